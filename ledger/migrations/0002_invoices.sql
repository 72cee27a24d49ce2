-- Invoices of the 402 flow (invoice payments on EVM and Cardano), bound to the
-- request that minted them, consumed at most once.
CREATE TABLE invoices (
    id              TEXT PRIMARY KEY,
    service_id      TEXT NOT NULL,
    chain           TEXT NOT NULL,
    asset           TEXT NOT NULL,
    token           TEXT,
    amount          BIGINT NOT NULL,
    decimals        INTEGER NOT NULL,
    price           BIGINT NOT NULL,
    batch_target    INTEGER NOT NULL,
    pay_to          TEXT NOT NULL,
    outputs         TEXT NOT NULL DEFAULT '[]',
    partner         TEXT NOT NULL,
    wallet_address  TEXT,
    owner_id        TEXT NOT NULL,
    req_method      TEXT NOT NULL,
    req_path        TEXT NOT NULL,
    req_body_hash   TEXT NOT NULL,
    status          TEXT NOT NULL,
    payment_id      TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    paid_at         BIGINT
);
CREATE INDEX invoices_owner ON invoices (owner_id, status);
