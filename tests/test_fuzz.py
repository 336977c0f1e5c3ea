"""Fuzzing the signed API over real HTTP (issue #6): whatever arrives, a signed catalogue answer.

One ``otpgate serve`` process per module, with the client rate, the user send limits and the
failure budget out of the way so that no limit masks how a request is parsed. Hypothesis
sends arbitrary JSON, valid bodies with one field mutated, duplicated keys, bytes that are
not JSON, huge and deeply nested bodies, absurd numbers, header garbage, absurd
``Request-Time`` values, wrong methods and wrong paths. Bodies are signed correctly (so they
reach the parser) unless the signature itself is under test.

Every answer must be HTTP 200, carry a ``signature`` header that verifies with the server's
public key over the exact bytes received, name a catalogue code with its fixed status, and
arrive within a second. Where the protocol fixes the outcome (a field over its length, a
wrong type, an unknown path...), the code is asserted too. Finally the server's memory must
stay flat across a few thousand such requests.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import unquote

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from otpgate.protocol import (
    MAX_BODY_BYTES,
    ResultCode,
    content_to_sign,
    parse_signature_header,
    verify_signature,
)
from support.harness import (
    Merchant,
    Server,
    add_merchant,
    add_user,
    init_body,
    init_data_dir,
    issue_token,
    running_server,
    verify_body,
)

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"
API_PATHS: dict[str, str] = {
    f"{prefix}/{api}": api
    for prefix in ("/ams/api/v1/users", "/v1/users", "/ams/sandbox/api/v1/users")
    for api in (INIT, VERIFY)
}
OPS_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
CATALOGUE: dict[str, str] = {code.name: code.status.value for code in ResultCode}
MAX_SECONDS = 1.0
CLIENT_ID = "M_FUZZ"

# Field -> (maximum length, allowed values) of the interface document (PROTOCOL.md §3).
FieldRules = dict[str, tuple[int, tuple[str, ...] | None]]
INIT_FIELDS: FieldRules = {
    "authenticationType": (16, ("OTP",)),
    "authenticationRequestId": (64, None),
    "authenticationChannelType": (16, ("SMS", "EMAIL")),
    "userIdentityType": (16, ("WALLET_TOKEN",)),
    "userIdentityValue": (128, None),
}
VERIFY_FIELDS: FieldRules = {
    "authenticationType": (16, ("OTP",)),
    "authenticationRequestId": (64, None),
    "authenticationValue": (256, None),  # ASCII digits
}
FIELDS: dict[str, FieldRules] = {INIT: INIT_FIELDS, VERIFY: VERIFY_FIELDS}


def fuzz(examples: int) -> settings:
    """Settings for a test that talks to the server: no deadline, network-speed examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# -- the server under test ---------------------------------------------------------------


@dataclass
class Target:
    server: Server
    merchant: Merchant
    token: str
    http: httpx.Client


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    data_dir = init_data_dir(
        tmp_path_factory.mktemp("fuzz") / "data",
        user_send_interval_seconds=0,
        user_sends_per_10_min=0,
        user_failure_budget=0,
    )
    with running_server(data_dir) as server, httpx.Client(timeout=10) as http:
        merchant = add_merchant(data_dir, CLIENT_ID, "--rate", "1000000")
        add_user(data_dir, "alice", "--phone", "+14155550123", "--email", "alice@example.com")
        token = issue_token(data_dir, CLIENT_ID, "alice")
        yield Target(server, merchant, token, http)
        assert server.process.poll() is None, f"server died during the run:\n{server.log()}"
        assert "Traceback" not in server.log(), server.log()


# -- one exchange, fully checked ----------------------------------------------------------


@dataclass
class Reply:
    path: str  # the request target as sent (path and query), which the answer is signed over
    code: str
    status: str
    message: str
    body: dict[str, Any]


