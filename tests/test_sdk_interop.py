"""Interop with the official Python merchant SDK (``global-open-sdk-python``).

A merchant must be able to point the SDK at otpgate and work unchanged (PROTOCOL.md).
Only the SDK's transport is replaced: ``default_http_rpc`` always opens HTTPS on port 443,
so its connection factory is swapped for plain HTTP to the test server. Everything else is
the SDK's own code: request serialisation (``indent=3`` JSON), ISO-8601 ``Request-Time``,
request signing, the absolute-form request target (``POST https://host/ams/...``), the
sandbox path rewrite, response-header parsing and response-signature verification.

Two SDK bugs are worked around here, never in otpgate:

* ``AlipayInitAuthenticationRequest`` / ``AlipayVerifyAuthenticationRequest`` call
  ``AlipayRequest.__init__()`` without a path and raise ``IndexError``. The subclasses below
  call ``AlipayRequest.__init__`` with the path and keep the SDK's properties and
  ``to_ams_json`` untouched, so the bytes on the wire are the SDK's own.
* the transport, as above.
"""

from __future__ import annotations

import base64
import http.client
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import rsa
from com.alipay.ams.api.default_alipay_client import DefaultAlipayClient
from com.alipay.ams.api.exception.exception import AlipayApiException
from com.alipay.ams.api.net import default_http_rpc
from com.alipay.ams.api.request.alipay_request import AlipayRequest
from com.alipay.ams.api.request.users.alipay_init_authentication_request import (
    AlipayInitAuthenticationRequest,
)
from com.alipay.ams.api.request.users.alipay_verify_authentication_request import (
    AlipayVerifyAuthenticationRequest,
)
from com.alipay.ams.api.tools import signature_tool
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from support.harness import (
    Merchant,
    Server,
    World,
    add_merchant,
    cli_json,
    inbox_codes,
    init_body,
    issue_token,
    verify_body,
)

# Never resolved: the patched transport connects to 127.0.0.1, but the SDK still puts this
# URL into the request line (absolute form) and the Host header.
GATEWAY = "https://open-sea-global.alipay.com"
INIT_PATH = "/ams/api/v1/users/initAuthentication"
VERIFY_PATH = "/ams/api/v1/users/verifyAuthentication"
SANDBOX_INIT_PATH = "/ams/sandbox/api/v1/users/initAuthentication"
SANDBOX_VERIFY_PATH = "/ams/sandbox/api/v1/users/verifyAuthentication"

# The module-level factory `do_post` looks up in its globals (no name mangling at module level).
CONNECTION_FACTORY = "__get_http_connection"


# -- the SDK's users requests, constructible ------------------------------------------------


class InitAuthenticationRequest(AlipayInitAuthenticationRequest):
    """The SDK class with a working constructor; fields and ``to_ams_json`` are the SDK's."""

    def __init__(self, path: str = INIT_PATH) -> None:
        AlipayRequest.__init__(self, path)
        self.authentication_type = None
        self.authentication_request_id = None
        self.authentication_channel_type = None
        self.user_identity_type = None
        self.user_identity_value = None


class VerifyAuthenticationRequest(AlipayVerifyAuthenticationRequest):
    """The SDK class with a working constructor; fields and ``to_ams_json`` are the SDK's."""

    def __init__(self, path: str = VERIFY_PATH) -> None:
        AlipayRequest.__init__(self, path)
        self.authentication_type = None
        self.authentication_request_id = None
        self.authentication_value = None


# -- transport ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One request as the SDK put it on the wire."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Wire:
    """Replaces the SDK's HTTPS-on-443 connection factory with plain HTTP to ``server``."""

    server: Server
    sent: list[Sent] = field(default_factory=list)

    def connect(self, url: str, timeout: float = 15) -> http.client.HTTPConnection:
        assert url.startswith(GATEWAY + "/"), url
        wire = self

        class Recording(http.client.HTTPConnection):
            def request(
                self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any
            ) -> None:
                wire.sent.append(Sent(method, url, dict(headers or {}), bytes(body or b"")))
                super().request(method, url, body=body, headers=headers or {}, **kwargs)

        return Recording("127.0.0.1", self.server.port, timeout=timeout)


@pytest.fixture
def wire(world: World, monkeypatch: pytest.MonkeyPatch) -> Wire:
    assert CONNECTION_FACTORY in vars(default_http_rpc), dir(default_http_rpc)
    patched = Wire(world.server)
    monkeypatch.setattr(default_http_rpc, CONNECTION_FACTORY, patched.connect)
    return patched


# -- keys in the shapes the SDK takes ---------------------------------------------------


