-- Wallet flows (issue 5): Stripe events and customers, auto top-up state, withdrawals.
-- Money itself only ever moves in ``transfers``; these tables hold the state of
-- the flows around it. Times are integer milliseconds since the epoch.

-- Every Stripe event id we processed: a redelivered event is answered 200 and
-- does nothing. The credit itself is keyed by PaymentIntent in ``payments``.
CREATE TABLE stripe_events (
    event_id        TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    received_at     BIGINT NOT NULL
);

-- One Stripe identity per Tollway owner: the Customer that holds saved cards
-- (auto top-up) and the Connect account that receives provider payouts.
CREATE TABLE stripe_customers (
    owner_id            TEXT PRIMARY KEY,
    customer_id         TEXT,
    card_saved          INTEGER NOT NULL DEFAULT 0,
    connect_account_id  TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL
);

-- Auto top-up, one row per owner. ``state`` is the state machine:
--   idle -> triggered (a charge took the balance below threshold; written by the
--   finish hook in the charge's own transaction) -> charging (a worker claimed it)
--   -> idle (credited, or declined: cooldown_until set) | processing (Stripe is
--   still working; the webhook credits and returns it to idle) | triggered again
--   (outcome unknown: retried at retry_at with the same episode, hence the same
--   idempotency key).
-- ``episode`` grows by one per trigger; the Stripe idempotency key is
-- (owner, episode), so retries of one episode can never charge twice.
CREATE TABLE auto_topups (
    owner_id            TEXT PRIMARY KEY,
    asset               TEXT NOT NULL,
    threshold           BIGINT NOT NULL,
    amount              BIGINT NOT NULL,
    enabled             INTEGER NOT NULL,
    state               TEXT NOT NULL DEFAULT 'idle',
    episode             BIGINT NOT NULL DEFAULT 0,
    retry_at            BIGINT NOT NULL DEFAULT 0,
    cooldown_until      BIGINT NOT NULL DEFAULT 0,
    claimed_at          BIGINT NOT NULL DEFAULT 0,
    payment_intent_id   TEXT,
    last_error          TEXT,
    updated_at          BIGINT NOT NULL
);
CREATE INDEX auto_topups_state ON auto_topups (state, retry_at);

-- Withdrawals: on chain (hold -> payout -> post or void) and to Stripe Connect
-- (debit -> transfer -> done or reversed). ``unknown`` means the payout may or
-- may not have happened: the money stays out of the wallet until reconciled.
CREATE TABLE withdrawals (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL,
    method          TEXT NOT NULL,
    asset           TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount > 0),
    source_account  TEXT NOT NULL,
    destination     TEXT NOT NULL,
    chain           TEXT,
    status          TEXT NOT NULL,
    hold_id         TEXT,
    tx_hash         TEXT UNIQUE,
    from_block      BIGINT,
    transfer_id     TEXT,
    error           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX withdrawals_owner ON withdrawals (owner_id, created_at);
CREATE INDEX withdrawals_status ON withdrawals (status, updated_at);
