"""Wire dialects of the official SDKs (PROTOCOL.md §3 and §4), sent over real sockets."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from urllib.parse import quote

import pytest

from otpgate.protocol import content_to_sign
from support.harness import World, init_body, verify_body

PATH = "/ams/api/v1/users/initAuthentication"


def raw_exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send bytes as they are; return status line, headers (lower-cased names), body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += sock.recv(65536)
    return lines[0], headers, body


def signed_headers(world: World, path: str, body: bytes, request_time: str) -> dict[str, str]:
    signature = world.merchant.signer.sign(
        content_to_sign("POST", path, "M_SHOP", request_time, body)
    )
    return {
        "Client-Id": "M_SHOP",
        "Request-Time": request_time,
        "Signature": f"algorithm=RSA256,keyVersion=1,signature={signature}",
    }


def test_absolute_form_request_target(world: World) -> None:
    """The official Python SDK sends `POST http://host/ams/... HTTP/1.1`."""
    body = json.dumps(init_body("r-abs", world.token), indent=3).encode()
    now = str(int(time.time() * 1000))
    headers = signed_headers(world, PATH, body, now)
    target = f"http://open-sea-global.alipay.com{PATH}"
    request = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + f"Content-Type: application/json; charset=UTF-8\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, response_headers, response_body = raw_exchange(world.server.port, request)
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(response_body)["result"]["resultCode"] == "SUCCESS"
    # Lower-case names, signature the third comma item, no other header mentions them.
    assert response_headers["signature"].split(",")[2].startswith("signature=")
    assert response_headers["content-type"] == "application/json; charset=UTF-8"
    others = [k for k in response_headers if k not in {"signature", "response-time"}]
    assert not [k for k in others if "signature" in k or "response-time" in k]
    assert not [k for k in others if "signature" in response_headers[k].lower()]


@pytest.mark.parametrize(
    "request_time",
    [
        "{ms}",
        "{iso_py}",  # Python: +00:00
        "{iso_net}",  # .NET: 7 fractional digits and Z
        "{iso_php}",  # PHP: +0800 offset from its configured zone
    ],
)
def test_request_time_dialects(world: World, request_time: str) -> None:
    now = dt.datetime.now(dt.UTC)
    values = {
        "ms": str(int(now.timestamp() * 1000)),
        "iso_py": now.replace(microsecond=0).isoformat(),
        "iso_net": now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
        "iso_php": now.astimezone(dt.timezone(dt.timedelta(hours=8))).strftime(
            "%Y-%m-%dT%H:%M:%S+0800"
        ),
    }
    value = request_time.format(**values)
    answer = world.server.post(
        world.merchant,
        "initAuthentication",
        init_body(f"r-{hash(value)}", world.token),
        request_time=value,
    )
    assert answer.code in {"SUCCESS", "REQUEST_TRAFFIC_EXCEED_LIMIT"}, answer.body


def test_sdk_body_and_header_dialects(world: World) -> None:
    """Go: duplicate Content-Type, empty extra headers, \\u003c escapes; PHP: escaped slash;
    .NET: %2b lower-case hex and nulls for unset fields; no keyVersion; spaces after commas."""
    fields = {**init_body("r-dialect/1", world.token), "extra": None}
    body = json.dumps(fields).replace("/", "\\/").encode()
    now = str(int(time.time() * 1000))
    signature = world.merchant.signer.sign(content_to_sign("POST", PATH, "M_SHOP", now, body))
    lower_hex = (
        quote(signature.replace("%2B", "+").replace("%2F", "/").replace("%3D", "="), safe="")
        .replace("%2B", "%2b")
        .replace("%2F", "%2f")
    )
    request = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Type: application/json; charset=UTF-8\r\nAgent-Token: \r\nKey-Version: \r\n"
        f"Sdk-Version: \r\nclient-id: M_SHOP\r\nrequest-time: {now}\r\n"
        f"signature: algorithm=RSA256, signature={lower_hex}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    _, _, response_body = raw_exchange(world.server.port, request)
    document = json.loads(response_body)
    assert document["result"]["resultCode"] == "SUCCESS", document
    assert document["authenticationRequestId"] == "r-dialect/1"


def test_raw_plus_in_signature_survives(world: World) -> None:
    """A raw base64 `+` must not turn into a space (unquote, not unquote_plus)."""
    for attempt in range(40):
        body = json.dumps(verify_body(f"r-plus-{attempt}", "123456")).encode()
        now = str(int(time.time() * 1000))
        signature = world.merchant.signer.sign(
            content_to_sign("POST", "/ams/api/v1/users/verifyAuthentication", "M_SHOP", now, body)
        )
        raw = signature.replace("%2B", "+").replace("%2F", "/").replace("%3D", "=")
        if "+" in raw:
            answer = world.server.post(
                world.merchant,
                "verifyAuthentication",
                body,
                headers={
                    "Signature": f"algorithm=RSA256,keyVersion=1,signature={raw}",
                    "Request-Time": now,
                },
                request_time=now,
            )
            assert answer.code == "AUTHENTICATION_REQUEST_ID_INVALID", answer.body
            return
    pytest.fail("no signature with a '+' in 40 tries")


def test_short_path_form(world: World) -> None:
    answer = world.server.post(
        world.merchant,
        "verifyAuthentication",
        verify_body("nope", "123456"),
        path="/v1/users/verifyAuthentication",
    )
    assert answer.code == "AUTHENTICATION_REQUEST_ID_INVALID"
    assert answer.body["isPassed"] is False
