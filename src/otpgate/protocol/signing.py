"""RSA256 request/response signatures (PROTOCOL.md §3, §4).

Every request and every response is signed with RSA PKCS#1 v1.5 over SHA-256. The signed
content is the method, path, client id, time and the *exact* body bytes; the signature travels
as URL-encoded standard base64. These helpers are byte-for-byte compatible with the official
merchant SDKs: the Python SDK signs with ``quote_plus`` and verifies with ``unquote_plus``,
.NET percent-encodes with lower-case hex, and some clients send raw base64.

Keys come from operators (our own key) and merchants (their public keys), in whatever shape
the SDK documentation told them to use: PEM of either flavour, or the bare one-line base64
the SDKs take. Loading them is strict about the algorithm and size but lenient about layout.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from otpgate.protocol.codes import ResultCode
from otpgate.protocol.errors import ProtocolError

__all__ = [
    "ALGORITHM",
    "MIN_KEY_BITS",
    "Signer",
    "content_to_sign",
    "decode_signature",
    "encode_signature",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_bare",
    "public_key_pem",
    "verify_signature",
]

ALGORITHM = "RSA256"
"""The only algorithm name the protocol defines (the ``algorithm=`` item of ``Signature``)."""

MIN_KEY_BITS = 2048
"""Smaller RSA keys are factorable in practice; refuse them when they are registered."""

# A 16384-bit signature is 2048 bytes, ~2.7k base64 chars, ~8.2k once fully %-encoded.
# Anything longer is not a signature, and decoding it would only waste time.
_MAX_SIGNATURE_VALUE = 8192

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def content_to_sign(method: str, path: str, client_id: str, time: str, body: bytes) -> bytes:
    """Build ``"<METHOD> <path>\\n<client-id>.<time>.<body>"`` as the SDKs do.

    ``body`` is appended as received: re-serialising would change whitespace and escapes
    (Python sends ``indent=3`` JSON, PHP escapes ``/``) and break every signature.
    Lone surrogates in header text are encoded with ``surrogatepass`` so this never raises;
    such content simply will not verify.
    """
    head = f"{method} {path}\n{client_id}.{time}."
    return head.encode("utf-8", "surrogatepass") + body


def encode_signature(raw: bytes) -> str:
    """Standard base64, then percent-encode everything reserved (``+``, ``/``, ``=``).

    ``quote(safe="")`` yields the same text as the SDKs' ``quote_plus`` here, because base64
    never contains a space; every SDK's ``unquote``/``unquote_plus`` recovers it.
    """
    # Three fixed replacements do what ``quote`` does for the base64 alphabet, ~30x faster
    # (this runs on every response).
    text = base64.b64encode(raw).decode("ascii")
    return text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


def _unescape_base64(value: str) -> str:
    """Undo the only escapes percent-encoded base64 contains, in either hex case."""
    for escaped, char in _BASE64_ESCAPES:
        if escaped in value:
            value = value.replace(escaped, char)
    return value


_BASE64_ESCAPES = (
    ("%2B", "+"),
    ("%2b", "+"),
    ("%2F", "/"),
    ("%2f", "/"),
    ("%3D", "="),
    ("%3d", "="),
)


def decode_signature(value: str) -> bytes:
    """Turn a ``signature=`` value back into raw signature bytes.

    ``unquote`` (not ``unquote_plus``) so that raw base64, whose ``+`` must survive, works
    as well as percent-encoded base64 in either hex case (.NET sends ``%2b``). Decoding is
    strict: characters outside the base64 alphabet or bad padding are an error, not skipped.
    """
    if not value:
        raise ProtocolError(ResultCode.SIGNATURE_INVALID, "Signature value is empty")
    if len(value) > _MAX_SIGNATURE_VALUE:
        raise ProtocolError(ResultCode.SIGNATURE_INVALID, "Signature value is too long")
    if "%" not in value:
        text = value
    else:
        # Fast path for the escapes base64 needs; anything else takes the general route.
        text = _unescape_base64(value)
        if "%" in text:
            text = unquote(value)
    if not text.isascii():
        raise ProtocolError(ResultCode.SIGNATURE_INVALID, "Signature value is not base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ResultCode.SIGNATURE_INVALID, "Signature value is not base64") from None
    if not raw:
        raise ProtocolError(ResultCode.SIGNATURE_INVALID, "Signature value is empty")
    return raw


def verify_signature(public_key: RSAPublicKey, content: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid RSA256 signature of ``content``; never raises.

    A wrong length or garbage bytes are just an invalid signature: the caller answers
    SIGNATURE_INVALID and must not have to tell failure modes apart.
    """
    try:
        public_key.verify(signature, content, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class Signer:
    """Signs responses with the server's private key under a published key version.

    The key version travels in the ``Signature`` header so merchants can pick the matching
    public key during a key rotation.
    """

    __slots__ = ("_private_key", "key_version", "public_key")

    def __init__(self, private_key: RSAPrivateKey, key_version: int) -> None:
        if isinstance(key_version, bool) or not isinstance(key_version, int) or key_version < 0:
            raise ValueError(f"key_version must be a non-negative integer, got {key_version!r}")
        _check_rsa_size(private_key.key_size, "private key")
        self._private_key = private_key
        self.key_version = key_version
        self.public_key: RSAPublicKey = private_key.public_key()

    def sign(self, content: bytes) -> str:
        """Return the URL-encoded base64 signature value of ``content``."""
        raw = self._private_key.sign(content, padding.PKCS1v15(), hashes.SHA256())
        return encode_signature(raw)

    def signature_header(self, content: bytes) -> str:
        """Return the whole ``Signature`` header value for ``content``.

        Same layout as ``headers.format_signature_header`` (not imported here, to keep the
        module graph acyclic): ``signature`` is the third comma item because the Java SDK
        reads item 3 and the Python SDK splits on ``"signature="``.
        """
        return f"algorithm={ALGORITHM},keyVersion={self.key_version},signature={self.sign(content)}"

    def __repr__(self) -> str:
        return f"Signer(key_version={self.key_version}, bits={self._private_key.key_size})"


# -- keys ------------------------------------------------------------------------------


def generate_private_key() -> RSAPrivateKey:
    """A fresh RSA-2048 key with e=65537, what every merchant SDK expects."""
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_KEY_BITS)


