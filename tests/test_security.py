"""Security promises, end to end: brute force, timing, secrets at rest and in logs, audit chain."""

from __future__ import annotations

import base64
import json
import random
import re
import sqlite3
import statistics
import time
from pathlib import Path

import httpx

from support.harness import (
    Server,
    add_merchant,
    add_user,
    cli,
    cli_json,
    inbox_codes,
    init_body,
    init_data_dir,
    issue_token,
    running_server,
    signed_request,
    verify_body,
)

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


def test_brute_force_with_a_valid_token_is_stopped_by_the_failure_budget(tmp_path: Path) -> None:
    """The attacker's best case: send limits off, a fresh code whenever wanted."""
    data = init_data_dir(tmp_path / "d", user_send_interval_seconds=0, user_sends_per_10_min=0)
    attacker = add_merchant(data, "M_EVIL", "--rate", "100000")
    add_user(data, "victim", "--phone", "+14155550123")
    token = issue_token(data, "M_EVIL", "victim")
    evaluated = 0
    refused = []
    with running_server(data) as server, httpx.Client(timeout=10) as http:
        for round_no in range(10):
            rid = f"bf-{round_no}"
            started = server.post(attacker, INIT, init_body(rid, token), http=http)
            if started.code != "SUCCESS":
                refused.append(started.code)
                continue
            for guess in range(5):
                answer = server.post(
                    attacker, VERIFY, verify_body(rid, f"{round_no}{guess:05d}"), http=http
                )
                if answer.code in {"VERIFY_UNMATCHED", "VERIFY_TIMES_EXCEED_LIMIT"}:
                    evaluated += 1
                else:
                    refused.append(answer.code)
    assert evaluated == 10  # the budget: 10 evaluated guesses, then nothing more
    assert refused and set(refused) == {"USER_STATUS_ABNORMAL"}
    db = sqlite3.connect(data / "otpgate.db")
    (locked_until,) = db.execute("SELECT locked_until FROM users").fetchone()
    assert 850 < locked_until - time.time() <= 900


