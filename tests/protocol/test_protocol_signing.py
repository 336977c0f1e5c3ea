"""Signatures and keys: round trips, the official Python SDK in both directions, key loading."""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

import pytest
from com.alipay.ams.api.tools import signature_tool  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from otpgate.protocol import (
    ProtocolError,
    ResultCode,
    Signer,
    content_to_sign,
    decode_signature,
    encode_signature,
    format_signature_header,
    generate_private_key,
    load_private_key,
    load_public_key,
    parse_signature_header,
    private_key_pem,
    public_key_bare,
    public_key_pem,
    verify_signature,
)

PATH = "/ams/api/v1/users/initAuthentication"
# Bytes chosen so that standard base64 contains '+', '/' and '=' padding.
TRICKY = bytes([0xFB, 0xEF, 0xFF, 0xFB, 0xF0])
TRICKY_B64 = "++//+/A="

header_text = st.text(max_size=40)  # hypothesis text() never yields lone surrogates


# -- content ---------------------------------------------------------------------------


def test_content_to_sign_layout() -> None:
    body = b'{\n   "a": "\\/x"\n}'
    assert content_to_sign("POST", PATH, "C1", "1685599933871", body) == (
        b"POST /ams/api/v1/users/initAuthentication\nC1.1685599933871." + body
    )


def test_content_to_sign_matches_sdk() -> None:
    body = '{\n   "userIdentityValue": "t\u00e9st"\n}'
    expected = signature_tool.gen_sign_content("POST", PATH, "C1", "T", body).encode("utf-8")
    assert content_to_sign("POST", PATH, "C1", "T", body.encode("utf-8")) == expected


def test_content_to_sign_never_raises_on_surrogates() -> None:
    assert content_to_sign("POST", "/p", "\ud800", "t", b"").startswith(b"POST /p\n")


# -- signature values ------------------------------------------------------------------


def test_encode_signature_percent_encodes_reserved_characters() -> None:
    assert base64.b64encode(TRICKY).decode() == TRICKY_B64
    assert encode_signature(TRICKY) == "%2B%2B%2F%2F%2B%2FA%3D"
    assert encode_signature(TRICKY) == quote_plus(TRICKY_B64)  # what the Python SDK sends


