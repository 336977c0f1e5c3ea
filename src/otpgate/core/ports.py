"""The small interfaces the domain needs from the outside world.

Stores (SQLite, PostgreSQL) implement ``ChallengeStore``; limiters (in-process, Redis)
implement ``RateLimiter``. Each atomic operation is one transaction in the store, because
the security limits (attempts, failure budget, send limits) must hold exactly across
processes and nodes: they are decided where the data is, never read-then-write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from otpgate.core.models import (
    AccessToken,
    AuditEvent,
    Client,
    FailurePolicy,
    InitDecision,
    NewChallenge,
    SendLimits,
    User,
    VerifyDecision,
)

Clock = Callable[[], float]
"""Seconds since the epoch (``time.time`` in production, a fake in tests)."""


class ChallengeStore(Protocol):
    async def get_client(self, client_id: str) -> Client | None: ...

    async def get_token(self, token_hash: bytes) -> AccessToken | None: ...

    async def get_user(self, user_id: str) -> User | None: ...

    async def find_init(self, client_id: str, request_id: str) -> bytes | None:
        """The parameter hash of an existing challenge with this id, if any."""
        ...

    async def create_challenge(
        self, challenge: NewChallenge, limits: SendLimits, audit: AuditEvent
    ) -> InitDecision:
        """Atomically: replay check, lockout and send-limit checks, supersede the user's
        pending challenges for this client, insert the challenge, its sealed outbox message
        and the audit row. Only a CREATED decision writes anything but the audit row."""
        ...

    async def attempt_verification(
        self,
        client_id: str,
        request_id: str,
        value_macs: Sequence[bytes],
        now: float,
        policy: FailurePolicy,
        audit: AuditEvent,
    ) -> VerifyDecision:
        """Atomically: claim an attempt on a pending, unexpired challenge of an unlocked user,
        compare, pass or exhaust it, charge or reset the user's failure budget, write audit."""
        ...

    async def record_audit(self, event: AuditEvent) -> None: ...


class RateLimiter(Protocol):
    async def hit(self, key: str, per_second: int) -> bool:
        """Count one request for ``key``; False when over ``per_second``."""
        ...
