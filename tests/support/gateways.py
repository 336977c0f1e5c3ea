"""Stand-ins for the outside world the delivery worker talks to, started by the tests.

``SmsGateway`` is a real HTTP server (a thread per connection) playing an SMS gateway: it records
every request the moment it arrives (arrival is what counts as "the gateway got it": a real
gateway would send the SMS even if its answer never reached us) and answers as a script says,
so tests can inject 5xx, 4xx, slow answers and hangs.  ``SmtpSink`` is an aiosmtpd server that
keeps every message it accepts.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- SMS gateway ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """How the gateway answers one request: after ``delay`` seconds, with ``status``/``body``."""

    status: int = 200
    delay: float = 0.0
    body: bytes = b'{"id": "SM1", "status": "queued"}'


@dataclass
class SmsRequest:
    """One request as the gateway saw it."""

    path: str
    headers: dict[str, str]
    raw: bytes
    arrived: float
    nth: int
    """1 for the first request to this destination, 2 for the second, ..."""
    status: int | None = None
    """The status the gateway answered (None while it is still "working")."""
    answered: bool = False
    """The answer was written without the connection having been torn down first."""

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def to(self) -> str:
        return str(self.json.get("to", ""))

    @property
    def text(self) -> str:
        return str(self.json.get("text", ""))

    @property
    def message_id(self) -> str:
        return self.headers.get("Idempotency-Key", "")


Script = Callable[[SmsRequest], Reply]


def always(reply: Reply) -> Script:
    return lambda _request: reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog of 5 drops a worker's concurrent burst


class SmsGateway:
    """A scripted HTTP SMS gateway on 127.0.0.1; use as a context manager."""

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or always(Reply())
        self.requests: list[SmsRequest] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _SmsHandler)
        self._server.gateway = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    def __enter__(self) -> SmsGateway:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/v1/sms") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _arrived(self, path: str, headers: dict[str, str], raw: bytes) -> SmsRequest:
        with self._lock:
            try:
                to = str(json.loads(raw).get("to", ""))
            except ValueError:
                to = ""
            nth = 1 + sum(1 for r in self.requests if r.to == to)
            request = SmsRequest(path, headers, raw, time.time(), nth)
            self.requests.append(request)
            return request

    def snapshot(self) -> list[SmsRequest]:
        with self._lock:
            return list(self.requests)

    def to(self, destination: str) -> list[SmsRequest]:
        return [r for r in self.snapshot() if r.to == destination]

    def accepted(self) -> list[SmsRequest]:
        """Requests the gateway answered 2xx."""
        return [r for r in self.snapshot() if r.status is not None and 200 <= r.status < 300]


class _SmsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        gateway: SmsGateway = self.server.gateway  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        request = gateway._arrived(self.path, dict(self.headers.items()), raw)
        reply = gateway.script(request)
        if reply.delay:
            time.sleep(reply.delay)
        request.status = reply.status
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
            request.answered = True
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


# ---- SMTP server ---------------------------------------------------------------------------


@dataclass
class _Collector:
    envelopes: list[Envelope] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 that accepts and keeps every message."""

    def __init__(self, port: int) -> None:
        self._collector = _Collector()
        self._controller = Controller(self._collector, hostname="127.0.0.1", port=port)
        self.port = port

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._controller.stop()

    @property
    def envelopes(self) -> list[Envelope]:
        return list(self._collector.envelopes)

    def message(self, index: int) -> EmailMessage:
        content = self.envelopes[index].original_content
        assert isinstance(content, bytes)
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed
