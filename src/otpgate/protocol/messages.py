"""Request bodies in, response bodies out (PROTOCOL.md §3, §4).

Bodies are decoded straight into ``msgspec`` structs whose fields are all ``str | None``, so
JSON nulls, missing fields and type errors are caught by the C decoder without building
intermediate dicts. The business rules (required, maximum length, enums, digits) then run
in plain Python, which lets every failure carry a message naming the field and the problem.
Nothing but ``ProtocolError(PARAM_ILLEGAL)`` escapes, whatever the bytes.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from otpgate.protocol.codes import MAX_MESSAGE_LENGTH, ResultCode
from otpgate.protocol.errors import ProtocolError

__all__ = [
    "AUTHENTICATION_TYPES",
    "CHANNEL_TYPES",
    "MAX_BODY_BYTES",
    "USER_IDENTITY_TYPES",
    "InitAuthenticationRequest",
    "VerifyAuthenticationRequest",
    "decode_init_request",
    "decode_verify_request",
    "encode_init_response",
    "encode_result",
    "encode_verify_response",
]

MAX_BODY_BYTES = 65536
"""A valid body is well under 1 KiB; anything past this is refused before parsing."""

# The enum values of the interface document, in the order messages list them.
AUTHENTICATION_TYPES: tuple[str, ...] = ("OTP",)
CHANNEL_TYPES: tuple[str, ...] = ("SMS", "EMAIL")
USER_IDENTITY_TYPES: tuple[str, ...] = ("WALLET_TOKEN",)

_UTF8_BOM = b"\xef\xbb\xbf"
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
# C0 controls, DEL and lone surrogates: never legitimate in an id or token, and they make
# logs and database drivers misbehave.
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_ERROR_FIELD = re.compile(r"at `\$\.([A-Za-z]+)`")


# -- requests --------------------------------------------------------------------------


class InitAuthenticationRequest(msgspec.Struct, frozen=True, rename="camel"):
    """A validated initAuthentication body; every field is present and within its rules."""

    authentication_type: str
    authentication_request_id: str
    authentication_channel_type: str
    user_identity_type: str
    user_identity_value: str


class VerifyAuthenticationRequest(msgspec.Struct, frozen=True, rename="camel"):
    """A validated verifyAuthentication body; ``authentication_value`` is ASCII digits."""

    authentication_type: str
    authentication_request_id: str
    authentication_value: str


class _InitWire(msgspec.Struct, rename="camel"):
    authentication_type: str | None = None
    authentication_request_id: str | None = None
    authentication_channel_type: str | None = None
    user_identity_type: str | None = None
    user_identity_value: str | None = None


class _VerifyWire(msgspec.Struct, rename="camel"):
    authentication_type: str | None = None
    authentication_request_id: str | None = None
    authentication_value: str | None = None


_W = TypeVar("_W", _InitWire, _VerifyWire)
_init_decoder = msgspec.json.Decoder(_InitWire)
_verify_decoder = msgspec.json.Decoder(_VerifyWire)


def _illegal(message: str) -> ProtocolError:
    return ProtocolError(ResultCode.PARAM_ILLEGAL, message)


def _decode(decoder: msgspec.json.Decoder[_W], body: bytes) -> _W:
    """Run the C decoder, translating each way it can fail into a merchant-readable error."""
    if not body:
        raise _illegal("body is empty")
    if len(body) > MAX_BODY_BYTES:
        raise _illegal(f"body exceeds {MAX_BODY_BYTES} bytes")
    if body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM) :]  # Windows tooling adds it; it carries no meaning
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        # Only type errors reach here; the message names the JSON path when there is one.
        match = _ERROR_FIELD.search(str(exc))
        if match is None:
            raise _illegal("body must be a JSON object") from None
        raise _illegal(f"{match.group(1)} must be a string") from None
    except UnicodeDecodeError:
        raise _illegal("body is not valid UTF-8") from None
    except RecursionError:
        raise _illegal("body is nested too deeply") from None
    except (msgspec.DecodeError, ValueError):
        raise _illegal("body is not valid JSON") from None


def _text(value: str | None, field: str, max_length: int) -> str:
    """A required string field: present, non-empty, within length, no control characters."""
    if not value:  # the SDKs omit empty fields, so "" means the same as absent
        raise _illegal(f"{field} is required")
    if len(value) > max_length:
        raise _illegal(f"{field} exceeds {max_length} characters")
    if _BAD_CHARS.search(value):
        raise _illegal(f"{field} contains control characters")
    return value


def _choice(value: str | None, field: str, max_length: int, allowed: tuple[str, ...]) -> str:
    """A required enum field; matched exactly, as the interface document spells the values."""
    text = _text(value, field, max_length)
    if text not in allowed:
        raise _illegal(f"{field} must be {' or '.join(allowed)}")
    return text


def decode_init_request(body: bytes) -> InitAuthenticationRequest:
    """Decode and validate an initAuthentication body; raises only ``ProtocolError``."""
    wire = _decode(_init_decoder, body)
    return InitAuthenticationRequest(
        authentication_type=_choice(
            wire.authentication_type, "authenticationType", 16, AUTHENTICATION_TYPES
        ),
        authentication_request_id=_text(
            wire.authentication_request_id, "authenticationRequestId", 64
        ),
        authentication_channel_type=_choice(
            wire.authentication_channel_type, "authenticationChannelType", 16, CHANNEL_TYPES
        ),
        user_identity_type=_choice(
            wire.user_identity_type, "userIdentityType", 16, USER_IDENTITY_TYPES
        ),
        user_identity_value=_text(wire.user_identity_value, "userIdentityValue", 128),
    )


def decode_verify_request(body: bytes) -> VerifyAuthenticationRequest:
    """Decode and validate a verifyAuthentication body; raises only ``ProtocolError``."""
    wire = _decode(_verify_decoder, body)
    authentication_type = _choice(
        wire.authentication_type, "authenticationType", 16, AUTHENTICATION_TYPES
    )
    request_id = _text(wire.authentication_request_id, "authenticationRequestId", 64)
    value = _text(wire.authentication_value, "authenticationValue", 256)
    if not _DIGITS.fullmatch(value):
        raise _illegal("authenticationValue must be digits")
    return VerifyAuthenticationRequest(
        authentication_type=authentication_type,
        authentication_request_id=request_id,
        authentication_value=value,
    )


# -- responses -------------------------------------------------------------------------


class _Result(msgspec.Struct, rename="camel"):
    result_code: str
    result_status: str
    result_message: str


class _ResultOnly(msgspec.Struct):
    result: _Result


class _InitResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    result: _Result
    authentication_request_id: str | None = None


class _VerifyResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    result: _Result
    is_passed: bool | None = None


_encoder = msgspec.json.Encoder()


def _result(code: ResultCode, message: str | None) -> _Result:
    """``resultMessage`` is String(64): fall back to the catalogue text, clip long ones."""
    text = message or code.default_message
    if len(text) > MAX_MESSAGE_LENGTH:
        text = text[: MAX_MESSAGE_LENGTH - 3] + "..."
    return _Result(code.name, code.status.value, text)


def encode_result(code: ResultCode, message: str | None = None) -> bytes:
    """``{"result":{...}}`` alone: for errors raised before the API is known."""
    return _encoder.encode(_ResultOnly(_result(code, message)))


def encode_init_response(
    code: ResultCode,
    message: str | None = None,
    authentication_request_id: str | None = None,
) -> bytes:
    """An initAuthentication answer; ``authenticationRequestId`` is omitted when None."""
    return _encoder.encode(_InitResponse(_result(code, message), authentication_request_id))


def encode_verify_response(
    code: ResultCode,
    message: str | None = None,
    is_passed: bool | None = None,
) -> bytes:
    """A verifyAuthentication answer; ``isPassed`` is a JSON boolean (.NET rejects strings)."""
    return _encoder.encode(_VerifyResponse(_result(code, message), is_passed))
