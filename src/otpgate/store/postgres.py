"""The scale-out store: PostgreSQL through an asyncpg pool, for several nodes sharing one database.

It answers exactly as ``SqliteStore`` (the reference semantics); one contract test suite
(tests/store/) runs against both. SQLite gets exactness for free by serialising writers;
here many nodes write at once under READ COMMITTED, so each atomic operation is built from
conditional writes whose conditions PostgreSQL re-checks on the newest row version. Row locks
live within one statement, except in init's short transaction (below), which holds one user's
row for two more round trips; nothing is locked while Python computes.

**The user row is the serialisation point for everything about one user.** Every statement or
transaction that changes a user's challenges locks that user's ``users`` row first (init with
``SELECT … FOR UPDATE``, verify with a ``FOR UPDATE`` CTE, ``delete_user`` by deleting it).
So two inits for one user, or an init and a verify, take turns, and each then decides on the
latest committed state: the send limits, the lockout and the failure budget are exact across
nodes, which they must be (PROTOCOL.md §6). Locks are always taken in the same order (user row,
then challenge rows, then the audit head), so these operations cannot deadlock.

**verify** (``attempt_verification``): 2 round trips, no explicit transaction.
  1. ``SELECT user_id`` of the challenge (an index read, no lock). The audit row names the user,
     and its content digest is computed in Python, so the user must be known first; a challenge
     never changes hands, so this read cannot go stale.
  2. One statement of CTEs: lock the user row; claim an attempt, compare and pass or exhaust
     in one conditional ``UPDATE challenges … RETURNING`` (the MACs of the submitted value were
     computed before touching the store); if nothing was claimed, re-read the challenge
     ``FOR SHARE`` (which sees the newest committed version, not the statement's snapshot)
     to say why; charge or reset the failure budget with ``UPDATE users`` from the locked row;
     append the audit row. All row locks end with that statement's implicit commit.

**init** (``create_challenge``): 4 round trips, one short transaction: ``BEGIN``; lock the user
row; one statement of CTEs (replay check, lockout, send limits, ``INSERT … ON CONFLICT
(client_id, request_id) DO NOTHING RETURNING id``, supersede the user's pending challenge for
this client, queue the sealed message, append the audit row); ``COMMIT``. The lock must be its
own statement: under READ COMMITTED each statement reads a snapshot taken when it starts, and
the limit checks must see every challenge committed by whoever held the lock before us.
Concurrent inits with one id but *different* users are not serialised by the lock; the unique
index settles them (``DO NOTHING``), and the loser reads the winner's params_hash to answer
REPLAYED or CONFLICT (2 more round trips, only in that race; 1 more if the user row is gone,
when an advisory lock on the user id stands in for it).

Round trips are counted with prepared statements cached (the first use of each statement on
a connection adds one to prepare it); releasing a connection to the pool sends nothing
(``_keep_session``). Measured on localhost: verify about 1.2 ms, init about 3.5 ms, most of it
the commit's WAL flush.

**Audit chain.** ``audit_head`` is a single row holding the chain's tip. Each audit row is
appended by ``UPDATE audit_head SET seq = seq + 1, hash = sha256(hash || digest) RETURNING …``
feeding an ``INSERT INTO audit`` in the same statement, which is the last statement before
commit, so rows form one chain with no lock held across a round trip except the ``COMMIT`` of
an init. The price: init and verify commits take turns on that row (throughput is bounded by
the commit latency), which a single hash chain cannot avoid.

**Outbox.** Claims pick due rows with ``FOR UPDATE SKIP LOCKED`` inside the claiming
``UPDATE`` and lease them (``lease_until``), exactly as the SQLite store does.

**Failures.** Commands time out after ``command_timeout`` (5 s) and connects after
``connect_timeout`` (5 s). Lost connections, timeouts and refused connects raise
``StoreUnavailable``; the pool replaces dead connections on the next acquire, so the store
recovers by itself when PostgreSQL comes back.

**Schema.** ``connect(url, sealer, schema="otpgate")`` or a ``schema`` query parameter in the
URL (``postgresql://host/db?schema=otpgate``, removed before the URL reaches asyncpg) sets
``search_path`` on every pooled connection; the schema must exist. Other query parameters that
asyncpg does not know become server settings, e.g. ``application_name``. Prepared statements
are cached per connection, so a transaction-pooling PgBouncer in front is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from otpgate.core.models import (
    AccessToken,
    AuditEvent,
    Client,
    ClientKey,
    FailurePolicy,
    InitDecision,
    InitStatus,
    NewChallenge,
    SendLimits,
    User,
    UserStatus,
    VerifyDecision,
    VerifyStatus,
)
from otpgate.store.audit import AuditRow, content_digest

# Shared with the embedded store, so both stores answer and audit alike.
from otpgate.store.common import (
    audit_with_code,
    client_from_row,
    migrations,
    verify_result_code,
)
from otpgate.store.errors import StoreConflict, StoreUnavailable
from otpgate.store.records import ClaimedMessage, InboxMessage, OutboxEntry, UserRecord
from otpgate.store.sealing import Sealer

_PAYLOAD_CONTEXT = b"otpgate-outbox"
_INBOX_CONTEXT = b"otpgate-inbox"

_MIGRATION_LOCK = int.from_bytes(b"otpgate", "big")
"""``pg_advisory_xact_lock`` key held while migrating, so nodes starting at once take turns."""

_MIGRATION_TIMEOUT = 300.0
"""Seconds a migration statement (or the wait for that lock) may take, beyond command_timeout."""

_USER_LOCK_CLASS = int.from_bytes(b"ou", "big")
"""First key of the advisory lock that stands in for a missing user row (see create_challenge)."""

_MAX_LOCKOUT_LEVEL = 32
"""``FailurePolicy.lockout_for`` stops growing here; the statement indexes a table of it."""


class _Query:
    """SQL written with ``:name`` placeholders, compiled once to asyncpg's ``$n`` form.

    The init and verify statements take two dozen parameters; names keep them readable and a
    missing or misspelt one fails loudly instead of binding the wrong value.
    """

    _PLACEHOLDER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")

    def __init__(self, text: str) -> None:
        self.names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.names:
                self.names.append(name)
            return f"${self.names.index(name) + 1}"

        self.text = self._PLACEHOLDER.sub(number, text)

    def args(self, **values: Any) -> list[Any]:
        if set(values) != set(self.names):
            missing, extra = set(self.names) - set(values), set(values) - set(self.names)
            raise TypeError(f"query parameters: missing {sorted(missing)}, extra {sorted(extra)}")
        return [values[name] for name in self.names]


# Appends one audit row. The statement using it defines ``entry (code, digest)``: zero rows
# appends nothing, one row extends the chain. Placed last in the statement and fed by every
# other CTE, so the audit head is the last row the statement locks.
_APPEND_AUDIT = """
head AS (
    UPDATE audit_head
    SET seq = audit_head.seq + 1,
        prev_hash = audit_head.hash,
        hash = sha256(audit_head.hash || entry.digest)
    FROM entry
    RETURNING audit_head.seq, audit_head.prev_hash, audit_head.hash, entry.code
),
logged AS (
    INSERT INTO audit (seq, at, api, client_id, request_id, user_id, result_code, detail,
                       prev_hash, row_hash)
    SELECT seq, :at::float8, :api::text, :audit_client::text, :audit_request::text,
           :audit_user::text, code, :detail::text, prev_hash, hash
    FROM head
    RETURNING seq
)"""

_RECORD_AUDIT = _Query(
    f"""
