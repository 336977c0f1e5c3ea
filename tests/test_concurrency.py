"""Concurrency claims, proven against a server with 2 worker processes.

The attempt cap and idempotent init must hold however requests interleave across processes:
hundreds of parallel requests, then the database is inspected directly.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.harness import (
    Merchant,
    Server,
    add_merchant,
    add_user,
    inbox_codes,
    init_body,
    init_data_dir,
    issue_token,
    running_server,
    signed_request,
    verify_body,
)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[Server, Merchant, str]]:
    data = init_data_dir(tmp_path / "data")
    merchant = add_merchant(data, "M_BUSY", "--rate", "100000")
    add_user(data, "alice", "--phone", "+14155550123")
    token = issue_token(data, "M_BUSY", "alice")
    with running_server(data, workers=2) as server:
        yield server, merchant, token


async def blast(server: Server, requests: list[tuple[str, dict[str, str], bytes]]) -> list[str]:
    """Send all requests at once; check every answer's signature; return result codes."""
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        responses = await asyncio.gather(
            *(http.post(path, content=raw, headers=headers) for path, headers, raw in requests)
        )
    codes = []
    for (path, _, _), response in zip(requests, responses, strict=True):
        codes.append(server.check(response, path, "M_BUSY").code)
    return codes


def test_200_concurrent_wrong_guesses_evaluate_exactly_five(
    two_workers: tuple[Server, Merchant, str],
) -> None:
    server, merchant, token = two_workers
    path, headers, raw = signed_request(merchant, "initAuthentication", init_body("r-race", token))
    assert (
        server.check(
            httpx.post(server.url + path, content=raw, headers=headers), path, "M_BUSY"
        ).code
        == "SUCCESS"
    )
    (code,) = inbox_codes(server.data_dir, "alice")
    wrong = str((int(code) + 1) % 1_000_000).zfill(6)

    guesses = [
        signed_request(merchant, "verifyAuthentication", verify_body("r-race", wrong))
        for _ in range(200)
    ]
    codes = Counter(asyncio.run(blast(server, guesses)))

    assert codes == {"VERIFY_UNMATCHED": 4, "VERIFY_TIMES_EXCEED_LIMIT": 196}
    db = sqlite3.connect(server.data_dir / "otpgate.db")
    assert db.execute("SELECT attempts, state FROM challenges").fetchall() == [(5, "exhausted")]
    right = [signed_request(merchant, "verifyAuthentication", verify_body("r-race", code))]
    assert asyncio.run(blast(server, right)) == ["VERIFY_TIMES_EXCEED_LIMIT"]


def test_concurrent_right_codes_pass_once_and_replay(
    two_workers: tuple[Server, Merchant, str],
) -> None:
    server, merchant, token = two_workers
    init = signed_request(merchant, "initAuthentication", init_body("r-pass", token))
    assert asyncio.run(blast(server, [init])) == ["SUCCESS"]
    (code,) = inbox_codes(server.data_dir, "alice")
    verifies = [
        signed_request(merchant, "verifyAuthentication", verify_body("r-pass", code))
        for _ in range(100)
    ]
    assert Counter(asyncio.run(blast(server, verifies))) == {"SUCCESS": 100}
    db = sqlite3.connect(server.data_dir / "otpgate.db")
    assert db.execute("SELECT attempts, state FROM challenges").fetchall() == [(1, "passed")]


def test_50_concurrent_identical_inits_make_one_challenge_and_one_message(
    two_workers: tuple[Server, Merchant, str],
) -> None:
    server, merchant, token = two_workers
    inits = [
        signed_request(merchant, "initAuthentication", init_body("r-dup", token)) for _ in range(50)
    ]
    assert Counter(asyncio.run(blast(server, inits))) == {"SUCCESS": 50}
    time.sleep(0.5)  # let the in-process workers drain the outbox
    assert len(inbox_codes(server.data_dir, "alice")) == 1
    db = sqlite3.connect(server.data_dir / "otpgate.db")
    assert db.execute("SELECT count(*) FROM challenges").fetchone() == (1,)
    assert db.execute("SELECT count(*), min(status) FROM outbox").fetchone() == (1, "sent")
    assert db.execute("SELECT count(*) FROM inbox").fetchone() == (1,)
