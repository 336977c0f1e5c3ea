"""PostgreSQL-only behaviour the contract suite cannot show: outages, timeouts, migrations
racing, the URL's schema, and the interleavings the design relies on, forced one at a time.

The interleaving tests hold a user's row lock (or an uncommitted row) in a second connection,
start a store call that must wait for it, change the data, commit, and check the call decided
on what was committed while it waited, not on the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from otpgate.core.models import AuditEvent, InitDecision, InitStatus, SendLimits, VerifyStatus
from otpgate.store.audit import first_broken_row
from otpgate.store.errors import StoreUnavailable
from otpgate.store.postgres import PostgresStore
from otpgate.store.sealing import Sealer
from store.conftest import (
    ALICE,
    BOB,
    NOW,
    PG_URL,
    SHOP,
    PostgresBackend,
    PostgresServer,
    challenge,
    init_event,
    seed,
    verify,
)

T = TypeVar("T")

NO_LIMITS = SendLimits(min_interval_seconds=0, max_per_window=0)


@pytest.fixture
async def unmigrated(postgres: PostgresServer, sealer: Sealer) -> AsyncIterator[PostgresBackend]:
    backend = await postgres.open_backend(sealer)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def pg(unmigrated: PostgresBackend) -> PostgresBackend:
    await unmigrated.store.migrate()
    await seed(unmigrated.store)
    return unmigrated


async def blocked(call: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start ``call`` and check it is waiting (for a lock held by the test)."""
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0.3)
    assert not task.done(), "the call should be waiting for the lock"
    return task


# ---- outages and timeouts -----------------------------------------------------------


async def test_unreachable_server_raises_store_unavailable(sealer: Sealer) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        await PostgresStore.connect("postgresql://postgres@127.0.0.1:1/test", sealer)
    assert time.monotonic() - started < 5


async def test_pool_recovers_after_its_connections_are_killed(pg: PostgresBackend) -> None:
    old = {row[0] for row in await pg.admin.fetch(_STORE_PIDS, pg.schema)}
    assert len(old) > 0
    assert await pg.terminate_store_connections() == len(old)
    # Racing the kill, a call may meet a dying connection: that is an outage, not a bug.
    with contextlib.suppress(StoreUnavailable):
        await pg.store.list_users()
    deadline = time.monotonic() + 5
    while {row[0] for row in await pg.admin.fetch(_STORE_PIDS, pg.schema)} & old:
        assert time.monotonic() < deadline, "terminated backends did not exit"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # the server has closed them; let the client see the EOFs

    # Nothing was restarted or reset by hand: the pool replaces dead connections itself.
    assert [u.user_id for u in await pg.store.list_users()] == [ALICE, BOB]
    assert (await pg.store.create_challenge(*_init("r-1"))).status is InitStatus.CREATED
    assert (await verify(pg.store)).status is VerifyStatus.PASSED


_STORE_PIDS = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"


async def test_slow_statement_times_out_as_unavailable(
    postgres: PostgresServer, sealer: Sealer
) -> None:
    backend = await postgres.open_backend(sealer, command_timeout=0.5)
    try:
        store = backend.store
        await store.migrate()
        event = AuditEvent("initAuthentication", SHOP, "r-1", None, "X", "", NOW)
        async with backend.admin.transaction():
            await backend.admin.execute("SELECT * FROM audit_head FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.record_audit(event)
            assert time.monotonic() - started < 2
        await store.record_audit(event)
        rows = await store.audit_rows()
        assert len(rows) == 1 and first_broken_row(rows) is None
    finally:
        await backend.close()


# ---- schema and migrations ------------------------------------------------------------


async def test_nodes_migrating_at_once_apply_each_migration_once(
    unmigrated: PostgresBackend, sealer: Sealer
) -> None:
    others = [
        await PostgresStore.connect(PG_URL, sealer, schema=unmigrated.schema) for _ in range(3)
    ]
    try:
        versions = await asyncio.gather(
            unmigrated.store.migrate(), *(other.migrate() for other in others)
        )
    finally:
        for other in others:
            await other.close()
    assert versions == [1, 1, 1, 1]
    assert await unmigrated.admin.fetchval("SELECT count(*) FROM schema_version") == 1
    assert await unmigrated.admin.fetchval("SELECT seq FROM audit_head") == 0


async def test_schema_can_come_from_the_url(unmigrated: PostgresBackend, sealer: Sealer) -> None:
    store = await PostgresStore.connect(f"{PG_URL}?schema={unmigrated.schema}", sealer)
    try:
        assert await store.migrate() == 1
        assert await store.list_users() == []
    finally:
        await store.close()
    tables = await unmigrated.admin.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1", unmigrated.schema
    )
    assert tables == 10  # nine from the migration, and schema_version


