"""The OpenAPI document of the signed API (issue #6): served, kept in the repo, valid, true.

The document lives in ``src/otpgate/server/openapi.json`` and the server serves that file at
``GET /openapi.json``. Beyond being valid OpenAPI, it must agree with the protocol package
(catalogue codes and their fixed statuses, field limits and enums) and with the running
server: schemathesis generates requests from it, a ``before_call`` hook signs each one as a
merchant SDK would, and every answer must be HTTP 200, signed, a catalogue code, and conform
to the document's response schema and headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import otpgate.server
from otpgate.protocol import ResultCode, content_to_sign
from support.harness import (
    Merchant,
    Server,
    add_merchant,
    add_user,
    init_data_dir,
    issue_token,
    running_server,
)

DOCUMENT = Path(otpgate.server.__file__).with_name("openapi.json")
CLIENT_ID = "M_SPEC"
INIT_PATH = "/ams/api/v1/users/initAuthentication"
VERIFY_PATH = "/ams/api/v1/users/verifyAuthentication"

# Field -> (maximum length, allowed values) of the interface document (PROTOCOL.md §3).
REQUEST_FIELDS: dict[str, dict[str, tuple[int, list[str] | None]]] = {
    "InitAuthenticationRequest": {
        "authenticationType": (16, ["OTP"]),
        "authenticationRequestId": (64, None),
        "authenticationChannelType": (16, ["SMS", "EMAIL"]),
        "userIdentityType": (16, ["WALLET_TOKEN"]),
        "userIdentityValue": (128, None),
    },
    "VerifyAuthenticationRequest": {
        "authenticationType": (16, ["OTP"]),
        "authenticationRequestId": (64, None),
        "authenticationValue": (256, None),
    },
}


@dataclass
class SignedApi:
    server: Server
    merchant: Merchant
    token: str


@pytest.fixture(scope="module")
def signed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignedApi]:
    data_dir = init_data_dir(
        tmp_path_factory.mktemp("openapi") / "data",
        user_send_interval_seconds=0,
        user_sends_per_10_min=0,
        user_failure_budget=0,
    )
    with running_server(data_dir) as server:
        merchant = add_merchant(data_dir, CLIENT_ID, "--rate", "1000000")
        add_user(data_dir, "alice", "--phone", "+14155550123", "--email", "alice@example.com")
        yield SignedApi(server, merchant, issue_token(data_dir, CLIENT_ID, "alice"))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (one level is all the document uses)."""
    if "$ref" not in node:
        return node
    target: dict[str, Any] = document
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return target


# -- the document itself -----------------------------------------------------------------


def test_served_document_is_the_repository_file(signed_api: SignedApi) -> None:
    response = httpx.get(signed_api.server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == DOCUMENT.read_bytes()


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {INIT_PATH, VERIFY_PATH}


def test_result_schema_is_the_catalogue(document: dict[str, Any]) -> None:
    result = document["components"]["schemas"]["Result"]
    assert result["properties"]["resultCode"]["enum"] == [code.name for code in ResultCode]
    assert result["properties"]["resultStatus"]["enum"] == ["S", "F", "U"]
    assert result["properties"]["resultMessage"]["maxLength"] == 64
    by_status = {
        branch["properties"]["resultStatus"]["enum"][0]: branch["properties"]["resultCode"]["enum"]
        for branch in result["oneOf"]
    }
    for code in ResultCode:
        assert code.name in by_status[code.status.value], code


@pytest.mark.parametrize("name", sorted(REQUEST_FIELDS))
def test_request_schemas_have_the_interface_limits(document: dict[str, Any], name: str) -> None:
    schema = document["components"]["schemas"][name]
    assert sorted(schema["required"]) == sorted(REQUEST_FIELDS[name])
    for field, (limit, allowed) in REQUEST_FIELDS[name].items():
        prop = resolve(document, schema["properties"][field])
        assert prop["type"] == "string", field
        assert prop["maxLength"] == limit, field
        assert prop.get("enum") == allowed, field


@pytest.mark.parametrize("path", [INIT_PATH, VERIFY_PATH])
def test_operations_declare_signed_headers(document: dict[str, Any], path: str) -> None:
    operation = document["paths"][path]["post"]
    parameters = [resolve(document, p) for p in operation["parameters"]]
    assert {(p["name"], p["in"], p["required"]) for p in parameters} == {
        ("Client-Id", "header", True),
        ("Request-Time", "header", True),
        ("Signature", "header", True),
    }
    assert set(operation["responses"]) == {"200"}  # every outcome is HTTP 200
    response = resolve(document, operation["responses"]["200"])
    headers = {name: resolve(document, h) for name, h in response["headers"].items()}
    for name in ("client-id", "response-time", "signature"):  # lower-case, as sent
        assert headers[name]["required"] is True, name


# -- schemathesis against the running server ---------------------------------------------


def with_real_token(case: schemathesis.Case, token: str) -> None:
    """Put alice's real token in half of the init bodies (those whose generated token has an
    even length), so that generated requests also reach SUCCESS, not only token errors."""
    body = case.body
    value = body.get("userIdentityValue") if isinstance(body, dict) else None
    if isinstance(value, str) and len(value) % 2 == 0:
        body["userIdentityValue"] = token


def sign_case(merchant: Merchant, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Serialise the body ourselves, send exactly those bytes, sign exactly those bytes."""
    body = case.body
    if isinstance(body, NotSet):
        raw = b""  # negative cases may leave the required body out
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = json.dumps(body).encode()
    transport = case.as_transport_kwargs(base_url="http://otpgate.invalid")
    prepared = requests.Request("POST", transport["url"], params=transport["params"]).prepare()
    request_time = str(int(time.time() * 1000))
    content = content_to_sign("POST", prepared.path_url, merchant.client_id, request_time, raw)
    case.headers = {
        **(case.headers or {}),
        "Content-Type": "application/json; charset=UTF-8",
        "Client-Id": merchant.client_id,
        "Request-Time": request_time,
        "Signature": f"algorithm=RSA256,keyVersion={merchant.key_version},"
        f"signature={merchant.signer.sign(content)}",
    }
    kwargs["data"] = raw


@pytest.fixture
def signing_hook(signed_api: SignedApi) -> Iterator[None]:
    """A schemathesis ``before_call`` hook that signs every request as the merchant.

    Registered for the test that needs it and removed after, so no other schemathesis run
    in the session signs with this merchant's key.
    """

    def before_call(
        context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]
    ) -> None:
        with_real_token(case, signed_api.token)
        sign_case(signed_api.merchant, case, kwargs)

    schemathesis.hook(before_call)
    try:
        yield
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)


# The repository file, which the server serves unchanged (see the first test above).
schema = schemathesis.openapi.from_path(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_every_generated_request_gets_a_signed_conforming_answer(
    case: schemathesis.Case, signed_api: SignedApi, signing_hook: None
) -> None:
    response = case.call(base_url=signed_api.server.url, timeout=10)
    path = response.request.path_url
    assert path.startswith((INIT_PATH, VERIFY_PATH)), path
    as_httpx = httpx.Response(
        response.status_code,
        headers=[(name, value) for name, values in response.headers.items() for value in values],
        content=response.content,
    )
    answer = signed_api.server.check(as_httpx, path, CLIENT_ID)  # 200, signed, echoed id
    assert answer.code in ResultCode.__members__, answer.body
    assert answer.status == ResultCode[answer.code].status.value, answer.body
    # Limits are off and the store is healthy: a U answer can only be an internal fault.
    assert answer.status != "U", answer.body
    assert response.elapsed < 1.0, response.elapsed
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