@pytest.mark.parametrize(
    "value",
    [
        "%2B%2B%2F%2F%2B%2FA%3D",  # SDK / our own encoding
        "%2b%2b%2f%2f%2b%2fA%3d",  # .NET lower-case hex
        "++//+/A=",  # raw base64: '+' must not become a space
        "%2B+%2F/%2b/A=",  # mixed
    ],
)
def test_decode_signature_dialects(value: str) -> None:
    assert decode_signature(value) == TRICKY


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "Signature value is empty"),
        ("%2B%2B%2F%2F%20gA%3D", "Signature value is not base64"),  # a space
        ("  //+gA=", "Signature value is not base64"),  # unquote_plus damage
        ("++//+gA", "Signature value is not base64"),  # bad padding
        ("++//+g!=", "Signature value is not base64"),
        ("++//+g\u00e9=", "Signature value is not base64"),
        ("%FF%FE", "Signature value is not base64"),
        ("====", "Signature value is not base64"),
        ("A" * 10000, "Signature value is too long"),
    ],
)
def test_decode_signature_rejects(value: str, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_signature(value)
    assert info.value.code is ResultCode.SIGNATURE_INVALID
    assert info.value.message == message


@given(st.binary(min_size=1, max_size=600))
def test_encode_decode_round_trip(raw: bytes) -> None:
    encoded = encode_signature(raw)
    assert encoded.isascii() and "+" not in encoded and "/" not in encoded
    assert decode_signature(encoded) == raw
    assert decode_signature(base64.b64encode(raw).decode()) == raw


@given(st.text())
def test_decode_signature_raises_only_protocol_error(value: str) -> None:
    try:
        assert isinstance(decode_signature(value), bytes)
    except ProtocolError as exc:
        assert exc.code is ResultCode.SIGNATURE_INVALID


# -- sign / verify ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=2000), client_id=header_text, time=header_text, path=header_text)
def test_sign_verify_round_trip_binary(
    private_key: RSAPrivateKey, body: bytes, client_id: str, time: str, path: str
) -> None:
    signer = Signer(private_key, 1)
    content = content_to_sign("POST", path, client_id, time, body)
    signature = decode_signature(signer.sign(content))
    assert len(signature) == 256
    assert verify_signature(signer.public_key, content, signature)
    assert not verify_signature(signer.public_key, content + b" ", signature)
    tampered = content_to_sign("POST", path, client_id + "x", time, body)
    assert not verify_signature(signer.public_key, tampered, signature)


@settings(max_examples=40, deadline=None)
@given(body=st.text(max_size=500))
def test_sign_verify_round_trip_text(private_key: RSAPrivateKey, body: str) -> None:
    signer = Signer(private_key, 7)
    content = content_to_sign("POST", PATH, "SANDBOX_1", "2026-11-28T19:17:23+00:00", body.encode())
    header = parse_signature_header(signer.signature_header(content))
    assert header.key_version == 7
    assert verify_signature(signer.public_key, content, header.signature)


def test_verify_with_wrong_key_fails(
    private_key: RSAPrivateKey, other_private_key: RSAPrivateKey
) -> None:
    content = content_to_sign("POST", PATH, "C1", "1", b"{}")
    signature = decode_signature(Signer(private_key, 1).sign(content))
    assert not verify_signature(other_private_key.public_key(), content, signature)


@given(st.binary(max_size=600))
def test_verify_signature_never_raises(private_key: RSAPrivateKey, garbage: bytes) -> None:
    assert verify_signature(private_key.public_key(), b"content", garbage) is False


def test_signer_header_layout(private_key: RSAPrivateKey) -> None:
    signer = Signer(private_key, 12)
    header = signer.signature_header(b"content")
    items = header.split(",")
    assert items[0] == "algorithm=RSA256"
    assert items[1] == "keyVersion=12"
    assert items[2].startswith("signature=")  # the Java SDK reads item 3
    assert header == format_signature_header(12, signer.sign(b"content"))  # deterministic
    assert header.split("signature=")[1] == signer.sign(b"content")  # Python SDK's split


@pytest.mark.parametrize("version", [-1, True, 1.0, "1"])
def test_signer_rejects_bad_key_version(private_key: RSAPrivateKey, version: object) -> None:
    with pytest.raises(ValueError, match="key_version"):
        Signer(private_key, version)  # type: ignore[arg-type]


# -- the official Python SDK -----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(body=st.text(max_size=300), client_id=header_text)
def test_sdk_signature_verifies_with_us(
    private_key: RSAPrivateKey, sdk_private_key: str, body: str, client_id: str
) -> None:
    time = "2026-11-28T19:17:23+00:00"
    value = signature_tool.sign("POST", PATH, client_id, time, body, sdk_private_key)
    content = content_to_sign("POST", PATH, client_id, time, body.encode("utf-8"))
    public_key = load_public_key(public_key_bare(private_key))
    assert verify_signature(public_key, content, decode_signature(value))
    # And through the header exactly as the SDK builds it.
    header = parse_signature_header("algorithm=RSA256,keyVersion=1,signature=" + value)
    assert verify_signature(public_key, content, header.signature)


@settings(max_examples=25, deadline=None)
@given(body=st.text(max_size=300), client_id=header_text)
def test_our_signature_verifies_with_sdk(
    private_key: RSAPrivateKey, body: str, client_id: str
) -> None:
    time = "2026-11-28T19:17:23.123+00:00"
    signer = Signer(private_key, 1)
    value = signer.sign(content_to_sign("POST", PATH, client_id, time, body.encode("utf-8")))
    bare = public_key_bare(private_key)
    assert signature_tool.verify("POST", PATH, client_id, time, body, value, bare) is True


def test_sdk_rejects_our_signature_for_other_body(private_key: RSAPrivateKey) -> None:
    value = Signer(private_key, 1).sign(content_to_sign("POST", PATH, "C1", "T", b"{}"))
    with pytest.raises(Exception, match="Verification failed"):
        signature_tool.verify("POST", PATH, "C1", "T", "{ }", value, public_key_bare(private_key))


# -- keys ------------------------------------------------------------------------------


def _private_formats(key: RSAPrivateKey) -> dict[str, bytes]:
    enc = serialization.Encoding
    fmt = serialization.PrivateFormat
    none = serialization.NoEncryption()
    return {
        "pkcs8-pem": key.private_bytes(enc.PEM, fmt.PKCS8, none),
        "pkcs1-pem": key.private_bytes(enc.PEM, fmt.TraditionalOpenSSL, none),
        "pkcs8-bare": base64.b64encode(key.private_bytes(enc.DER, fmt.PKCS8, none)),
        "pkcs1-bare": base64.b64encode(key.private_bytes(enc.DER, fmt.TraditionalOpenSSL, none)),
        "pkcs1-der": key.private_bytes(enc.DER, fmt.TraditionalOpenSSL, none),
    }


@pytest.mark.parametrize(
    "form", ["pkcs8-pem", "pkcs1-pem", "pkcs8-bare", "pkcs1-bare", "pkcs1-der"]
)
def test_load_private_key_formats(private_key: RSAPrivateKey, form: str) -> None:
    loaded = load_private_key(_private_formats(private_key)[form])
    assert loaded.private_numbers() == private_key.private_numbers()


def test_private_key_pem_round_trip(private_key: RSAPrivateKey) -> None:
    pem = private_key_pem(private_key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert load_private_key(pem).private_numbers() == private_key.private_numbers()


def test_generate_private_key() -> None:
    key = generate_private_key()
    assert key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537


def test_load_private_key_rejects_encrypted(private_key: RSAPrivateKey) -> None:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        load_private_key(pem)
    legacy = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        load_private_key(legacy)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"not a key!", "neither PEM nor valid base64"),
        (b"QUJD", "could not be parsed"),
        (b"-----BEGIN PRIVATE KEY-----\nQUJD\n", "malformed"),
        (b"-----BEGIN PUBLIC KEY-----\nQUJD\n-----END PUBLIC KEY-----", "found PUBLIC KEY"),
    ],
)
def test_load_private_key_rejects_garbage(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_private_key(data)


def test_load_private_key_rejects_small_and_non_rsa() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="RSA-1024; keys must be at least RSA-2048"):
        load_private_key(private_key_pem(small))
    with pytest.raises(ValueError, match="RSA-1024"):
        Signer(small, 1)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        load_private_key(ec_pem)