def sdk_private_key(key: RSAPrivateKey) -> str:
    """The one-line base64 body of a PKCS#1 PEM; the SDK adds the markers itself."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    lines = pem.strip().splitlines()
    assert lines[0] == "-----BEGIN RSA PRIVATE KEY-----"
    assert lines[-1] == "-----END RSA PRIVATE KEY-----"
    return "".join(lines[1:-1])


def bare_public_key(key: RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def random_private_key() -> RSAPrivateKey:
    return crypto_rsa.generate_private_key(public_exponent=65537, key_size=2048)


def server_public_key(data_dir: Path) -> str:
    """`otpgate public-key --bare`, checked against the PEM file the operator publishes."""
    bare: str = cli_json(data_dir, "public-key", "--bare")["publicKey"]
    pem = serialization.load_pem_public_key((data_dir / "server-public-key.pem").read_bytes())
    der = pem.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert bare == base64.b64encode(der).decode("ascii")
    return bare


# -- the merchant side -------------------------------------------------------------------


class SdkMerchant:
    """A merchant integration: the SDK's DefaultAlipayClient and its users requests."""

    def __init__(
        self,
        merchant: Merchant,
        alipay_public_key: str,
        private_key: RSAPrivateKey | None = None,
        key_version: str | None = None,
    ) -> None:
        self.client_id = merchant.client_id
        self.key_version = key_version  # None: the SDK's default, "1"
        self.client = DefaultAlipayClient(
            GATEWAY,
            merchant.client_id,
            sdk_private_key(private_key or merchant.private_key),
            alipay_public_key,
        )

    def init(
        self, request_id: str, token: str, channel: str = "SMS", path: str = INIT_PATH
    ) -> dict[str, Any]:
        request = InitAuthenticationRequest(path)
        request.authentication_type = "OTP"
        request.authentication_request_id = request_id
        request.authentication_channel_type = channel
        request.user_identity_type = "WALLET_TOKEN"
        request.user_identity_value = token
        return self._execute(request)

    def verify(self, request_id: str, value: str, path: str = VERIFY_PATH) -> dict[str, Any]:
        request = VerifyAuthenticationRequest(path)
        request.authentication_type = "OTP"
        request.authentication_request_id = request_id
        request.authentication_value = value
        return self._execute(request)

    def _execute(self, request: AlipayRequest) -> dict[str, Any]:
        request.key_version = self.key_version
        # execute() verifies the response signature itself and raises if it is missing/bad.
        body: dict[str, Any] = json.loads(self.client.execute(request))
        return body


def result(body: dict[str, Any]) -> tuple[str, str]:
    return body["result"]["resultCode"], body["result"]["resultStatus"]


def new_request_id() -> str:
    return f"sdk-{uuid.uuid4().hex}"


