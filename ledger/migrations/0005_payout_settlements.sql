-- Provider payouts pay settlements: a withdrawal from earnings (on chain or
-- through Stripe Connect) pays one or more settled-but-unpaid settlements of
-- its provider, so the settlements stay the one record of what a provider is
-- owed and was paid.
--
-- settlements.withdrawal_id is the withdrawal paying (status 'paying') or that
-- paid (status 'completed') the settlement; NULL for a settlement paid outside
-- Tollway (PATCH /settlements/{id}/pay) or not paid yet. A failed payout sets
-- the settlement back to 'pending' and clears it.
ALTER TABLE settlements ADD COLUMN withdrawal_id TEXT;
CREATE INDEX settlements_withdrawal ON settlements (withdrawal_id);

-- Which settlements each withdrawal was made for (kept after a failed payout,
-- as the history of the attempt), with each settlement's net at the time.
CREATE TABLE withdrawal_settlements (
    withdrawal_id   TEXT NOT NULL,
    settlement_id   TEXT NOT NULL,
    net             BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (withdrawal_id, settlement_id)
);
CREATE INDEX withdrawal_settlements_settlement ON withdrawal_settlements (settlement_id);
