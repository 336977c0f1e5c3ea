"""The Signature header as every SDK writes it, and every way it can be wrong."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpgate.protocol import (
    MAX_MESSAGE_LENGTH,
    ProtocolError,
    ResultCode,
    SignatureHeader,
    encode_signature,
    format_signature_header,
    parse_signature_header,
)

RAW = bytes([0xFB, 0xEF, 0xFF, 0xFB, 0xF0]) + b"\x01" * 251  # base64 has '+', '/', '='
B64 = base64.b64encode(RAW).decode()
ENCODED = encode_signature(RAW)
ENCODED_LOWER_HEX = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), ENCODED)  # .NET
assert "+" in B64 and "/" in B64 and B64.endswith("=")
NOT_A_NUMBER = "keyVersion in Signature header is not a number"


def with_key_version(text: str) -> str:
    return f"algorithm=RSA256,keyVersion={text},signature={ENCODED}"


@pytest.mark.parametrize(
    ("value", "key_version"),
    [
        (f"algorithm=RSA256,keyVersion=1,signature={ENCODED}", 1),  # Python/Java SDK
        (f"algorithm=RSA256, keyVersion=2, signature={ENCODED}", 2),  # spaces after commas
        (f"algorithm=RSA256,signature={ENCODED}", None),  # no keyVersion: newest key
        (f"algorithm=RSA256,keyVersion=,signature={ENCODED}", None),  # empty keyVersion
        (f"ALGORITHM=RSA256,KEYVERSION=3,Signature={ENCODED}", 3),  # names any case
        (f"signature={ENCODED},keyVersion=04,algorithm=RSA256", 4),  # any order
        (f"algorithm=RSA256,keyVersion=1,signature={ENCODED_LOWER_HEX}", 1),  # .NET %2b
        (f"algorithm=RSA256,keyVersion=1,signature={B64}", 1),  # raw base64, ends in '='
        (f" algorithm=RSA256 ,\tkeyVersion=5,signature={ENCODED},", 5),  # stray whitespace
        (f"algorithm=rsa256,keyVersion=1,signature={ENCODED},foo=bar", 1),  # unknown item
    ],
)
def test_parse_accepts(value: str, key_version: int | None) -> None:
    parsed = parse_signature_header(value)
    assert parsed == SignatureHeader("RSA256", key_version, RAW)


def test_lower_hex_is_not_a_no_op() -> None:
    # Guard against the parametrised case passing vacuously.
    assert ENCODED_LOWER_HEX != ENCODED
    assert "%2b" in ENCODED_LOWER_HEX and "%2f" in ENCODED_LOWER_HEX


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "Signature header is missing"),
        ("", "Signature header is missing"),
        ("   ", "Signature header is missing"),
        ("x" * 20000, "Signature header is too long"),
        (f"algorithm=RSA256,keyVersion=1,{ENCODED}", "Signature header has a malformed item"),
        (f"=RSA256,signature={ENCODED}", "Signature header has a malformed item"),
        (f"keyVersion=1,signature={ENCODED}", "Signature algorithm is missing"),
        (f"algorithm=,signature={ENCODED}", "Signature algorithm is missing"),
        (f"algorithm=RSA,signature={ENCODED}", "Signature algorithm must be RSA256"),
        (f"algorithm=RSA2,keyVersion=1,signature={ENCODED}", "Signature algorithm must be RSA256"),
        ("algorithm=RSA256,keyVersion=1", "Signature header has no signature"),
        ("algorithm=RSA256,keyVersion=1,signature=", "Signature header has no signature"),
        ("algorithm=RSA256,keyVersion=1,signature=@@@@", "Signature value is not base64"),
        (with_key_version("one"), NOT_A_NUMBER),
        (with_key_version("1.5"), NOT_A_NUMBER),
        (with_key_version("+1"), NOT_A_NUMBER),
        (with_key_version("null"), NOT_A_NUMBER),
        (with_key_version("\u0661"), NOT_A_NUMBER),
        (with_key_version("-1"), "keyVersion in Signature header is negative"),
        (with_key_version("2147483648"), "keyVersion in Signature header is too large"),
        (with_key_version("9" * 40), "keyVersion in Signature header is too large"),
        (f"signature={ENCODED},signature={ENCODED}", "Signature header repeats signature"),
        (with_key_version("1,KeyVersion=2"), "Signature header repeats keyVersion"),
    ],
)
def test_parse_rejects(value: str | None, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_signature_header(value)
    assert info.value.code is ResultCode.SIGNATURE_INVALID
    assert info.value.message == message
    assert len(message) <= MAX_MESSAGE_LENGTH


def test_largest_key_version_is_accepted() -> None:
    parsed = parse_signature_header(f"algorithm=RSA256,keyVersion=2147483647,signature={B64}")
    assert parsed.key_version == 2**31 - 1


def test_format_signature_header() -> None:
    assert format_signature_header(3, "abc%3D") == "algorithm=RSA256,keyVersion=3,signature=abc%3D"


@given(st.integers(min_value=0, max_value=2**31 - 1), st.binary(min_size=1, max_size=512))
def test_format_parse_round_trip(key_version: int, raw: bytes) -> None:
    value = format_signature_header(key_version, encode_signature(raw))
    assert value.split(",")[2] == "signature=" + encode_signature(raw)
    assert parse_signature_header(value) == SignatureHeader("RSA256", key_version, raw)


signature_like = st.lists(
    st.tuples(
        st.sampled_from(["algorithm", "keyVersion", "signature", "KEYVERSION", "x", ""]),
        st.sampled_from(["=", "", "=="]),
        st.sampled_from(["RSA256", "1", "-1", B64, ENCODED, "", "%", "%zz"]) | st.text(max_size=30),
    ),
    max_size=5,
).map(lambda items: ",".join(name + sep + val for name, sep, val in items))


@given(st.text() | signature_like)
def test_parse_raises_only_protocol_error(value: str) -> None:
    try:
        parsed = parse_signature_header(value)
    except ProtocolError as exc:
        assert exc.code is ResultCode.SIGNATURE_INVALID
        assert 0 < len(exc.message) <= MAX_MESSAGE_LENGTH
    else:
        assert parsed.algorithm == "RSA256" and parsed.signature
        assert parsed.key_version is None or 0 <= parsed.key_version < 2**31