def test_public_key_forms(private_key: RSAPrivateKey) -> None:
    public = private_key.public_key()
    numbers = public.public_numbers()
    pem = public_key_pem(private_key)
    bare = public_key_bare(private_key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert public_key_pem(public) == pem
    assert "\n" not in bare and bare.startswith("MIIBIjAN")  # SubjectPublicKeyInfo, RSA-2048
    pkcs1_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    ).decode()
    assert pkcs1_pem.startswith("-----BEGIN RSA PUBLIC KEY-----")
    wrapped = "\n".join("    " + bare[i : i + 64] for i in range(0, len(bare), 64))
    for form in (
        pem,
        pem.encode(),
        pem.replace("\n", "\r\n"),
        pkcs1_pem,
        bare,
        bare.encode(),
        f"  {bare}\n",
        wrapped,
        " ".join(pem.split("\n")),  # PEM whose newlines an env file turned into spaces
    ):
        assert load_public_key(form).public_numbers() == numbers, form


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("", "empty"),
        ("%%%", "neither PEM nor valid base64"),
        ("MIIBIjAN", "could not be parsed"),  # truncated paste
        ("QUJDRA==", "could not be parsed"),
        ("-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----", "found CERTIFICATE"),
    ],
)
def test_load_public_key_rejects_garbage(data: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_public_key(data)


def test_load_public_key_rejects_private_small_and_non_rsa(private_key: RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="found PRIVATE KEY"):
        load_public_key(private_key_pem(private_key))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="RSA-1024"):
        load_public_key(public_key_bare(small))
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        load_public_key(ec_pem)


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_load_public_key_raises_only_value_error(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        load_public_key(data)
