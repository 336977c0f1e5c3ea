"""The otpgate wire protocol: signatures, headers, times and message bodies.

Pure functions over bytes and strings, no I/O: the server, the client and the tests all
speak the protocol through this package, so there is exactly one definition of it.
"""

from otpgate.protocol.codes import MAX_MESSAGE_LENGTH, ResultCode, ResultStatus
from otpgate.protocol.errors import ProtocolError
from otpgate.protocol.headers import (
    MAX_KEY_VERSION,
    SignatureHeader,
    format_signature_header,
    parse_signature_header,
)
from otpgate.protocol.messages import (
    AUTHENTICATION_TYPES,
    CHANNEL_TYPES,
    MAX_BODY_BYTES,
    USER_IDENTITY_TYPES,
    InitAuthenticationRequest,
    VerifyAuthenticationRequest,
    decode_init_request,
    decode_verify_request,
    encode_init_response,
    encode_result,
    encode_verify_response,
)
from otpgate.protocol.signing import (
    ALGORITHM,
    MIN_KEY_BITS,
    Signer,
    content_to_sign,
    decode_signature,
    encode_signature,
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_bare,
    public_key_pem,
    verify_signature,
)
from otpgate.protocol.timeparse import format_response_time, parse_request_time

__all__ = [
    "ALGORITHM",
    "AUTHENTICATION_TYPES",
    "CHANNEL_TYPES",
    "MAX_BODY_BYTES",
    "MAX_KEY_VERSION",
    "MAX_MESSAGE_LENGTH",
    "MIN_KEY_BITS",
    "USER_IDENTITY_TYPES",
    "InitAuthenticationRequest",
    "ProtocolError",
    "ResultCode",
    "ResultStatus",
    "SignatureHeader",
    "Signer",
    "VerifyAuthenticationRequest",
    "content_to_sign",
    "decode_init_request",
    "decode_signature",
    "decode_verify_request",
    "encode_init_response",
    "encode_result",
    "encode_signature",
    "encode_verify_response",
    "format_response_time",
    "format_signature_header",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "parse_request_time",
    "parse_signature_header",
    "private_key_pem",
    "public_key_bare",
    "public_key_pem",
    "verify_signature",
]
