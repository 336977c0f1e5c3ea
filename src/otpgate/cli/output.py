"""Shared plumbing for commands: errors, output, and running against the store."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from otpgate.config import ConfigError, Settings, load_settings
from otpgate.datadir import DataDirError
from otpgate.store import Store, StoreConflict, open_store

T = TypeVar("T")


class CommandError(Exception):
    """An operator mistake or an unusable environment: printed as one sentence, exit 2."""


def settings_of(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.data_dir)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the configured store, run ``work``, close; operator errors become CommandError."""
    settings = settings_of(args)
    if not (settings.data_dir / "secrets.json").exists():
        raise CommandError(f"{settings.data_dir} is not initialised; run `otpgate init` first")

    async def go() -> T:
        store = await open_store(settings)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except (StoreConflict, DataDirError, ConfigError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot reach the store: {exc}") from None


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def emit(args: argparse.Namespace, document: Any, text: str | Sequence[str]) -> None:
    """Print ``document`` as JSON with --json, else the human ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(document, ensure_ascii=False))
        return
    print(text if isinstance(text, str) else "\n".join(text))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    cells = [[str(c) if c is not None else "-" for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
