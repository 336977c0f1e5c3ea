"""The embedded default store: one SQLite file in WAL mode.

Every write runs in ``BEGIN IMMEDIATE``: a deferred transaction that later upgrades to a write
gets SQLITE_BUSY at once (ignoring any busy timeout), while IMMEDIATE takes the write lock up
front. SQLite serialises writers, so each atomic operation below is exact across worker
processes. Waiting for the lock is done asynchronously (see ``_begin_immediate``).

The methods are ``async`` to share the store interface with PostgreSQL, but run the
statements inline: a local SQLite statement takes microseconds, far less than a thread hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

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
from otpgate.store.audit import GENESIS, AuditRow, row_hash
from otpgate.store.common import (
    INBOX_CONTEXT,
    PAYLOAD_CONTEXT,
    audit_with_code,
    classify_unclaimed,
    client_from_row,
    migrations,
    verify_result_code,
)
from otpgate.store.errors import StoreConflict, StoreUnavailable
from otpgate.store.records import ClaimedMessage, InboxMessage, OutboxEntry, UserRecord
from otpgate.store.sealing import Sealer

_LOCK_WAIT_SECONDS = 10.0


class SqliteStore:
    def __init__(self, path: Path, sealer: Sealer, synchronous: str = "NORMAL") -> None:
        self._path = path
        self._sealer = sealer
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=0")  # waiting is done in _begin_immediate
        self._db.execute("PRAGMA foreign_keys=ON")

    # ---- lifecycle -------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply pending migrations; return the schema version."""
        async with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, script in migrations("sqlite"):
                if version > current:
                    for statement in script.split(";\n"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
                    current = version
        return int(current)

    async def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        self._db.close()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[sqlite3.Connection]:
        """A write transaction. The body must not await: the lock is held only while it runs."""
        db = self._db
        await self._begin_immediate()
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE``, waiting for another process's write lock without blocking.

        SQLite's own busy handler sleeps at least a millisecond per retry while blocking the
        event loop, although writes here hold the lock for tens of microseconds. So the busy
        timeout is 0 and the wait happens here: short asynchronous sleeps, during which this
        process keeps serving other requests.
        """
        delay = 0.00005
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"the database stayed locked for {_LOCK_WAIT_SECONDS:g} s"
                    ) from exc
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.001)

    def _audit(self, db: sqlite3.Connection, event: AuditEvent) -> None:
        last = db.execute("SELECT seq, row_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        digest = row_hash(
            prev,
            event.at,
            event.api,
            event.client_id,
            event.request_id,
            event.user_id,
            event.result_code,
            event.detail,
        )
        db.execute(
            "INSERT INTO audit (seq, at, api, client_id, request_id, user_id, result_code,"
            " detail, prev_hash, row_hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                seq,
                event.at,
                event.api,
                event.client_id,
                event.request_id,
                event.user_id,
                event.result_code,
                event.detail,
                prev,
                digest,
            ),
        )

    # ---- reads for the hot path ------------------------------------------------------

    async def get_client(self, client_id: str) -> Client | None:
        row = self._db.execute(
            "SELECT client_id, enabled, sandbox, display_name, channels, apis, rate_per_second"
            " FROM clients WHERE client_id = ?",
            (client_id,),
        ).fetchone()
        if row is None:
            return None
        keys = self._db.execute(
            "SELECT key_version, public_key FROM client_keys"
            " WHERE client_id = ? AND revoked_at IS NULL ORDER BY key_version",
            (client_id,),
        ).fetchall()
        return client_from_row(row, keys)

    async def get_token(self, token_hash: bytes) -> AccessToken | None:
        row = self._db.execute(
            "SELECT client_id, user_id, scopes, expires_at, revoked_at FROM tokens"
            " WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        return AccessToken(row[0], row[1], frozenset(row[2].split()), row[3], row[4] is not None)

    async def get_user(self, user_id: str) -> User | None:
        row = self._db.execute(
            "SELECT user_id, status, phone, email, locale, locked_until FROM users"
            " WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        return User(row[0], UserStatus(row[1]), row[2], row[3], row[4], row[5])

    async def find_init(self, client_id: str, request_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT params_hash FROM challenges WHERE client_id = ? AND request_id = ?",
            (client_id, request_id),
        ).fetchone()
        return None if row is None else bytes(row[0])

    # ---- atomic operations -------------------------------------------------------------

    async def create_challenge(
        self, challenge: NewChallenge, limits: SendLimits, audit: AuditEvent
    ) -> InitDecision:
        c = challenge
        async with self._write() as db:
            decision = self._init_refusal(db, c, limits)
            if decision is not None:
                code = "SUCCESS" if decision.status is InitStatus.REPLAYED else decision.status.name
                self._audit(db, audit_with_code(audit, code))
                return decision
            db.execute(
                "UPDATE challenges SET state = 'superseded', finished_at = ?"
                " WHERE client_id = ? AND user_id = ? AND state = 'pending'",
                (c.created_at, c.client_id, c.user_id),
            )
            (challenge_id,) = db.execute(
                "INSERT INTO challenges (client_id, request_id, user_id, channel, params_hash,"
                " code_mac, key_id, max_attempts, created_at, expires_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    c.client_id,
                    c.request_id,
                    c.user_id,
                    c.channel,
                    c.params_hash,
                    c.code_mac,
                    c.key_id,
                    c.max_attempts,
                    c.created_at,
                    c.expires_at,
                ),
            ).fetchone()
            payload = self._sealer.seal(c.message_subject + "\n" + c.message_text, PAYLOAD_CONTEXT)
            (outbox_id,) = db.execute(
                "INSERT INTO outbox (challenge_id, client_id, user_id, channel, destination,"
                " provider, payload, next_attempt_at, created_at, expires_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    challenge_id,
                    c.client_id,
                    c.user_id,
                    c.channel,
                    c.destination,
                    c.provider,
                    payload,
                    c.created_at,
                    c.created_at,
                    c.expires_at,
                ),
            ).fetchone()
            self._audit(db, audit)
        return InitDecision(InitStatus.CREATED, outbox_id)

    @staticmethod
    def _init_refusal(
        db: sqlite3.Connection, c: NewChallenge, limits: SendLimits
    ) -> InitDecision | None:
        row = db.execute(
            "SELECT params_hash FROM challenges WHERE client_id = ? AND request_id = ?",
            (c.client_id, c.request_id),
        ).fetchone()
        if row is not None:
            same = bytes(row[0]) == c.params_hash
            return InitDecision(InitStatus.REPLAYED if same else InitStatus.CONFLICT)
        locked = db.execute(
            "SELECT locked_until FROM users WHERE user_id = ?", (c.user_id,)
        ).fetchone()
        if locked is not None and locked[0] > c.created_at:
            return InitDecision(InitStatus.LOCKED)
        now = c.created_at
        if (
            limits.min_interval_seconds > 0
            and db.execute(
                "SELECT 1 FROM challenges WHERE user_id = ? AND created_at > ? LIMIT 1",
                (c.user_id, now - limits.min_interval_seconds),
            ).fetchone()
        ):
            return InitDecision(InitStatus.SEND_INTERVAL)
        if limits.max_per_window > 0:
            (count,) = db.execute(
                "SELECT count(*) FROM challenges WHERE user_id = ? AND created_at > ?",
                (c.user_id, now - limits.window_seconds),
            ).fetchone()
            if count >= limits.max_per_window:
                return InitDecision(InitStatus.SEND_WINDOW)
        return None

    async def attempt_verification(
        self,
        client_id: str,
        request_id: str,
        value_macs: Sequence[bytes],
        now: float,
        policy: FailurePolicy,
        audit: AuditEvent,
    ) -> VerifyDecision:
        marks = ",".join("?" * len(value_macs))
        matched = f"code_mac IN ({marks})"
        async with self._write() as db:
            # Claim an attempt and compare in one statement: the attempt is spent before the
            # comparison's result exists, so concurrent guesses can never exceed max_attempts.
            row = db.execute(
                f"UPDATE challenges SET attempts = attempts + 1,"
                f" state = CASE WHEN {matched} THEN 'passed'"
                f"  WHEN attempts + 1 >= max_attempts THEN 'exhausted' ELSE 'pending' END,"
                f" finished_at = CASE WHEN {matched} OR attempts + 1 >= max_attempts"
                f"  THEN ? ELSE NULL END"
                f" WHERE client_id = ? AND request_id = ? AND state = 'pending'"
                f" AND expires_at > ? AND COALESCE((SELECT locked_until FROM users"
                f"  WHERE users.user_id = challenges.user_id), 0) <= ?"
                f" RETURNING state, attempts, max_attempts, user_id",
                (*value_macs, *value_macs, now, client_id, request_id, now, now),
            ).fetchone()
            if row is None:
                decision = self._classify_unclaimed(db, client_id, request_id, value_macs, now)
            else:
                decision = self._charge_user(db, row, now, policy)
            self._audit(db, audit_with_code(audit, verify_result_code(decision), decision.user_id))
        return decision

    @staticmethod
    def _charge_user(
        db: sqlite3.Connection, row: Any, now: float, policy: FailurePolicy
    ) -> VerifyDecision:
        state, attempts, max_attempts, user_id = row
        if state == "passed":
            # Only a user with a failure streak needs a write (one page less on most passes).
            db.execute(
                "UPDATE users SET failed_verifies = 0, lockout_level = 0 WHERE user_id = ?"
                " AND (failed_verifies <> 0 OR lockout_level <> 0)",
                (user_id,),
            )
            return VerifyDecision(VerifyStatus.PASSED, user_id=user_id)
        locked_now = False
        charged = db.execute(
            "UPDATE users SET failed_verifies = failed_verifies + 1 WHERE user_id = ?"
            " RETURNING failed_verifies, lockout_level",
            (user_id,),
        ).fetchone()
        if charged is not None and policy.budget > 0 and charged[0] >= policy.budget:
            locked_now = True
            db.execute(
                "UPDATE users SET failed_verifies = 0, lockout_level = lockout_level + 1,"
                " locked_until = ? WHERE user_id = ?",
                (now + policy.lockout_for(charged[1]), user_id),
            )
        status = VerifyStatus.EXHAUSTED if state == "exhausted" else VerifyStatus.UNMATCHED
        return VerifyDecision(status, max_attempts - attempts, user_id, locked_now)

    @staticmethod
    def _classify_unclaimed(
        db: sqlite3.Connection,
        client_id: str,
        request_id: str,
        value_macs: Sequence[bytes],
        now: float,
    ) -> VerifyDecision:
        row = db.execute(
            "SELECT state, expires_at, code_mac, challenges.user_id,"
            " COALESCE(users.locked_until, 0) FROM challenges"
            " LEFT JOIN users ON users.user_id = challenges.user_id"
            " WHERE client_id = ? AND request_id = ?",
            (client_id, request_id),
        ).fetchone()
        if row is None:
            return VerifyDecision(VerifyStatus.UNKNOWN)
        state, expires_at, code_mac, user_id, locked_until = row
        return VerifyDecision(
            classify_unclaimed(state, expires_at, bytes(code_mac), locked_until, value_macs, now),
            user_id=user_id,
        )

    async def record_audit(self, event: AuditEvent) -> None:
        async with self._write() as db:
            self._audit(db, event)

    # ---- outbox and inbox (delivery worker) -----------------------------------------

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[ClaimedMessage]:
        async with self._write() as db:
            rows = db.execute(
                "UPDATE outbox SET lease_until = ?, tries = tries + 1 WHERE id IN ("
                " SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?"
                " AND lease_until <= ? ORDER BY next_attempt_at LIMIT ?)"
                " RETURNING id, client_id, user_id, channel, destination, provider, payload,"
                " tries, expires_at",
                (now + lease_seconds, now, now, limit),
            ).fetchall()
        return [self._claimed(row) for row in rows]

    def _claimed(self, row: Any) -> ClaimedMessage:
        subject, _, text = self._sealer.open(row[6], PAYLOAD_CONTEXT).partition("\n")
        return ClaimedMessage(
            row[0], row[1], row[2], row[3], row[4], row[5], subject, text, row[7], row[8]
        )

    async def finish_message(
        self, outbox_id: int, status: str, now: float, error: str | None = None
    ) -> None:
        """Mark a claimed message sent, failed or expired, and wipe its sealed payload."""
        async with self._write() as db:
            db.execute(
                "UPDATE outbox SET status = ?, payload = NULL, finished_at = ?, lease_until = 0,"
                " last_error = COALESCE(?, last_error) WHERE id = ?",
                (status, now, error, outbox_id),
            )

    async def retry_message(self, outbox_id: int, next_attempt_at: float, error: str) -> None:
        async with self._write() as db:
            db.execute(
                "UPDATE outbox SET next_attempt_at = ?, lease_until = 0, last_error = ?"
                " WHERE id = ?",
                (next_attempt_at, error, outbox_id),
            )

    async def deliver_to_inbox(self, messages: Sequence[ClaimedMessage], now: float) -> None:
        """The local provider: file the messages and mark them sent, all in one transaction
        (once per outbox id: a repeat is ignored)."""
        filed = [
            (
                m.outbox_id,
                m.client_id,
                m.user_id,
                m.channel,
                m.destination,
                self._sealer.seal(m.text, INBOX_CONTEXT),
                now,
            )
            for m in messages
        ]
        async with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO inbox (outbox_id, client_id, user_id, channel,"
                " destination, payload, created_at) VALUES (?,?,?,?,?,?,?)",
                filed,
            )
            db.executemany(
                "UPDATE outbox SET status = 'sent', payload = NULL, finished_at = ?,"
                " lease_until = 0 WHERE id = ?",
                [(now, m.outbox_id) for m in messages],
            )

    async def list_inbox(self, user_id: str | None, limit: int) -> list[InboxMessage]:
        sql = "SELECT id, client_id, user_id, channel, destination, payload, created_at FROM inbox"
        args: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            InboxMessage(r[0], r[1], r[2], r[3], r[4], self._sealer.open(r[5], INBOX_CONTEXT), r[6])
            for r in rows
        ]

    async def list_outbox(self, limit: int, status: str | None = None) -> list[OutboxEntry]:
        sql = (
            "SELECT id, client_id, user_id, channel, destination, provider, status, tries,"
            " last_error, created_at, finished_at FROM outbox"
        )
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [OutboxEntry(*row) for row in rows]

    async def outbox_depth(self) -> int:
        (count,) = self._db.execute(
            "SELECT count(*) FROM outbox WHERE status = 'queued'"
        ).fetchone()
        return int(count)

    # ---- administration (operator CLI) ---------------------------------------------

    async def add_client(self, client: Client) -> None:
        now = time.time()
        try:
            async with self._write() as db:
                db.execute(
                    "INSERT INTO clients (client_id, display_name, enabled, sandbox, channels,"
                    " apis, rate_per_second, created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        client.client_id,
                        client.display_name,
                        int(client.enabled),
                        int(client.sandbox),
                        ",".join(sorted(client.channels)),
                        ",".join(sorted(client.apis)),
                        client.rate_per_second,
                        now,
                    ),
                )
                for key in client.keys:
                    db.execute(
                        "INSERT INTO client_keys (client_id, key_version, public_key, created_at)"
                        " VALUES (?,?,?,?)",
                        (client.client_id, key.key_version, key.public_key, now),
                    )
        except sqlite3.IntegrityError:
            raise StoreConflict(f"client {client.client_id} already exists") from None

    async def add_client_key(self, client_id: str, key: ClientKey) -> None:
        async with self._write() as db:
            self._require(db, "clients", "client_id", client_id, "client")
            try:
                db.execute(
                    "INSERT INTO client_keys (client_id, key_version, public_key, created_at)"
                    " VALUES (?,?,?,?)",
                    (client_id, key.key_version, key.public_key, time.time()),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(
                    f"client {client_id} already has key version {key.key_version}"
                ) from None

    async def revoke_client_key(self, client_id: str, key_version: int) -> None:
        async with self._write() as db:
            cursor = db.execute(
                "UPDATE client_keys SET revoked_at = ? WHERE client_id = ? AND key_version = ?"
                " AND revoked_at IS NULL",
                (time.time(), client_id, key_version),
            )
            if cursor.rowcount == 0:
                raise StoreConflict(f"client {client_id} has no active key version {key_version}")

    async def set_client_enabled(self, client_id: str, enabled: bool) -> None:
        async with self._write() as db:
            cursor = db.execute(
                "UPDATE clients SET enabled = ? WHERE client_id = ?", (int(enabled), client_id)
            )
            if cursor.rowcount == 0:
                raise StoreConflict(f"no client {client_id}")

    async def list_clients(self) -> list[Client]:
        rows = self._db.execute(
            "SELECT client_id, enabled, sandbox, display_name, channels, apis, rate_per_second"
            " FROM clients ORDER BY client_id"
        ).fetchall()
        result = []
        for row in rows:
            keys = self._db.execute(
                "SELECT key_version, public_key FROM client_keys"
                " WHERE client_id = ? AND revoked_at IS NULL ORDER BY key_version",
                (row[0],),
            ).fetchall()
            result.append(client_from_row(row, keys))
        return result

    async def add_users(self, users: Iterable[User]) -> int:
        now = time.time()
        rows = [(u.user_id, u.status.value, u.phone, u.email, u.locale, now) for u in users]
        try:
            async with self._write() as db:
                db.executemany(
                    "INSERT INTO users (user_id, status, phone, email, locale, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    rows,
                )
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(f"a user already exists ({exc})") from None
        return len(rows)

    async def update_user(self, user_id: str, **changes: Any) -> None:
        allowed = {"status", "phone", "email", "locale"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"can only change {sorted(allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in changes)
        async with self._write() as db:
            cursor = db.execute(
                f"UPDATE users SET {assignments} WHERE user_id = ?", (*changes.values(), user_id)
            )
            if cursor.rowcount == 0:
                raise StoreConflict(f"no user {user_id}")

    async def delete_user(self, user_id: str) -> None:
        async with self._write() as db:
            cursor = db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            if cursor.rowcount == 0:
                raise StoreConflict(f"no user {user_id}")
            db.execute(
                "UPDATE challenges SET state = 'superseded', finished_at = ?"
                " WHERE user_id = ? AND state = 'pending'",
                (time.time(), user_id),
            )

    async def list_users(self, limit: int = 1000) -> list[UserRecord]:
        rows = self._db.execute(
            "SELECT user_id, status, phone, email, locale, locked_until, failed_verifies"
            " FROM users ORDER BY user_id LIMIT ?",
            (limit,),
        ).fetchall()
        return [UserRecord(*row) for row in rows]

    async def add_tokens(
        self, tokens: Sequence[tuple[bytes, str, str, frozenset[str], float]]
    ) -> None:
        """Store (hash, client, user, scopes, expires_at) rows; clients and users must exist."""
        now = time.time()
        async with self._write() as db:
            for client_id in dict.fromkeys(client_id for _, client_id, _, _, _ in tokens):
                self._require(db, "clients", "client_id", client_id, "client")
            missing = [
                user_id
                for _, _, user_id, _, _ in tokens
                if db.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone()
                is None
            ]
            if missing:
                raise StoreConflict(f"no user {missing[0]}")
            try:
                db.executemany(
                    "INSERT INTO tokens (token_hash, client_id, user_id, scopes, expires_at,"
                    " created_at) VALUES (?,?,?,?,?,?)",
                    [(h, c, u, " ".join(sorted(s)), e, now) for h, c, u, s, e in tokens],
                )
            except sqlite3.IntegrityError:
                raise StoreConflict("a token already exists") from None

    async def revoke_token(self, token_hash: bytes) -> None:
        async with self._write() as db:
            cursor = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
                (time.time(), token_hash),
            )
            if cursor.rowcount == 0:
                raise StoreConflict("no active token matches")

    async def audit_rows(self) -> list[AuditRow]:
        rows = self._db.execute(
            "SELECT seq, at, api, client_id, request_id, user_id, result_code, detail,"
            " prev_hash, row_hash FROM audit ORDER BY seq"
        ).fetchall()
        return [
            AuditRow(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                row[7],
                bytes(row[8]),
                bytes(row[9]),
            )
            for row in rows
        ]

    @staticmethod
    def _require(db: sqlite3.Connection, table: str, column: str, value: str, what: str) -> None:
        if db.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchone() is None:
            raise StoreConflict(f"no {what} {value}")
