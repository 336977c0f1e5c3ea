-- otpgate embedded schema, version 1.
CREATE TABLE clients (
    client_id       TEXT PRIMARY KEY,
    display_name    TEXT NOT NULL DEFAULT '',
    enabled         INTEGER NOT NULL DEFAULT 1,
    sandbox         INTEGER NOT NULL DEFAULT 0,
    channels        TEXT NOT NULL DEFAULT 'SMS,EMAIL',
    apis            TEXT NOT NULL DEFAULT 'initAuthentication,verifyAuthentication',
    rate_per_second INTEGER,
    created_at      REAL NOT NULL
);

CREATE TABLE client_keys (
    client_id   TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    key_version INTEGER NOT NULL,
    public_key  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL,
    PRIMARY KEY (client_id, key_version)
);

CREATE TABLE users (
    user_id         TEXT PRIMARY KEY,
    status          TEXT NOT NULL DEFAULT 'NORMAL',
    phone           TEXT,
    email           TEXT,
    locale          TEXT,
    failed_verifies INTEGER NOT NULL DEFAULT 0,
    lockout_level   INTEGER NOT NULL DEFAULT 0,
    locked_until    REAL NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL
);

-- Tokens are stored as SHA-256 hashes only.
CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY,
    client_id  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    created_at REAL NOT NULL
);

-- code_mac = HMAC-SHA-256(secret[key_id], client ‖ request id ‖ code); the code itself is never stored.
CREATE TABLE challenges (
    id           INTEGER PRIMARY KEY,
    client_id    TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    channel      TEXT NOT NULL,
    params_hash  BLOB NOT NULL,
    code_mac     BLOB NOT NULL,
    key_id       TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    finished_at  REAL,
    UNIQUE (client_id, request_id)
);
CREATE INDEX challenges_by_user ON challenges (user_id, created_at);
CREATE INDEX challenges_pending ON challenges (client_id, user_id) WHERE state = 'pending';

-- payload: the sealed (AES-GCM) subject and text; wiped once delivered, failed or expired.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    challenge_id    INTEGER NOT NULL,
    client_id       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    destination     TEXT NOT NULL,
    provider        TEXT NOT NULL,
    payload         BLOB,
    status          TEXT NOT NULL DEFAULT 'queued',
    tries           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until     REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    finished_at     REAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'queued';

-- The local (dev/sandbox) provider's mailbox; text sealed like the outbox payload.
CREATE TABLE inbox (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER NOT NULL UNIQUE,
    client_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    channel     TEXT NOT NULL,
    destination TEXT NOT NULL,
    payload     BLOB NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX inbox_by_user ON inbox (user_id, id);

-- Append-only, hash-chained record of every init/verify outcome (no secrets).
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    api         TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    request_id  TEXT,
    user_id     TEXT,
    result_code TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    prev_hash   BLOB NOT NULL,
    row_hash    BLOB NOT NULL
);
