"""The ``Signature`` header: ``algorithm=RSA256,keyVersion=<n>,signature=<value>``.

SDKs differ in the details (spaces after commas, header-name case, raw or percent-encoded
base64, keyVersion present or not), so parsing is lenient about layout and strict about
meaning: every failure is a ``SIGNATURE_INVALID`` with a message that says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from otpgate.protocol.codes import ResultCode
from otpgate.protocol.errors import ProtocolError
from otpgate.protocol.signing import ALGORITHM, decode_signature

__all__ = [
    "MAX_KEY_VERSION",
    "SignatureHeader",
    "format_signature_header",
    "parse_signature_header",
]

MAX_KEY_VERSION = 2**31 - 1
"""Key versions are small counters; anything larger is a client bug, not a real key."""

# The header is three short items; a real one is under 1 KiB even with a 4096-bit key.
_MAX_HEADER_LENGTH = 16384
_KEY_VERSION = re.compile(r"[0-9]{1,10}", re.ASCII)
# Lower-cased item name -> spelling used in messages. Other items are ignored.
_KNOWN_ITEMS = {"algorithm": "algorithm", "keyversion": "keyVersion", "signature": "signature"}


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """A parsed ``Signature`` header; ``signature`` is already decoded to raw bytes.

    ``key_version`` is None when the client did not send one: the caller then uses the
    client's newest active key (PROTOCOL.md §3).
    """

    algorithm: str
    key_version: int | None
    signature: bytes


def _fail(message: str) -> ProtocolError:
    return ProtocolError(ResultCode.SIGNATURE_INVALID, message)


def parse_signature_header(value: str | None) -> SignatureHeader:
    """Parse a ``Signature`` header value; raises only ``ProtocolError(SIGNATURE_INVALID)``.

    Items are split on commas (optional spaces after them) and each item on its *first*
    ``=``, because raw base64 signature values end in ``=``. Item names are matched
    case-insensitively; unknown items are ignored, repeated ones rejected as ambiguous.
    """
    if value is None or not value.strip():
        raise _fail("Signature header is missing")
    if len(value) > _MAX_HEADER_LENGTH:
        raise _fail("Signature header is too long")

    items: dict[str, str] = {}
    for part in value.split(","):
        part = part.strip(" \t")
        if not part:
            continue  # a stray or trailing comma is harmless
        name, sep, item_value = part.partition("=")
        name = name.strip(" \t").lower()
        if not sep or not name:
            raise _fail("Signature header has a malformed item")
        if name not in _KNOWN_ITEMS:
            continue
        if name in items:
            raise _fail(f"Signature header repeats {_KNOWN_ITEMS[name]}")
        items[name] = item_value.strip(" \t")

    algorithm = items.get("algorithm")
    if not algorithm:
        raise _fail("Signature algorithm is missing")
    if algorithm.upper() != ALGORITHM:
        raise _fail(f"Signature algorithm must be {ALGORITHM}")

    key_version = _parse_key_version(items.get("keyversion"))

    signature = items.get("signature")
    if not signature:
        raise _fail("Signature header has no signature")
    return SignatureHeader(ALGORITHM, key_version, decode_signature(signature))


def _parse_key_version(text: str | None) -> int | None:
    if not text:
        return None  # absent or empty: the newest active key
    if text.startswith("-") and _KEY_VERSION.fullmatch(text[1:]):
        raise _fail("keyVersion in Signature header is negative")
    if not _KEY_VERSION.fullmatch(text):
        if text.isascii() and text.isdigit():
            raise _fail("keyVersion in Signature header is too large")
        raise _fail("keyVersion in Signature header is not a number")
    number = int(text)
    if number > MAX_KEY_VERSION:
        raise _fail("keyVersion in Signature header is too large")
    return number


def format_signature_header(key_version: int, signature_value: str) -> str:
    """Build a ``Signature`` header value; ``signature_value`` is already URL-encoded base64.

    ``signature`` must stay the third item: the Java SDK takes item 3 and the Python SDK
    splits on ``"signature="``.
    """
    return f"algorithm={ALGORITHM},keyVersion={key_version},signature={signature_value}"
