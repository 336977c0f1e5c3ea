"""Email delivery through an SMTP server (``EMAIL_PROVIDER=smtp``).

Each message gets its own connection (connect, optional TLS, optional AUTH, send, QUIT).  One-time
codes are low-volume and bursty, submission servers drop idle connections anyway, and a fresh
connection per message keeps failure handling trivial: nothing half-broken is ever reused.

The whole conversation is bounded by ``timeout_seconds``, not each command separately, so a slow
or tarpitting server holds a worker slot for at most that long.

Failures are classified by what a retry could change.  Network trouble, timeouts and SMTP 4xx
replies ("try again later") are transient; SMTP 5xx replies (unknown recipient, refused
credentials, rejected content) and configuration mismatches (no STARTTLS, untrusted certificate)
are permanent.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import socket
import ssl
from email.message import EmailMessage
from typing import Literal

import aiosmtplib

from otpgate.delivery.base import (
    DeliveryError,
    OutgoingMessage,
    PermanentDeliveryError,
    TransientDeliveryError,
    sanitize_detail,
)

__all__ = ["SmtpProvider"]

logger = logging.getLogger(__name__)

TlsMode = Literal["none", "starttls", "implicit"]

# Characters allowed in the left part of a Message-ID (RFC 5322 dot-atom-text, conservatively).
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SmtpProvider:
    """Send :class:`OutgoingMessage` s of channel ``EMAIL`` as plain-text UTF-8 mail.

    ``tls`` is ``"none"`` (plain SMTP, never upgraded; for a local relay), ``"starttls"`` (upgrade
    is required, typically port 587) or ``"implicit"`` (TLS from the first byte, port 465).
    ``from_address`` may carry a display name (``"Acme <no-reply@acme.example>"``); the bare
    address is the envelope sender and its domain ends every ``Message-ID``.  ``tls_context``
    replaces the default (system CAs, hostname checked), e.g. to trust a private CA.
    """

    name = "smtp"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: TlsMode,
        username: str | None,
        password: str | None,
        from_address: str,
        timeout_seconds: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"SMTP TLS mode must be 'none', 'starttls' or 'implicit', not {tls!r}")
        if (username is None) != (password is None):
            raise ValueError("SMTP username and password must be set together")
        if timeout_seconds <= 0:
            raise ValueError("SMTP timeout must be a positive number of seconds")
        _, sender = email.utils.parseaddr(from_address)
        if "@" not in sender:
            raise ValueError(f"SMTP from address {from_address!r} has no user@domain part")
        self.host = host
        self.port = port
        self.tls: TlsMode = tls
        self.timeout_seconds = timeout_seconds
        self._username = username
        self._password = password
        self._from_header = from_address
        self._sender = sender
        self._domain = sender.rpartition("@")[2]
        self._tls_context = tls_context
        self._local_hostname: str | None = None

    def __repr__(self) -> str:
        return f"SmtpProvider(host={self.host!r}, port={self.port}, tls={self.tls!r})"

    async def send(self, message: OutgoingMessage) -> None:
        """Hand ``message`` to the SMTP server; return once it answered 250 to the DATA."""
        mail = self.build_email(message)
        if self._local_hostname is None:
            # socket.getfqdn() may do a slow DNS lookup; aiosmtplib would repeat it per connection.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await aiosmtplib.send(
                    mail,
                    sender=self._sender,
                    recipients=[message.destination],
                    hostname=self.host,
                    port=self.port,
                    use_tls=self.tls == "implicit",
                    start_tls=self.tls == "starttls",
                    tls_context=self._tls_context,
                    username=self._username,
                    password=self._password,
                    local_hostname=self._local_hostname,
                    timeout=self.timeout_seconds,
                )
        except Exception as exc:
            raise self._classify(exc) from exc
        logger.debug("SMTP server %s accepted message %s", self.host, message.message_id)

    async def aclose(self) -> None:
        """Nothing to release: connections do not outlive a :meth:`send`."""

    def build_email(self, message: OutgoingMessage) -> EmailMessage:
        """The RFC 5322 message for ``message``.  Public so that it can be inspected in tests.

        ``Message-ID`` embeds the outbox id (so mail logs can be matched to ``otpgate outbox list``)
        next to a timestamp and random part from :func:`email.utils.make_msgid`, which keeps it
        globally unique even if the outbox ids of a reset database repeat.  ``Date`` is in UTC so
        that no host time-zone leaks into mail.
        """
        mail = EmailMessage()
        mail["From"] = self._from_header
        mail["To"] = message.destination
        mail["Subject"] = message.subject
        mail["Date"] = email.utils.formatdate(localtime=False)
        idstring = _MSGID_UNSAFE.sub("-", message.message_id)[:64] or "otp"
        mail["Message-ID"] = email.utils.make_msgid(idstring=idstring, domain=self._domain)
        mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a code
        mail.set_content(message.text, charset="utf-8")
        return mail

    def _classify(self, exc: Exception) -> DeliveryError:
        """Turn whatever aiosmtplib raised into a short, code-free, retry-or-not verdict."""
        where = f"{self.host}:{self.port}"
        if isinstance(exc, TimeoutError):  # SMTPTimeoutError is one too
            return TransientDeliveryError(f"SMTP timeout after {self.timeout_seconds:g}s ({where})")
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            refused = exc.recipients[0]
            return _by_code(refused.code, "SMTP server refused the recipient", refused.message)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return _by_code(exc.code, _response_stage(exc), exc.message)
        if _untrusted_certificate(exc):
            return PermanentDeliveryError(
                f"SMTP server {where} presented a certificate that is not trusted"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected):
            return TransientDeliveryError(
                f"SMTP connection to {where} failed: {sanitize_detail(_root_message(exc))}"
            )
        if isinstance(exc, OSError):
            return TransientDeliveryError(
                f"SMTP connection to {where} failed: {sanitize_detail(str(exc))}"
            )
        if isinstance(exc, aiosmtplib.SMTPException):
            # Capability mismatches: no STARTTLS, no AUTH, no SMTPUTF8 for a non-ASCII address.
            return PermanentDeliveryError(f"SMTP: {sanitize_detail(exc.message)}")
        if isinstance(exc, ValueError):  # aiosmtplib refuses addresses it cannot encode safely
            return PermanentDeliveryError("SMTP: recipient address cannot be sent")
        return TransientDeliveryError(f"SMTP: unexpected {type(exc).__name__}")


def _by_code(code: int, what: str, reply: str) -> DeliveryError:
    """SMTP semantics: 5xx is permanent, anything else (4xx, odd codes) is worth a retry."""
    text = f"{what}: {code} {sanitize_detail(reply)}".rstrip()
    if 500 <= code < 600:
        return PermanentDeliveryError(text)
    return TransientDeliveryError(text)


def _response_stage(exc: aiosmtplib.SMTPResponseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "SMTP server refused the login (check SMTP_USERNAME/SMTP_PASSWORD)"
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return "SMTP server refused the sender (check SMTP_FROM)"
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return "SMTP server refused the message"
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return "SMTP server is not ready"
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return "SMTP server refused EHLO/HELO"
    return "SMTP server answered"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _untrusted_certificate(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc))


def _root_message(exc: BaseException) -> str:
    """The innermost reason ("Connection refused") rather than aiosmtplib's wordy wrapper."""
    root = _chain(exc)[-1]
    if isinstance(root, OSError) and root.errno:
        return os.strerror(root.errno)
    return str(root) or type(root).__name__
