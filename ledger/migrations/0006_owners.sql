-- Owner ids, claimed once: the first key of an owner creates the row, so two
-- concurrent first mints for one owner id cannot both succeed.
CREATE TABLE owners (
    owner_id        TEXT PRIMARY KEY,
    created_at      BIGINT NOT NULL
);
INSERT INTO owners (owner_id, created_at)
    SELECT owner_id, MIN(created_at) FROM api_keys GROUP BY owner_id;
