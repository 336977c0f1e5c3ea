"""SMS delivery through an HTTP gateway (``SMS_PROVIDER=http``).

Presets say how a message becomes an HTTP request:

``json`` (default)
    ``POST SMS_HTTP_URL`` with the body ``{"to": "<E.164>", "text": "<message>"}`` and the header
    ``Idempotency-Key: <message id>``, so a gateway that supports it can drop the duplicate a retry
    after a lost response would otherwise cause.  Any 2xx answer means accepted.

``twilio``
    Twilio's Messages API.  ``url`` is
    ``https://api.twilio.com/2010-04-01/Accounts/<AccountSid>/Messages.json``; the request is a
    form-encoded ``POST`` of ``To``, ``Body`` and ``From`` (the ``from_number`` argument, an E.164
    number or alphanumeric sender id; a Messaging Service SID ``MG…`` is sent as
    ``MessagingServiceSid`` instead).  Credentials are HTTP basic auth with the Account SID (or an
    API key SID) as user and the auth token (or API key secret) as password: pass them as
    ``basic_auth=(user, password)``, write them into the URL (``https://AC…:token@api.twilio.com/…``,
    httpx turns that into basic auth) or put a ready-made ``Authorization`` header in ``headers``.
    Twilio answers ``201 Created`` on success.

``headers`` (``SMS_HTTP_HEADERS``) are added to every request of every preset, e.g. an API key.

Outcomes, for every preset: 2xx is accepted; 408, 429, 5xx, timeouts and network errors are
transient (retry later); any other status, including redirects, which are not followed, is
permanent.  ``timeout_seconds`` bounds the whole request, not each read, so a gateway that trickles
its answer still frees the worker in time.  Error messages carry the status and a short, sanitised
snippet of the gateway's answer, never the message text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from otpgate.delivery.base import (
    OutgoingMessage,
    PermanentDeliveryError,
    TransientDeliveryError,
    sanitize_detail,
)

__all__ = ["PRESETS", "HttpSmsProvider"]

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 429})


class HttpSmsProvider:
    """Send :class:`OutgoingMessage` s of channel ``SMS`` to an HTTP gateway.

    One :class:`httpx.AsyncClient` (a connection pool) is shared by all sends of the provider.  If
    ``client`` is passed, the caller owns it and :meth:`aclose` leaves it open, as is usual with
    httpx; otherwise the provider creates its own and closes it in :meth:`aclose`.
    """

    name = "http"

    def __init__(
        self,
        *,
        url: str,
        headers: Mapping[str, str] | None = None,
        timeout_seconds: float = 10.0,
        preset: str = "json",
        client: httpx.AsyncClient | None = None,
        from_number: str | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        if preset not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown SMS HTTP preset {preset!r}; known presets: {known}")
        if preset == "twilio" and not from_number:
            raise ValueError("the twilio SMS preset needs a from_number (or an MG… service SID)")
        if timeout_seconds <= 0:
            raise ValueError("SMS HTTP timeout must be a positive number of seconds")
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"SMS HTTP URL must be an absolute http(s) URL, not {url!r}")
        self.url = url
        self.preset = preset
        self.timeout_seconds = timeout_seconds
        self._headers = dict(headers or {})
        self._from_number = from_number
        self._auth = httpx.BasicAuth(*basic_auth) if basic_auth else None
        self._build = PRESETS[preset]
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout_seconds, follow_redirects=False)

    def __repr__(self) -> str:
        # Never the headers or the auth: they hold API keys.
        return f"HttpSmsProvider(url={self._redacted_url()!r}, preset={self.preset!r})"

    async def send(self, message: OutgoingMessage) -> None:
        """POST ``message`` to the gateway; return on a 2xx answer."""
        request = self._build(message, self._from_number)
        headers = {**request.pop("headers", {}), **self._headers}
        try:
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._client.post(
                    self.url,
                    headers=headers,
                    auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                    timeout=self.timeout_seconds,
                    **request,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise TransientDeliveryError(
                f"SMS gateway timeout after {self.timeout_seconds:g}s"
            ) from None
        except httpx.UnsupportedProtocol as exc:
            raise PermanentDeliveryError(f"SMS gateway URL not usable: {exc}") from None
        except httpx.TransportError as exc:
            reason = sanitize_detail(str(exc)) or type(exc).__name__
            raise TransientDeliveryError(f"SMS gateway unreachable: {reason}") from None
        self._check(response)
        logger.debug(
            "SMS gateway accepted message %s (HTTP %d)", message.message_id, response.status_code
        )

    async def aclose(self) -> None:
        """Close the connection pool, unless it was passed in by the caller."""
        if self._owns_client:
            await self._client.aclose()

    def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        text = f"SMS gateway answered HTTP {status}"
        detail = _error_detail(response)
        if detail:
            text = f"{text}: {detail}"
        if status in _RETRYABLE_STATUS or status >= 500:
            raise TransientDeliveryError(text)
        raise PermanentDeliveryError(text)

    def _redacted_url(self) -> str:
        url = httpx.URL(self.url)
        return str(url.copy_with(username=None, password=None, query=None))


def _error_detail(response: httpx.Response) -> str:
    """A gateway's own words for an error, e.g. Twilio's ``message`` field, cut short and masked.

    Bodies are untrusted: a gateway might echo the request, so only a sanitised snippet (long
    digit runs masked) is kept, and only from textual answers.
    """
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith(("application/json", "text/", "application/problem+json")):
        return ""
    body = response.text
    try:
        data = json.loads(body)
    except ValueError:
        return sanitize_detail(body, limit=100)
    if isinstance(data, dict):
        for key in ("message", "error_description", "detail", "error", "title"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return sanitize_detail(value, limit=100)
    return sanitize_detail(body, limit=100)


# A preset turns a message into keyword arguments for httpx's ``post`` (``json``, ``data``,
# ``headers``).  Headers given by the operator are applied on top.
Preset = Callable[[OutgoingMessage, str | None], dict[str, Any]]


def _json_preset(message: OutgoingMessage, from_number: str | None) -> dict[str, Any]:
    return {
        "json": {"to": message.destination, "text": message.text},
        "headers": {"Idempotency-Key": message.message_id},
    }


def _twilio_preset(message: OutgoingMessage, from_number: str | None) -> dict[str, Any]:
    data = {"To": message.destination, "Body": message.text}
    if from_number and from_number.startswith("MG"):
        data["MessagingServiceSid"] = from_number
    elif from_number:
        data["From"] = from_number
    return {"data": data, "headers": {"Accept": "application/json"}}


PRESETS: Mapping[str, Preset] = {
    "json": _json_preset,
    "twilio": _twilio_preset,
}