WITH entry AS (SELECT :code::text AS code, :digest::bytea AS digest),
{_APPEND_AUDIT}
SELECT seq FROM logged
"""
)

# The audit entry for the outcome the statement reaches, from digests precomputed per status.
_CHOSEN_ENTRY = """
    SELECT choice.code, choice.digest
    FROM unnest(:statuses::text[], :codes::text[], :digests::bytea[])
         AS choice (status, code, digest)
    WHERE choice.status = (SELECT status FROM outcome)"""

_INIT = _Query(
    f"""
WITH prior AS (
    SELECT params_hash FROM challenges WHERE client_id = :client_id AND request_id = :request_id
),
gate AS (
    -- The same order of checks as SqliteStore._init_refusal.
    SELECT CASE
        WHEN EXISTS (SELECT FROM prior) THEN
            CASE WHEN (SELECT params_hash FROM prior) = :params_hash::bytea
                 THEN 'REPLAYED' ELSE 'CONFLICT' END
        WHEN COALESCE((SELECT locked_until FROM users WHERE user_id = :user_id), 0)
             > :now::float8 THEN 'LOCKED'
        WHEN :min_interval::int > 0 AND EXISTS (
            SELECT FROM challenges
            WHERE user_id = :user_id AND created_at > :now - :min_interval) THEN 'SEND_INTERVAL'
        WHEN :max_per_window::int > 0 AND (
            SELECT count(*) FROM challenges
            WHERE user_id = :user_id AND created_at > :now - :window_seconds::int
        ) >= :max_per_window THEN 'SEND_WINDOW'
        ELSE 'CREATED'
    END AS status
),
created AS (
    INSERT INTO challenges (client_id, request_id, user_id, channel, params_hash, code_mac,
                            key_id, max_attempts, created_at, expires_at)
    SELECT :client_id, :request_id, :user_id, :channel, :params_hash, :code_mac, :key_id,
           :max_attempts, :now, :expires_at
    FROM gate WHERE status = 'CREATED'
    ON CONFLICT (client_id, request_id) DO NOTHING
    RETURNING id
),
superseded AS (
    -- Newest wins. The row inserted above is invisible to this statement's snapshot.
    UPDATE challenges SET state = 'superseded', finished_at = :now
    FROM created
    WHERE challenges.client_id = :client_id AND challenges.user_id = :user_id
      AND challenges.state = 'pending' AND challenges.id <> created.id
    RETURNING challenges.id
),
queued AS (
    INSERT INTO outbox (challenge_id, client_id, user_id, channel, destination, provider,
                        payload, next_attempt_at, created_at, expires_at)
    SELECT id, :client_id, :user_id, :channel, :destination, :provider, :payload, :now, :now,
           :expires_at
    FROM created
    RETURNING id
),
outcome AS (
    -- RACED: the gate saw no such id, yet a concurrent init (another user's, so not held
    -- back by our lock) inserted it first. The caller reads the winner's params_hash.
    SELECT CASE WHEN gate.status = 'CREATED' AND NOT EXISTS (SELECT FROM created)
                THEN 'RACED' ELSE gate.status END AS status,
           (SELECT id FROM queued) AS outbox_id,
           (SELECT count(*) FROM superseded) AS superseded
    FROM gate
),
entry AS ({_CHOSEN_ENTRY}
),
{_APPEND_AUDIT}
SELECT outcome.status, outcome.outbox_id, logged.seq
FROM outcome LEFT JOIN logged ON TRUE
"""
)

_VERIFY = _Query(
    f"""
