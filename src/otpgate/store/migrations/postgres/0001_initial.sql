-- otpgate scale-out schema, version 1: the embedded (SQLite) schema's tables and meaning.
-- Timestamps are epoch seconds (DOUBLE PRECISION, exactly the Python floats the service uses);
-- names are compared byte-wise (COLLATE "C" in queries) so listings sort as in SQLite.
CREATE TABLE clients (
    client_id       TEXT PRIMARY KEY,
    display_name    TEXT NOT NULL DEFAULT '',
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    sandbox         BOOLEAN NOT NULL DEFAULT FALSE,
    channels        TEXT NOT NULL DEFAULT 'SMS,EMAIL',
    apis            TEXT NOT NULL DEFAULT 'initAuthentication,verifyAuthentication',
    rate_per_second INTEGER,
    created_at      DOUBLE PRECISION NOT NULL
);

CREATE TABLE client_keys (
    client_id   TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    key_version INTEGER NOT NULL,
    public_key  TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION,
    PRIMARY KEY (client_id, key_version)
);

-- failed_verifies, lockout_level, locked_until: the failure budget across challenges (§6).
-- Every transaction that changes a user's challenges locks this row first (see postgres.py).
CREATE TABLE users (
    user_id         TEXT PRIMARY KEY,
    status          TEXT NOT NULL DEFAULT 'NORMAL',
    phone           TEXT,
    email           TEXT,
    locale          TEXT,
    failed_verifies INTEGER NOT NULL DEFAULT 0,
    lockout_level   INTEGER NOT NULL DEFAULT 0,
    locked_until    DOUBLE PRECISION NOT NULL DEFAULT 0,
    created_at      DOUBLE PRECISION NOT NULL
);

-- Tokens are stored as SHA-256 hashes only.
CREATE TABLE tokens (
    token_hash BYTEA PRIMARY KEY,
    client_id  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
);

-- code_mac = HMAC-SHA-256(secret[key_id], client ‖ request id ‖ code); the code itself is never stored.
CREATE TABLE challenges (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id    TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    channel      TEXT NOT NULL,
    params_hash  BYTEA NOT NULL,
    code_mac     BYTEA NOT NULL,
    key_id       TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'passed', 'exhausted', 'superseded')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    finished_at  DOUBLE PRECISION,
    UNIQUE (client_id, request_id)
);
CREATE INDEX challenges_by_user ON challenges (user_id, created_at);
CREATE INDEX challenges_pending ON challenges (client_id, user_id) WHERE state = 'pending';

-- payload: the sealed (AES-GCM) subject and text; wiped once delivered, failed or expired.
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    challenge_id    BIGINT NOT NULL,
    client_id       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    destination     TEXT NOT NULL,
    provider        TEXT NOT NULL,
    payload         BYTEA,
    status          TEXT NOT NULL DEFAULT 'queued',
    tries           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until     DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    expires_at      DOUBLE PRECISION NOT NULL,
    finished_at     DOUBLE PRECISION
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'queued';

-- The local (dev/sandbox) provider's mailbox; text sealed like the outbox payload.
CREATE TABLE inbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id   BIGINT NOT NULL UNIQUE,
    client_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    channel     TEXT NOT NULL,
    destination TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX inbox_by_user ON inbox (user_id, id);

-- Append-only, hash-chained record of every init/verify outcome (no secrets).
-- row_hash = sha256(prev_hash || content_digest), the digest computed by the service.
CREATE TABLE audit (
    seq         BIGINT PRIMARY KEY,
    at          DOUBLE PRECISION NOT NULL,
    api         TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    request_id  TEXT,
    user_id     TEXT,
    result_code TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    prev_hash   BYTEA NOT NULL,
    row_hash    BYTEA NOT NULL
);

-- The chain's tip, one row. Appending updates it in the statement that inserts the audit row,
-- so concurrent writers extend one chain, serialised by this row's lock until they commit.
CREATE TABLE audit_head (
    only_row  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    seq       BIGINT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL
);
INSERT INTO audit_head (seq, prev_hash, hash)
VALUES (0, decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'));