def exchange(
    target: Target,
    body: bytes,
    *,
    path: str = f"/ams/api/v1/users/{INIT}",
    method: str = "POST",
    client_id: bytes = CLIENT_ID.encode(),
    request_time: bytes | None = None,
    signature: bytes | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> Reply:
    """Send one request and check the protocol envelope of its answer.

    ``signature=None`` signs the request correctly over the path, headers and body exactly
    as sent (header bytes are read as Latin-1, as the server reads them). An example whose
    headers httpx refuses to put on the wire is rejected: there is nothing to answer.
    """
    if request_time is None:
        request_time = str(int(time.time() * 1000)).encode()
    try:
        url = httpx.URL(target.server.url + path)
        sent_path = url.raw_path.decode("ascii")
        if signature is None:
            content = content_to_sign(
                "POST", sent_path, client_id.decode("latin-1"), request_time.decode("latin-1"), body
            )
            value = target.merchant.signer.sign(content)
            signature = f"algorithm=RSA256,keyVersion=1,signature={value}".encode()
        headers = [
            (b"Content-Type", b"application/json; charset=UTF-8"),
            (b"Client-Id", client_id),
            (b"Request-Time", request_time),
            (b"Signature", signature),
            *(extra_headers or []),  # after ours: the first of repeated headers counts
        ]
        started = time.perf_counter()
        response = target.http.request(method, url, content=body, headers=headers)
        elapsed = time.perf_counter() - started
    except httpx.LocalProtocolError:
        reject()
    # Ours is the first Client-Id header, the one that counts; HTTP strips surrounding blanks.
    reply = check_answer(target, response, sent_path, client_id.strip(b" \t"))
    assert elapsed < MAX_SECONDS, f"answer took {elapsed:.2f}s: {reply}"
    # Limits are off and the store is healthy: a U answer here can only be an internal fault.
    assert reply.code not in {"UNKNOWN_EXCEPTION", "REQUEST_TRAFFIC_EXCEED_LIMIT"}, reply
    if api_of(sent_path) == VERIFY:
        assert reply.body.get("isPassed") is (reply.code == "SUCCESS"), reply.body
    return reply


def check_answer(
    target: Target, response: httpx.Response, sent_path: str, client_id: bytes
) -> Reply:
    """HTTP 200, lower-case signed headers, a verifying signature, a catalogue code."""
    assert response.status_code == 200, (response.status_code, response.content[:300])
    names = [name for name, _ in response.headers.raw]
    assert b"signature" in names, f"unsigned answer: {response.content[:300]!r}"
    # Lower-case names, each once; no other header mentions them (PHP scans by substring).
    for name in (b"signature", b"response-time", b"client-id"):
        assert [n for n in names if name in n.lower()] == [name], names
    headers = dict(response.headers.raw)
    echoed = headers[b"client-id"].decode("latin-1")
    assert echoed == client_id.decode("latin-1")
    content = content_to_sign(
        "POST", sent_path, echoed, headers[b"response-time"].decode("latin-1"), response.content
    )
    signature = parse_signature_header(headers[b"signature"].decode("latin-1"))
    assert verify_signature(target.server.public_key, content, signature.signature), "bad signature"
    body = json.loads(response.content)
    result = body["result"]
    code, status = result["resultCode"], result["resultStatus"]
    assert code in CATALOGUE, body
    assert status == CATALOGUE[code], body
    message = result.get("resultMessage", "")
    assert isinstance(message, str) and len(message) <= 64, body
    return Reply(sent_path, code, status, message, body)


def api_of(sent_path: str) -> str | None:
    """The API a request target names, decoded as the server decodes it."""
    return API_PATHS.get(unquote(sent_path.partition("?")[0]))


def api_path(api: str) -> str:
    return f"/ams/api/v1/users/{api}"


def fresh_id() -> str:
    return f"fz-{uuid.uuid4().hex}"


def base_body(target: Target, api: str) -> dict[str, str]:
    """A valid body with a request id never used before."""
    if api == INIT:
        return init_body(fresh_id(), target.token)
    return verify_body(fresh_id(), "123456")


def encoded(body: dict[str, str]) -> bytes:
    return json.dumps(body).encode()


def json_object(members: list[tuple[str, bytes]]) -> bytes:
    """A JSON object of already-serialised values, in order, repeated keys kept."""
    return b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in members) + b"}"


def members_of(body: dict[str, str]) -> list[tuple[str, bytes]]:
    return [(key, json.dumps(value).encode()) for key, value in body.items()]


# -- strategies -------------------------------------------------------------------------

apis = st.sampled_from([INIT, VERIFY])
field_names = st.sampled_from(sorted(INIT_FIELDS | VERIFY_FIELDS))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(field_names | st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)

