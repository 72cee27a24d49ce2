-- Balance leases (issue 12): a worker reserves a slice of a hot buyer's balance
-- as one hold of kind 'lease', spends it call by call in memory, and writes the
-- calls' usage and captures in batches. ``captured`` is what those batches have
-- posted out of the hold so far; the holding account carries amount - captured
-- of each pending hold. A lease is closed (rest released) when idle, or expires
-- back like any hold when its worker dies; each batch pushes its expiry on.
ALTER TABLE holds ADD COLUMN kind TEXT NOT NULL DEFAULT 'call';
ALTER TABLE holds ADD COLUMN captured BIGINT NOT NULL DEFAULT 0;
-- Set by another worker that found the wallet empty while this lease held money:
-- the owning worker stops spending from it and closes it, so the money is
-- found where the next call looks (the wallet).
ALTER TABLE holds ADD COLUMN recalled_at BIGINT;
CREATE INDEX holds_leases ON holds (account_id, status) WHERE kind = 'lease';

-- The same for free-tier calls: a worker takes ``slots`` of a buyer's free calls
-- on a service at once (free_tier_usage.used grows by them), counts ``used``
-- up in memory, and gives back slots - used when it closes; a dead worker's
-- slots come back at expiry.
CREATE TABLE free_tier_leases (
    id              TEXT PRIMARY KEY,
    buyer_id        TEXT NOT NULL,
    service_id      TEXT NOT NULL,
    slots           INTEGER NOT NULL CHECK (slots > 0),
    used            INTEGER NOT NULL DEFAULT 0,
    status          TEXT NOT NULL,
    expires_at      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    resolved_at     BIGINT,
    recalled_at     BIGINT
);
CREATE INDEX free_tier_leases_buyer ON free_tier_leases (buyer_id, service_id, status);
CREATE INDEX free_tier_leases_pending ON free_tier_leases (status, expires_at);
