-- Card money given back (second review of issue 10): a refund that fails or is
-- canceled, and a dispute the merchant wins (or whose funds are reinstated),
-- return the money Stripe had taken from the platform, so Tollway gives it back
-- to the owner (the debt first, then the wallet). A running maximum cannot go
-- down, so each refund and dispute is now tracked by its Stripe id and status.
--
-- One row per refund (re_...) or dispute (dp_...) of a card payment. ``amount``
-- is what it is for; ``taken`` is what it takes back now: the amount while a
-- refund counts (pending, succeeded...), 0 once it failed or was canceled; the
-- disputed amount less the funds reinstated, 0 once the dispute is won. ``final``
-- is set by a status Stripe does not leave (refund failed or canceled, dispute
-- won or lost), so an older event delivered late changes nothing.
--
-- ``card_funds.reversed`` stays what the ledger has taken back, now
-- min(amount, what the parts take), and may go down. ``card_funds.refunded`` stays
-- the highest ``amount_refunded`` seen: refunds an event did not list count through
-- it. ``card_funds.disputed`` holds disputes recorded before this migration, which
-- have no part. ``steps`` numbers the ledger steps of a payment (its journal keys),
-- since with money given back the same total can be reached twice.
CREATE TABLE card_reversals (
    payment_intent_id   TEXT NOT NULL,
    part_id             TEXT NOT NULL,
    kind                TEXT NOT NULL,
    status              TEXT NOT NULL,
    amount              BIGINT NOT NULL,
    taken               BIGINT NOT NULL,
    final               INTEGER NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    PRIMARY KEY (payment_intent_id, part_id),
    CHECK (kind IN ('refund', 'dispute')),
    CHECK (taken >= 0 AND taken <= amount)
);

ALTER TABLE card_funds ADD COLUMN steps BIGINT NOT NULL DEFAULT 0;