# ---- interleavings ------------------------------------------------------------------


def _init(request_id: str, **fields: Any) -> tuple[Any, SendLimits, AuditEvent]:
    limits = fields.pop("limits", NO_LIMITS)
    c = challenge(request_id, **fields)
    return c, limits, init_event(c)


async def test_verify_that_waited_for_the_user_decides_on_the_committed_state(
    pg: PostgresBackend,
) -> None:
    await pg.store.create_challenge(*_init("r-1"))
    conn = pg.admin
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", ALICE)
        replay = await blocked(verify(pg.store))
        other = await blocked(verify(pg.store, value="000000"))
        # Another node passes the challenge meanwhile.
        await conn.execute(
            "UPDATE challenges SET state = 'passed', attempts = 1, finished_at = $1", NOW
        )
    assert (await replay).status is VerifyStatus.REPLAYED
    assert (await other).status is VerifyStatus.USED
    assert await conn.fetchval("SELECT attempts FROM challenges") == 1


async def test_verify_that_waited_sees_a_lockout_set_meanwhile(pg: PostgresBackend) -> None:
    await pg.store.create_challenge(*_init("r-1"))
    conn = pg.admin
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", ALICE)
        task = await blocked(verify(pg.store))
        await conn.execute("UPDATE users SET locked_until = $1", NOW + 900)
    assert (await task).status is VerifyStatus.LOCKED
    assert await conn.fetchval("SELECT attempts FROM challenges") == 0


async def test_init_that_waited_for_the_user_counts_the_winners_challenge(
    pg: PostgresBackend,
) -> None:
    conn = pg.admin
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", ALICE)
        limits = SendLimits(min_interval_seconds=30)
        task = await blocked(pg.store.create_challenge(*_init("r-2", limits=limits)))
        # Another node's init for the same user commits first.
        await conn.execute(
            "INSERT INTO challenges (client_id, request_id, user_id, channel, params_hash,"
            " code_mac, key_id, max_attempts, created_at, expires_at)"
            " VALUES ($1, 'r-1', $2, 'SMS', '\\x00', '\\x00', 'k1', 5, $3, $3::float8 + 300)",
            SHOP,
            ALICE,
            NOW - 1,
        )
    assert await task == InitDecision(InitStatus.SEND_INTERVAL)


@pytest.mark.parametrize(
    ("same_params", "expected"),
    [(True, InitStatus.REPLAYED), (False, InitStatus.CONFLICT)],
)
async def test_init_racing_another_users_init_with_the_same_id(
    pg: PostgresBackend, same_params: bool, expected: InitStatus
) -> None:
    mine = challenge("r-x")
    theirs = mine.params_hash if same_params else b"other params"
    conn = pg.admin
    async with conn.transaction():
        # Bob's init (another user: our user lock does not hold it back) is mid-commit.
        await conn.execute(
            "INSERT INTO challenges (client_id, request_id, user_id, channel, params_hash,"
            " code_mac, key_id, max_attempts, created_at, expires_at)"
            " VALUES ($1, 'r-x', $2, 'SMS', $3, '\\x00', 'k1', 5, $4, $4::float8 + 300)",
            SHOP,
            BOB,
            theirs,
            NOW,
        )
        task = await blocked(pg.store.create_challenge(mine, NO_LIMITS, init_event(mine)))
    assert await task == InitDecision(expected)
    assert await conn.fetchval("SELECT user_id FROM challenges") == BOB
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    rows = await pg.store.audit_rows()
    assert [row.result_code for row in rows] == ["SUCCESS" if same_params else "CONFLICT"]
    assert first_broken_row(rows) is None


async def test_audit_head_tracks_the_chain(pg: PostgresBackend) -> None:
    await pg.store.create_challenge(*_init("r-1"))
    await verify(pg.store)
    rows = await pg.store.audit_rows()
    head = await pg.admin.fetchrow("SELECT seq, prev_hash, hash FROM audit_head")
    assert (head["seq"], head["prev_hash"], head["hash"]) == (
        rows[-1].seq,
        rows[-1].prev_hash,
        rows[-1].row_hash,
    )
