"""Delivery end to end (issue #3): `otpgate serve` / `otpgate worker` against real SMTP and HTTP
servers started by the tests.

The providers' unit tests (tests/delivery) prove each request's shape; these prove the whole path:
init -> outbox row -> worker -> provider -> the outside world, and the code that arrived there
verifies.  Failure injection, the outbox's statuses, the lease across worker processes, SIGTERM
and SIGKILL of a worker, and that a slow gateway never slows the API are checked against the
database (sqlite3 on otpgate.db), `otpgate outbox list` and what the fake servers recorded.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.gateways import Reply, SmsGateway, SmsRequest, SmtpSink, always, wait_until
from support.harness import (
    OTPGATE,
    Merchant,
    Server,
    add_merchant,
    add_user,
    cli,
    cli_json,
    free_port,
    init_body,
    init_data_dir,
    issue_token,
    running_server,
    verify_body,
)

pytestmark = pytest.mark.slow

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"
PHONE = "+14155550123"
EMAIL = "alice@example.com"
CODE_RE = re.compile(r"\b(\d{6})\b")

# Fast retries and polls so the failure tests take seconds, not minutes.
QUICK = {
    "outbox_retry_base_seconds": 0.1,
    "outbox_poll_seconds": 0.05,
}


# ---- helpers -------------------------------------------------------------------------------


def code_in(text: str) -> str:
    found = CODE_RE.search(text)
    assert found, f"no 6-digit code in {text!r}"
    return found.group(1)


def sms_settings(gateway: SmsGateway, **extra: Any) -> dict[str, Any]:
    return {
        "sms_provider": "http",
        "sms_http_url": gateway.url(),
        "sms_http_headers": '{"X-Api-Key": "k"}',
        **QUICK,
        **extra,
    }


def shop(data_dir: Path) -> Merchant:
    return add_merchant(data_dir, "M_SHOP", "--name", "Wallet", "--rate", "100000")


@dataclass
class Row:
    id: int
    user_id: str
    channel: str
    destination: str
    provider: str
    status: str
    tries: int
    last_error: str | None
    lease_until: float
    payload_is_null: bool


def outbox(data_dir: Path) -> dict[int, Row]:
    """The outbox table as it is on disk, read with plain sqlite3."""
    db = sqlite3.connect(data_dir / "otpgate.db", timeout=10)
    try:
        rows = db.execute(
            "SELECT id, user_id, channel, destination, provider, status, tries, last_error,"
            " lease_until, payload IS NULL FROM outbox ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    return {r[0]: Row(*r[:9], bool(r[9])) for r in rows}


def settled(data_dir: Path, count: int) -> dict[int, Row] | None:
    rows = outbox(data_dir)
    if len(rows) == count and all(r.status != "queued" for r in rows.values()):
        return rows
    return None


def outbox_id(request: SmsRequest) -> int:
    key = request.message_id
    assert key.startswith("otpgate-"), key
    return int(key.removeprefix("otpgate-"))


def init_ok(
    server: Server,
    merchant: Merchant,
    rid: str,
    token: str,
    channel: str = "SMS",
    http: httpx.Client | None = None,
) -> None:
    answer = server.post(merchant, INIT, init_body(rid, token, channel), http=http)
    assert (answer.code, answer.status) == ("SUCCESS", "S"), answer.body


def assert_verifies(server: Server, merchant: Merchant, rid: str, code: str) -> None:
    answer = server.post(merchant, VERIFY, verify_body(rid, code))
    assert answer.code == "SUCCESS", answer.body
    assert answer.body["isPassed"] is True


def many_users(data_dir: Path, count: int) -> list[tuple[str, str, str]]:
    """``count`` users with distinct phones and M_SHOP tokens: [(user id, phone, token)]."""
    users = [(f"u{i:03d}", f"+1415555{1000 + i}") for i in range(count)]
    import_file = data_dir / "users.jsonl"
    import_file.write_text("".join(json.dumps({"userId": u, "phone": p}) + "\n" for u, p in users))
    code, out = cli(data_dir, "user", "import", str(import_file))
    assert code == 0, out
    ids_file = data_dir / "user-ids.txt"
    ids_file.write_text("".join(u + "\n" for u, _ in users))
    code, out = cli(
        data_dir, "token", "issue-batch", "--client", "M_SHOP", "--users-file", str(ids_file)
    )
    assert code == 0, out
    tokens = {d["userId"]: d["accessToken"] for d in map(json.loads, out.splitlines())}
    return [(u, p, tokens[u]) for u, p in users]


@dataclass
class Worker:
    """A running `otpgate worker` process."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 15) -> None:
        def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            return "delivery worker started" in self.log()

        wait_until(started, timeout, "the worker to start")

    def stop(self) -> None:
        """Cleanup: SIGTERM, then SIGKILL if it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextmanager
def running_worker(
    data_dir: Path, name: str, env: Mapping[str, str] | None = None
) -> Iterator[Worker]:
    log_path = data_dir / f"worker-{name}.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [OTPGATE, "worker", "--data-dir", str(data_dir)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    worker = Worker(process, log_path)
    try:
        yield worker
    finally:
        worker.stop()


# ---- 1. email through SMTP -----------------------------------------------------------------


def test_email_init_is_delivered_by_smtp_and_its_code_verifies(tmp_path: Path) -> None:
    port = free_port()
    data = init_data_dir(
        tmp_path / "data",
        email_provider="smtp",
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_tls="none",
        smtp_from="otp@wallet.example",
        **QUICK,
    )
    merchant = shop(data)
    add_user(data, "alice", "--phone", PHONE, "--email", EMAIL)
    token = issue_token(data, "M_SHOP", "alice")
    with SmtpSink(port) as smtp, running_server(data) as server:
        before = time.time()
        init_ok(server, merchant, "r-mail", token, "EMAIL")
        wait_until(lambda: smtp.envelopes, 10, "the email at the SMTP server")
        rows = wait_until(lambda: settled(data, 1), 10, "the outbox row to finish")

        envelope = smtp.envelopes[0]
        assert envelope.mail_from == "otp@wallet.example"
        assert envelope.rcpt_tos == [EMAIL]
        mail = smtp.message(0)
        assert mail["To"] == EMAIL
        assert mail["From"] == "otp@wallet.example"
        assert mail["Subject"] == "Your Wallet verification code"
        parsed_date = email.utils.parsedate_tz(mail["Date"])
        assert parsed_date is not None, mail["Date"]
        assert parsed_date[9] in (0, None)  # UTC: "+0000" or "-0000"
        assert abs(email.utils.mktime_tz((*parsed_date[:9], 0)) - before) < 60
        (row,) = rows.values()
        message_id = re.sub(r"\s+", "", mail["Message-ID"])
        assert re.fullmatch(rf"<[^<>@]*otpgate-{row.id}[^<>@]*@wallet\.example>", message_id)
        body = mail.get_content()
        code = code_in(body)
        assert "Your Wallet verification code is" in body
        assert "It expires in 5 minutes" in body

        assert (row.channel, row.destination, row.provider) == ("EMAIL", EMAIL, "smtp")
        assert (row.status, row.tries, row.payload_is_null) == ("sent", 1, True)
        assert_verifies(server, merchant, "r-mail", code)
        assert len(smtp.envelopes) == 1


# ---- 2. SMS through an HTTP gateway --------------------------------------------------------


def test_sms_init_is_posted_to_the_http_gateway_and_its_code_verifies(tmp_path: Path) -> None:
    with SmsGateway() as gateway:
        data = init_data_dir(tmp_path / "data", **sms_settings(gateway))
        merchant = shop(data)
        add_user(data, "alice", "--phone", PHONE, "--email", EMAIL)
        token = issue_token(data, "M_SHOP", "alice")
        with running_server(data) as server:
            init_ok(server, merchant, "r-sms", token)
            rows = wait_until(lambda: settled(data, 1), 10, "the SMS to be sent")
            (request,) = gateway.snapshot()
            (row,) = rows.values()

            assert request.path == "/v1/sms"
            assert request.headers["X-Api-Key"] == "k"
            assert request.headers["Content-Type"] == "application/json"
            assert request.headers["Idempotency-Key"] == f"otpgate-{row.id}"
            body = request.json
            assert set(body) == {"to", "text"}
            assert body["to"] == PHONE
            code = code_in(body["text"])
            assert body["text"] == (
                f"Your Wallet verification code is {code}. It expires in 5 minutes. Never share it."
            )
            assert (row.status, row.tries, row.provider) == ("sent", 1, "http")
            assert_verifies(server, merchant, "r-sms", code)


# ---- 3. failure injection ------------------------------------------------------------------

FLAKY, HANGS, REFUSED, DOWN = "+14155550101", "+14155550102", "+14155550103", "+14155550104"


def failing_gateway(request: SmsRequest) -> Reply:
    if request.to == FLAKY:  # 500, 500, then 200
        return Reply(500, body=b'{"error": "internal"}') if request.nth <= 2 else Reply(200)
    if request.to == HANGS:  # first request hangs past SMS_HTTP_TIMEOUT_SECONDS
        return Reply(200, delay=1.5) if request.nth == 1 else Reply(200)
    if request.to == REFUSED:  # 400 that echoes the message back, code and all
        echo = json.dumps({"message": f"rejected: {request.text}"}).encode()
        return Reply(400, body=echo)
    if request.to == DOWN:
        return Reply(503, body=b'{"error": "maintenance"}')
    return Reply(200)


def test_gateway_failures_retry_fail_and_dead_letter(tmp_path: Path) -> None:
    with SmsGateway(failing_gateway) as gateway:
        data = init_data_dir(
            tmp_path / "data",
            **sms_settings(gateway, sms_http_timeout_seconds=0.5, outbox_max_tries=4),
        )
        merchant = shop(data)
        phones = {"flaky": FLAKY, "hangs": HANGS, "refused": REFUSED, "down": DOWN}
        tokens = {}
        for user, phone in phones.items():
            add_user(data, user, "--phone", phone)
            tokens[user] = issue_token(data, "M_SHOP", user)
        with running_server(data) as server:
            for user in phones:
                init_ok(server, merchant, f"r-{user}", tokens[user])
            rows = wait_until(lambda: settled(data, 4), 20, "every message to finish")
            time.sleep(0.5)  # room for a wrong retry to show up at the gateway
            by_user = {r.user_id: r for r in rows.values()}

            # 500, 500, 200: delivered exactly once, on the third try.
            flaky = gateway.to(FLAKY)
            assert [r.status for r in flaky] == [500, 500, 200]
            assert len([r for r in flaky if r.status == 200]) == 1
            assert len({r.message_id for r in flaky}) == 1  # the same message, retried
            # Backed off between tries (>= 0.05 + 0.1 s), at OUTBOX_RETRY_BASE_SECONDS=0.1 pace.
            assert 0.15 <= flaky[-1].arrived - flaky[0].arrived < 1.2
            assert (by_user["flaky"].status, by_user["flaky"].tries) == ("sent", 3)
            assert_verifies(server, merchant, "r-flaky", code_in(flaky[-1].text))

            # A hang past the 0.5 s timeout: given up on, retried at once, delivered.
            hangs = gateway.to(HANGS)
            assert len(hangs) == 2
            assert hangs[1].arrived - hangs[0].arrived < 1.5  # did not wait for the hung answer
            assert (by_user["hangs"].status, by_user["hangs"].tries) == ("sent", 2)
            assert "timeout" in (by_user["hangs"].last_error or "")
            assert_verifies(server, merchant, "r-hangs", code_in(hangs[-1].text))

            # 400: permanent, failed after one try, never retried.
            refused = gateway.to(REFUSED)
            assert len(refused) == 1
            row = by_user["refused"]
            assert (row.status, row.tries) == ("failed", 1)
            assert row.last_error and "HTTP 400" in row.last_error

            # 503 until OUTBOX_MAX_TRIES: dead letter.
            down = gateway.to(DOWN)
            assert [r.status for r in down] == [503] * 4
            row = by_user["down"]
            assert (row.status, row.tries) == ("failed", 4)
            assert row.last_error and row.last_error.startswith("gave up")
            assert "HTTP 503" in row.last_error

            # Every finished row had its sealed payload wiped.
            assert all(r.payload_is_null for r in rows.values())

            # `outbox list` reports all of it, and never a code.
            codes = {code_in(r.text) for r in gateway.snapshot()}
            assert len(codes) == 4
            listed = cli_json(data, "outbox", "list")
            assert {(d["userId"], d["status"], d["tries"]) for d in listed} == {
                ("flaky", "sent", 3),
                ("hangs", "sent", 2),
                ("refused", "failed", 1),
                ("down", "failed", 4),
            }
            assert all(d["channel"] == "SMS" for d in listed)
            assert {d["destination"] for d in listed} == set(phones.values())
            refused_entry = next(d for d in listed if d["userId"] == "refused")
            assert "HTTP 400" in refused_entry["lastError"]
            status, text_output = cli(data, "outbox", "list")
            assert status == 0
            assert "failed" in text_output and "gave up" in text_output
            json_output = json.dumps(listed)
            for code in codes:
                assert code not in json_output
                assert code not in text_output
            # The 400 answer echoed the message: its text may show, its code only masked.
            assert "######" in refused_entry["lastError"]


def test_message_whose_code_expired_before_delivery_is_never_sent(tmp_path: Path) -> None:
    first: list[float] = []

    def down_then_up(request: SmsRequest) -> Reply:
        # Down (503) from the first attempt until just after the 1 s code has expired, then up.
        first.append(request.arrived)
        return Reply(503) if request.arrived - first[0] < 1.3 else Reply(200)

    with SmsGateway(down_then_up) as gateway:
        data = init_data_dir(
            tmp_path / "data",
            **sms_settings(gateway, otp_ttl_seconds=1, outbox_max_tries=50),
        )
        merchant = shop(data)
        add_user(data, "alice", "--phone", PHONE)
        token = issue_token(data, "M_SHOP", "alice")
        with running_server(data) as server:
            init_ok(server, merchant, "r-late", token)
            rows = wait_until(lambda: settled(data, 1), 15, "the message to finish")
            (row,) = rows.values()
            assert row.status == "expired"
            assert row.last_error == "code expired"
            assert row.payload_is_null
            tries_at_expiry = len(gateway.snapshot())
            assert tries_at_expiry >= 1  # it was tried while the gateway was down
            assert row.tries == tries_at_expiry + 1  # the last claim found it expired, sent nothing
            time.sleep(1.0)  # the gateway is up by now; the expired message must stay unsent
            assert gateway.accepted() == []
            assert len(gateway.snapshot()) == tries_at_expiry
            (entry,) = cli_json(data, "outbox", "list")
            assert (entry["status"], entry["lastError"]) == ("expired", "code expired")
            code = code_in(gateway.snapshot()[0].text)
            assert code not in json.dumps(entry)


# ---- 4. scale-out worker and SIGTERM -------------------------------------------------------


def test_separate_worker_delivers_and_finishes_the_message_in_hand_on_sigterm(
    tmp_path: Path,
) -> None:
    with SmsGateway(always(Reply(200, delay=1.0))) as gateway:
        data = init_data_dir(tmp_path / "data", **sms_settings(gateway, delivery_in_process=False))
        merchant = shop(data)
        add_user(data, "alice", "--phone", PHONE)
        token = issue_token(data, "M_SHOP", "alice")
        with running_server(data) as server:
            init_ok(server, merchant, "r-out", token)
            time.sleep(0.6)
            # DELIVERY_IN_PROCESS=false: serve queues but does not deliver.
            assert gateway.snapshot() == []
            (row,) = outbox(data).values()
            assert (row.status, row.tries) == ("queued", 0)

            with running_worker(data, "solo") as worker:
                wait_until(gateway.snapshot, 15, "the worker's request at the gateway")
                (request,) = gateway.snapshot()
                assert request.status is None  # the gateway is still working on it
                worker.process.send_signal(signal.SIGTERM)
                returncode = worker.process.wait(10)
                stopped_at = time.time()
                assert returncode == 0, worker.log()
            assert request.status == 200 and request.answered
            assert stopped_at - request.arrived >= 0.9  # it waited for the answer
            (row,) = outbox(data).values()
            assert (row.status, row.tries, row.payload_is_null) == ("sent", 1, True)
            assert len(gateway.snapshot()) == 1
            assert_verifies(server, merchant, "r-out", code_in(request.text))


# ---- 5. crash safety and the lease ---------------------------------------------------------


def test_worker_killed_mid_batch_loses_nothing_and_resends_only_what_was_in_hand(
    tmp_path: Path,
) -> None:
    count = 30

    def mixed_latency(request: SmsRequest) -> Reply:
        # Half the phones answer in 0.1 s, half in 1.2 s (below the 1.6 s lease bound), so at
        # the kill half the batch is finished and half is in hand.
        return Reply(200, delay=0.1 if int(request.to[-1]) % 2 == 0 else 1.2)

    with SmsGateway(mixed_latency) as gateway:
        data = init_data_dir(
            tmp_path / "data",
            **sms_settings(
                gateway,
                delivery_in_process=False,
                outbox_lease_seconds=2,
                sms_http_timeout_seconds=1.5,
            ),
        )
        merchant = shop(data)
        users = many_users(data, count)
        with running_server(data) as server, ExitStack() as stack:
            with httpx.Client(timeout=30) as http:
                for user, _, token in users:
                    init_ok(server, merchant, f"r-{user}", token, http=http)
            assert [r.status for r in outbox(data).values()] == ["queued"] * count

            first = stack.enter_context(
                running_worker(data, "a", {"OTPGATE_SMS_HTTP_URL": gateway.url("/a")})
            )

            def mid_batch() -> bool:
                sent = [r for r in outbox(data).values() if r.status == "sent"]
                return len(gateway.snapshot()) == count and len(sent) == count // 2

            wait_until(mid_batch, 15, "half the batch sent, half in hand")
            first.process.send_signal(signal.SIGKILL)
            assert first.process.wait(5) == -signal.SIGKILL
            at_kill = outbox(data)
            sent_at_kill = {i for i, r in at_kill.items() if r.status == "sent"}
            in_hand = {i for i, r in at_kill.items() if r.status == "queued"}
            assert len(sent_at_kill) + len(in_hand) == count
            assert in_hand, "the kill came after the batch had finished"
            assert all(at_kill[i].tries == 1 and at_kill[i].lease_until > 0 for i in in_hand)

            stack.enter_context(
                running_worker(data, "b", {"OTPGATE_SMS_HTTP_URL": gateway.url("/b")})
            )
            rows = wait_until(lambda: settled(data, count), 20, "every message to be sent")

        requests = gateway.snapshot()
        by_worker = Counter(r.path for r in requests)
        per_message = Counter(outbox_id(r) for r in requests)
        duplicates = sum(n - 1 for n in per_message.values())
        print(
            f"\ncrash test: {len(sent_at_kill)} sent before the kill, {len(in_hand)} in hand,"
            f" {duplicates} duplicates; requests per worker {dict(by_worker)}"
        )
        # Nothing lost: every row sent, every user's phone got its message.
        assert all((r.status, r.payload_is_null) == ("sent", True) for r in rows.values())
        assert {r.to for r in requests} == {phone for _, phone, _ in users}
        assert set(per_message) == set(rows)
        # Only messages in hand at the kill were sent again, each once, by the new worker.
        assert {outbox_id(r) for r in requests if r.path == "/b"} == in_hand
        assert all(per_message[i] == 1 for i in sent_at_kill)
        assert all(per_message[i] <= 2 for i in in_hand)
        assert duplicates <= len(in_hand) <= 32
        assert all(rows[i].tries == 2 for i in in_hand)


def test_two_workers_deliver_every_message_exactly_once(tmp_path: Path) -> None:
    count = 50
    with SmsGateway(always(Reply(200, delay=0.3))) as gateway:
        data = init_data_dir(tmp_path / "data", **sms_settings(gateway, delivery_in_process=False))
        merchant = shop(data)
        users = many_users(data, count)
        with running_server(data) as server, ExitStack() as stack:
            workers = [
                stack.enter_context(
                    running_worker(data, name, {"OTPGATE_SMS_HTTP_URL": gateway.url(f"/{name}")})
                )
                for name in ("a", "b")
            ]
            for worker in workers:
                worker.wait_started()
            # Both workers poll while the inits arrive, so they claim against each other.
            with httpx.Client(timeout=30) as http:
                for user, _, token in users:
                    init_ok(server, merchant, f"r-{user}", token, http=http)
            rows = wait_until(lambda: settled(data, count), 20, "every message to be sent")
            time.sleep(0.3)

        requests = gateway.snapshot()
        by_worker = Counter(r.path for r in requests)
        print(f"\ntwo workers: requests per worker {dict(by_worker)}")
        assert len(requests) == count
        assert Counter(outbox_id(r) for r in requests) == Counter(set(rows))
        assert Counter(r.to for r in requests) == Counter({phone for _, phone, _ in users})
        assert all((r.status, r.tries) == ("sent", 1) for r in rows.values())
        assert by_worker["/a"] > 0 and by_worker["/b"] > 0, by_worker


# ---- 6. a slow gateway never slows the API -------------------------------------------------


def test_slow_gateway_does_not_slow_init(tmp_path: Path) -> None:
    count = 5
    with SmsGateway(always(Reply(200, delay=2.0))) as gateway:
        data = init_data_dir(tmp_path / "data", **sms_settings(gateway))
        merchant = shop(data)
        users = many_users(data, count)
        with running_server(data) as server, httpx.Client(timeout=30) as http:
            durations = []
            for user, _, token in users:
                started = time.perf_counter()
                init_ok(server, merchant, f"r-{user}", token, http=http)
                durations.append(time.perf_counter() - started)
                time.sleep(0.1)  # spaced out, so later inits overlap the first 2 s send
            last_answered = time.time()
            rows = wait_until(lambda: settled(data, count), 20, "every message to be sent")

        requests = gateway.snapshot()
        # The inits overlapped a send in progress (else this proves nothing) ...
        assert requests and min(r.arrived for r in requests) < last_answered
        # ... and each still answered fast.
        assert max(durations) < 1.0, durations
        assert len(requests) == count
        assert all(r.status == "sent" for r in rows.values())
        assert sum(durations) < 2.0, durations  # not one init waited for a 2 s send
