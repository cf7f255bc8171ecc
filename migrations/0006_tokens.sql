-- API tokens (service/auth.py). A token is `kipam_<key id>_<secret>`: the key id finds the
-- row, the secret is checked against its salted SHA-256 hash (the secret is 256 random bits,
-- so a fast hash is enough; it is never stored). Revoked tokens stay for the audit trail.
CREATE TABLE tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The actor in the history of every change the token makes.
    name          text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$'),
    key_id        text NOT NULL UNIQUE CHECK (key_id ~ '^[0-9a-f]{16}$'),
    salt          bytea NOT NULL CHECK (length(salt) = 16),
    hash          bytea NOT NULL CHECK (length(hash) = 32),
    scope         text NOT NULL CHECK (scope IN ('read', 'allocate', 'admin')),
    -- Pool name patterns the token is limited to; empty: every pool. Admin tokens have none.
    pools         text[] NOT NULL DEFAULT '{}' CHECK (scope <> 'admin' OR pools = '{}'),
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
-- One live token per name (revoke frees the name).
CREATE UNIQUE INDEX tokens_live_name ON tokens (name) WHERE revoked_at IS NULL;
