-- An optional per-service limit: calls per minute from one caller to this service.
ALTER TABLE services ADD COLUMN rate_limit BIGINT;