ABSURD_NUMBERS = [b"1e999", b"-1e999", b"-0", b"-0.0", b"1" + b"0" * 400, b"1e-999", b"0.1e1"]
NOT_JSON_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"0x10", b"01", b"+1", b".5", b"1."]
# JSON fragments that are not strings: a wrong type for every field.
wrong_types = st.one_of(
    st.sampled_from([b"null", b"true", b"false", b"[]", b"{}", b'["OTP"]', b'{"x":"y"}']),
    st.sampled_from(ABSURD_NUMBERS),
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: json.dumps(x).encode()),
)
# Letters and digits of any script: text no validator of free-form ids could object to.
plain_text = st.text(st.characters(categories=["L", "N"]), min_size=1)
# Lone surrogates (escaped), control characters and invalid UTF-8 inside a JSON string:
# never legitimate in an id, a token or a code.
illegal_strings = st.sampled_from(
    [
        b'"\\ud800"',
        b'"a\\udc00b"',
        b'"\\udbff\\udfff\\ud800"',
        b'"\\u0000"',
        b'"a\\u0000b"',
        b'"\\u001b[31m"',
        b'"tab\\there"',
        b'"new\\nline"',
        b'"\\u007f"',
        b'"\xff"',
        b'"\xc0\xaf"',
        b'"\xed\xa0\x80"',
        b'"\xf4\x90\x80\x80"',
        b'"a\x00b"',
        b'"a\x1fb"',
    ]
)
# Valid but unusual Unicode: RTL marks and overrides, isolates, joiners, emoji (escaped in
# JSON as surrogate pairs when ASCII-only), BOM, non-characters, combining marks, NEL, line
# separator, non-ASCII digits.
UNICODE_EDGES = [
    "\u200f",
    "\u202e",
    "\u2066",
    "\u200d",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\U0010ffff",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "e\u0301",
    "\u0085",
    "\u2028",
    "\u0663\u0664",
    "\uff10",
]
unicode_edge_text = st.lists(
    st.sampled_from(UNICODE_EDGES) | st.text(max_size=3), min_size=1, max_size=8
).map("".join)

# Header values HTTP/1.1 can carry: visible ASCII, obs-text, inner blanks.
HEADER_VALUE_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
header_bytes = st.lists(st.sampled_from(HEADER_VALUE_BYTES), max_size=200).map(
    lambda raw: bytes(raw).strip(b" \t")
)
long_header_bytes = st.builds(
    lambda unit, size: (unit * size)[:size],
    st.sampled_from([b"A", b"\xe9", b"M_FUZZ", b"%2B", b"=,", b"9"]),
    st.sampled_from([1_000, 8_191, 8_192, 16_384, 16_385, 65_536]),
)
header_names = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=40,
).map(str.encode)

# Headers the SDKs send, some of them twice or empty (PROTOCOL.md §3), in odd spellings.
SDK_HEADER_NAMES = [
    *(b"Client-Id", b"client-id", b"SIGNATURE", b"Request-Time", b"Content-Type"),
    *(b"Agent-Token", b"Key-Version", b"Sdk-Version"),
]

Expect = Literal["illegal", "legal", "any"]


@st.composite
def mutations(draw: st.DrawFn, api: str, field: str) -> tuple[bytes | None, Expect]:
    """A replacement JSON value for ``field`` (None: drop the field) and what must answer.

    ``illegal``: the body breaks a rule of PROTOCOL.md §3, so PARAM_ILLEGAL. ``legal``: the
    body is well-formed, so anything but PARAM_ILLEGAL. ``any``: some catalogue code.
    """
    limit, allowed = FIELDS[api][field]
    digits_only = field == "authenticationValue"

    def dumps(text: str) -> bytes:
        return json.dumps(text, ensure_ascii=draw(st.booleans())).encode()

    def judged(text: str) -> Expect:
        if allowed is not None:
            return "legal" if text in allowed else "illegal"
        if digits_only:
            return "legal" if text.isascii() and text.isdigit() else "illegal"
        return "legal"

    kind = draw(
        st.sampled_from(["drop", "empty", "wrong_type", "illegal", "over", "at_limit", "unicode"])
    )
    if kind == "drop":
        return None, "illegal"
    if kind == "empty":
        return b'""', "illegal"  # the SDKs omit empty fields: "" means missing
    if kind == "wrong_type":
        return draw(wrong_types), "illegal"
    if kind == "illegal":
        return draw(illegal_strings), "illegal"
    if kind == "over":
        size = draw(st.integers(limit + 1, limit + 300))
        return dumps(draw(st.text(min_size=size, max_size=size))), "illegal"
    if kind == "at_limit":
        unit = draw(st.text("0123456789", min_size=1) if digits_only else plain_text)
        text = (unit * limit)[:limit]
        return dumps(text), judged(text)
    text = draw(unicode_edge_text.filter(lambda t: len(t) <= limit))
    # Free-form ids and tokens with unusual characters: the server may take or refuse them.
    return dumps(text), "any" if allowed is None and not digits_only else judged(text)


