CREATE FUNCTION tollway_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only: % on transfers refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION tollway_refuse_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION tollway_refuse_change();

-- One round trip per transfer on the hot path: debit (guarded when asked),
-- credit (creating the account on first use) and the journal row, together.
-- Returns false, changing nothing, when a guarded debit would go below zero.
-- A repeated idempotency key raises unique_violation (the caller's batch retries alone).
CREATE FUNCTION tollway_transfer(
    p_id TEXT, p_asset TEXT, p_debit TEXT, p_debit_kind TEXT, p_debit_owner TEXT,
    p_credit TEXT, p_credit_kind TEXT, p_credit_owner TEXT, p_amount BIGINT, p_kind TEXT,
    p_usage TEXT, p_payment TEXT, p_hold TEXT, p_idem TEXT, p_guard BOOLEAN, p_now BIGINT
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    IF p_guard THEN
        UPDATE accounts SET balance = balance - p_amount
         WHERE id = p_debit AND balance >= p_amount;
        IF NOT FOUND THEN
            RETURN FALSE;
        END IF;
    ELSE
        INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at)
             VALUES (p_debit, p_asset, p_debit_kind, p_debit_owner, -p_amount, p_now)
        ON CONFLICT (id) DO UPDATE SET balance = accounts.balance - p_amount;
    END IF;
    INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at)
         VALUES (p_credit, p_asset, p_credit_kind, p_credit_owner, p_amount, p_now)
    ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + p_amount;
    INSERT INTO transfers (id, asset, debit_account, credit_account, amount, kind,
                           usage_id, payment_id, hold_id, idempotency_key, created_at)
         VALUES (p_id, p_asset, p_debit, p_credit, p_amount, p_kind,
                 p_usage, p_payment, p_hold, p_idem, p_now);
    RETURN TRUE;
END $$;
