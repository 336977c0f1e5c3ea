"""The merchant SDK: signed requests to otpgate (or any server of the protocol), verified answers.

``OtpgateClient`` (sync) and ``AsyncOtpgateClient`` share one request builder and one response
checker; only the httpx transport differs. A response whose signature is missing or does not
verify raises ``ResponseSignatureError``: an unsigned answer is never trusted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from otpgate.protocol import (
    ProtocolError,
    Signer,
    content_to_sign,
    load_private_key,
    load_public_key,
    parse_signature_header,
    verify_signature,
)

__all__ = [
    "AsyncOtpgateClient",
    "InitResult",
    "OtpgateClient",
    "OtpgateError",
    "ResponseSignatureError",
    "Result",
    "VerifyResult",
]


class OtpgateError(Exception):
    """The server could not be reached or answered something that is not the protocol."""


class ResponseSignatureError(OtpgateError):
    """The response's signature is missing or does not verify with the server's key."""


@dataclass(frozen=True, slots=True)
class Result:
    code: str
    status: str  # "S", "F" or "U"
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "S"


@dataclass(frozen=True, slots=True)
class InitResult:
    result: Result
    authentication_request_id: str | None


@dataclass(frozen=True, slots=True)
class VerifyResult:
    result: Result
    is_passed: bool


@dataclass(frozen=True, slots=True)
class _Prepared:
    path: str
    headers: dict[str, str]
    body: bytes


class _Protocol:
    """Request signing and response checking, shared by both clients."""

    def __init__(
        self,
        client_id: str,
        private_key: RSAPrivateKey | bytes | str,
        server_public_key: RSAPublicKey | bytes | str,
        key_version: int | None,
    ) -> None:
        if not isinstance(private_key, RSAPrivateKey):
            raw = private_key.encode() if isinstance(private_key, str) else private_key
            private_key = load_private_key(raw)
        if not isinstance(server_public_key, RSAPublicKey):
            server_public_key = load_public_key(server_public_key)
        self.client_id = client_id
        self._signer = Signer(private_key, key_version or 1)
        self._key_version = key_version
        self._server_key = server_public_key
        # The official SDKs rewrite /ams/api to /ams/sandbox/api for SANDBOX_ clients.
        self._prefix = "/ams/sandbox/api" if client_id.startswith("SANDBOX_") else "/ams/api"

    def prepare(self, api: str, fields: dict[str, str]) -> _Prepared:
        path = f"{self._prefix}/v1/users/{api}"
        body = json.dumps(fields, separators=(",", ":")).encode()
        request_time = str(int(time.time() * 1000))
        signature = self._signer.sign(
            content_to_sign("POST", path, self.client_id, request_time, body)
        )
        version = f"keyVersion={self._key_version}," if self._key_version is not None else ""
        headers = {
            "Content-Type": "application/json; charset=UTF-8",
            "Client-Id": self.client_id,
            "Request-Time": request_time,
            "Signature": f"algorithm=RSA256,{version}signature={signature}",
        }
        return _Prepared(path, headers, body)

    def check(self, prepared: _Prepared, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise OtpgateError(f"server answered HTTP {response.status_code}")
        header = response.headers.get("signature")
        response_time = response.headers.get("response-time")
        if not header or response_time is None:
            raise ResponseSignatureError("response is not signed")
        try:
            signature = parse_signature_header(header)
        except ProtocolError as exc:
            raise ResponseSignatureError(f"response signature is malformed: {exc}") from None
        echoed = response.headers.get("client-id", self.client_id)
        content = content_to_sign("POST", prepared.path, echoed, response_time, response.content)
        if not verify_signature(self._server_key, content, signature.signature):
            raise ResponseSignatureError("response signature does not verify")
        try:
            document = json.loads(response.content)
            result = document["result"]
            _ = (result["resultCode"], result["resultStatus"])
        except (ValueError, KeyError, TypeError):
            raise OtpgateError("response body is not a protocol answer") from None
        if not isinstance(document, dict):
            raise OtpgateError("response body is not a protocol answer")
        return document


def _result(document: dict[str, Any]) -> Result:
    result = document["result"]
    return Result(result["resultCode"], result["resultStatus"], result.get("resultMessage", ""))


def _init_fields(request_id: str, channel: str, access_token: str) -> dict[str, str]:
    return {
        "authenticationType": "OTP",
        "authenticationRequestId": request_id,
        "authenticationChannelType": channel,
        "userIdentityType": "WALLET_TOKEN",
        "userIdentityValue": access_token,
    }


def _verify_fields(request_id: str, value: str) -> dict[str, str]:
    return {
        "authenticationType": "OTP",
        "authenticationRequestId": request_id,
        "authenticationValue": value,
    }


def _init_result(document: dict[str, Any]) -> InitResult:
    return InitResult(_result(document), document.get("authenticationRequestId"))


def _verify_result(document: dict[str, Any]) -> VerifyResult:
    return VerifyResult(_result(document), document.get("isPassed") is True)


class OtpgateClient:
    """Blocking client. ``base_url`` is e.g. ``http://127.0.0.1:8080``."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        private_key: RSAPrivateKey | bytes | str,
        server_public_key: RSAPublicKey | bytes | str,
        *,
        key_version: int | None = 1,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._protocol = _Protocol(client_id, private_key, server_public_key, key_version)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def init_authentication(self, request_id: str, channel: str, access_token: str) -> InitResult:
        return _init_result(
            self._call("initAuthentication", _init_fields(request_id, channel, access_token))
        )

    def verify_authentication(self, request_id: str, value: str) -> VerifyResult:
        return _verify_result(self._call("verifyAuthentication", _verify_fields(request_id, value)))

    def _call(self, api: str, fields: dict[str, str]) -> dict[str, Any]:
        prepared = self._protocol.prepare(api, fields)
        try:
            response = self._http.post(
                prepared.path, content=prepared.body, headers=prepared.headers
            )
        except httpx.HTTPError as exc:
            raise OtpgateError(f"could not reach otpgate: {exc}") from exc
        return self._protocol.check(prepared, response)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OtpgateClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncOtpgateClient:
    """asyncio client with the same calls as ``OtpgateClient``."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        private_key: RSAPrivateKey | bytes | str,
        server_public_key: RSAPublicKey | bytes | str,
        *,
        key_version: int | None = 1,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._protocol = _Protocol(client_id, private_key, server_public_key, key_version)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=100),
        )

    async def init_authentication(
        self, request_id: str, channel: str, access_token: str
    ) -> InitResult:
        fields = _init_fields(request_id, channel, access_token)
        return _init_result(await self._call("initAuthentication", fields))

    async def verify_authentication(self, request_id: str, value: str) -> VerifyResult:
        fields = _verify_fields(request_id, value)
        return _verify_result(await self._call("verifyAuthentication", fields))

    async def _call(self, api: str, fields: dict[str, str]) -> dict[str, Any]:
        prepared = self._protocol.prepare(api, fields)
        try:
            response = await self._http.post(
                prepared.path, content=prepared.body, headers=prepared.headers
            )
        except httpx.HTTPError as exc:
            raise OtpgateError(f"could not reach otpgate: {exc}") from exc
        return self._protocol.check(prepared, response)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncOtpgateClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
