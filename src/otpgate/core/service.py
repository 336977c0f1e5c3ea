"""The two use cases: initAuthentication and verifyAuthentication.

The server has already authenticated the client and parsed the body; this module applies
the business rules of PROTOCOL.md §5 to §7 and returns an ``Outcome`` that the server encodes.
Anything that must hold across processes is delegated to one atomic store operation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from otpgate.core.models import (
    SCOPE_SEND_OTP,
    AuditEvent,
    Client,
    FailurePolicy,
    InitStatus,
    NewChallenge,
    SendLimits,
    UserStatus,
    VerifyStatus,
)
from otpgate.core.otp import CodeHasher, generate_code, hash_token, params_hash
from otpgate.core.ports import ChallengeStore, Clock
from otpgate.protocol.codes import ResultCode
from otpgate.protocol.messages import InitAuthenticationRequest, VerifyAuthenticationRequest

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"

ComposeMessage = Callable[..., tuple[str, str]]
"""``(channel=, locale=, brand=, code=, minutes=) -> (subject, text)``."""


@dataclass(frozen=True)
class OtpPolicy:
    ttl_seconds: int = 300
    max_attempts: int = 5
    code_length: int = 6
    send_limits: SendLimits = field(default_factory=SendLimits)
    failure: FailurePolicy = field(default_factory=FailurePolicy)


@dataclass(frozen=True, slots=True)
class Outcome:
    code: ResultCode
    message: str | None = None
    is_passed: bool | None = None
    request_id: str | None = None


class AuthenticationService:
    def __init__(
        self,
        store: ChallengeStore,
        hasher: CodeHasher,
        compose_message: ComposeMessage,
        providers: Mapping[str, str],
        policy: OtpPolicy | None = None,
        clock: Clock = time.time,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._compose = compose_message
        self._providers = providers  # channel -> provider name for non-sandbox clients
        self._policy = policy or OtpPolicy()
        self._clock = clock
        self._on_queued = on_queued

    async def init_authentication(
        self, client: Client, request: InitAuthenticationRequest
    ) -> Outcome:
        rid = request.authentication_request_id
        channel = request.authentication_channel_type
        now = self._clock()

        async def fail(code: ResultCode, message: str, user_id: str | None = None) -> Outcome:
            await self._store.record_audit(
                AuditEvent(INIT, client.client_id, rid, user_id, code.name, message, now)
            )
            return Outcome(code, message)

        fingerprint = params_hash(channel, request.user_identity_type, request.user_identity_value)
        existing = await self._store.find_init(client.client_id, rid)
        if existing is not None:
            if existing != fingerprint:
                return await fail(ResultCode.PARAM_ILLEGAL, _REUSED_ID)
            await self._store.record_audit(
                AuditEvent(INIT, client.client_id, rid, None, "SUCCESS", "replay", now)
            )
            return Outcome(ResultCode.SUCCESS, request_id=rid)

        if channel not in client.channels:
            return await fail(ResultCode.ACCESS_DENIED, f"client is not allowed channel {channel}")
        token = await self._store.get_token(hash_token(request.user_identity_value))
        if token is None or token.client_id != client.client_id:
            return await fail(ResultCode.INVALID_ACCESS_TOKEN, "access token is unknown")
        if token.revoked:
            return await fail(ResultCode.INVALID_ACCESS_TOKEN, "access token was revoked")
        if token.expires_at <= now:
            return await fail(ResultCode.INVALID_ACCESS_TOKEN, "access token has expired")
        if SCOPE_SEND_OTP not in token.scopes:
            return await fail(ResultCode.ACCESS_DENIED, "access token lacks the SEND_OTP scope")
        user = await self._store.get_user(token.user_id)
        if user is None:
            return await fail(ResultCode.USER_NOT_EXIST, "the token's user no longer exists")
        if user.status is not UserStatus.NORMAL:
            return await fail(ResultCode.USER_STATUS_ABNORMAL, "user is frozen", user.user_id)
        if user.locked_until > now:
            return await fail(ResultCode.USER_STATUS_ABNORMAL, _locked(user.locked_until - now))
        destination = user.contact(channel)
        if not destination:
            what = "phone number" if channel == "SMS" else "email address"
            return await fail(
                ResultCode.PROCESS_FAIL, f"user has no {what} for {channel}", user.user_id
            )

        policy = self._policy
        code = generate_code(policy.code_length)
        subject, text = self._compose(
            channel=channel,
            locale=user.locale,
            brand=client.brand,
            code=code,
            minutes=max(1, math.ceil(policy.ttl_seconds / 60)),
        )
        provider = "inbox" if client.sandbox else self._providers.get(channel, "inbox")
        challenge = NewChallenge(
            client_id=client.client_id,
            request_id=rid,
            user_id=user.user_id,
            channel=channel,
            destination=destination,
            params_hash=fingerprint,
            code_mac=self._hasher.mac_current(client.client_id, rid, code),
            key_id=self._hasher.current,
            created_at=now,
            expires_at=now + policy.ttl_seconds,
            max_attempts=policy.max_attempts,
            message_subject=subject,
            message_text=text,
            provider=provider,
        )
        audit = AuditEvent(INIT, client.client_id, rid, user.user_id, "SUCCESS", channel, now)
        decision = await self._store.create_challenge(challenge, policy.send_limits, audit)
        status = decision.status
        if status is InitStatus.CREATED:
            if self._on_queued is not None:
                self._on_queued()
            return Outcome(ResultCode.SUCCESS, request_id=rid)
        if status is InitStatus.REPLAYED:
            return Outcome(ResultCode.SUCCESS, request_id=rid)
        if status is InitStatus.CONFLICT:
            return Outcome(ResultCode.PARAM_ILLEGAL, _REUSED_ID)
        if status is InitStatus.LOCKED:
            return Outcome(ResultCode.USER_STATUS_ABNORMAL, "user is locked after failed codes")
        interval = policy.send_limits.min_interval_seconds
        message = (
            f"a code was sent to this user in the last {interval}s; retry later"
            if status is InitStatus.SEND_INTERVAL
            else "too many codes sent to this user; retry in a few minutes"
        )
        return Outcome(ResultCode.REQUEST_TRAFFIC_EXCEED_LIMIT, message)

    async def verify_authentication(
        self, client: Client, request: VerifyAuthenticationRequest
    ) -> Outcome:
        rid = request.authentication_request_id
        now = self._clock()
        macs = self._hasher.macs_all(client.client_id, rid, request.authentication_value)
        audit = AuditEvent(VERIFY, client.client_id, rid, None, "", "", now)
        decision = await self._store.attempt_verification(
            client.client_id, rid, macs, now, self._policy.failure, audit
        )
        status = decision.status
        if status is VerifyStatus.PASSED or status is VerifyStatus.REPLAYED:
            return Outcome(ResultCode.SUCCESS, is_passed=True)
        if status is VerifyStatus.UNMATCHED:
            left = decision.attempts_left
            plural = "attempt" if left == 1 else "attempts"
            return Outcome(
                ResultCode.VERIFY_UNMATCHED, f"code does not match; {left} {plural} left", False
            )
        code, message = _VERIFY_FAILURES[status]
        return Outcome(code, message, False)


_REUSED_ID = "authenticationRequestId was used with other parameters"


def _locked(seconds: float) -> str:
    return f"user is locked after failed codes; retry in {math.ceil(seconds)}s"


_VERIFY_FAILURES: dict[VerifyStatus, tuple[ResultCode, str]] = {
    VerifyStatus.EXHAUSTED: (
        ResultCode.VERIFY_TIMES_EXCEED_LIMIT,
        "attempts used up; the user must request a new code",
    ),
    VerifyStatus.EXPIRED: (
        ResultCode.AUTHENTICATION_REQUEST_ID_INVALID,
        "the code has expired; request a new one",
    ),
    VerifyStatus.SUPERSEDED: (
        ResultCode.AUTHENTICATION_REQUEST_ID_INVALID,
        "a newer code was sent to this user; use the latest",
    ),
    VerifyStatus.USED: (
        ResultCode.AUTHENTICATION_REQUEST_ID_INVALID,
        "this authentication was already completed",
    ),
    VerifyStatus.UNKNOWN: (
        ResultCode.AUTHENTICATION_REQUEST_ID_INVALID,
        "no authentication with this authenticationRequestId",
    ),
    VerifyStatus.LOCKED: (
        ResultCode.USER_STATUS_ABNORMAL,
        "user is locked after failed codes; retry later",
    ),
}
