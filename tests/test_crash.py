"""Crash safety on the embedded default: SIGKILL the server under mixed load, then restart.

After the restart the database must be intact, every init that was answered SUCCESS must have
its challenge and its message, no challenge may have lost an attempt it had answered for, and
no message may be delivered twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

from support.harness import (
    Merchant,
    Server,
    add_merchant,
    init_data_dir,
    running_server,
    signed_request,
    start_server,
)

USERS = 120


def _kill_tree(server: Server) -> None:
    parent = psutil.Process(server.process.pid)
    for process in [*parent.children(recursive=True), parent]:
        process.send_signal(signal.SIGKILL)
    server.process.wait(10)


async def _mixed_load(
    server: Server, merchant: Merchant, tokens: list[str], stop_after: float
) -> tuple[set[str], dict[str, int]]:
    """Inits for every user, then wrong guesses at the created challenges, until killed."""
    succeeded: set[str] = set()
    evaluated: dict[str, int] = defaultdict(int)
    deadline = time.monotonic() + stop_after

    async def one_user(http: httpx.AsyncClient, index: int) -> None:
        rid = f"crash-{index}"
        path, headers, raw = signed_request(
            merchant,
            "initAuthentication",
            {
                "authenticationType": "OTP",
                "authenticationRequestId": rid,
                "authenticationChannelType": "SMS",
                "userIdentityType": "WALLET_TOKEN",
                "userIdentityValue": tokens[index],
            },
        )
        try:
            answer = (await http.post(path, content=raw, headers=headers)).json()
        except httpx.HTTPError:
            return
        if answer["result"]["resultCode"] != "SUCCESS":
            return
        succeeded.add(rid)
        while time.monotonic() < deadline:
            path, headers, raw = signed_request(
                merchant,
                "verifyAuthentication",
                {
                    "authenticationType": "OTP",
                    "authenticationRequestId": rid,
                    "authenticationValue": "0000000",  # 7 digits: never a 6-digit code
                },
            )
            try:
                answer = (await http.post(path, content=raw, headers=headers)).json()
            except httpx.HTTPError:
                return
            if answer["result"]["resultCode"] == "VERIFY_UNMATCHED":
                evaluated[rid] += 1
            else:
                return

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=5, limits=limits) as http:
        tasks = [asyncio.create_task(one_user(http, i)) for i in range(USERS)]
        await asyncio.sleep(stop_after)
        _kill_tree(server)
        await asyncio.gather(*tasks, return_exceptions=True)
    return succeeded, dict(evaluated)


def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "d", otp_max_attempts=50, user_failure_budget=0)
    merchant = add_merchant(data, "M_SHOP", "--rate", "100000")
    users = tmp_path / "users.jsonl"
    users.write_text(
        "".join(
            json.dumps({"userId": f"u{i}", "phone": f"+1415555{i:04d}"}) + "\n"
            for i in range(USERS)
        )
    )
    from support.harness import cli

    assert cli(data, "user", "import", str(users))[0] == 0
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"u{i}\n" for i in range(USERS)))
    status, out = cli(data, "token", "issue-batch", "--client", "M_SHOP", "--users-file", str(ids))
    assert status == 0, out
    tokens = [json.loads(line)["accessToken"] for line in out.splitlines()]

    server = start_server(data, workers=2)
    succeeded, evaluated = asyncio.run(_mixed_load(server, merchant, tokens, stop_after=2.5))
    assert succeeded, "the load produced no successful init before the kill"

    db = sqlite3.connect(data / "otpgate.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    challenges = dict(db.execute("SELECT request_id, attempts FROM challenges").fetchall())
    assert succeeded <= set(challenges), "an init answered SUCCESS lost its challenge"
    for rid, answered in evaluated.items():
        assert challenges[rid] >= answered, f"{rid} lost attempts it had answered for"
    queued = dict(
        db.execute(
            "SELECT c.request_id, count(o.id) FROM challenges c"
            " JOIN outbox o ON o.challenge_id = c.id GROUP BY c.request_id"
        ).fetchall()
    )
    assert all(queued.get(rid) == 1 for rid in succeeded), "a SUCCESS init has no message"
    db.close()

    # After a restart, the in-process worker delivers every queued message, each once.
    with running_server(data):
        deadline = time.time() + 20
        while time.time() < deadline:
            db = sqlite3.connect(data / "otpgate.db")
            pending = db.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()
            db.close()
            if pending == (0,):
                break
            time.sleep(0.2)
    db = sqlite3.connect(data / "otpgate.db")
    assert db.execute("SELECT count(*) FROM outbox WHERE status != 'sent'").fetchone() == (0,)
    per_challenge = db.execute(
        "SELECT o.challenge_id, count(i.id) FROM outbox o LEFT JOIN inbox i ON i.outbox_id = o.id"
        " GROUP BY o.challenge_id"
    ).fetchall()
    assert per_challenge and all(count == 1 for _, count in per_challenge)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
