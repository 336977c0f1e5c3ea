"""HttpSmsProvider against a real local HTTP server standing in for the SMS gateway."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from otpgate.delivery.base import (
    OutgoingMessage,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.delivery.http_sms import HttpSmsProvider

CODE = "739105"
TEXT = f"Your Acme verification code is {CODE}. It expires in 5 minutes. Never share it."
MESSAGE = OutgoingMessage(
    message_id="outbox-17", channel="SMS", destination="+14155550123", subject="", text=TEXT
)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Gateway:
    """A scripted SMS gateway: records requests, answers with ``status``/``body`` after ``delay``.

    ``trickle`` sends the answer one byte at a time, ``trickle`` seconds apart, to stand in for a
    gateway that keeps the connection alive without ever finishing its answer.
    """

    url: str
    status: int = 200
    body: bytes = b'{"id": "SM1", "status": "queued"}'
    content_type: str = "application/json"
    delay: float = 0.0
    trickle: float = 0.0
    requests: list[Received] = field(default_factory=list)


def start_gateway() -> tuple[Gateway, ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    gateway = Gateway(url=f"http://127.0.0.1:{server.server_address[1]}/v1/sms")
    server.gateway = gateway  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return gateway, server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        gateway: Gateway = self.server.gateway  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", "0"))
        gateway.requests.append(
            Received("POST", self.path, dict(self.headers.items()), self.rfile.read(length))
        )
        time.sleep(gateway.delay)
        self.send_response(gateway.status)
        self.send_header("Content-Type", gateway.content_type)
        self.send_header("Content-Length", str(len(gateway.body)))
        self.end_headers()
        if not gateway.trickle:
            self.wfile.write(gateway.body)
            return
        for index in range(len(gateway.body)):
            self.wfile.write(gateway.body[index : index + 1])
            self.wfile.flush()
            time.sleep(gateway.trickle)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gateway, server = start_gateway()
    yield gateway
    server.shutdown()
    server.server_close()


def assert_code_free(exc: BaseException) -> None:
    assert CODE not in str(exc)
    assert "verification code" not in str(exc)


# --- json preset ---------------------------------------------------------------------------


async def test_json_preset_posts_to_and_text_with_headers(gateway: Gateway) -> None:
    provider = HttpSmsProvider(url=gateway.url, headers={"X-Api-Key": "k-123"})
    await provider.send(MESSAGE)
    await provider.aclose()

    assert len(gateway.requests) == 1
    request = gateway.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/sms"
    assert json.loads(request.body) == {"to": "+14155550123", "text": TEXT}
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == "outbox-17"
    assert request.headers["X-Api-Key"] == "k-123"


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_accepted(gateway: Gateway, status: int) -> None:
    gateway.status = status
    gateway.body = b""
    provider = HttpSmsProvider(url=gateway.url)
    await provider.send(MESSAGE)
    await provider.aclose()
    assert len(gateway.requests) == 1


async def test_operator_headers_win_over_preset_headers(gateway: Gateway) -> None:
    provider = HttpSmsProvider(url=gateway.url, headers={"Idempotency-Key": "fixed"})
    await provider.send(MESSAGE)
    await provider.aclose()
    assert gateway.requests[0].headers["Idempotency-Key"] == "fixed"


async def test_server_error_is_transient(gateway: Gateway) -> None:
    gateway.status = 500
    gateway.body = b"internal error"
    gateway.content_type = "text/plain"
    provider = HttpSmsProvider(url=gateway.url)
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value) == "SMS gateway answered HTTP 500: internal error"


@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_retryable_statuses_are_transient(gateway: Gateway, status: int) -> None:
    gateway.status = status
    gateway.body = b""
    provider = HttpSmsProvider(url=gateway.url)
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value) == f"SMS gateway answered HTTP {status}"


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 422])
async def test_other_statuses_are_permanent(gateway: Gateway, status: int) -> None:
    gateway.status = status
    gateway.body = b""
    provider = HttpSmsProvider(url=gateway.url)
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value) == f"SMS gateway answered HTTP {status}"


async def test_error_detail_is_kept_but_an_echoed_code_is_masked(gateway: Gateway) -> None:
    gateway.status = 400
    echo = {"message": f"invalid 'to' for text {TEXT!r}", "request": {"text": TEXT}}
    gateway.body = json.dumps(echo).encode()
    provider = HttpSmsProvider(url=gateway.url)
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value).startswith("SMS gateway answered HTTP 400: invalid 'to' for text")
    assert "######" in str(info.value)
    assert CODE not in str(info.value)
    assert len(str(info.value)) < 140


async def test_binary_error_bodies_are_not_quoted(gateway: Gateway) -> None:
    gateway.status = 400
    gateway.body = b"\x00\x01 whatever"
    gateway.content_type = "application/octet-stream"
    provider = HttpSmsProvider(url=gateway.url)
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value) == "SMS gateway answered HTTP 400"


async def test_slow_gateway_times_out_in_time(gateway: Gateway) -> None:
    gateway.delay = 3.0
    provider = HttpSmsProvider(url=gateway.url, timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(MESSAGE)
    elapsed = time.monotonic() - started
    await provider.aclose()
    assert str(info.value) == "SMS gateway timeout after 0.5s"
    assert 0.4 < elapsed < 1.5


async def test_trickling_gateway_is_bounded_by_the_total_timeout(gateway: Gateway) -> None:
    # Every single read succeeds well within 0.5 s, but the whole answer would take ~6 s.
    gateway.body = b"x" * 30
    gateway.content_type = "text/plain"
    gateway.trickle = 0.2
    provider = HttpSmsProvider(url=gateway.url, timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(MESSAGE)
    elapsed = time.monotonic() - started
    await provider.aclose()
    assert str(info.value) == "SMS gateway timeout after 0.5s"
    assert elapsed < 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_gateway_not_listening_is_transient() -> None:
    provider = HttpSmsProvider(url=f"http://127.0.0.1:{free_port()}/sms")
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value).startswith("SMS gateway unreachable: ")
    assert_code_free(info.value)


# --- twilio preset -------------------------------------------------------------------------


async def test_twilio_preset_posts_form_fields_with_basic_auth(gateway: Gateway) -> None:
    gateway.status = 201
    url = gateway.url.replace("/v1/sms", "/2010-04-01/Accounts/AC0123/Messages.json")
    provider = HttpSmsProvider(
        url=url, preset="twilio", from_number="+15005550006", basic_auth=("AC0123", "tok3n")
    )
    await provider.send(MESSAGE)
    await provider.aclose()

    request = gateway.requests[0]
    assert request.path == "/2010-04-01/Accounts/AC0123/Messages.json"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    fields = urllib.parse.parse_qs(request.body.decode(), strict_parsing=True)
    assert fields == {"To": ["+14155550123"], "Body": [TEXT], "From": ["+15005550006"]}
    scheme, _, credentials = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(credentials) == b"AC0123:tok3n"
    assert "Idempotency-Key" not in request.headers


async def test_twilio_credentials_in_the_url(gateway: Gateway) -> None:
    gateway.status = 201
    url = gateway.url.replace("http://", "http://AC0123:tok3n@")
    provider = HttpSmsProvider(url=url, preset="twilio", from_number="+15005550006")
    await provider.send(MESSAGE)
    await provider.aclose()
    credentials = gateway.requests[0].headers["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(credentials) == b"AC0123:tok3n"
    assert "tok3n" not in repr(provider)


async def test_twilio_messaging_service_sid(gateway: Gateway) -> None:
    gateway.status = 201
    provider = HttpSmsProvider(
        url=gateway.url,
        preset="twilio",
        from_number="MG9752274e9e519418a7406176694466fa",
        headers={"Authorization": "Basic QUMwMTIzOnRvazNu"},
    )
    await provider.send(MESSAGE)
    await provider.aclose()

    request = gateway.requests[0]
    fields = urllib.parse.parse_qs(request.body.decode())
    assert fields["MessagingServiceSid"] == ["MG9752274e9e519418a7406176694466fa"]
    assert "From" not in fields
    assert request.headers["Authorization"] == "Basic QUMwMTIzOnRvazNu"


async def test_twilio_error_message_is_reported(gateway: Gateway) -> None:
    gateway.status = 400
    gateway.body = json.dumps(
        {
            "code": 21211,
            "message": "The 'To' number +1415555012 is not a valid phone number.",
            "more_info": "https://www.twilio.com/docs/errors/21211",
            "status": 400,
        }
    ).encode()
    provider = HttpSmsProvider(url=gateway.url, preset="twilio", from_number="+15005550006")
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(MESSAGE)
    await provider.aclose()
    assert str(info.value) == (
        "SMS gateway answered HTTP 400: The 'To' number +########## is not a valid phone number."
    )


# --- construction and lifecycle ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"url": "http://gw.example/sms", "preset": "nexmo"},
            "unknown SMS HTTP preset 'nexmo'; known presets: json, twilio",
        ),
        (
            {"url": "http://gw.example/sms", "preset": "twilio"},
            "the twilio SMS preset needs a from_number (or an MG… service SID)",
        ),
        (
            {"url": "gw.example/sms"},
            "SMS HTTP URL must be an absolute http(s) URL, not 'gw.example/sms'",
        ),
        (
            {"url": "http://gw.example/sms", "timeout_seconds": 0},
            "SMS HTTP timeout must be a positive number of seconds",
        ),
    ],
)
def test_rejects_bad_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        HttpSmsProvider(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


async def test_aclose_closes_only_its_own_client(gateway: Gateway) -> None:
    own = HttpSmsProvider(url=gateway.url)
    await own.send(MESSAGE)
    await own.send(MESSAGE)
    await own.aclose()
    with pytest.raises(RuntimeError):
        await own.send(MESSAGE)

    async with httpx.AsyncClient() as client:
        borrowed = HttpSmsProvider(url=gateway.url, client=client)
        await borrowed.send(MESSAGE)
        await borrowed.aclose()
        assert not client.is_closed
        await borrowed.send(MESSAGE)
    assert len(gateway.requests) == 4


def test_repr_hides_secrets() -> None:
    provider = HttpSmsProvider(
        url="https://AC0123:tok3n@api.example/sms?key=secret",
        headers={"X-Api-Key": "k-123"},
        basic_auth=("user", "pw-xyz"),
    )
    assert provider.name == "http"
    text = repr(provider)
    for secret in ("tok3n", "secret", "k-123", "pw-xyz"):
        assert secret not in text
    assert "api.example/sms" in text
