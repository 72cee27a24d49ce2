-- Portable core schema (PostgreSQL and SQLite). Times are integer milliseconds
-- since the epoch; amounts are integers in the asset's smallest unit.

CREATE TABLE api_keys (
    key_id          TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL,
    role            TEXT NOT NULL,
    rate_limit      INTEGER NOT NULL,
    wallet_address  TEXT,
    secret_hash     TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active',
    created_at      BIGINT NOT NULL
);
CREATE INDEX api_keys_owner ON api_keys (owner_id);

CREATE TABLE providers (
    provider_id     TEXT PRIMARY KEY,
    registered_at   BIGINT NOT NULL
);

CREATE TABLE services (
    id              TEXT PRIMARY KEY,
    provider_id     TEXT NOT NULL,
    name            TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    endpoint        TEXT NOT NULL,
    price_units     BIGINT NOT NULL,
    asset           TEXT NOT NULL,
    payment_method  TEXT NOT NULL,
    free_tier_calls INTEGER NOT NULL DEFAULT 0,
    allow_anonymous INTEGER NOT NULL DEFAULT 0,
    category        TEXT NOT NULL DEFAULT '',
    tags            TEXT NOT NULL DEFAULT '[]',
    status          TEXT NOT NULL DEFAULT 'active',
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX services_provider ON services (provider_id);
CREATE INDEX services_status ON services (status, created_at);

-- Cached balances. The journal (transfers) is the record; verify checks they agree.
CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    asset           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    owner_id        TEXT,
    balance         BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);
CREATE INDEX accounts_owner ON accounts (owner_id);

-- The append-only journal. A trigger refuses UPDATE and DELETE.
CREATE TABLE transfers (
    id              TEXT PRIMARY KEY,
    asset           TEXT NOT NULL,
    debit_account   TEXT NOT NULL,
    credit_account  TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount > 0),
    kind            TEXT NOT NULL,
    usage_id        TEXT,
    payment_id      TEXT,
    hold_id         TEXT,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL,
    CHECK (debit_account <> credit_account)
);
CREATE INDEX transfers_debit ON transfers (debit_account, created_at);
CREATE INDEX transfers_credit ON transfers (credit_account, created_at);
CREATE INDEX transfers_usage ON transfers (usage_id);

-- Two-phase charges. The money sits in the asset's holding account meanwhile.
CREATE TABLE holds (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    asset           TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount > 0),
    status          TEXT NOT NULL,
    usage_id        TEXT,
    expires_at      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    resolved_at     BIGINT
);
CREATE INDEX holds_pending ON holds (status, expires_at);

CREATE TABLE free_tier_usage (
    buyer_id        TEXT NOT NULL,
    service_id      TEXT NOT NULL,
    used            INTEGER NOT NULL,
    PRIMARY KEY (buyer_id, service_id)
);

CREATE TABLE usage_records (
    id              TEXT PRIMARY KEY,
    buyer_id        TEXT NOT NULL,
    service_id      TEXT NOT NULL,
    provider_id     TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    asset           TEXT NOT NULL,
    free_tier       INTEGER NOT NULL,
    payment_method  TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    upstream_status INTEGER,
    latency_ms      DOUBLE PRECISION,
    bytes_in        BIGINT NOT NULL DEFAULT 0,
    bytes_out       BIGINT NOT NULL DEFAULT 0,
    request_id      TEXT,
    hold_id         TEXT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX usage_buyer ON usage_records (buyer_id, created_at);
CREATE INDEX usage_service ON usage_records (service_id, created_at);
CREATE INDEX usage_provider ON usage_records (provider_id, created_at);

CREATE TABLE idempotency_keys (
    buyer_id        TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    state           TEXT NOT NULL,
    usage_id        TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (buyer_id, idem_key)
);

-- Every external payment, unique per rail: one payment credits once, ever.
CREATE TABLE payments (
    id              TEXT PRIMARY KEY,
    rail            TEXT NOT NULL,
    external_ref    TEXT NOT NULL,
    owner_id        TEXT,
    asset           TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    status          TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT '{}',
    created_at      BIGINT NOT NULL,
    UNIQUE (rail, external_ref)
);