WITH owner AS (
    -- Serialise with every other writer of this user's challenges; FOR UPDATE returns the
    -- newest committed version, so the lockout and budget below are decided on current data.
    SELECT failed_verifies, lockout_level, locked_until
    FROM users WHERE user_id = :user_id
    FOR UPDATE
),
claim AS (
    -- Spend an attempt and compare in one step: any number of concurrent guesses evaluates
    -- at most max_attempts (PROTOCOL.md §6).
    UPDATE challenges SET
        attempts = attempts + 1,
        state = CASE WHEN code_mac = ANY(:value_macs::bytea[]) THEN 'passed'
                     WHEN attempts + 1 >= max_attempts THEN 'exhausted'
                     ELSE 'pending' END,
        finished_at = CASE WHEN code_mac = ANY(:value_macs) OR attempts + 1 >= max_attempts
                           THEN :now::float8 END
    WHERE client_id = :client_id AND request_id = :request_id
      AND state = 'pending' AND expires_at > :now
      AND COALESCE((SELECT locked_until FROM owner), 0) <= :now
    RETURNING state, max_attempts - attempts AS attempts_left
),
seen AS (
    -- Why no attempt was claimed. A plain read would use the statement's snapshot, which
    -- predates our wait for the owner lock; FOR SHARE reads the newest committed version.
    SELECT state, expires_at, code_mac = ANY(:value_macs) AS same_value
    FROM challenges
    WHERE client_id = :client_id AND request_id = :request_id AND NOT EXISTS (SELECT FROM claim)
    FOR SHARE
),
outcome AS (
    -- The same answers as SqliteStore._charge_user and classify_unclaimed.
    SELECT
        CASE
            WHEN claim.state = 'passed' THEN 'PASSED'
            WHEN claim.state = 'exhausted' THEN 'EXHAUSTED'
            WHEN claim.state = 'pending' THEN 'UNMATCHED'
            WHEN seen.state IS NULL THEN 'UNKNOWN'
            WHEN seen.state = 'passed' THEN
                CASE WHEN seen.same_value THEN 'REPLAYED' ELSE 'USED' END
            WHEN seen.state = 'exhausted' THEN 'EXHAUSTED'
            WHEN seen.state = 'superseded' THEN 'SUPERSEDED'
            WHEN seen.expires_at <= :now THEN 'EXPIRED'
            WHEN COALESCE(owner.locked_until, 0) > :now THEN 'LOCKED'
            ELSE 'UNKNOWN'
        END AS status,
        CASE WHEN claim.state IN ('pending', 'exhausted') THEN claim.attempts_left ELSE 0 END
            AS attempts_left,
        claim.state AS claimed,
        COALESCE(claim.state <> 'passed' AND :budget::int > 0
                 AND owner.failed_verifies + 1 >= :budget, FALSE) AS locks,
        owner.failed_verifies,
        owner.lockout_level
    FROM (VALUES (TRUE)) AS always (x)
    LEFT JOIN claim ON TRUE
    LEFT JOIN seen ON TRUE
    LEFT JOIN owner ON TRUE
),
charged AS (
    -- The failure budget across challenges: a pass resets it; a failure that uses it up
    -- locks the user for lockout_for(level), looked up in :lockouts (computed by the policy).
    UPDATE users SET
        failed_verifies = CASE WHEN outcome.claimed = 'passed' OR outcome.locks THEN 0
                               ELSE outcome.failed_verifies + 1 END,
        lockout_level = CASE WHEN outcome.claimed = 'passed' THEN 0
                             WHEN outcome.locks THEN outcome.lockout_level + 1
                             ELSE outcome.lockout_level END,
        locked_until = CASE
            WHEN outcome.locks THEN
                :now + (:lockouts::float8[])[LEAST(outcome.lockout_level, {_MAX_LOCKOUT_LEVEL}) + 1]
            ELSE users.locked_until END
    FROM outcome
    WHERE users.user_id = :user_id AND outcome.claimed IS NOT NULL
    RETURNING users.user_id
),
entry AS (
    -- Joined with charged only so the user row is written before the audit head is locked.
    SELECT chosen.code, chosen.digest
    FROM ({_CHOSEN_ENTRY}
    ) AS chosen
    LEFT JOIN charged ON TRUE
),
{_APPEND_AUDIT}
SELECT outcome.status, outcome.attempts_left, outcome.locks, logged.seq
FROM outcome LEFT JOIN logged ON TRUE
"""
)

_CLAIM_DUE = _Query(
    """
