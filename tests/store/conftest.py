"""Fixtures for the store contract suite: one suite, run against SQLite and PostgreSQL.

``store`` is parametrised over both backends. ``backend`` gives the same test raw SQL access
(to check what is really stored, or to tamper with it) and a way to run calls concurrently
that is real for that backend: a pool for PostgreSQL, threads with their own connections to
one file for SQLite (whose methods run inline, so ``asyncio.gather`` alone would serialise).

PostgreSQL: ``OTPGATE_TEST_DATABASE_URL`` (default: database ``test`` on 127.0.0.1:5432 as
``postgres``). Each test gets a fresh schema ``otpgate_test_<session hex>_<n>``, dropped after
the test; the session drops any of its schemas left behind. If the server is unreachable the
postgres cases skip with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

from otpgate.core.models import (
    AuditEvent,
    Client,
    ClientKey,
    FailurePolicy,
    NewChallenge,
    User,
    UserStatus,
    VerifyDecision,
)
from otpgate.store.base import Store
from otpgate.store.postgres import PostgresStore
from otpgate.store.sealing import Sealer
from otpgate.store.sqlite import SqliteStore

T = TypeVar("T")

PG_URL = os.environ.get("OTPGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

POOL_SIZE = 10
"""Connections per PostgreSQL test store: the concurrency tests' parallelism."""

SQLITE_THREADS = 8
"""Threads (each with its own SQLite connection) in the SQLite concurrency tests."""

NOW = 1_700_000_000.0
"""The fake clock: every store call gets explicit times derived from it."""

SHOP = "M_SHOP"
OTHER = "M_OTHER"
ALICE = "alice"
BOB = "bob"
CODE = "123456"
_MAC_KEY = b"test-mac-key"

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"


# ---- values ---------------------------------------------------------------------------


def mac(client_id: str, request_id: str, value: str, key: bytes = _MAC_KEY) -> bytes:
    """The code MAC the service computes (HMAC-SHA-256 of client ‖ request id ‖ value)."""
    message = f"{client_id}\x00{request_id}\x00{value}".encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def challenge(
    request_id: str = "r-1",
    *,
    user_id: str = ALICE,
    client_id: str = SHOP,
    now: float = NOW,
    ttl: float = 300.0,
    code: str = CODE,
    params: bytes = b"SMS|token-of-alice",
    max_attempts: int = 5,
    channel: str = "SMS",
    destination: str = "+14155550123",
    provider: str = "inbox",
) -> NewChallenge:
    return NewChallenge(
        client_id=client_id,
        request_id=request_id,
        user_id=user_id,
        channel=channel,
        destination=destination,
        params_hash=hashlib.sha256(params).digest(),
        code_mac=mac(client_id, request_id, code),
        key_id="k1",
        created_at=now,
        expires_at=now + ttl,
        max_attempts=max_attempts,
        message_subject="Your code",
        message_text=f"Your code is {code}",
        provider=provider,
    )


def init_event(c: NewChallenge) -> AuditEvent:
    """The audit event the service hands to create_challenge."""
    return AuditEvent(
        INIT, c.client_id, c.request_id, c.user_id, "SUCCESS", c.channel, c.created_at
    )


def verify_event(client_id: str, request_id: str, now: float) -> AuditEvent:
    """The audit event the service hands to attempt_verification (result filled in by the store)."""
    return AuditEvent(VERIFY, client_id, request_id, None, "", "", now)


async def verify(
    store: Store,
    request_id: str = "r-1",
    value: str = CODE,
    *,
    now: float = NOW + 1,
    client_id: str = SHOP,
    policy: FailurePolicy | None = None,
    macs: Sequence[bytes] | None = None,
) -> VerifyDecision:
    """One verify as the service does it: the value's MAC is computed before the store call."""
    return await store.attempt_verification(
        client_id,
        request_id,
        list(macs) if macs is not None else [mac(client_id, request_id, value)],
        now,
        policy or FailurePolicy(),
        verify_event(client_id, request_id, now),
    )


def pem(n: int) -> str:
    return f"-----BEGIN PUBLIC KEY-----\nkey{n}\n-----END PUBLIC KEY-----\n"


async def seed(store: Store) -> None:
    """Two clients (SHOP, OTHER) and two users (alice, bob)."""
    await store.add_client(Client(SHOP, display_name="Shop", keys=(ClientKey(1, pem(1)),)))
    await store.add_client(Client(OTHER, keys=(ClientKey(1, pem(2)),)))
    await store.add_users(
        [
            User(ALICE, UserStatus.NORMAL, phone="+14155550123", email="alice@example.com"),
            User(BOB, UserStatus.NORMAL, phone="+14155550124", locale="fr"),
        ]
    )


# ---- backends -------------------------------------------------------------------------


