"""The outbox worker: leases due messages, hands them to providers, records the result.

A message is leased (``lease_until``) before it is sent, so two workers, in one process or
many, never send the same message at the same time. A worker killed mid-send leaves its lease
to run out; the message is then sent again by whoever claims it next. That window (provider
accepted, worker died before recording it) is the only place a duplicate is possible.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from otpgate.core.ports import Clock
from otpgate.delivery.base import (
    DeliveryProvider,
    OutgoingMessage,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.store.records import ClaimedMessage

log = logging.getLogger("otpgate.delivery")

INBOX = "inbox"
_GATHER_SECONDS = 0.01


class OutboxStore(Protocol):
    async def claim_due(
        self, now: float, limit: int, lease_seconds: float
    ) -> list[ClaimedMessage]: ...

    async def finish_message(
        self, outbox_id: int, status: str, now: float, error: str | None = None
    ) -> None: ...

    async def retry_message(self, outbox_id: int, next_attempt_at: float, error: str) -> None: ...

    async def deliver_to_inbox(self, messages: Sequence[ClaimedMessage], now: float) -> None: ...


class DeliveryListener(Protocol):
    def delivery(self, provider: str, outcome: str) -> None: ...


def backoff_seconds(tries: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with jitter: about base·2^(tries-1), never above ``cap``."""
    ceiling = min(cap, base * 2 ** min(tries - 1, 30))
    return float(ceiling * random.uniform(0.5, 1.0))


class DeliveryWorker:
    def __init__(
        self,
        store: OutboxStore,
        providers: Mapping[str, DeliveryProvider],
        *,
        max_tries: int = 8,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.2,
        retry_base_seconds: float = 1.0,
        batch_size: int = 32,
        clock: Clock = time.time,
        listener: DeliveryListener | None = None,
    ) -> None:
        self._store = store
        self._providers = providers
        self._max_tries = max_tries
        self._lease = lease_seconds
        self._poll = poll_seconds
        self._retry_base = retry_base_seconds
        self._batch = batch_size
        self._clock = clock
        self._listener = listener
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after an init queues a message, so delivery starts without waiting a poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; the batch in hand is always finished first."""
        failures = 0
        while not stop.is_set():
            try:
                handled = await self.run_once()
                failures = 0
            except Exception:
                # The store is down or failing: say so once per streak, back off up to 5 s.
                if failures == 0:
                    log.exception("outbox batch failed; retrying with backoff")
                failures += 1
                handled = 0
            if handled >= self._batch:
                continue  # a full batch: more are probably due already
            self._wake.clear()
            waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
            pause = min(5.0, self._poll * 2**failures) if failures else self._poll
            await asyncio.wait(waiters, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            for task in waiters:
                task.cancel()
            if self._wake.is_set() and not stop.is_set():
                # Woken by an init: give a burst a moment to collect into one batch, so a
                # busy server pays one claim per batch rather than one per message.
                await asyncio.sleep(_GATHER_SECONDS)

    async def run_once(self) -> int:
        messages = await self._store.claim_due(self._clock(), self._batch, self._lease)
        now = self._clock()
        # The local inbox lives in the store: its live messages are filed in one transaction.
        local: list[ClaimedMessage] = []
        others: list[ClaimedMessage] = []
        for message in messages:
            is_local = message.provider == INBOX and message.expires_at > now
            (local if is_local else others).append(message)
        if local:
            await self._store.deliver_to_inbox(local, now)
            for _ in local:
                self._record(INBOX, "sent")
        # The rest concurrently: one slow gateway must not hold up the batch.
        if others:
            await asyncio.gather(*(self._deliver(message) for message in others))
        return len(messages)

    async def _deliver(self, message: ClaimedMessage) -> None:
        now = self._clock()
        if message.expires_at <= now:
            await self._store.finish_message(message.outbox_id, "expired", now, "code expired")
            self._record(message.provider, "expired")
            return
        provider = self._providers.get(message.provider)
        if provider is None:
            await self._store.finish_message(
                message.outbox_id, "failed", now, f"provider {message.provider} not configured"
            )
            self._record(message.provider, "failed")
            return
        outgoing = OutgoingMessage(
            message_id=f"otpgate-{message.outbox_id}",
            channel=message.channel,
            destination=message.destination,
            subject=message.subject,
            text=message.text,
        )
        try:
            # Bounded below the lease, so no other worker can claim a message still in hand.
            await asyncio.wait_for(provider.send(outgoing), timeout=self._lease * 0.8)
        except PermanentDeliveryError as exc:
            await self._store.finish_message(message.outbox_id, "failed", self._clock(), str(exc))
            self._record(message.provider, "failed")
        except Exception as exc:
            # Anything a provider raises beyond its contract is retried like a transient
            # failure, so max tries still ends it (named by type only: no message text leaks).
            if isinstance(exc, TransientDeliveryError):
                error = str(exc)
            elif isinstance(exc, TimeoutError):
                error = "provider timed out"
            else:
                log.exception("provider %s raised unexpectedly", message.provider)
                error = f"provider error: {type(exc).__name__}"
            if message.tries >= self._max_tries:
                await self._store.finish_message(
                    message.outbox_id, "failed", self._clock(), f"gave up: {error}"
                )
                self._record(message.provider, "failed")
            else:
                retry_at = self._clock() + backoff_seconds(message.tries, base=self._retry_base)
                await self._store.retry_message(message.outbox_id, retry_at, error)
                self._record(message.provider, "retry")
        else:
            await self._store.finish_message(message.outbox_id, "sent", self._clock())
            self._record(message.provider, "sent")

    def _record(self, provider: str, outcome: str) -> None:
        if self._listener is not None:
            self._listener.delivery(provider, outcome)
