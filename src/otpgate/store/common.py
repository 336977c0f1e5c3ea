"""Helpers both stores share, so SQLite and PostgreSQL cannot drift apart in meaning."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from otpgate.core.models import AuditEvent, Client, ClientKey, VerifyDecision, VerifyStatus

PAYLOAD_CONTEXT = b"otpgate-outbox"
INBOX_CONTEXT = b"otpgate-inbox"


def migrations(kind: str) -> list[tuple[int, str]]:
    folder = resources.files("otpgate.store") / "migrations" / kind
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def client_from_row(row: Any, keys: Iterable[Any]) -> Client:
    return Client(
        client_id=row[0],
        enabled=bool(row[1]),
        sandbox=bool(row[2]),
        display_name=row[3],
        channels=frozenset(filter(None, row[4].split(","))),
        apis=frozenset(filter(None, row[5].split(","))),
        rate_per_second=row[6],
        keys=tuple(ClientKey(k[0], k[1]) for k in keys),
    )


def classify_unclaimed(
    state: str,
    expires_at: float,
    code_mac: bytes,
    locked_until: float,
    value_macs: Sequence[bytes],
    now: float,
) -> VerifyStatus:
    """Why a verify could not claim an attempt: shared by every store."""
    if state == "passed":
        return VerifyStatus.REPLAYED if code_mac in value_macs else VerifyStatus.USED
    if state == "exhausted":
        return VerifyStatus.EXHAUSTED
    if state == "superseded":
        return VerifyStatus.SUPERSEDED
    if expires_at <= now:
        return VerifyStatus.EXPIRED
    if locked_until > now:
        return VerifyStatus.LOCKED
    return VerifyStatus.UNKNOWN


VERIFY_CODES = {
    VerifyStatus.PASSED: "SUCCESS",
    VerifyStatus.REPLAYED: "SUCCESS",
    VerifyStatus.UNMATCHED: "VERIFY_UNMATCHED",
    VerifyStatus.EXHAUSTED: "VERIFY_TIMES_EXCEED_LIMIT",
    VerifyStatus.LOCKED: "USER_STATUS_ABNORMAL",
}


def verify_result_code(decision: VerifyDecision) -> str:
    return VERIFY_CODES.get(decision.status, "AUTHENTICATION_REQUEST_ID_INVALID")


def audit_with_code(event: AuditEvent, code: str, user_id: str | None = None) -> AuditEvent:
    return AuditEvent(
        event.api,
        event.client_id,
        event.request_id,
        user_id or event.user_id,
        code,
        event.detail,
        event.at,
    )