@st.composite
def mutated_bodies(draw: st.DrawFn, target: Target) -> tuple[str, bytes, Expect]:
    """A valid body of either API with one field mutated, and what must answer."""
    api = draw(apis)
    field = draw(st.sampled_from(sorted(FIELDS[api])))
    value, expect = draw(mutations(api, field))
    members = [
        (key, value if key == field else original)
        for key, original in members_of(base_body(target, api))
        if key != field or value is not None
    ]
    return api, json_object(members), expect


def signature_garbage() -> st.SearchStrategy[bytes]:
    items = st.sampled_from(
        [
            b"algorithm=RSA256",
            b"algorithm=rsa256",
            b"algorithm=RSA",
            b"algorithm=",
            b"keyVersion=1",
            b"keyVersion=0",
            b"keyVersion=-1",
            b"keyVersion=99999999999",
            b"keyVersion=" + b"9" * 400,
            b"keyVersion=1e999",
            b"keyVersion=\xd9\xa1",
            b"keyversion=2",
            b"signature=",
            b"signature=%",
            b"signature=%zz",
            b"signature=%2",
            b"signature=====",
            b"signature=" + b"A" * 344,
            b"signature=" + b"%2B" * 300,
            b"signature=\xe9\xe9",
            b"signature=a=b=c",
            b"=",
            b",",
        ]
    )
    return st.one_of(
        st.lists(items | header_bytes, min_size=1, max_size=6).map(
            lambda parts: b",".join(parts).strip(b" \t")
        ),
        header_bytes,
        long_header_bytes,
    )


ABSURD_TIMES = [
    b"",
    b"0",
    b"-1",
    b"1e999",
    b"9" * 14,
    b"9" * 15,
    b"9" * 400,
    b"32503680000001",
    "\u0661\u0666\u0668\u0665".encode(),
    b"0000-00-00T00:00:00Z",
    b"9999-12-31T23:59:59Z",
    b"2024-02-30T00:00:00Z",
    b"2024-13-01T00:00:00Z",
    b"2024-01-01T25:61:61Z",
    b"2024-01-01T00:00:00",
    b"2024-01-01T00:00:00+99:99",
    b"2024-01-01T00:00:00+18:01",
    b"2024-01-01T00:00:00.0000000000Z",
    b"2024-01-01 00:00:00Z",
    b"NaN",
    b"now",
]
absurd_times = st.one_of(
    st.sampled_from(ABSURD_TIMES),
    header_bytes,
    long_header_bytes,
    st.integers(-(10**30), 10**30).map(lambda n: str(n).encode()),
    st.datetimes().map(lambda d: d.isoformat().encode() + b"Z"),
)

PATH_SEGMENTS = [
    *("ams", "api", "v1", "users", "sandbox", "", ".", "..", "%2e%2e", "%2F"),
    *("%ff", "%zz", "%E2%80%AE", "\u202e", "\U0001f600", "a" * 300),
    *(INIT, VERIFY, INIT.lower(), VERIFY.upper(), f"{INIT}%00", f"{INIT}%20"),
]
path_segments = st.one_of(
    st.sampled_from(PATH_SEGMENTS),
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%",
        max_size=20,
    ),
)


# -- bodies ------------------------------------------------------------------------------


def test_server_answers_a_valid_request(target: Target) -> None:
    """The baseline every fuzzer mutates: a valid init passes."""
    assert exchange(target, encoded(init_body(fresh_id(), target.token))).code == "SUCCESS"