class Backend(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def store(self) -> Store: ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Run raw SQL written with ``?`` placeholders; the first column of the first row."""
        ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def concurrently(
        self, n: int, call: Callable[[Store], Coroutine[Any, Any, T]]
    ) -> list[T]:
        """Run ``call`` n times at once, truly concurrently for this backend."""
        ...

    async def close(self) -> None: ...


@dataclass
class SqliteBackend:
    path: Path
    sealer: Sealer
    store: SqliteStore
    kind: str = "sqlite"

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with sqlite3.connect(self.path) as db:
            row = db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> None:
        db = sqlite3.connect(self.path)
        try:
            with db:
                db.execute(sql, args)
        finally:
            db.close()

    async def concurrently(
        self, n: int, call: Callable[[Store], Coroutine[Any, Any, T]]
    ) -> list[T]:
        # Threads with their own connection to the same file, as worker processes have,
        # released together so their transactions really contend.
        shares = [range(k, n, SQLITE_THREADS) for k in range(SQLITE_THREADS)]
        start = threading.Barrier(SQLITE_THREADS)

        async def calls(store: SqliteStore, share: range) -> list[T]:
            return [await call(store) for _ in share]

        def thread(share: range) -> list[T]:
            store = SqliteStore(self.path, self.sealer)
            try:
                start.wait()
                return asyncio.run(calls(store, share))
            finally:
                asyncio.run(store.close())

        with ThreadPoolExecutor(max_workers=SQLITE_THREADS) as threads:
            loop = asyncio.get_running_loop()
            done = await asyncio.gather(
                *(loop.run_in_executor(threads, thread, share) for share in shares)
            )
        return [result for results in done for result in results]

    async def close(self) -> None:
        await self.store.close()


def _numbered(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$n``."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


@dataclass
class PostgresBackend:
    schema: str
    store: PostgresStore
    admin: Any  # an asyncpg connection outside the store's pool, on the test's schema
    kind: str = "postgres"

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.admin.fetchval(_numbered(sql), *args)

    async def execute(self, sql: str, *args: Any) -> None:
        await self.admin.execute(_numbered(sql), *args)

    async def concurrently(
        self, n: int, call: Callable[[Store], Coroutine[Any, Any, T]]
    ) -> list[T]:
        return list(await asyncio.gather(*(call(self.store) for _ in range(n))))

    async def terminate_store_connections(self) -> int:
        """Kill the store's server processes (not the admin connection): a network outage."""
        killed = await self.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND pid <> pg_backend_pid()",
            self.schema,
        )
        return int(killed)

    async def close(self) -> None:
        try:
            await self.store.close()
        finally:
            await self.admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await self.admin.close()


@dataclass
class PostgresServer:
    """The session's view of the test server: reachable or why not, and its schema names."""

    prefix: str
    unreachable: str | None = None
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def new_schema(self) -> str:
        return f"{self.prefix}_{next(self._counter)}"

    async def open_backend(self, sealer: Sealer, **connect: Any) -> PostgresBackend:
        if self.unreachable:
            pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {self.unreachable}")
        schema = self.new_schema()
        admin = await asyncpg.connect(PG_URL, timeout=5)
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await admin.execute(f'SET search_path TO "{schema}"')
        try:
            # The store's connections carry the schema's name, so a test can find and kill them.
            url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}application_name={schema}"
            # A full pool from the start: connecting takes longer than a call, so on a cold
            # pool the first connection would serve most of a concurrent burst by itself.
            options = {"min_size": POOL_SIZE, "max_size": POOL_SIZE, **connect}
            store = await PostgresStore.connect(url, sealer, schema=schema, **options)
        except BaseException:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()
            raise
        return PostgresBackend(schema, store, admin)


async def _probe(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=3)
    await conn.close()


async def _drop_schemas(url: str, prefix: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        names = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", prefix + "_"
        )
        for (name,) in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(prefix=f"otpgate_test_{secrets.token_hex(4)}")
    try:
        asyncio.run(_probe(PG_URL))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        server.unreachable = f"{type(exc).__name__}: {exc}"
    yield server
    if server.unreachable is None:
        asyncio.run(_drop_schemas(PG_URL, server.prefix))


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(os.urandom(32))


_BACKEND = pytest.StashKey[Backend]()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, sealer: Sealer, postgres: PostgresServer
) -> AsyncIterator[Store]:
    """A migrated, empty store of each kind."""
    backend: Backend
    if request.param == "sqlite":
        path = tmp_path / "otpgate.db"
        backend = SqliteBackend(path, sealer, SqliteStore(path, sealer))
    else:
        backend = await postgres.open_backend(sealer)
    request.node.stash[_BACKEND] = backend
    try:
        await backend.store.migrate()
        yield backend.store
    finally:
        await backend.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest, store: Store) -> Backend:
    """Raw access to the database behind ``store``."""
    found: Backend = request.node.stash[_BACKEND]
    return found


@pytest.fixture
async def seeded(store: Store) -> Store:
    """``store`` with the clients and users of ``seed``."""
    await seed(store)
    return store
