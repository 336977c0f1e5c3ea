"""Request bodies as each SDK sends them, every validation rule, and the response encoders."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from com.alipay.ams.api.request.users.alipay_init_authentication_request import (  # type: ignore[import-untyped]
    AlipayInitAuthenticationRequest,
)
from com.alipay.ams.api.request.users.alipay_verify_authentication_request import (  # type: ignore[import-untyped]
    AlipayVerifyAuthenticationRequest,
)
from hypothesis import given
from hypothesis import strategies as st

from otpgate.protocol import (
    MAX_BODY_BYTES,
    MAX_MESSAGE_LENGTH,
    InitAuthenticationRequest,
    ProtocolError,
    ResultCode,
    VerifyAuthenticationRequest,
    decode_init_request,
    decode_verify_request,
    encode_init_response,
    encode_result,
    encode_verify_response,
)

INIT = {
    "authenticationType": "OTP",
    "authenticationRequestId": "req-2026-0001",
    "authenticationChannelType": "SMS",
    "userIdentityType": "WALLET_TOKEN",
    "userIdentityValue": "tok_abc123",
}
VERIFY = {
    "authenticationType": "OTP",
    "authenticationRequestId": "req-2026-0001",
    "authenticationValue": "012345",
}
EXPECTED_INIT = InitAuthenticationRequest(
    authentication_type="OTP",
    authentication_request_id="req-2026-0001",
    authentication_channel_type="SMS",
    user_identity_type="WALLET_TOKEN",
    user_identity_value="tok_abc123",
)
EXPECTED_VERIFY = VerifyAuthenticationRequest(
    authentication_type="OTP",
    authentication_request_id="req-2026-0001",
    authentication_value="012345",
)


def body(base: dict[str, Any], **changes: Any) -> bytes:
    """``base`` with fields changed; a value of ``...`` removes the field."""
    merged = {**base, **changes}
    return json.dumps({k: v for k, v in merged.items() if v is not ...}).encode()


def reason(decode: Any, data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code is ResultCode.PARAM_ILLEGAL
    assert len(info.value.message) <= MAX_MESSAGE_LENGTH
    return info.value.message


# -- SDK dialects ----------------------------------------------------------------------


def test_python_sdk_bodies() -> None:
    # The SDK request classes cannot be constructed normally (their base __init__ indexes
    # an empty tuple), so bypass __init__ and use the real to_ams_json().
    init = AlipayInitAuthenticationRequest.__new__(AlipayInitAuthenticationRequest)
    init.authentication_type = "OTP"
    init.authentication_request_id = "req-2026-0001"
    init.authentication_channel_type = "SMS"
    init.user_identity_type = "WALLET_TOKEN"
    init.user_identity_value = "tok_abc123"
    sent = init.to_ams_json()
    assert sent.startswith('{\n   "authenticationType"')  # indent=3, as the spec says
    assert decode_init_request(sent.encode()) == EXPECTED_INIT

    verify = AlipayVerifyAuthenticationRequest.__new__(AlipayVerifyAuthenticationRequest)
    verify.authentication_type = "OTP"
    verify.authentication_request_id = "req-2026-0001"
    verify.authentication_value = "012345"
    assert decode_verify_request(verify.to_ams_json().encode()) == EXPECTED_VERIFY


def test_go_escapes() -> None:
    data = body(INIT, authenticationRequestId="a<b>&c").replace(b"<", b"\\u003c")
    data = data.replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    assert b"<" not in data
    assert decode_init_request(data).authentication_request_id == "a<b>&c"


def test_php_escapes() -> None:
    data = (
        b'{"authenticationType":"OTP","authenticationRequestId":"shop\\/42\\/caf\\u00e9",'
        b'"authenticationChannelType":"EMAIL","userIdentityType":"WALLET_TOKEN",'
        b'"userIdentityValue":"t\\/1"}'
    )
    decoded = decode_init_request(data)
    assert decoded.authentication_request_id == "shop/42/caf\u00e9"
    assert decoded.user_identity_value == "t/1"
    assert decoded.authentication_channel_type == "EMAIL"


def test_dotnet_nulls_and_unknown_fields_are_ignored() -> None:
    data = body(
        VERIFY,
        extendInfo=None,
        merchantRegion=None,
        nested={"deep": [1, 2, {"x": None}]},
        authenticationtype="ignored: wrong case",
    )
    assert decode_verify_request(data) == EXPECTED_VERIFY


def test_utf8_bom_and_non_ascii() -> None:
    data = b"\xef\xbb\xbf" + body(INIT, authenticationRequestId="\u8ba2\u5355-1")
    assert decode_init_request(data).authentication_request_id == "\u8ba2\u5355-1"


def test_limits_are_inclusive() -> None:
    data = body(INIT, authenticationRequestId="r" * 64, userIdentityValue="t" * 128)
    decoded = decode_init_request(data)
    assert len(decoded.authentication_request_id) == 64
    assert len(decoded.user_identity_value) == 128
    assert decode_verify_request(body(VERIFY, authenticationValue="9" * 256))


def test_request_structs_encode_to_wire_names() -> None:
    # The client side can send the same structs: field names map to camelCase.
    assert json.loads(msgspec.json.encode(EXPECTED_INIT)) == INIT
    assert json.loads(msgspec.json.encode(EXPECTED_VERIFY)) == VERIFY


# -- validation rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "body is empty"),
        (b"{", "body is not valid JSON"),
        (b"{} {}", "body is not valid JSON"),
        (b"{'a': 1}", "body is not valid JSON"),
        (b'{"authenticationType":"\\ud800"}', "body is not valid JSON"),
        (b'{"authenticationType":"\xff"}', "body is not valid UTF-8"),
        (b"[]", "body must be a JSON object"),
        (b"null", "body must be a JSON object"),
        (b'"OTP"', "body must be a JSON object"),
        (b"1", "body must be a JSON object"),
        (b" " * (MAX_BODY_BYTES + 1), f"body exceeds {MAX_BODY_BYTES} bytes"),
        (b'{"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "body is nested too deeply"),
        (body(INIT, authenticationType=...), "authenticationType is required"),
        (body(INIT, authenticationType=None), "authenticationType is required"),
        (body(INIT, authenticationType=""), "authenticationType is required"),
        (body(INIT, authenticationType=1), "authenticationType must be a string"),
        (body(INIT, authenticationType="otp"), "authenticationType must be OTP"),
        (body(INIT, authenticationType="O" * 17), "authenticationType exceeds 16 characters"),
        (body(INIT, authenticationRequestId=...), "authenticationRequestId is required"),
        (body(INIT, authenticationRequestId=""), "authenticationRequestId is required"),
        (body(INIT, authenticationRequestId=42), "authenticationRequestId must be a string"),
        (body(INIT, authenticationRequestId=["a"]), "authenticationRequestId must be a string"),
        (
            body(INIT, authenticationRequestId="r" * 65),
            "authenticationRequestId exceeds 64 characters",
        ),
        (
            body(INIT, authenticationRequestId="a\nb"),
            "authenticationRequestId contains control characters",
        ),
        (body(INIT, authenticationChannelType=...), "authenticationChannelType is required"),
        (
            body(INIT, authenticationChannelType="PUSH"),
            "authenticationChannelType must be SMS or EMAIL",
        ),
        (
            body(INIT, authenticationChannelType="sms"),
            "authenticationChannelType must be SMS or EMAIL",
        ),
        (
            body(INIT, authenticationChannelType=True),
            "authenticationChannelType must be a string",
        ),
        (body(INIT, userIdentityType=None), "userIdentityType is required"),
        (body(INIT, userIdentityType="USER_ID"), "userIdentityType must be WALLET_TOKEN"),
        (body(INIT, userIdentityValue=...), "userIdentityValue is required"),
        (body(INIT, userIdentityValue="t" * 129), "userIdentityValue exceeds 128 characters"),
        (body(INIT, userIdentityValue={"token": "t"}), "userIdentityValue must be a string"),
        (body(INIT, userIdentityValue="t\x7f"), "userIdentityValue contains control characters"),
    ],
)
def test_init_rules(data: bytes, message: str) -> None:
    assert reason(decode_init_request, data) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{}", "authenticationType is required"),
        (body(VERIFY, authenticationType="TOTP"), "authenticationType must be OTP"),
        (body(VERIFY, authenticationRequestId=None), "authenticationRequestId is required"),
        (
            body(VERIFY, authenticationRequestId="r" * 65),
            "authenticationRequestId exceeds 64 characters",
        ),
        (body(VERIFY, authenticationValue=...), "authenticationValue is required"),
        (body(VERIFY, authenticationValue=""), "authenticationValue is required"),
        (body(VERIFY, authenticationValue=123456), "authenticationValue must be a string"),
        (body(VERIFY, authenticationValue=1.5), "authenticationValue must be a string"),
        (body(VERIFY, authenticationValue="12a456"), "authenticationValue must be digits"),
        (body(VERIFY, authenticationValue=" 123456"), "authenticationValue must be digits"),
        (body(VERIFY, authenticationValue="-12345"), "authenticationValue must be digits"),
        (
            body(VERIFY, authenticationValue="\u0661\u0662\u0663"),
            "authenticationValue must be digits",
        ),
        (body(VERIFY, authenticationValue="\uff11\uff12"), "authenticationValue must be digits"),
        (
            body(VERIFY, authenticationValue="1" * 257),
            "authenticationValue exceeds 256 characters",
        ),
        (
            body(VERIFY, authenticationValue="12\n34"),
            "authenticationValue contains control characters",
        ),
    ],
)
def test_verify_rules(data: bytes, message: str) -> None:
    assert reason(decode_verify_request, data) == message


# -- never anything but ProtocolError ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from([*INIT, *VERIFY, "extra"])
json_objects = st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6)


def _only_protocol_errors(data: bytes) -> None:
    for decode in (decode_init_request, decode_verify_request):
        try:
            decoded = decode(data)
        except ProtocolError as exc:
            assert exc.code is ResultCode.PARAM_ILLEGAL
            assert 0 < len(exc.message) <= MAX_MESSAGE_LENGTH
        else:
            assert isinstance(decoded, InitAuthenticationRequest | VerifyAuthenticationRequest)


@given(json_objects | json_values)
def test_arbitrary_json_raises_only_protocol_error(value: Any) -> None:
    _only_protocol_errors(json.dumps(value).encode())
    _only_protocol_errors(json.dumps(value, indent=3, ensure_ascii=False).encode())


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    _only_protocol_errors(data)


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_protocol_error(text: str) -> None:
    _only_protocol_errors(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("depth", [10, 500, 5_000, 200_000])
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    nested = opener * depth + b"1" + closer * depth
    _only_protocol_errors(b'{"extra":' + nested + b"}")
    _only_protocol_errors(b'{"authenticationValue":' + nested + b"}")


safe_text = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=64)


@given(
    request_id=safe_text,
    token=safe_text,
    channel=st.sampled_from(["SMS", "EMAIL"]),
    code=st.from_regex(r"\A[0-9]{1,256}\Z"),
)
def test_valid_requests_round_trip(request_id: str, token: str, channel: str, code: str) -> None:
    init = body(
        INIT,
        authenticationRequestId=request_id,
        userIdentityValue=token,
        authenticationChannelType=channel,
    )
    assert decode_init_request(init) == InitAuthenticationRequest(
        "OTP", request_id, channel, "WALLET_TOKEN", token
    )
    verify = body(VERIFY, authenticationRequestId=request_id, authenticationValue=code)
    assert decode_verify_request(verify).authentication_value == code


# -- responses -------------------------------------------------------------------------


def test_init_response_layout() -> None:
    raw = encode_init_response(ResultCode.SUCCESS, authentication_request_id="req-1")
    assert raw == (
        b'{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"Success"},'
        b'"authenticationRequestId":"req-1"}'
    )
    without_id = json.loads(encode_init_response(ResultCode.PROCESS_FAIL, "no phone"))
    assert without_id == {
        "result": {"resultCode": "PROCESS_FAIL", "resultStatus": "F", "resultMessage": "no phone"}
    }


@pytest.mark.parametrize(
    ("code", "is_passed"),
    [(ResultCode.SUCCESS, True), (ResultCode.VERIFY_UNMATCHED, False)],
)
def test_verify_response_has_real_boolean(code: ResultCode, is_passed: bool) -> None:
    raw = encode_verify_response(code, is_passed=is_passed)
    assert raw.endswith(b',"isPassed":' + (b"true" if is_passed else b"false") + b"}")
    decoded = json.loads(raw)
    assert decoded["isPassed"] is is_passed
    assert list(decoded) == ["result", "isPassed"]
    assert decoded["result"]["resultCode"] == code.name


def test_verify_response_omits_is_passed_when_unknown() -> None:
    decoded = json.loads(encode_verify_response(ResultCode.UNKNOWN_EXCEPTION))
    assert decoded == {
        "result": {
            "resultCode": "UNKNOWN_EXCEPTION",
            "resultStatus": "U",
            "resultMessage": ResultCode.UNKNOWN_EXCEPTION.default_message,
        }
    }


@pytest.mark.parametrize("code", list(ResultCode))
def test_encode_result_every_code(code: ResultCode) -> None:
    assert json.loads(encode_result(code)) == {
        "result": {
            "resultCode": code.name,
            "resultStatus": code.status.value,
            "resultMessage": code.default_message,
        }
    }
    assert len(code.default_message) <= MAX_MESSAGE_LENGTH


@given(st.text(), st.sampled_from(list(ResultCode)))
def test_messages_are_at_most_64_characters(message: str, code: ResultCode) -> None:
    for raw in (
        encode_result(code, message),
        encode_init_response(code, message, "id"),
        encode_verify_response(code, message, False),
    ):
        decoded = json.loads(raw)
        text = decoded["result"]["resultMessage"]
        assert 0 < len(text) <= MAX_MESSAGE_LENGTH
        if not message:
            assert text == code.default_message
        elif len(message) <= MAX_MESSAGE_LENGTH:
            assert text == message
        else:
            assert text == message[:61] + "..."
        assert next(iter(decoded)) == "result"


def test_long_message_is_clipped_with_ellipsis() -> None:
    text = json.loads(encode_result(ResultCode.PARAM_ILLEGAL, "x" * 100))["result"]
    assert text["resultMessage"] == "x" * 61 + "..."
