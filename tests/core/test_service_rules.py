"""The OTP rules of PROTOCOL.md §6 and §7 through the service and the embedded store.

All on a fake clock.

Time-dependent rules (expiry, send limits, the growing lockout) are checked to the second
without sleeping.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from otpgate.core.models import Client, ClientKey, User, UserStatus
from otpgate.core.otp import CodeHasher, hash_token
from otpgate.core.service import AuthenticationService, OtpPolicy
from otpgate.delivery.templates import render_message
from otpgate.protocol import InitAuthenticationRequest, ResultCode, VerifyAuthenticationRequest
from otpgate.store.sealing import Sealer
from otpgate.store.sqlite import SqliteStore

START = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp_path: Path, **policy: object) -> None:
        self.clock = FakeClock()
        self.db_path = tmp_path / "otp.db"
        self.store = SqliteStore(self.db_path, Sealer(b"k" * 32))
        self.hasher = CodeHasher({"k1": b"s" * 32}, "k1")
        self.service = AuthenticationService(
            self.store,
            self.hasher,
            render_message,
            {"SMS": "inbox", "EMAIL": "inbox"},
            OtpPolicy(**policy),  # type: ignore[arg-type]
            clock=self.clock,
        )
        self.client = Client("M1", keys=(ClientKey(1, "unused"),))
        self.sent_codes: dict[str, str] = {}

    async def setup(self) -> None:
        await self.store.migrate()
        await self.store.add_client(self.client)
        await self.store.add_users([User("alice", UserStatus.NORMAL, "+14155550123")])
        await self.store.add_tokens(
            [(hash_token("tok"), "M1", "alice", frozenset({"SEND_OTP"}), START + 10**9)]
        )

    async def init(self, request_id: str, channel: str = "SMS") -> ResultCode:
        request = InitAuthenticationRequest("OTP", request_id, channel, "WALLET_TOKEN", "tok")
        outcome = await self.service.init_authentication(self.client, request)
        return outcome.code

    async def code_of(self, request_id: str) -> str:
        """Read the code the way a user would: from the delivered message."""
        claimed = await self.store.claim_due(self.clock.now, 100, 30)
        for message in claimed:
            await self.store.deliver_to_inbox([message], self.clock.now)
        (newest, *_) = await self.store.list_inbox("alice", 1)
        return next(word for word in newest.text.replace(".", " ").split() if word.isdigit())

    async def verify(self, request_id: str, value: str) -> ResultCode:
        request = VerifyAuthenticationRequest("OTP", request_id, value)
        return (await self.service.verify_authentication(self.client, request)).code


@pytest.fixture
async def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    await harness.setup()
    return harness


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


async def test_code_is_six_digits_and_stored_only_as_hmac(h: Harness) -> None:
    assert await h.init("r1") is ResultCode.SUCCESS
    code = await h.code_of("r1")
    assert len(code) == 6 and code.isdigit()
    raw = h.db_path.read_bytes() + Path(str(h.db_path) + "-wal").read_bytes()
    assert code.encode() not in raw
    db = sqlite3.connect(h.db_path)
    (mac,) = db.execute("SELECT code_mac FROM challenges").fetchone()
    assert mac == h.hasher.mac_current("M1", "r1", code)


async def test_code_expires_after_300_seconds(h: Harness) -> None:
    await h.init("r1")
    code = await h.code_of("r1")
    h.clock.now += 300
    assert await h.verify("r1", code) is ResultCode.AUTHENTICATION_REQUEST_ID_INVALID


async def test_code_valid_just_before_expiry(h: Harness) -> None:
    await h.init("r1")
    code = await h.code_of("r1")
    h.clock.now += 299.9
    assert await h.verify("r1", code) is ResultCode.SUCCESS


async def test_send_limits_one_per_30s_and_five_per_10_min(h: Harness) -> None:
    assert await h.init("a") is ResultCode.SUCCESS
    h.clock.now += 29
    assert await h.init("b") is ResultCode.REQUEST_TRAFFIC_EXCEED_LIMIT
    codes = []
    for i in range(5):
        h.clock.now += 31
        codes.append(await h.init(f"c{i}"))
    assert codes == [ResultCode.SUCCESS] * 4 + [ResultCode.REQUEST_TRAFFIC_EXCEED_LIMIT]
    h.clock.now += 600
    assert await h.init("later") is ResultCode.SUCCESS


async def test_idempotent_init_replays_without_sending_again(h: Harness) -> None:
    assert await h.init("r1") is ResultCode.SUCCESS
    assert await h.init("r1") is ResultCode.SUCCESS  # within 30 s: a replay, not a send
    assert await h.init("r1", "EMAIL") is ResultCode.PARAM_ILLEGAL
    db = sqlite3.connect(h.db_path)
    assert db.execute("SELECT count(*) FROM outbox").fetchone() == (1,)


async def test_failure_budget_locks_with_growing_lockout(h: Harness) -> None:
    """10 consecutive failures lock the user 15 min, then 30, 60 … capped at 24 h."""
    expected = [900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 86400]
    for lockout in expected:
        failures = 0
        while failures < 10:
            h.clock.now += 31
            assert await h.init(f"r{h.clock.now}") is ResultCode.SUCCESS
            code = await h.code_of("")
            for _ in range(min(5, 10 - failures)):
                result = await h.verify(f"r{h.clock.now}", wrong(code))
                assert result in {ResultCode.VERIFY_UNMATCHED, ResultCode.VERIFY_TIMES_EXCEED_LIMIT}
                failures += 1
        # Locked now: init and verify both refused, for exactly `lockout` seconds.
        locked_at = h.clock.now
        assert await h.init("while-locked") is ResultCode.USER_STATUS_ABNORMAL
        h.clock.now = locked_at + lockout - 1
        assert await h.init("still-locked") is ResultCode.USER_STATUS_ABNORMAL
        h.clock.now = locked_at + lockout + 1


async def test_locked_user_cannot_verify_even_the_right_code(h: Harness) -> None:
    # A challenge of another merchant, pending while this merchant's guesses lock the user.
    other = Client("M2", keys=(ClientKey(1, "unused"),))
    await h.store.add_client(other)
    await h.store.add_tokens(
        [(hash_token("tok2"), "M2", "alice", frozenset({"SEND_OTP"}), START + 10**9)]
    )
    request = InitAuthenticationRequest("OTP", "victim", "SMS", "WALLET_TOKEN", "tok2")
    assert (await h.service.init_authentication(other, request)).code is ResultCode.SUCCESS
    victim_code = await h.code_of("victim")
    for i in range(2):
        h.clock.now += 31
        await h.init(f"burn{i}")
        burn = await h.code_of("")
        for _ in range(5):
            await h.verify(f"burn{i}", wrong(burn))
    check = VerifyAuthenticationRequest("OTP", "victim", victim_code)
    outcome = await h.service.verify_authentication(other, check)
    assert outcome.code is ResultCode.USER_STATUS_ABNORMAL
    # Still refused later in the lockout; by its end (900 s > 300 s TTL) the code has expired.
    h.clock.now += 100
    refused = await h.service.verify_authentication(other, check)
    assert refused.code is ResultCode.USER_STATUS_ABNORMAL
    h.clock.now += 900
    expired = await h.service.verify_authentication(other, check)
    assert expired.code is ResultCode.AUTHENTICATION_REQUEST_ID_INVALID


async def test_a_pass_resets_the_failure_budget(h: Harness) -> None:
    for i in range(3):
        h.clock.now += 31
        await h.init(f"r{i}")
        code = await h.code_of("")
        for _ in range(3):
            assert await h.verify(f"r{i}", wrong(code)) is ResultCode.VERIFY_UNMATCHED
        assert await h.verify(f"r{i}", code) is ResultCode.SUCCESS
    # 9 failures in total, but never 10 in a row: no lockout.
    h.clock.now += 31
    assert await h.init("after") is ResultCode.SUCCESS


async def test_codes_are_uniform(h: Harness) -> None:
    """Chi-square over the first digit of 5,000 codes: a biased generator fails this."""
    from otpgate.core.otp import generate_code

    counts = Counter(generate_code(6)[0] for _ in range(5000))
    expected = 500
    chi2 = sum((counts[d] - expected) ** 2 / expected for d in "0123456789")
    assert chi2 < 27.9  # p = 0.001 for 9 degrees of freedom
