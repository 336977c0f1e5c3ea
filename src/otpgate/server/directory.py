"""Registered clients and their public keys, cached per process.

Every request needs its client and key before anything else; reading them from the store
each time would cost a round trip (PostgreSQL) and re-parsing PEM would cost more than the
RSA verify. Entries live ``ttl`` seconds, so operator changes (disable, key revoke) take
effect within that time on every node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from otpgate.core.models import Client
from otpgate.core.ports import ChallengeStore, Clock
from otpgate.protocol.signing import load_public_key

_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class ResolvedClient:
    client: Client
    keys: dict[int, RSAPublicKey]

    def key(self, version: int | None) -> RSAPublicKey | None:
        if version is None:
            return self.keys[max(self.keys)] if self.keys else None
        return self.keys.get(version)


class ClientDirectory:
    def __init__(self, store: ChallengeStore, ttl: float, clock: Clock = time.monotonic) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, ResolvedClient | None]] = {}

    async def get(self, client_id: str) -> ResolvedClient | None:
        now = self._clock()
        entry = self._entries.get(client_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        client = await self._store.get_client(client_id)
        resolved = None
        if client is not None:
            keys = {k.key_version: load_public_key(k.public_key) for k in client.keys if k.active}
            resolved = ResolvedClient(client, keys)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()  # bounded: unknown ids sent by strangers must not grow memory
        self._entries[client_id] = (now + self._ttl, resolved)
        return resolved