WITH due AS MATERIALIZED (
    SELECT id FROM outbox
    WHERE status = 'queued' AND next_attempt_at <= :now::float8 AND lease_until <= :now
    ORDER BY next_attempt_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox SET lease_until = :lease_until::float8, tries = tries + 1
FROM due
WHERE outbox.id = due.id
RETURNING outbox.id, client_id, user_id, channel, destination, provider, payload, tries,
          expires_at
"""
)

_CLIENT_COLUMNS = """
    client_id, enabled, sandbox, display_name, channels, apis, rate_per_second,
    ARRAY(SELECT key_version FROM client_keys k
          WHERE k.client_id = c.client_id AND revoked_at IS NULL ORDER BY key_version)
        AS key_versions,
    ARRAY(SELECT public_key FROM client_keys k
          WHERE k.client_id = c.client_id AND revoked_at IS NULL ORDER BY key_version)
        AS public_keys"""


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # command_timeout, connect timeout, pool acquire timeout
    asyncpg.PostgresConnectionError,  # class 08, including connections lost mid-operation
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, terminated, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # 40: deadlock or serialisation; retryable
    # The driver lost track of the protocol, e.g. the server's "terminating connection"
    # arrived mid-statement ("cannot switch to state …"): that connection is gone.
    asyncpg.InternalClientError,
)


def _is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot answer now" rather than a bug or bad data."""
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "pool is closing"; not DataError and the like (ValueErrors:
        # a value of the wrong type is a bug to surface, not an outage to retry).
        return not isinstance(exc, ValueError)
    return isinstance(exc, _UNAVAILABLE)


async def _keep_session(conn: Any) -> None:
    """Pool release hook that sends nothing.

    asyncpg's default sends ``RESET ALL``, ``UNLISTEN *``… on every release: a round trip per
    store call. This store leaves no session state behind (no SET, LISTEN, cursor or session
    advisory lock), and asyncpg still rolls back a transaction left open before calling this.
    """


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take a ``schema`` query parameter out of the URL (asyncpg would send it as a setting)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for key, value in query if key == "schema"), None)
    kept = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=kept)), schema


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _affected(status: str) -> int:
    """Row count from a command status such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore:
    """The ``Store`` on PostgreSQL; open it with ``PostgresStore.connect``."""

    def __init__(self, pool: Any, sealer: Sealer, *, acquire_timeout: float = 5.0) -> None:
        self._pool = pool
        self._sealer = sealer
        self._acquire_timeout = acquire_timeout

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        sealer: Sealer,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> PostgresStore:
        """Open a pool of ``min_size`` to ``max_size`` connections. The first ``min_size`` are
        opened now, so an unreachable server raises ``StoreUnavailable`` here rather than on
        the first request.

        ``schema`` (or ``?schema=`` in the URL; the keyword wins) becomes the ``search_path``.
        """
        dsn, url_schema = _split_schema(url)
        schema = schema or url_schema
        # The atomic operations rely on READ COMMITTED, whatever the server's default is.
        settings = {"default_transaction_isolation": "read committed"}
        if schema:
            settings["search_path"] = _quote_ident(schema)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                timeout=connect_timeout,
                server_settings=settings,
                reset=_keep_session,
            )
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
            raise
        return cls(pool, sealer, acquire_timeout=command_timeout)

    async def migrate(self) -> int:
        """Apply pending migrations in one transaction; return the schema version.

        The advisory lock makes concurrent callers (nodes starting at once) take turns; the
        second then finds the schema current and applies nothing.
        """
        wait = _MIGRATION_TIMEOUT  # another node's migration may hold the lock a while
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=wait)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            current = int(
                await conn.fetchval("SELECT COALESCE(max(version), 0) FROM schema_version")
            )
            for version, script in migrations("postgres"):
                if version > current:
                    await conn.execute(script, timeout=wait)
                    await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
                    current = version
        return current

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        """Close the pool, waiting a bounded time for connections in use to come back."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except TimeoutError:
            self._pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; connection failures and timeouts become ``StoreUnavailable``."""
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
            raise

    @staticmethod
    async def _append_audit(conn: Any, event: AuditEvent) -> None:
        digest = content_digest(
            event.at,
            event.api,
            event.client_id,
            event.request_id,
            event.user_id,
            event.result_code,
            event.detail,
        )
        await conn.fetchval(
            _RECORD_AUDIT.text,
            *_RECORD_AUDIT.args(code=event.result_code, digest=digest, **_audit_fields(event)),
        )

    # ---- reads for the hot path ------------------------------------------------------

    async def get_client(self, client_id: str) -> Client | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_CLIENT_COLUMNS} FROM clients c WHERE client_id = $1", client_id
            )
        return None if row is None else client_from_row(row, zip(row[7], row[8], strict=True))

    async def get_token(self, token_hash: bytes) -> AccessToken | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT client_id, user_id, scopes, expires_at, revoked_at FROM tokens"
                " WHERE token_hash = $1",
                token_hash,
            )
        if row is None:
            return None
        return AccessToken(row[0], row[1], frozenset(row[2].split()), row[3], row[4] is not None)

    async def get_user(self, user_id: str) -> User | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT user_id, status, phone, email, locale, locked_until FROM users"
                " WHERE user_id = $1",
                user_id,
            )
        if row is None:
            return None
        return User(row[0], UserStatus(row[1]), row[2], row[3], row[4], row[5])

    async def find_init(self, client_id: str, request_id: str) -> bytes | None:
        async with self._connection() as conn:
            found = await conn.fetchval(
                "SELECT params_hash FROM challenges WHERE client_id = $1 AND request_id = $2",
                client_id,
                request_id,
            )
        return None if found is None else bytes(found)

    # ---- atomic operations -------------------------------------------------------------

    async def create_challenge(
        self, challenge: NewChallenge, limits: SendLimits, audit: AuditEvent
    ) -> InitDecision:
        c = challenge
        payload = self._sealer.seal(c.message_subject + "\n" + c.message_text, _PAYLOAD_CONTEXT)
        async with self._connection() as conn, conn.transaction(isolation="read_committed"):
            owner = await conn.fetchval(
                "SELECT TRUE FROM users WHERE user_id = $1 FOR UPDATE", c.user_id
            )
            if owner is None:
                # No row to lock (the user was deleted meanwhile): an advisory lock on the id
                # keeps concurrent inits for it serialised all the same.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))", _USER_LOCK_CLASS, c.user_id
                )
            row = await conn.fetchrow(
                _INIT.text,
                *_INIT.args(
                    **_audit_params(_init_events(audit)),
                    client_id=c.client_id,
                    request_id=c.request_id,
                    user_id=c.user_id,
                    channel=c.channel,
                    params_hash=c.params_hash,
                    code_mac=c.code_mac,
                    key_id=c.key_id,
                    max_attempts=c.max_attempts,
                    now=c.created_at,
                    expires_at=c.expires_at,
                    destination=c.destination,
                    provider=c.provider,
                    payload=payload,
                    min_interval=limits.min_interval_seconds,
                    max_per_window=limits.max_per_window,
                    window_seconds=limits.window_seconds,
                ),
            )
            if row["status"] != "RACED":
                return InitDecision(InitStatus[row["status"]], row["outbox_id"])
            winner = await conn.fetchval(
                "SELECT params_hash FROM challenges WHERE client_id = $1 AND request_id = $2",
                c.client_id,
                c.request_id,
            )
            status = InitStatus.REPLAYED if winner == c.params_hash else InitStatus.CONFLICT
            await self._append_audit(conn, _init_events(audit)[status])
        return InitDecision(status)

    async def attempt_verification(
        self,
        client_id: str,
        request_id: str,
        value_macs: Sequence[bytes],
        now: float,
        policy: FailurePolicy,
        audit: AuditEvent,
    ) -> VerifyDecision:
        async with self._connection() as conn:
            user_id = await conn.fetchval(
                "SELECT user_id FROM challenges WHERE client_id = $1 AND request_id = $2",
                client_id,
                request_id,
            )
            if user_id is None:
                unknown = VerifyDecision(VerifyStatus.UNKNOWN)
                await self._append_audit(conn, audit_with_code(audit, verify_result_code(unknown)))
                return unknown
            events = {
                status: audit_with_code(audit, verify_result_code(VerifyDecision(status)), user_id)
                for status in VerifyStatus
            }
            row = await conn.fetchrow(
                _VERIFY.text,
                *_VERIFY.args(
                    **_audit_params(events),
                    client_id=client_id,
                    request_id=request_id,
                    user_id=user_id,
                    value_macs=list(value_macs),
                    now=now,
                    budget=policy.budget,
                    lockouts=[policy.lockout_for(n) for n in range(_MAX_LOCKOUT_LEVEL + 1)],
                ),
            )
        return VerifyDecision(
            VerifyStatus[row["status"]], row["attempts_left"], user_id, row["locks"]
        )

    async def record_audit(self, event: AuditEvent) -> None:
        async with self._connection() as conn:
            await self._append_audit(conn, event)

    # ---- outbox and inbox (delivery worker) -----------------------------------------

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[ClaimedMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                _CLAIM_DUE.text,
                *_CLAIM_DUE.args(now=now, limit=limit, lease_until=now + lease_seconds),
            )
        return [self._claimed(row) for row in rows]

    def _claimed(self, row: Any) -> ClaimedMessage:
        subject, _, text = self._sealer.open(row[6], _PAYLOAD_CONTEXT).partition("\n")
        return ClaimedMessage(
            row[0], row[1], row[2], row[3], row[4], row[5], subject, text, row[7], row[8]
        )

    async def finish_message(
        self, outbox_id: int, status: str, now: float, error: str | None = None
    ) -> None:
        """Mark a claimed message sent, failed or expired, and wipe its sealed payload."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE outbox SET status = $1, payload = NULL, finished_at = $2, lease_until = 0,"
                " last_error = COALESCE($3, last_error) WHERE id = $4",
                status,
                now,
                error,
                outbox_id,
            )

    async def retry_message(self, outbox_id: int, next_attempt_at: float, error: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE outbox SET next_attempt_at = $1, lease_until = 0, last_error = $2"
                " WHERE id = $3",
                next_attempt_at,
                error,
                outbox_id,
            )

    async def deliver_to_inbox(self, messages: Sequence[ClaimedMessage], now: float) -> None:
        """The local provider: file the messages (once per outbox id) and mark them sent,
        in one transaction."""
        rows = [
            (
                m.outbox_id,
                m.client_id,
                m.user_id,
                m.channel,
                m.destination,
                self._sealer.seal(m.text, _INBOX_CONTEXT),
                now,
            )
            for m in messages
        ]
        async with self._connection() as conn, conn.transaction():
            await conn.executemany(
                "WITH filed AS ("
                " INSERT INTO inbox (outbox_id, client_id, user_id, channel, destination,"
                " payload, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (outbox_id) DO NOTHING)"
                " UPDATE outbox SET status = 'sent', payload = NULL, finished_at = $7,"
                " lease_until = 0 WHERE id = $1",
                rows,
            )

    async def list_inbox(self, user_id: str | None, limit: int) -> list[InboxMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, client_id, user_id, channel, destination, payload, created_at"
                " FROM inbox WHERE $1::text IS NULL OR user_id = $1 ORDER BY id DESC LIMIT $2",
                user_id,
                limit,
            )
        return [
            InboxMessage(
                r[0], r[1], r[2], r[3], r[4], self._sealer.open(r[5], _INBOX_CONTEXT), r[6]
            )
            for r in rows
        ]

    async def list_outbox(self, limit: int, status: str | None = None) -> list[OutboxEntry]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, client_id, user_id, channel, destination, provider, status, tries,"
                " last_error, created_at, finished_at FROM outbox"
                " WHERE $1::text IS NULL OR status = $1 ORDER BY id DESC LIMIT $2",
                status,
                limit,
            )
        return [OutboxEntry(*row) for row in rows]

    async def outbox_depth(self) -> int:
        async with self._connection() as conn:
            count = await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'queued'")
        return int(count)

    # ---- administration (operator CLI) ---------------------------------------------

    async def add_client(self, client: Client) -> None:
        now = time.time()
        async with self._connection() as conn, conn.transaction():
            try:
                await conn.execute(
                    "INSERT INTO clients (client_id, display_name, enabled, sandbox, channels,"
                    " apis, rate_per_second, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    client.client_id,
                    client.display_name,
                    client.enabled,
                    client.sandbox,
                    ",".join(sorted(client.channels)),
                    ",".join(sorted(client.apis)),
                    client.rate_per_second,
                    now,
                )
                await conn.executemany(
                    "INSERT INTO client_keys (client_id, key_version, public_key, created_at)"
                    " VALUES ($1, $2, $3, $4)",
                    [(client.client_id, k.key_version, k.public_key, now) for k in client.keys],
                )
            except asyncpg.UniqueViolationError:
                raise StoreConflict(f"client {client.client_id} already exists") from None

    async def add_client_key(self, client_id: str, key: ClientKey) -> None:
        async with self._connection() as conn, conn.transaction():
            await _require(conn, "clients", "client_id", client_id, "client")
            try:
                await conn.execute(
                    "INSERT INTO client_keys (client_id, key_version, public_key, created_at)"
                    " VALUES ($1, $2, $3, $4)",
                    client_id,
                    key.key_version,
                    key.public_key,
                    time.time(),
                )
            except asyncpg.UniqueViolationError:
                raise StoreConflict(
                    f"client {client_id} already has key version {key.key_version}"
                ) from None

    async def revoke_client_key(self, client_id: str, key_version: int) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE client_keys SET revoked_at = $1 WHERE client_id = $2 AND key_version = $3"
                " AND revoked_at IS NULL",
                time.time(),
                client_id,
                key_version,
            )
        if _affected(status) == 0:
            raise StoreConflict(f"client {client_id} has no active key version {key_version}")

    async def set_client_enabled(self, client_id: str, enabled: bool) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE clients SET enabled = $1 WHERE client_id = $2", enabled, client_id
            )
        if _affected(status) == 0:
            raise StoreConflict(f"no client {client_id}")

    async def list_clients(self) -> list[Client]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f'SELECT {_CLIENT_COLUMNS} FROM clients c ORDER BY client_id COLLATE "C"'
            )
        return [client_from_row(row, zip(row[7], row[8], strict=True)) for row in rows]

    async def add_users(self, users: Iterable[User]) -> int:
        now = time.time()
        rows = [(u.user_id, u.status.value, u.phone, u.email, u.locale, now) for u in users]
        async with self._connection() as conn, conn.transaction():
            try:
                await conn.executemany(
                    "INSERT INTO users (user_id, status, phone, email, locale, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    rows,
                )
            except asyncpg.UniqueViolationError as exc:
                raise StoreConflict(f"a user already exists ({exc.detail})") from None
        return len(rows)

    async def update_user(self, user_id: str, **changes: Any) -> None:
        allowed = {"status", "phone", "email", "locale"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"can only change {sorted(allowed)}")
        names = list(changes)  # only the allowed names above ever reach the SQL text
        assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(names, start=2))
        values = [_plain(changes[name]) for name in names]
        async with self._connection() as conn:
            status = await conn.execute(
                f"UPDATE users SET {assignments} WHERE user_id = $1", user_id, *values
            )
        if _affected(status) == 0:
            raise StoreConflict(f"no user {user_id}")

    async def delete_user(self, user_id: str) -> None:
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM users WHERE user_id = $1", user_id)
            if _affected(status) == 0:
                raise StoreConflict(f"no user {user_id}")
            await conn.execute(
                "UPDATE challenges SET state = 'superseded', finished_at = $1"
                " WHERE user_id = $2 AND state = 'pending'",
                time.time(),
                user_id,
            )

    async def list_users(self, limit: int = 1000) -> list[UserRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT user_id, status, phone, email, locale, locked_until, failed_verifies"
                ' FROM users ORDER BY user_id COLLATE "C" LIMIT $1',
                limit,
            )
        return [UserRecord(*row) for row in rows]

    async def add_tokens(
        self, tokens: Sequence[tuple[bytes, str, str, frozenset[str], float]]
    ) -> None:
        """Store (hash, client, user, scopes, expires_at) rows; clients and users must exist."""
        now = time.time()
        async with self._connection() as conn, conn.transaction():
            for client_id in dict.fromkeys(client_id for _, client_id, _, _, _ in tokens):
                await _require(conn, "clients", "client_id", client_id, "client")
            wanted = list(dict.fromkeys(user_id for _, _, user_id, _, _ in tokens))
            found = await conn.fetch(
                "SELECT user_id FROM users WHERE user_id = ANY($1::text[])", wanted
            )
            missing = [u for u in wanted if u not in {row[0] for row in found}]
            if missing:
                raise StoreConflict(f"no user {missing[0]}")
            try:
                await conn.executemany(
                    "INSERT INTO tokens (token_hash, client_id, user_id, scopes, expires_at,"
                    " created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    [(h, c, u, " ".join(sorted(s)), e, now) for h, c, u, s, e in tokens],
                )
            except asyncpg.UniqueViolationError:
                raise StoreConflict("a token already exists") from None

    async def revoke_token(self, token_hash: bytes) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
                time.time(),
                token_hash,
            )
        if _affected(status) == 0:
            raise StoreConflict("no active token matches")

    async def audit_rows(self) -> list[AuditRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT seq, at, api, client_id, request_id, user_id, result_code, detail,"
                " prev_hash, row_hash FROM audit ORDER BY seq"
            )
        return [AuditRow(*row) for row in rows]


