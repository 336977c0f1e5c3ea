"""One-time codes: generation, keyed hashing at rest, and token hashing.

Codes are stored only as HMAC-SHA-256 under a server secret kept outside the database, so a
database dump reveals nothing a guesser can use offline. The MAC binds client and request id,
so a code can never be replayed against another challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass


def generate_code(length: int) -> str:
    """A uniform decimal code from the OS CSPRNG."""
    return f"{secrets.randbelow(10**length):0{length}d}"


def hash_token(token: str) -> bytes:
    """Tokens are 256-bit random strings: a plain SHA-256 is enough to keep them off disk."""
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return "otk_" + secrets.token_urlsafe(32)


def _framed(*parts: str) -> bytes:
    # Length-prefixed so that ("ab", "c") and ("a", "bc") never collide.
    out = bytearray()
    for part in parts:
        raw = part.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


@dataclass(frozen=True)
class CodeHasher:
    """HMAC-SHA-256 keyring: new codes use ``current``; verifies try every key, for rotation."""

    keys: Mapping[str, bytes]
    current: str

    def mac(self, key_id: str, client_id: str, request_id: str, code: str) -> bytes:
        return hmac.new(self.keys[key_id], _framed(client_id, request_id, code), "sha256").digest()

    def mac_current(self, client_id: str, request_id: str, code: str) -> bytes:
        return self.mac(self.current, client_id, request_id, code)

    def macs_all(self, client_id: str, request_id: str, value: str) -> list[bytes]:
        """The MAC of a submitted value under every key, so the store can compare in place."""
        message = _framed(client_id, request_id, value)
        return [hmac.new(key, message, "sha256").digest() for key in self.keys.values()]


def params_hash(channel: str, identity_type: str, identity_value: str) -> bytes:
    """Fingerprint of the init parameters, for idempotent replays (§7)."""
    return hashlib.sha256(_framed(channel, identity_type, identity_value)).digest()
