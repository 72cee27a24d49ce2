-- Card money (issue 10): every Stripe card payment credited to a wallet, when it
-- settles, and how much of it was taken back by refunds and disputes. The money
-- itself moves only in ``transfers``; this is the state around it.
--
-- One row per PaymentIntent, written in the transaction of its one credit.
-- Until ``settles_at`` its amount (less what was taken back) cannot leave the
-- wallet. A refund or dispute that arrives before the credit (Stripe does not
-- order events) makes the row first, with ``payment_id`` NULL, and the credit
-- applies it.
--
-- ``refunded`` is the highest cumulative ``amount_refunded`` seen and ``disputed``
-- the highest disputed amount (a charge has one dispute), so repeated or
-- out-of-order events never count twice. ``reversed`` is what was taken back in
-- the ledger: min(amount, refunded + disputed), never more than the payment.
CREATE TABLE card_funds (
    payment_intent_id   TEXT PRIMARY KEY,
    payment_id          TEXT UNIQUE,
    owner_id            TEXT,
    asset               TEXT,
    amount              BIGINT,
    settles_at          BIGINT NOT NULL DEFAULT 0,
    refunded            BIGINT NOT NULL DEFAULT 0,
    disputed            BIGINT NOT NULL DEFAULT 0,
    reversed            BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    CHECK (reversed >= 0 AND reversed <= COALESCE(amount, 0))
);
CREATE INDEX card_funds_settling ON card_funds (owner_id, asset, settles_at);

-- Card payments credited before this migration: refunds and disputes of them can
-- be taken back too, and they settle one default period (7 days) after their credit.
INSERT INTO card_funds (payment_intent_id, payment_id, owner_id, asset, amount, settles_at,
                        created_at, updated_at)
    SELECT external_ref, id, owner_id, asset, amount, created_at + 604800000, created_at, created_at
      FROM payments WHERE rail = 'stripe';
