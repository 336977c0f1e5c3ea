"""The operator command line, driven as OPERATOR.md says (subprocesses where it matters)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx

from otpgate.protocol import generate_private_key, load_public_key, public_key_bare
from support.harness import OTPGATE, Server, cli, cli_json, free_port, init_data_dir, wait_ready


def run(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--data-dir", str(data_dir)] if data_dir else []
    return subprocess.run(
        [OTPGATE, *args, *extra], capture_output=True, text=True, timeout=60, check=False
    )


def test_init_creates_keys_and_is_idempotent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = run("init", "--json", data_dir=data)
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)["created"]
    assert {"server-private-key.pem", "secrets.json", "config.toml"} <= set(created)
    assert stat.S_IMODE((data / "server-private-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "secrets.json").stat().st_mode) == 0o600
    key_before = (data / "server-private-key.pem").read_bytes()
    secrets_before = (data / "secrets.json").read_bytes()
    again = run("init", "--json", data_dir=data)
    assert again.returncode == 0
    assert json.loads(again.stdout)["created"] == []
    assert (data / "server-private-key.pem").read_bytes() == key_before
    assert (data / "secrets.json").read_bytes() == secrets_before
    assert "# OTP_TTL_SECONDS = 300" in (data / "config.toml").read_text()


def test_public_key_pem_and_bare_are_the_same_key(data_dir: Path) -> None:
    pem = run("public-key", data_dir=data_dir).stdout
    bare = run("public-key", "--bare", data_dir=data_dir).stdout.strip()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert "\n" not in bare and "-----" not in bare
    assert load_public_key(pem).public_numbers() == load_public_key(bare).public_numbers()


def test_commands_before_init_say_what_to_do(tmp_path: Path) -> None:
    result = run("user", "list", data_dir=tmp_path / "nothing")
    assert result.returncode != 0
    assert "otpgate init" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_lifecycle(data_dir: Path, tmp_path: Path) -> None:
    key = generate_private_key()
    bare = tmp_path / "k.txt"
    bare.write_text(public_key_bare(key.public_key()))  # the bare base64 form is accepted too
    assert cli(data_dir, "client", "add", "M1", "--public-key", str(bare))[0] == 0
    code, _ = cli(data_dir, "client", "add", "M1", "--public-key", str(bare))
    assert code == 2
    assert (
        cli(data_dir, "client", "key-add", "M1", "--public-key", str(bare), "--key-version", "2")[0]
        == 0
    )
    assert cli(data_dir, "client", "key-revoke", "M1", "--key-version", "1")[0] == 0
    assert cli(data_dir, "client", "disable", "M1")[0] == 0
    (listed,) = cli_json(data_dir, "client", "list")
    assert listed["clientId"] == "M1"
    assert listed["enabled"] is False
    assert listed["keyVersions"] == [2]
    assert cli(data_dir, "client", "add", "SANDBOX_M2", "--public-key", str(bare))[0] == 0
    clients = {c["clientId"]: c for c in cli_json(data_dir, "client", "list")}
    assert clients["SANDBOX_M2"]["sandbox"] is True


def test_bad_public_key_file_is_a_clear_error(data_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    result = run("client", "add", "M1", "--public-key", str(junk), data_dir=data_dir)
    assert result.returncode == 2
    assert "junk.pem" in result.stderr and "Traceback" not in result.stderr


def test_user_validation_and_status(data_dir: Path) -> None:
    result = run("user", "add", "u1", "--phone", "555-1234", data_dir=data_dir)
    assert result.returncode == 2 and "E.164" in result.stderr
    result = run("user", "add", "u1", "--email", "not-an-address", data_dir=data_dir)
    assert result.returncode == 2 and "email" in result.stderr.lower()
    assert (
        cli(data_dir, "user", "add", "u1", "--phone", "+442071838750", "--locale", "en-GB")[0] == 0
    )
    assert cli(data_dir, "user", "set-status", "u1", "FROZEN")[0] == 0
    (user,) = cli_json(data_dir, "user", "list")
    assert user == {
        "userId": "u1",
        "status": "FROZEN",
        "phone": "+442071838750",
        "email": None,
        "locale": "en-GB",
        "lockedUntil": None,
    }
    assert cli(data_dir, "user", "delete", "u1")[0] == 0
    assert cli_json(data_dir, "user", "list") == []


def test_user_import_is_all_or_nothing(data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"userId": "a", "phone": "+14155550123"}\n{"userId": "b", "phone": "nope"}\n')
    result = run("user", "import", str(bad), data_dir=data_dir)
    assert result.returncode == 2 and "line 2" in result.stderr
    assert cli_json(data_dir, "user", "list") == []
    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(
            json.dumps({"userId": f"u{i}", "email": f"u{i}@example.com", "locale": "en"}) + "\n"
            for i in range(2000)
        )
    )
    assert cli_json(data_dir, "user", "import", str(good)) == {"imported": 2000}


def test_tokens_issue_batch_and_revoke(data_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text(public_key_bare(generate_private_key().public_key()))
    cli(data_dir, "client", "add", "M1", "--public-key", str(key))
    cli(data_dir, "user", "add", "u1", "--phone", "+14155550123")
    cli(data_dir, "user", "add", "u2", "--phone", "+14155550124")
    issued = cli_json(
        data_dir, "token", "issue", "--client", "M1", "--user", "u1", "--ttl-seconds", "60"
    )
    assert issued["accessToken"].startswith("otk_")
    assert issued["accessTokenExpiryTime"].endswith("+00:00")
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\n")
    code, out = cli(data_dir, "token", "issue-batch", "--client", "M1", "--users-file", str(users))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [x["userId"] for x in lines] == ["u1", "u2"]
    assert len({x["accessToken"] for x in lines}) == 2
    assert cli(data_dir, "token", "revoke", issued["accessToken"])[0] == 0
    assert cli(data_dir, "token", "revoke", issued["accessToken"])[0] == 2
    result = run("token", "issue", "--client", "M1", "--user", "ghost", data_dir=data_dir)
    assert result.returncode == 2 and "ghost" in result.stderr
    # Tokens are stored hashed: the database never holds one in clear.
    assert issued["accessToken"].encode() not in (data_dir / "otpgate.db").read_bytes()


def test_serve_logs_where_it_listens_and_exits_0_on_sigterm(data_dir: Path) -> None:
    port = free_port()
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [OTPGATE, "serve", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(
        data_dir,
        port,
        process,
        load_public_key((data_dir / "server-public-key.pem").read_bytes()),
        log_path,
    )
    wait_ready(server)
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert f"127.0.0.1:{port}" in log_path.read_text()


def test_demo_prints_a_passed_verification(tmp_path: Path) -> None:
    env = {**os.environ, "OTPGATE_DATA_DIR": str(tmp_path / "unused")}
    started = time.time()
    result = subprocess.run(
        [OTPGATE, "demo"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verification passed" in result.stdout
    assert "VERIFY_UNMATCHED" in result.stdout
    assert time.time() - started < 120


def test_settings_errors_are_reported(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    with (data / "config.toml").open("a") as handle:
        handle.write("OTP_LENGTH = 4\n")
    result = run("user", "list", data_dir=data)
    assert result.returncode == 2 and "OTP_LENGTH" in result.stderr


def test_max_body_bytes_cannot_exceed_what_the_decoder_accepts(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    with (data / "config.toml").open("a") as handle:
        handle.write("MAX_BODY_BYTES = 100000\n")
    result = run("user", "list", data_dir=data)
    assert result.returncode == 2 and "MAX_BODY_BYTES" in result.stderr
