"""The signed merchant API: one ASGI callable for every request that is not an ops endpoint.

Checks run in the order of PROTOCOL.md §5 and the first failure answers:
method → path → client → key → signature → Request-Time → client rate → body → business rules.
Every answer is HTTP 200 with a signed body, errors and internal faults included.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import Message, Receive, Scope, Send

from otpgate.core.models import MAX_CLIENT_ID_LENGTH
from otpgate.core.ports import Clock, RateLimiter
from otpgate.core.service import INIT, VERIFY, AuthenticationService, Outcome
from otpgate.protocol import (
    MAX_BODY_BYTES,
    ProtocolError,
    ResultCode,
    Signer,
    content_to_sign,
    decode_init_request,
    decode_verify_request,
    encode_init_response,
    encode_result,
    encode_verify_response,
    format_response_time,
    parse_request_time,
    parse_signature_header,
    verify_signature,
)
from otpgate.server.directory import ClientDirectory
from otpgate.server.logs import AccessLog
from otpgate.server.observe import RequestRecorder

log = logging.getLogger("otpgate.api")

_API_PATHS: dict[str, tuple[str, bool]] = {}
for _api in (INIT, VERIFY):
    _API_PATHS[f"/ams/api/v1/users/{_api}"] = (_api, False)
    _API_PATHS[f"/v1/users/{_api}"] = (_api, False)
    _API_PATHS[f"/ams/sandbox/api/v1/users/{_api}"] = (_api, True)


@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int = MAX_BODY_BYTES
    request_time_window_seconds: int = 600
    client_rate_per_second: int = 100


class _Reject(Exception):
    """Ends the pipeline with a signed failure."""

    def __init__(self, code: ResultCode, message: str | None = None) -> None:
        self.code = code
        self.message = message


class SignedApi:
    def __init__(
        self,
        service: AuthenticationService,
        directory: ClientDirectory,
        signer: Signer,
        limiter: RateLimiter,
        settings: ApiSettings,
        recorder: RequestRecorder,
        access_log: AccessLog | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._service = service
        self._directory = directory
        self._signer = signer
        self._limiter = limiter
        self._settings = settings
        self._recorder = recorder
        self._clock = clock
        self._access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        trace_id = os.urandom(8).hex()
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        sign_path = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        headers = _first_headers(scope["headers"])
        client_id = headers.get("client-id", "")
        api, sandbox = _API_PATHS.get(scope["path"], ("", False))
        try:
            outcome = await self._handle(
                scope, receive, headers, client_id, api, sandbox, sign_path
            )
        except _Reject as reject:
            outcome = Outcome(reject.code, reject.message)
        except Exception:
            log.exception("internal fault", extra={"trace_id": trace_id, "api": api})
            outcome = Outcome(ResultCode.UNKNOWN_EXCEPTION, "internal error; retry")
        body = _encode(api, outcome)
        await self._respond(send, sign_path, client_id, body, trace_id)
        elapsed = time.perf_counter() - started
        self._recorder.record(api or "unknown", outcome.code.name, elapsed)
        if self._access_log is not None:
            self._access_log.write(
                trace_id=trace_id,
                api=api or "unknown",
                client_id=client_id[:MAX_CLIENT_ID_LENGTH],
                result_code=outcome.code.name,
                ms=round(elapsed * 1000, 3),
            )

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        client_id: str,
        api: str,
        sandbox: bool,
        sign_path: str,
    ) -> Outcome:
        if scope["method"] != "POST":
            raise _Reject(ResultCode.METHOD_NOT_SUPPORTED, f"use POST, not {scope['method'][:16]}")
        if not api:
            raise _Reject(ResultCode.API_INVALID, "unknown API path")
        if not client_id:
            raise _Reject(ResultCode.CLIENT_INVALID, "Client-Id header is missing")
        if len(client_id) > MAX_CLIENT_ID_LENGTH:
            # Registered ids are at most 64 characters; refusing longer ones before the lookup
            # keeps strangers from filling the client cache with huge keys.
            raise _Reject(
                ResultCode.CLIENT_INVALID,
                f"Client-Id is longer than {MAX_CLIENT_ID_LENGTH} characters",
            )
        resolved = await self._directory.get(client_id)
        if resolved is None or not resolved.client.enabled:
            raise _Reject(ResultCode.CLIENT_INVALID, "unknown or disabled client")
        client = resolved.client
        if sandbox and not client.sandbox:
            raise _Reject(ResultCode.CLIENT_INVALID, "sandbox path is for sandbox clients only")
        if api not in client.apis:
            raise _Reject(ResultCode.API_INVALID, f"{api} is not enabled for this client")
        try:
            signature = parse_signature_header(headers.get("signature"))
        except ProtocolError as exc:
            raise _Reject(exc.code, exc.message) from None
        public_key = resolved.key(signature.key_version)
        if public_key is None:
            version = signature.key_version
            raise _Reject(
                ResultCode.KEY_NOT_FOUND,
                f"no active key version {version}" if version is not None else "no active key",
            )
        body = await _read_body(receive, self._settings.max_body_bytes)
        request_time = headers.get("request-time", "")
        content = content_to_sign("POST", sign_path, client_id, request_time, body)
        if not verify_signature(public_key, content, signature.signature):
            raise _Reject(ResultCode.SIGNATURE_INVALID, "signature does not verify")
        window = self._settings.request_time_window_seconds
        if window:
            try:
                sent_at = parse_request_time(request_time)
            except ProtocolError as exc:
                raise _Reject(exc.code, exc.message) from None
            if abs(self._clock() - sent_at) > window:
                raise _Reject(ResultCode.PARAM_ILLEGAL, f"Request-Time is more than {window}s off")
        rate = client.rate_per_second
        if not await self._limiter.hit(
            client_id, self._settings.client_rate_per_second if rate is None else rate
        ):
            raise _Reject(ResultCode.REQUEST_TRAFFIC_EXCEED_LIMIT, "client request rate exceeded")
        try:
            if api == INIT:
                outcome = await self._service.init_authentication(client, decode_init_request(body))
            else:
                outcome = await self._service.verify_authentication(
                    client, decode_verify_request(body)
                )
        except ProtocolError as exc:
            raise _Reject(exc.code, exc.message) from None
        return outcome

    async def _respond(
        self, send: Send, sign_path: str, client_id: str, body: bytes, trace_id: str
    ) -> None:
        response_time = format_response_time(self._clock())
        signature = self._signer.signature_header(
            content_to_sign("POST", sign_path, client_id, response_time, body)
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json; charset=UTF-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"client-id", client_id.encode("latin-1", "replace")),
                    (b"response-time", response_time.encode()),
                    (b"signature", signature.encode()),
                    (b"trace-id", trace_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _encode(api: str, outcome: Outcome) -> bytes:
    if api == INIT:
        return encode_init_response(outcome.code, outcome.message, outcome.request_id)
    if api == VERIFY:
        is_passed = outcome.is_passed
        if is_passed is None and outcome.code.status.value != "U":
            is_passed = outcome.code is ResultCode.SUCCESS
        return encode_verify_response(outcome.code, outcome.message, is_passed)
    return encode_result(outcome.code, outcome.message)


def _first_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case names, first value wins (the Go SDK repeats Content-Type)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in headers:
            headers[key] = value.decode("latin-1")
    return headers


async def _read_body(receive: Callable[[], Awaitable[Message]], limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Reject(ResultCode.PARAM_ILLEGAL, "request body was cut off")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Reject(ResultCode.PARAM_ILLEGAL, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