async def _require(conn: Any, table: str, column: str, value: str, what: str) -> None:
    if await conn.fetchval(f"SELECT 1 FROM {table} WHERE {column} = $1", value) is None:
        raise StoreConflict(f"no {what} {value}")


def _plain(value: Any) -> Any:
    """An enum member as its value (``UserStatus.FROZEN`` → ``"FROZEN"``), anything else as is."""
    return value.value if isinstance(value, UserStatus) else value


def _audit_fields(event: AuditEvent) -> dict[str, Any]:
    """The ``:at … :detail`` parameters of ``_APPEND_AUDIT``."""
    return {
        "at": event.at,
        "api": event.api,
        "audit_client": event.client_id,
        "audit_request": event.request_id,
        "audit_user": event.user_id,
        "detail": event.detail,
    }


def _init_events(audit: AuditEvent) -> dict[InitStatus, AuditEvent]:
    """The audit row SqliteStore.create_challenge writes for each init outcome."""
    events: dict[InitStatus, AuditEvent] = {}
    for status in InitStatus:
        if status is InitStatus.CREATED:
            events[status] = audit
        else:
            code = "SUCCESS" if status is InitStatus.REPLAYED else status.name
            events[status] = audit_with_code(audit, code)
    return events


def _audit_params(events: Mapping[Any, AuditEvent]) -> dict[str, Any]:
    """Audit parameters for a statement that learns its outcome only as it runs.

    ``events`` maps each outcome (an enum member) to the audit row the SQLite store writes
    for it. The content digest must be computed in Python, so it is computed for every
    outcome and the statement picks the one it reaches (``_CHOSEN_ENTRY``). The outcomes
    differ only in result code; the other fields are bound once.
    """
    first = next(iter(events.values()))
    if any(e.user_id != first.user_id for e in events.values()):
        raise ValueError("audit choices must share every field but the result code")
    digests: dict[str, bytes] = {}
    for event in events.values():
        if event.result_code not in digests:
            digests[event.result_code] = content_digest(
                event.at,
                event.api,
                event.client_id,
                event.request_id,
                event.user_id,
                event.result_code,
                event.detail,
            )
    return {
        "statuses": [status.name for status in events],
        "codes": [event.result_code for event in events.values()],
        "digests": [digests[event.result_code] for event in events.values()],
        **_audit_fields(first),
    }
