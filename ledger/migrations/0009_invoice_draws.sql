-- A prepaid batch is drawn at most batch_target - 1 times after the paying call
-- (billing.invoices.draw counts them with a conditional UPDATE), and only until
-- draws_until: a paid invoice id is not a key to its owner's wallet forever.
ALTER TABLE invoices ADD COLUMN draws_used BIGINT NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN draws_until BIGINT NOT NULL DEFAULT 0;
