"""Scale-out: several `otpgate serve` nodes over one PostgreSQL and one Redis.

Each test gets a fresh PostgreSQL database and Redis key prefix and removes them afterwards.
Backend outages are simulated with a TCP proxy (tests/support/proxy.py) between otpgate and
the backend, so the shared PostgreSQL and Redis keep running for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis

from support.harness import (
    Server,
    add_merchant,
    add_user,
    cli,
    free_port,
    inbox_codes,
    init_body,
    issue_token,
    running_server,
    signed_request,
    verify_body,
)
from support.proxy import fault_proxy

PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379"


def _pg_admin(sql: str) -> None:
    async def go() -> None:
        connection = await asyncpg.connect(f"{PG}/test", timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(go())


def _backends_up() -> bool:
    try:
        _pg_admin("SELECT 1")
        return bool(redis.Redis.from_url(REDIS, socket_timeout=1).ping())
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _backends_up(), reason="PostgreSQL or Redis is not running")


@dataclass
class Cluster:
    data_dir: Path
    database: str
    prefix: str


@contextlib.contextmanager
def cluster(tmp_path: Path, *, pg_port: int = 5432, redis_port: int = 6379) -> Iterator[Cluster]:
    """A data dir configured for PostgreSQL + Redis, with its own database and key prefix."""
    name = f"otpgate_t_{secrets.token_hex(4)}"
    prefix = f"otpgate-test-{secrets.token_hex(4)}"
    _pg_admin(f"CREATE DATABASE {name}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.toml").write_text(
        f'DATABASE_URL = "postgresql://postgres@127.0.0.1:{pg_port}/{name}"\n'
        f'REDIS_URL = "redis://127.0.0.1:{redis_port}"\n'
        f'REDIS_PREFIX = "{prefix}"\n'
    )
    try:
        status, out = cli(data, "init")
        assert status == 0, out
        yield Cluster(data, name, prefix)
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        client = redis.Redis.from_url(REDIS)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


async def _spread(
    nodes: list[Server], requests: list[tuple[str, dict[str, str], bytes]], client_id: str
) -> list[str]:
    """Send all requests at once, alternating nodes; every answer's signature is checked."""
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        responses = await asyncio.gather(
            *(
                http.post(nodes[i % len(nodes)].url + path, content=raw, headers=headers)
                for i, (path, headers, raw) in enumerate(requests)
            )
        )
    return [
        nodes[i % len(nodes)].check(response, requests[i][0], client_id).code
        for i, response in enumerate(responses)
    ]


def _pg_rows(database: str, sql: str) -> list[tuple[object, ...]]:
    async def go() -> list[tuple[object, ...]]:
        connection = await asyncpg.connect(f"{PG}/{database}", timeout=5)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(go())


def test_two_nodes_share_the_attempt_cap_and_idempotency(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        merchant = add_merchant(c.data_dir, "M_BIG", "--rate", "100000")
        add_user(c.data_dir, "alice", "--phone", "+14155550123")
        token = issue_token(c.data_dir, "M_BIG", "alice")
        with running_server(c.data_dir) as a, running_server(c.data_dir) as b:
            inits = [
                signed_request(merchant, "initAuthentication", init_body("dup", token))
                for _ in range(50)
            ]
            assert Counter(asyncio.run(_spread([a, b], inits, "M_BIG"))) == {"SUCCESS": 50}
            (code,) = inbox_codes(c.data_dir, "alice")
            time.sleep(0.5)
            assert len(inbox_codes(c.data_dir, "alice")) == 1
            assert _pg_rows(c.database, "SELECT count(*) FROM challenges") == [(1,)]
            assert _pg_rows(c.database, "SELECT count(*) FROM outbox") == [(1,)]

            wrong = str((int(code) + 1) % 1_000_000).zfill(6)
            guesses = [
                signed_request(merchant, "verifyAuthentication", verify_body("dup", wrong))
                for _ in range(200)
            ]
            codes = Counter(asyncio.run(_spread([a, b], guesses, "M_BIG")))
            assert codes == {"VERIFY_UNMATCHED": 4, "VERIFY_TIMES_EXCEED_LIMIT": 196}
            assert _pg_rows(c.database, "SELECT attempts, state FROM challenges") == [
                (5, "exhausted")
            ]
            right = [signed_request(merchant, "verifyAuthentication", verify_body("dup", code))]
            assert asyncio.run(_spread([b], right, "M_BIG")) == ["VERIFY_TIMES_EXCEED_LIMIT"]


def test_client_rate_holds_in_total_across_nodes(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        merchant = add_merchant(c.data_dir, "M_RATED", "--rate", "20")
        with running_server(c.data_dir) as a, running_server(c.data_dir) as b:
            requests = [
                signed_request(merchant, "verifyAuthentication", verify_body(f"x{i}", "123456"))
                for i in range(60)
            ]
            codes = Counter(asyncio.run(_spread([a, b], requests, "M_RATED")))
    admitted = 60 - codes["REQUEST_TRAFFIC_EXCEED_LIMIT"]
    # 20/s for the client as a whole: per-node limits would admit up to 40.
    assert 1 <= admitted <= 20, codes


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _ready(server: Server) -> bool:
    try:
        return httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("backend", ["postgresql", "redis"])
def test_backend_outage_answers_u_then_recovers(tmp_path: Path, backend: str) -> None:
    proxy_port = free_port()
    ports = {"pg_port": proxy_port} if backend == "postgresql" else {"redis_port": proxy_port}
    target = 5432 if backend == "postgresql" else 6379
    with fault_proxy("127.0.0.1", target, proxy_port) as proxy, cluster(tmp_path, **ports) as c:
        merchant = add_merchant(c.data_dir, "M_SHOP", "--rate", "100000")
        users = [f"u{i}" for i in range(8)]
        tokens = {}
        for user in users:
            add_user(c.data_dir, user, "--phone", f"+1415555{len(tokens):04d}")
            tokens[user] = issue_token(c.data_dir, "M_SHOP", user)
        env = {"OTPGATE_CLIENT_CACHE_SECONDS": "0"}
        with running_server(c.data_dir, env=env) as node:
            succeeded = []
            with httpx.Client(timeout=30) as http:
                for user in users[:3]:
                    answer = node.post(
                        merchant,
                        "initAuthentication",
                        init_body(f"before-{user}", tokens[user]),
                        http=http,
                    )
                    assert answer.code == "SUCCESS"
                    succeeded.append(f"before-{user}")
                proxy.down()
                outage = []
                for user in users[3:5]:
                    started = time.monotonic()
                    answer = node.post(
                        merchant,
                        "initAuthentication",
                        init_body(f"during-{user}", tokens[user]),
                        http=http,
                    )
                    outage.append((answer.code, answer.status, time.monotonic() - started))
                assert all(
                    code == "UNKNOWN_EXCEPTION" and status == "U" for code, status, _ in outage
                ), outage
                assert all(seconds < 10 for _, _, seconds in outage), outage
                assert not _ready(node)
                proxy.up()
                assert _wait_for(lambda: _ready(node), 30), "did not become ready again"
                for user in users[3:]:
                    rid = f"after-{user}"
                    answer = node.post(
                        merchant, "initAuthentication", init_body(rid, tokens[user]), http=http
                    )
                    assert answer.code == "SUCCESS", answer.body
                    succeeded.append(rid)
        stored = {row[0] for row in _pg_rows(c.database, "SELECT request_id FROM challenges")}
        assert set(succeeded) <= stored
