-- Settlements (provider payouts) and the webhook outbox. Portable SQL; times
-- are integer milliseconds since the epoch, amounts integers in smallest units.

-- One settlement: a provider's charges of one asset in [period_start, period_end).
-- status: processing (items being gathered) -> pending (totals fixed, unpaid)
-- -> completed (payout posted). request_key makes the same request return the
-- same settlement.
CREATE TABLE settlements (
    id              TEXT PRIMARY KEY,
    provider_id     TEXT NOT NULL,
    asset           TEXT NOT NULL,
    period_start    BIGINT NOT NULL,
    period_end      BIGINT NOT NULL,
    request_key     TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL,
    gross           BIGINT NOT NULL DEFAULT 0,
    call_fee        BIGINT NOT NULL DEFAULT 0,
    fee             BIGINT NOT NULL DEFAULT 0,
    net             BIGINT NOT NULL DEFAULT 0,
    call_count      BIGINT NOT NULL DEFAULT 0,
    payment_tx      TEXT,
    created_at      BIGINT NOT NULL,
    finalized_at    BIGINT,
    paid_at         BIGINT
);
CREATE INDEX settlements_provider ON settlements (provider_id, created_at);
CREATE INDEX settlements_status ON settlements (status, created_at);

-- Each charge (usage record) belongs to at most one settlement, ever: the usage
-- id is the primary key, so neither a repeated nor an overlapping settlement
-- can count it twice, whatever runs concurrently.
CREATE TABLE settlement_items (
    usage_id        TEXT PRIMARY KEY,
    settlement_id   TEXT NOT NULL,
    gross           BIGINT NOT NULL,
    call_fee        BIGINT NOT NULL,
    fee_bps         INTEGER NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX settlement_items_settlement ON settlement_items (settlement_id);

-- Webhook subscriptions. The secret is kept in the clear because signing needs
-- it (an HMAC key cannot be hashed away); it is returned only at creation.
CREATE TABLE webhooks (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL,
    url             TEXT NOT NULL,
    events          TEXT NOT NULL,
    secret          TEXT NOT NULL,
    active          INTEGER NOT NULL DEFAULT 1,
    created_at      BIGINT NOT NULL,
    deleted_at      BIGINT
);
CREATE INDEX webhooks_owner ON webhooks (owner_id, active);

-- The durable outbox: one row per (event, subscription). status: pending ->
-- delivered | dead | cancelled. A worker claims a due row by pushing
-- next_attempt_at past a lease and writing its claim token.
CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY,
    webhook_id      TEXT NOT NULL,
    owner_id        TEXT NOT NULL,
    event           TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    claim           TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_owner ON webhook_deliveries (owner_id, status, created_at);
