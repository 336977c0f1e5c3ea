"""The contract between the outbox worker and the providers that hand messages to the world.

A provider gets one :class:`OutgoingMessage` at a time and either returns (the SMTP server or SMS
gateway accepted it) or raises a :class:`DeliveryError`.  The subclass tells the worker what to do
next: :class:`TransientDeliveryError` means "try again later", :class:`PermanentDeliveryError`
means "retrying cannot help, mark the message failed".

``str(exc)`` of a delivery error is stored as the outbox row's *last error* and shown to operators
(``otpgate outbox list``), so providers build it from status codes and short, sanitised server
replies only, never from the message text: the text carries the one-time code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DeliveryError",
    "DeliveryProvider",
    "OutgoingMessage",
    "PermanentDeliveryError",
    "TransientDeliveryError",
    "sanitize_detail",
]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message from the outbox, ready to be handed to a provider.

    ``message_id`` is the outbox row id.  It is stable across retries, which makes it the natural
    idempotency key for SMS gateways and the unique part of an email ``Message-ID``: a retry after a
    lost response can then be recognised as a duplicate by whoever supports that.
    """

    message_id: str
    channel: str
    """``"SMS"`` or ``"EMAIL"``."""
    destination: str
    """An E.164 phone number for SMS, an email address for EMAIL."""
    subject: str
    """The email subject; SMS providers ignore it."""
    text: str
    """The full message text.  It contains the code: never log it or put it into an exception."""

    def __repr__(self) -> str:
        # The default dataclass repr would print the code into any traceback or debug log that
        # happens to format a message; this one leaves the text out on purpose.
        return (
            f"OutgoingMessage(message_id={self.message_id!r}, channel={self.channel!r}, "
            f"destination={self.destination!r}, text=<{len(self.text)} chars>)"
        )


class DeliveryError(Exception):
    """A provider could not deliver a message.  ``str(exc)`` is safe to store and show."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying: timeouts, refused connections, HTTP 408/429/5xx, SMTP 4xx replies."""


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help: HTTP 4xx (other than 408/429), SMTP 5xx replies, bad configuration."""


class DeliveryProvider(Protocol):
    """What the outbox worker needs from a provider.

    Providers are created once per process and shared by all concurrent sends, so ``send`` must be
    safe to call concurrently; ``aclose`` releases pooled connections at shutdown.
    """

    name: str

    async def send(self, message: OutgoingMessage) -> None:
        """Return once the provider accepted ``message``; raise a :class:`DeliveryError` if not."""
        ...

    async def aclose(self) -> None:
        """Release any resources (connection pools).  The provider is unusable afterwards."""
        ...


# Codes are 6-10 digits (PROTOCOL.md §6).  Masking every run of 6+ digits means that even a
# server that echoes our request back in an error reply cannot leak a code into "last error".
_LONG_DIGIT_RUN = re.compile(r"\d{6,}")
_WHITESPACE = re.compile(r"\s+")


def sanitize_detail(detail: str, *, limit: int = 120) -> str:
    """Make untrusted text from a server (SMTP reply, gateway error body) fit for "last error".

    Collapses whitespace and control characters, masks long digit runs (anything that could be a
    code) and truncates, so that what reaches the database is one short line an operator can read.
    """
    text = "".join(ch if ch.isprintable() else " " for ch in detail)
    text = _WHITESPACE.sub(" ", text).strip()
    text = _LONG_DIGIT_RUN.sub(lambda m: "#" * len(m.group()), text)
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text
