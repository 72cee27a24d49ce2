-- A signed Cardano transaction that Tollway itself submitted for an invoice, and
-- when: it pays that invoice once confirmed, even if confirmation comes after the
-- invoice's expiry (the buyer paid in time; the chain was slow).
ALTER TABLE invoices ADD COLUMN submitted_tx TEXT;
ALTER TABLE invoices ADD COLUMN submitted_at BIGINT;
