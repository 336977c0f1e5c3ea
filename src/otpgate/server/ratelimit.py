"""The per-client request rate (PROTOCOL.md §6), through the ``limits`` library.

In-process memory on the embedded default (approximate per worker process, as the protocol
allows), Redis when ``REDIS_URL`` is set (global across processes and nodes).
"""

from __future__ import annotations

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import BlockingConnectionPool


class ClientRateLimiter:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._limiter = FixedWindowRateLimiter(storage)
        self._items: dict[int, RateLimitItemPerSecond] = {}

    @classmethod
    def in_memory(cls) -> ClientRateLimiter:
        return cls(MemoryStorage())

    @classmethod
    def redis(cls, url: str, prefix: str) -> ClientRateLimiter:
        # A bounded, blocking pool: a burst waits (up to 2 s) for one of 32 connections
        # instead of opening hundreds at once; every socket operation is bounded too.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=2.0,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        uri = url.replace("redis://", "async+redis://", 1)
        storage = RedisStorage(
            uri,
            implementation="redispy",
            key_prefix=f"{prefix}:rate",
            connection_pool=pool,  # type: ignore[arg-type]  # limits types options too narrowly
        )
        return cls(storage)

    async def hit(self, key: str, per_second: int) -> bool:
        if per_second <= 0:
            return True
        item = self._items.get(per_second)
        if item is None:
            item = self._items[per_second] = RateLimitItemPerSecond(per_second)
        return await self._limiter.hit(item, key)

    async def ping(self) -> bool:
        return bool(await self._storage.check())
