"""Stores: the embedded SQLite default and PostgreSQL, behind one interface (``core.ports``)."""

from __future__ import annotations

from otpgate.config import Settings
from otpgate.datadir import load_secrets
from otpgate.store.base import Store
from otpgate.store.errors import StoreConflict, StoreUnavailable
from otpgate.store.sealing import Sealer
from otpgate.store.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "StoreConflict", "StoreUnavailable", "open_store"]


async def open_store(settings: Settings, *, migrate: bool = False) -> Store:
    """The store the settings name, with the data dir's sealing key."""
    sealer = Sealer(load_secrets(settings).sealing_key)
    if settings.uses_sqlite:
        store = SqliteStore(settings.sqlite_path, sealer)
        if migrate:
            await store.migrate()
        return store
    from otpgate.store.postgres import PostgresStore  # imported lazily: asyncpg is scale-out only

    pg = await PostgresStore.connect(settings.database_url, sealer)
    if migrate:
        await pg.migrate()
    return pg