def private_key_pem(key: RSAPrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``); protect the file, not the bytes."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: RSAPublicKey | RSAPrivateKey) -> str:
    """SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``); a private key gives its public half."""
    public = key.public_key() if isinstance(key, RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_bare(key: RSAPublicKey | RSAPrivateKey) -> str:
    """One-line base64 of the SubjectPublicKeyInfo DER: what merchant SDKs are configured with."""
    public = key.public_key() if isinstance(key, RSAPrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def load_private_key(data: bytes | str) -> RSAPrivateKey:
    """Load an unencrypted RSA private key: PEM (PKCS#8 or PKCS#1) or bare base64 of the DER.

    Raises ``ValueError`` with a sentence an operator can act on.
    """
    label, der = _to_der(data, "private key")
    if label == "ENCRYPTED PRIVATE KEY" or (label is not None and der is None):
        raise ValueError(
            "The private key is encrypted; otpgate needs it unencrypted "
            "(e.g. `openssl pkey -in key.pem -out plain.pem`)."
        )
    if label not in (None, "PRIVATE KEY", "RSA PRIVATE KEY"):
        raise ValueError(f"Expected a PRIVATE KEY or RSA PRIVATE KEY PEM block, found {label}.")
    assert der is not None
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            "The private key could not be parsed as PKCS#8 or PKCS#1 RSA key data."
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("The private key is not an RSA key; only RSA keys are supported.")
    _check_rsa_size(key.key_size, "private key")
    return key


def load_public_key(data: str | bytes) -> RSAPublicKey:
    """Load an RSA public key from PEM (``PUBLIC KEY`` or ``RSA PUBLIC KEY``) or bare base64.

    The bare form is the one-line base64 of the X.509 SubjectPublicKeyInfo DER that merchant
    SDKs are configured with; line breaks and indentation from copy-pasting are tolerated.
    Raises ``ValueError`` with a sentence an operator can act on.
    """
    label, der = _to_der(data, "public key")
    if label not in (None, "PUBLIC KEY", "RSA PUBLIC KEY"):
        if label in ("CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY"):
            hint = " Register the public key (`openssl pkey -pubout`), not a {}."
            raise ValueError(f"Expected a public key, found {label}.{hint.format(label.lower())}")
        raise ValueError(f"Expected a PUBLIC KEY or RSA PUBLIC KEY PEM block, found {label}.")
    if der is None:
        raise ValueError("The public key PEM block has headers; it is not a plain public key.")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            "The public key could not be parsed as X.509 SubjectPublicKeyInfo or PKCS#1 data."
        ) from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError("The public key is not an RSA key; only RSA keys are supported.")
    _check_rsa_size(key.key_size, "public key")
    return key


def _to_der(data: str | bytes, what: str) -> tuple[str | None, bytes | None]:
    """Split key text into (PEM label or None for bare base64, DER bytes).

    DER is None when the PEM block carries RFC 1421 headers (``Proc-Type: 4,ENCRYPTED``),
    which only legacy-encrypted keys have. Raw DER bytes are passed through.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return None, data  # raw DER; let the DER loader judge it
    else:
        text = data
    text = text.strip()
    if not text:
        raise ValueError(f"The {what} is empty.")
    if "-----BEGIN" in text:
        match = _PEM_BLOCK.search(text)
        if match is None:
            raise ValueError(f"The {what} PEM is malformed: no matching BEGIN/END lines.")
        label, body = match.group(1), match.group(2)
        if ":" in body:
            return label, None
    else:
        label, body = None, text
    compact = "".join(body.split())
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"The {what} is neither PEM nor valid base64 key data.") from None
    if not der:
        raise ValueError(f"The {what} is empty.")
    return label, der


def _check_rsa_size(bits: int, what: str) -> None:
    if bits < MIN_KEY_BITS:
        raise ValueError(f"The {what} is RSA-{bits}; keys must be at least RSA-{MIN_KEY_BITS}.")