def wrong_code(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


def one_code(data_dir: Path, user_id: str) -> str:
    codes = inbox_codes(data_dir, user_id)
    assert len(codes) == 1, codes
    return codes[0]


# -- tests -------------------------------------------------------------------------------


def test_sdk_request_classes_serialise_like_the_sdk() -> None:
    """The constructible subclasses produce exactly the SDK's indent=3 camelCase JSON."""
    init = InitAuthenticationRequest()
    init.authentication_type = "OTP"
    init.authentication_request_id = "r-1"
    init.authentication_channel_type = "SMS"
    init.user_identity_type = "WALLET_TOKEN"
    init.user_identity_value = "tok"
    assert init.path == INIT_PATH
    assert init.to_ams_json() == json.dumps(
        {
            "authenticationType": "OTP",
            "authenticationRequestId": "r-1",
            "authenticationChannelType": "SMS",
            "userIdentityType": "WALLET_TOKEN",
            "userIdentityValue": "tok",
        },
        indent=3,
    )
    verify = VerifyAuthenticationRequest()
    verify.authentication_type = "OTP"
    verify.authentication_request_id = "r-1"
    assert verify.path == VERIFY_PATH
    # Unset fields are omitted, as in the SDK.
    assert json.loads(verify.to_ams_json()) == {
        "authenticationType": "OTP",
        "authenticationRequestId": "r-1",
    }
    # The quirk being worked around is still there (if this fails, drop the subclasses).
    with pytest.raises(IndexError):
        AlipayInitAuthenticationRequest()


@pytest.mark.parametrize("channel", ["SMS", "EMAIL"])
def test_sdk_init_then_verify(world: World, wire: Wire, channel: str) -> None:
    data_dir = world.server.data_dir
    sdk = SdkMerchant(world.merchant, server_public_key(data_dir))
    request_id = new_request_id()

    init = sdk.init(request_id, world.token, channel)
    assert result(init) == ("SUCCESS", "S"), init
    assert init["authenticationRequestId"] == request_id

    # The SDK really sent its own dialect: absolute-form target, pretty JSON, ISO time.
    sent = wire.sent[-1]
    assert sent.method == "POST"
    assert sent.target == GATEWAY + INIT_PATH
    assert sent.body.startswith(b"{\n   ")
    assert sent.headers["Request-Time"].endswith("+00:00")
    assert sent.headers["Signature"].startswith("algorithm=RSA256,keyVersion=1,signature=")

    code = one_code(data_dir, world.user_id)

    miss = sdk.verify(request_id, wrong_code(code))
    assert result(miss) == ("VERIFY_UNMATCHED", "F"), miss
    assert miss["isPassed"] is False
    assert code not in json.dumps(miss)

    passed = sdk.verify(request_id, code)
    assert result(passed) == ("SUCCESS", "S"), passed
    assert passed["isPassed"] is True
    assert wire.sent[-1].target == GATEWAY + VERIFY_PATH
    assert len(wire.sent) == 3


def test_sdk_init_retry_is_idempotent(world: World, wire: Wire) -> None:
    """The SDK's retry of a lost response (same id, same fields) sends nothing new."""
    data_dir = world.server.data_dir
    sdk = SdkMerchant(world.merchant, server_public_key(data_dir))
    request_id = new_request_id()

    first = sdk.init(request_id, world.token)
    again = sdk.init(request_id, world.token)
    assert result(first) == ("SUCCESS", "S"), first
    assert result(again) == ("SUCCESS", "S"), again
    assert again["authenticationRequestId"] == request_id
    assert len(inbox_codes(data_dir, world.user_id, timeout=2, count=2)) == 1

    passed = sdk.verify(request_id, one_code(data_dir, world.user_id))
    assert result(passed) == ("SUCCESS", "S"), passed
    assert passed["isPassed"] is True


def test_sdk_sandbox_client_uses_sandbox_path(world: World, wire: Wire) -> None:
    data_dir = world.server.data_dir
    merchant = add_merchant(data_dir, "SANDBOX_SHOP", "--sandbox", "--name", "Sandbox Shop")
    token = issue_token(data_dir, "SANDBOX_SHOP", world.user_id)
    sdk = SdkMerchant(merchant, server_public_key(data_dir))
    request_id = new_request_id()

    init = sdk.init(request_id, token)
    assert wire.sent[-1].target == GATEWAY + SANDBOX_INIT_PATH
    assert wire.sent[-1].headers["client-id"] == "SANDBOX_SHOP"
    assert result(init) == ("SUCCESS", "S"), init
    assert init["authenticationRequestId"] == request_id

    code = one_code(data_dir, world.user_id)

    miss = sdk.verify(request_id, wrong_code(code))
    assert wire.sent[-1].target == GATEWAY + SANDBOX_VERIFY_PATH
    assert result(miss) == ("VERIFY_UNMATCHED", "F"), miss
    assert miss["isPassed"] is False

    passed = sdk.verify(request_id, code)
    assert result(passed) == ("SUCCESS", "S"), passed
    assert passed["isPassed"] is True


def test_sdk_production_client_on_sandbox_path_is_client_invalid(world: World, wire: Wire) -> None:
    data_dir = world.server.data_dir
    sdk = SdkMerchant(world.merchant, server_public_key(data_dir))
    request_id = new_request_id()

    # execute() returning at all means the SDK accepted the signature of the error answer.
    init = sdk.init(request_id, world.token, path=SANDBOX_INIT_PATH)
    assert wire.sent[-1].target == GATEWAY + SANDBOX_INIT_PATH
    assert result(init) == ("CLIENT_INVALID", "F"), init
    assert init["result"]["resultMessage"]

    verify = sdk.verify(request_id, "123456", path=SANDBOX_VERIFY_PATH)
    assert result(verify) == ("CLIENT_INVALID", "F"), verify

    # Nothing was sent to the user, and the id was not consumed on the production path.
    assert inbox_codes(data_dir, world.user_id, timeout=0.5) == []
    init = sdk.init(request_id, world.token)
    assert result(init) == ("SUCCESS", "S"), init


@pytest.mark.parametrize("client_state", ["unknown", "disabled"])
def test_sdk_accepts_signed_client_invalid(world: World, wire: Wire, client_state: str) -> None:
    """Errors before any key is known are still signed, for the client id the SDK sent."""
    data_dir = world.server.data_dir
    merchant = world.merchant
    if client_state == "unknown":
        merchant = Merchant("M_NOBODY", random_private_key())
    else:
        cli_json(data_dir, "client", "disable", "M_SHOP")  # before any request: nothing cached
    sdk = SdkMerchant(merchant, server_public_key(data_dir))
    answer = sdk.init(new_request_id(), world.token)
    assert wire.sent[-1].headers["client-id"] == merchant.client_id
    assert result(answer) == ("CLIENT_INVALID", "F"), answer
    assert inbox_codes(data_dir, world.user_id, timeout=0.5) == []


def test_sdk_rejects_answer_signed_by_another_key(world: World, wire: Wire) -> None:
    """With a wrong alipay_public_key the SDK refuses our answer: it really verifies it."""
    data_dir = world.server.data_dir
    sdk = SdkMerchant(world.merchant, bare_public_key(random_private_key()))
    request_id = new_request_id()

    with pytest.raises(AlipayApiException, match="verif"):
        sdk.init(request_id, world.token)
    assert wire.sent[-1].target == GATEWAY + INIT_PATH

    # The request itself was good and served: the failure is only the response check.
    assert len(inbox_codes(data_dir, world.user_id)) == 1
    honest = SdkMerchant(world.merchant, server_public_key(data_dir))
    replay = honest.init(request_id, world.token)
    assert result(replay) == ("SUCCESS", "S"), replay


def test_sdk_signed_with_unregistered_key_gets_signature_invalid(world: World, wire: Wire) -> None:
    data_dir = world.server.data_dir
    sdk = SdkMerchant(world.merchant, server_public_key(data_dir), private_key=random_private_key())
    init = sdk.init(new_request_id(), world.token)
    assert result(init) == ("SIGNATURE_INVALID", "F"), init
    assert inbox_codes(data_dir, world.user_id, timeout=0.5) == []


def test_sdk_key_version_selects_the_registered_key(world: World, wire: Wire) -> None:
    """Key rotation as the SDK does it: `request.key_version` goes into the Signature header."""
    data_dir = world.server.data_dir
    new_key = random_private_key()
    pem = data_dir / "M_SHOP-v2.pem"
    pem.write_bytes(
        new_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cli_json(
        data_dir, "client", "key-add", "M_SHOP", "--public-key", str(pem), "--key-version", "2"
    )
    alipay_public_key = server_public_key(data_dir)

    # The new key announced as version 1 does not verify against version 1's key.
    wrong_version = SdkMerchant(world.merchant, alipay_public_key, private_key=new_key)
    answer = wrong_version.init(new_request_id(), world.token)
    assert result(answer) == ("SIGNATURE_INVALID", "F"), answer

    unknown = SdkMerchant(world.merchant, alipay_public_key, private_key=new_key, key_version="3")
    answer = unknown.init(new_request_id(), world.token)
    assert wire.sent[-1].headers["Signature"].startswith("algorithm=RSA256,keyVersion=3,")
    assert result(answer) == ("KEY_NOT_FOUND", "F"), answer

    rotated = SdkMerchant(world.merchant, alipay_public_key, private_key=new_key, key_version="2")
    request_id = new_request_id()
    answer = rotated.init(request_id, world.token)
    assert result(answer) == ("SUCCESS", "S"), answer
    passed = rotated.verify(request_id, one_code(data_dir, world.user_id))
    assert result(passed) == ("SUCCESS", "S"), passed
    assert passed["isPassed"] is True


def test_sdk_signature_tool_verifies_harness_answers(world: World) -> None:
    """The SDK's own `signature_tool.verify` accepts otpgate answers, successes and errors."""
    server, merchant = world.server, world.merchant
    alipay_public_key = server_public_key(server.data_dir)
    request_id = new_request_id()
    cases = [
        (INIT_PATH, "initAuthentication", init_body(request_id, world.token), "SUCCESS"),
        (VERIFY_PATH, "verifyAuthentication", verify_body(request_id, "x"), "PARAM_ILLEGAL"),
        (
            "/v1/users/verifyAuthentication",
            "verifyAuthentication",
            verify_body(new_request_id(), "123456"),
            "AUTHENTICATION_REQUEST_ID_INVALID",
        ),
        ("/ams/api/v1/users/nope", "nope", {}, "API_INVALID"),
    ]
    for path, api, body, expected in cases:
        answer = server.post(merchant, api, body, path=path)
        assert answer.code == expected, answer.body
        header = answer.headers["signature"]
        signature = header.split("signature=")[1]  # as DefaultAlipayClient parses it
        text = answer.raw.decode("utf-8")
        args = ("POST", path, answer.headers["client-id"], answer.headers["response-time"])
        assert signature_tool.verify(*args, text, signature, alipay_public_key) is True

        # Negative controls: the same check fails on another body, path or key.
        with pytest.raises(rsa.VerificationError):
            signature_tool.verify(*args, text + " ", signature, alipay_public_key)
        with pytest.raises(rsa.VerificationError):
            signature_tool.verify("POST", path + "x", *args[2:], text, signature, alipay_public_key)
        with pytest.raises(rsa.VerificationError):
            signature_tool.verify(*args, text, signature, bare_public_key(random_private_key()))
