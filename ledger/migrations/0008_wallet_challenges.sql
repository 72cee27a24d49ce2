-- Sign-in challenges for wallets (billing.wallet_signin): each is used once.
CREATE TABLE wallet_challenges (
    nonce           TEXT PRIMARY KEY,
    chain           TEXT NOT NULL,
    address         TEXT NOT NULL,
    message         TEXT NOT NULL,
    expires_at      BIGINT NOT NULL,
    used_at         BIGINT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX wallet_challenges_expiry ON wallet_challenges (expires_at);
