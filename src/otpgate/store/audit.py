"""The audit hash chain, shared by every store and by ``otpgate audit verify``.

Each row's hash covers its content and the previous row's hash, so editing, deleting or
inserting a row breaks the chain at that row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

GENESIS = b"\x00" * 32


@dataclass(frozen=True, slots=True)
class AuditRow:
    seq: int
    at: float
    api: str
    client_id: str
    request_id: str | None
    user_id: str | None
    result_code: str
    detail: str
    prev_hash: bytes
    row_hash: bytes


def content_digest(
    at: float,
    api: str,
    client_id: str,
    request_id: str | None,
    user_id: str | None,
    result_code: str,
    detail: str,
) -> bytes:
    """SHA-256 of a row's content, computed in Python by every store."""
    # msgspec's compact JSON is deterministic for a list of strings and None, and ~10x
    # cheaper than json.dumps on this per-request path.
    content = msgspec.json.encode(
        [repr(float(at)), api, client_id, request_id, user_id, result_code, detail]
    )
    return hashlib.sha256(content).digest()


def chain_hash(prev_hash: bytes, digest: bytes) -> bytes:
    """``sha256(prev_hash || content_digest)``: simple enough to compute inside SQL too
    (PostgreSQL: ``sha256(prev || digest)``), so a store can extend the chain in one statement."""
    return hashlib.sha256(prev_hash + digest).digest()


def row_hash(
    prev_hash: bytes,
    at: float,
    api: str,
    client_id: str,
    request_id: str | None,
    user_id: str | None,
    result_code: str,
    detail: str,
) -> bytes:
    return chain_hash(
        prev_hash, content_digest(at, api, client_id, request_id, user_id, result_code, detail)
    )


def first_broken_row(rows: Iterable[AuditRow]) -> tuple[int, str] | None:
    """The seq of the first row that breaks the chain and why, or None when intact."""
    prev = GENESIS
    expected_seq: int | None = None
    for row in rows:
        if expected_seq is not None and row.seq != expected_seq:
            return row.seq, f"row {expected_seq} is missing (found {row.seq} after it)"
        if row.prev_hash != prev:
            return row.seq, "previous-hash link does not match (row deleted or inserted)"
        computed = row_hash(
            row.prev_hash,
            row.at,
            row.api,
            row.client_id,
            row.request_id,
            row.user_id,
            row.result_code,
            row.detail,
        )
        if computed != row.row_hash:
            return row.seq, "row content does not match its hash (row edited)"
        prev = row.row_hash
        expected_seq = row.seq + 1
    return None