@fuzz(250)
@given(api=apis, value=json_values, ascii_only=st.booleans())
def test_any_json_value(target: Target, api: str, value: Any, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    reply = exchange(target, body, path=api_path(api))
    if not isinstance(value, dict):
        assert reply.code == "PARAM_ILLEGAL", reply


@fuzz(400)
@given(data=st.data())
def test_valid_body_with_one_field_mutated(target: Target, data: st.DataObject) -> None:
    api, body, expect = data.draw(mutated_bodies(target))
    reply = exchange(target, body, path=api_path(api))
    if expect == "illegal":
        assert reply.code == "PARAM_ILLEGAL", (body[:200], reply)
    elif expect == "legal":
        assert reply.code != "PARAM_ILLEGAL", (body[:200], reply)


@pytest.mark.parametrize(
    ("api", "field"), [(api, field) for api, rules in FIELDS.items() for field in rules]
)
def test_every_field_at_and_over_its_length_limit(target: Target, api: str, field: str) -> None:
    limit, allowed = FIELDS[api][field]
    filler = "7" if field == "authenticationValue" else "x"
    for size, legal in ((limit, allowed is None), (limit + 1, False)):
        body = {**base_body(target, api), field: filler * size}
        reply = exchange(target, encoded(body), path=api_path(api))
        assert (reply.code != "PARAM_ILLEGAL") is legal, (field, size, reply)
        if not legal and allowed is None:
            assert str(limit) in reply.message, reply


@fuzz(100)
@given(
    api=apis,
    key=field_names,
    repeats=st.lists(
        st.text(max_size=70).map(lambda t: json.dumps(t).encode()) | wrong_types | illegal_strings,
        min_size=1,
        max_size=4,
    ),
    before=st.booleans(),
)
def test_duplicated_keys(
    target: Target, api: str, key: str, repeats: list[bytes], before: bool
) -> None:
    members = members_of(base_body(target, api))
    duplicates = [(key, value) for value in repeats]
    exchange(
        target,
        json_object(duplicates + members if before else members + duplicates),
        path=api_path(api),
    )


@fuzz(150)
@given(
    api=apis,
    body=st.one_of(
        st.binary(max_size=2_000),
        st.text().map(str.encode),
        st.sampled_from(
            [
                b"",
                b" ",
                b"\xef\xbb\xbf",
                b"\xef\xbb\xbf{}",
                b"\xff\xfe{\x00}\x00",
                b"{",
                b"}",
                b'{"a":}',
                b'{"a" "b"}',
                b"{'authenticationType': 'OTP'}",
                b'{"authenticationType":"OTP",}',
                b"[" * 10 + b"]" * 9,
                b'"\\',
                b"\x00" * 64,
                *ABSURD_NUMBERS,
                *NOT_JSON_NUMBERS,
            ]
        ),
    ),
)
def test_bytes_that_are_not_a_json_object(target: Target, api: str, body: bytes) -> None:
    try:
        is_object = isinstance(json.loads(body.removeprefix(b"\xef\xbb\xbf")), dict)
    except ValueError:
        is_object = False
    reply = exchange(target, body, path=api_path(api))
    if not is_object:
        assert reply.code == "PARAM_ILLEGAL", (body[:100], reply)


@fuzz(40)
@given(
    api=apis,
    size=st.sampled_from([MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 2, 100_000, 1_000_000]),
    shape=st.sampled_from(["padded", "string", "array"]),
)
def test_bodies_over_the_size_limit(target: Target, api: str, size: int, shape: str) -> None:
    body = encoded(base_body(target, api))
    if shape == "padded":
        body = body[:-1] + b" " * (size - len(body)) + b"}"
    elif shape == "string":
        body = body[:-1] + b',"pad":"' + b"x" * (size - len(body) - 9) + b'"}'
    else:
        body = b"[" + b"0," * ((size - 3) // 2) + b"0]"
    assert len(body) > MAX_BODY_BYTES
    reply = exchange(target, body, path=api_path(api))
    assert reply.code == "PARAM_ILLEGAL", reply
    assert str(MAX_BODY_BYTES) in reply.message, reply


@pytest.mark.parametrize("api", [INIT, VERIFY])
def test_a_body_of_exactly_the_size_limit_is_parsed(target: Target, api: str) -> None:
    body = encoded(base_body(target, api))
    body = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"
    assert len(body) == MAX_BODY_BYTES
    assert exchange(target, body, path=api_path(api)).code != "PARAM_ILLEGAL"


NESTING = {b"[": b"]", b'{"a":': b"}", b'{"authenticationType":[': b"]}", b'[{"x":': b"}]"}


@fuzz(60)
@given(
    api=apis,
    depth=st.integers(1, 300) | st.sampled_from([1_000, 10_000, 32_000, 65_000, 100_000]),
    opener=st.sampled_from(sorted(NESTING)),
    closed=st.booleans(),
)
def test_deeply_nested_bodies(
    target: Target, api: str, depth: int, opener: bytes, closed: bool
) -> None:
    body = opener * depth + b"0" + (NESTING[opener] * depth if closed else b"")
    reply = exchange(target, body, path=api_path(api))
    assert reply.code == "PARAM_ILLEGAL", (len(body), reply)


@fuzz(80)
@given(
    api=apis,
    number=st.sampled_from(ABSURD_NUMBERS + NOT_JSON_NUMBERS)
    | st.integers(-(10**500), 10**500).map(lambda n: str(n).encode()),
    where=st.sampled_from(["field", "extra", "top"]),
)
def test_absurd_numbers(target: Target, api: str, number: bytes, where: str) -> None:
    members = members_of(base_body(target, api))
    if where == "field":
        body = json_object([(members[0][0], number), *members[1:]])
    elif where == "extra":
        body = json_object([*members, ("amount", number)])  # unknown fields are ignored
    else:
        body = number
    reply = exchange(target, body, path=api_path(api))
    if where != "extra":
        assert reply.code == "PARAM_ILLEGAL", (body[:100], reply)


# -- headers -----------------------------------------------------------------------------


@fuzz(200)
@given(api=apis, signature=signature_garbage())
def test_signature_header_garbage(target: Target, api: str, signature: bytes) -> None:
    reply = exchange(
        target, encoded(base_body(target, api)), path=api_path(api), signature=signature
    )
    assert reply.code in {"SIGNATURE_INVALID", "KEY_NOT_FOUND"}, (signature[:100], reply)


@fuzz(200)
@given(api=apis, client_id=header_bytes | long_header_bytes, signed=st.booleans())
def test_client_id_garbage(target: Target, api: str, client_id: bytes, signed: bool) -> None:
    if client_id == CLIENT_ID.encode():
        reject()
    reply = exchange(
        target,
        encoded(base_body(target, api)),
        path=api_path(api),
        client_id=client_id,
        signature=None if signed else b"algorithm=RSA256,keyVersion=1,signature=AAAA",
    )
    assert reply.code == "CLIENT_INVALID", (client_id[:100], reply)


@fuzz(150)
@given(api=apis, request_time=absurd_times)
def test_absurd_request_time(target: Target, api: str, request_time: bytes) -> None:
    """Correctly signed, so only the freshness check can refuse it (PROTOCOL.md §7)."""
    reply = exchange(
        target, encoded(base_body(target, api)), path=api_path(api), request_time=request_time
    )
    assert reply.code == "PARAM_ILLEGAL", (request_time[:100], reply)


@fuzz(40)
@given(
    api=apis,
    dialect=st.sampled_from(["java", "python", "dotnet", "php", "zulu"]),
    skew=st.integers(-500, 500),
)
def test_every_sdk_request_time_dialect_near_now_passes(
    target: Target, api: str, dialect: str, skew: int
) -> None:
    moment = datetime.now(UTC) + timedelta(seconds=skew)
    text = {
        "java": str(int(moment.timestamp() * 1000)),
        "python": moment.isoformat(),
        "dotnet": moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
        "php": moment.astimezone(timezone(timedelta(hours=8))).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "zulu": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }[dialect]
    reply = exchange(
        target, encoded(base_body(target, api)), path=api_path(api), request_time=text.encode()
    )
    assert reply.code != "PARAM_ILLEGAL", (text, reply)


@fuzz(120)
@given(
    api=apis,
    extra=st.lists(
        st.tuples(
            header_names | st.sampled_from(SDK_HEADER_NAMES),
            header_bytes,
        ),
        max_size=8,
    ),
)
def test_unknown_and_repeated_headers_change_nothing(
    target: Target, api: str, extra: list[tuple[bytes, bytes]]
) -> None:
    """Unknown headers are ignored and the first of repeated ones counts (PROTOCOL.md §3)."""
    reply = exchange(
        target, encoded(base_body(target, api)), path=api_path(api), extra_headers=extra
    )
    assert reply.code not in {"CLIENT_INVALID", "SIGNATURE_INVALID", "PARAM_ILLEGAL"}, reply


# -- methods and paths -------------------------------------------------------------------


@fuzz(60)
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"]),
    path=st.sampled_from(sorted(API_PATHS)),
    body=st.sampled_from([b"", b"{}", b'{"authenticationType":"OTP"}']),
)
def test_wrong_methods(target: Target, method: str, path: str, body: bytes) -> None:
    reply = exchange(target, body, path=path, method=method)
    assert reply.code == "METHOD_NOT_SUPPORTED", reply


@pytest.mark.xfail(
    strict=True,
    reason="product bug: a method token the httptools parser does not know (e.g. FOO) gets "
    "uvicorn's unsigned HTTP 400 'Invalid HTTP request received.', not METHOD_NOT_SUPPORTED",
)
@pytest.mark.parametrize("method", ["FOO", "POSTX", "BREW"])
def test_unknown_method_tokens(target: Target, method: str) -> None:
    reply = exchange(target, b"{}", path=api_path(INIT), method=method)
    assert reply.code == "METHOD_NOT_SUPPORTED", reply


@fuzz(150)
@given(
    segments=st.lists(path_segments, min_size=1, max_size=8),
    query=st.none() | st.text(max_size=30),
)
def test_wrong_paths(target: Target, segments: list[str], query: str | None) -> None:
    path = "/" + "/".join(segments) + ("" if query is None else "?" + query)
    try:
        sent = httpx.URL(target.server.url + path)
    except httpx.InvalidURL:
        reject()
    if unquote(sent.path) in OPS_PATHS:
        reject()  # the unsigned ops endpoints, not the API
    if sent.raw_path.endswith(b"?"):
        reject()  # ASGI cannot tell `/x?` from `/x`: the server signs over `/x` (reported)
    reply = exchange(
        target, encoded(init_body(fresh_id(), target.token)), path=sent.raw_path.decode("ascii")
    )
    api = api_of(reply.path)
    if api is None:
        assert reply.code == "API_INVALID", (path, reply)
    elif unquote(reply.path).startswith("/ams/sandbox/"):
        assert reply.code == "CLIENT_INVALID", (path, reply)


# -- memory ------------------------------------------------------------------------------


def server_rss(server: Server) -> int:
    process = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


HUGE_BODIES = [b"[" * 60_000, b"[" * 100_000, b"x" * (MAX_BODY_BYTES + 1)]


def any_request(target: Target) -> st.SearchStrategy[Callable[[], Reply]]:
    """One fuzz request of any of the kinds above, ready to send."""

    def send(api: str, body: bytes, **headers: Any) -> Callable[[], Reply]:
        return lambda: exchange(target, body, path=api_path(api), **headers)

    def valid() -> bytes:
        return encoded(base_body(target, INIT))

    return st.one_of(
        mutated_bodies(target).map(lambda drawn: send(drawn[0], drawn[1])),
        st.tuples(apis, json_values).map(
            lambda drawn: send(drawn[0], json.dumps(drawn[1]).encode())
        ),
        st.tuples(apis, st.sampled_from(HUGE_BODIES)).map(lambda drawn: send(*drawn)),
        signature_garbage().map(lambda value: send(INIT, valid(), signature=value)),
        absurd_times.map(lambda value: send(INIT, valid(), request_time=value)),
        (header_bytes | long_header_bytes).map(lambda value: send(INIT, valid(), client_id=value)),
    )


def send_many(target: Target, count: int) -> None:
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(send=any_request(target))
    def run(send: Callable[[], Reply]) -> None:
        send()

    run()


def assert_flat(before: int, after: int) -> None:
    growth = (after - before) / before
    assert growth < 0.20, f"server RSS grew {growth:.0%}: {before >> 20} -> {after >> 20} MiB"


def test_memory_stays_flat(target: Target) -> None:
    send_many(target, 400)  # warm-up: caches, pools, allocator arenas
    before = server_rss(target.server)
    send_many(target, 3_000)
    assert_flat(before, server_rss(target.server))


def test_memory_stays_flat_under_long_unknown_client_ids(target: Target) -> None:
    """Strangers' ids must not pile up in the per-process client cache, whatever their size."""

    def stranger() -> bytes:
        return os.urandom(8).hex().encode() + b"S" * 32_000

    for _ in range(100):
        exchange(target, b"{}", client_id=stranger())
    before = server_rss(target.server)
    for _ in range(1_000):
        exchange(target, b"{}", client_id=stranger())
    assert_flat(before, server_rss(target.server))
