"""Records the stores return to the delivery worker and the operator CLI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """An outbox message leased to one worker; ``text`` is unsealed in memory only."""

    outbox_id: int
    client_id: str
    user_id: str
    channel: str
    destination: str
    provider: str
    subject: str
    text: str
    tries: int  # including this one
    expires_at: float


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    outbox_id: int
    client_id: str
    user_id: str
    channel: str
    destination: str
    provider: str
    status: str
    tries: int
    last_error: str | None
    created_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class InboxMessage:
    inbox_id: int
    client_id: str
    user_id: str
    channel: str
    destination: str
    text: str
    created_at: float


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    status: str
    phone: str | None
    email: str | None
    locale: str | None
    locked_until: float
    failed_verifies: int