def test_verify_timing_does_not_reveal_id_or_state(tmp_path: Path) -> None:
    """Wrong code, unknown id, expired challenge and another client's id: equal within noise."""
    data = init_data_dir(
        tmp_path / "d",
        user_failure_budget=0,
        otp_max_attempts=1_000_000,
        user_send_interval_seconds=0,
        request_time_window_seconds=0,
        otp_ttl_seconds=3600,
    )
    mine = add_merchant(data, "M_MINE", "--rate", "1000000")
    other = add_merchant(data, "M_OTHER", "--rate", "1000000")
    add_user(data, "u1", "--phone", "+14155550123")
    add_user(data, "u2", "--phone", "+14155550124")
    add_user(data, "u3", "--phone", "+14155550125")
    with running_server(data) as server:
        for user, rid, merchant in (
            ("u1", "live", mine),
            ("u2", "old", mine),
            ("u3", "theirs", other),
        ):
            token = issue_token(data, merchant.client_id, user)
            assert server.post(merchant, INIT, init_body(rid, token)).code == "SUCCESS"
        db = sqlite3.connect(data / "otpgate.db")
        db.execute("UPDATE challenges SET expires_at = 0 WHERE request_id = 'old'")
        db.commit()
        cases = {
            "wrong code": signed_request(mine, VERIFY, verify_body("live", "000000")),
            "unknown id": signed_request(mine, VERIFY, verify_body("nobody", "000000")),
            "expired": signed_request(mine, VERIFY, verify_body("old", "000000")),
            "other client's id": signed_request(mine, VERIFY, verify_body("theirs", "000000")),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        order = [name for name in cases for _ in range(1500)]
        random.Random(7).shuffle(order)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for name in list(cases) * 50:  # warm-up
                path, headers, raw = cases[name]
                http.post(path, content=raw, headers=headers)
            for name in order:
                path, headers, raw = cases[name]
                started = time.perf_counter()
                response = http.post(path, content=raw, headers=headers)
                samples[name].append(time.perf_counter() - started)
                assert response.status_code == 200
    medians = {name: statistics.median(values) for name, values in samples.items()}
    spread = max(medians.values()) - min(medians.values())
    overall = statistics.median(medians.values())
    report = {name: f"{value * 1e6:.0f}us" for name, value in medians.items()}
    # Noise on loopback is ~tens of µs; a state-dependent branch (a store round trip, an RSA
    # operation) would show as hundreds.
    assert spread < max(100e-6, 0.08 * overall), report


def _everything_written(data: Path, server: Server) -> tuple[bytes, str]:
    raw = b"".join(p.read_bytes() for p in data.glob("otpgate.db*"))
    db = sqlite3.connect(data / "otpgate.db")
    dump = "\n".join(db.iterdump())
    return raw + dump.encode(), server.log()


def test_no_secret_in_database_or_logs(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "d", log_level="debug", user_send_interval_seconds=0)
    merchant = add_merchant(data, "M_SHOP")
    add_user(data, "alice", "--phone", "+14155550123", "--email", "alice@example.com")
    token = issue_token(data, "M_SHOP", "alice")
    codes: list[str] = []
    with running_server(data) as server:
        for i, channel in enumerate(["SMS", "EMAIL", "SMS"]):
            rid = f"s-{i}"
            assert server.post(merchant, INIT, init_body(rid, token, channel)).code == "SUCCESS"
            code = inbox_codes(data, "alice", count=i + 1)[0]
            codes.append(code)
            assert server.post(merchant, VERIFY, verify_body(rid, wrong(code))).code
            assert server.post(merchant, VERIFY, verify_body(rid, code)).code == "SUCCESS"
        cli(data, "outbox", "list", "--json")
        written, logs = _everything_written(data, server)
    assert "answered" in logs  # the per-request log lines are there to be searched
    secrets_document = json.loads((data / "secrets.json").read_text())
    hmac_key = base64.b64decode(secrets_document["hmac_keys"]["k1"])
    sealing_key = base64.b64decode(secrets_document["sealing_key"])
    pem = (data / "server-private-key.pem").read_text()
    pem_lines = [line for line in pem.splitlines() if line and "-----" not in line]
    forbidden_text = [
        token,
        *pem_lines,
        secrets_document["hmac_keys"]["k1"],
        secrets_document["sealing_key"],
    ]
    for needle in forbidden_text:
        assert needle.encode() not in written, needle[:12]
        assert needle not in logs, needle[:12]
    for needle_bytes in (hmac_key, sealing_key):
        assert needle_bytes not in written
    for code in codes:
        pattern = re.compile(rf"(?<![0-9a-f]){code}(?![0-9a-f])")
        assert not pattern.search(logs), f"code {code} in logs"
        assert not re.search(rf"(?<!\d){code}(?!\d)".encode(), written), f"code {code} in db"


def test_audit_chain_detects_edit_delete_and_insert(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "d", user_send_interval_seconds=0)
    merchant = add_merchant(data, "M_SHOP")
    add_user(data, "alice", "--phone", "+14155550123")
    token = issue_token(data, "M_SHOP", "alice")
    with running_server(data) as server:
        for i in range(4):
            server.post(merchant, INIT, init_body(f"a-{i}", token))
            server.post(merchant, VERIFY, verify_body(f"a-{i}", "000000"))
    intact = cli_json(data, "audit", "verify")
    assert intact["intact"] is True and intact["rows"] == 8
    db_path = data / "otpgate.db"

    def tamper(sql: str) -> dict[str, object]:
        db = sqlite3.connect(db_path)
        db.execute("CREATE TABLE IF NOT EXISTS audit_backup AS SELECT * FROM audit")
        db.execute("DELETE FROM audit")
        db.execute("INSERT INTO audit SELECT * FROM audit_backup")
        db.execute(sql)
        db.commit()
        code, out = cli(data, "audit", "verify", "--json")
        assert code == 1, out
        return dict(json.loads(out))

    edited = tamper("UPDATE audit SET result_code = 'SUCCESS' WHERE seq = 4")
    assert edited["firstBadRow"] == 4 and "edited" in str(edited["reason"])
    deleted = tamper("DELETE FROM audit WHERE seq = 3")
    assert deleted["firstBadRow"] == 4
    inserted = tamper(
        "INSERT INTO audit SELECT 100, at, api, client_id, request_id, user_id, result_code,"
        " detail, prev_hash, row_hash FROM audit WHERE seq = 2"
    )
    assert inserted["firstBadRow"] == 100
