"""Keys shared by the protocol tests: RSA generation is slow enough to do once per session."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from otpgate.protocol import generate_private_key


@pytest.fixture(scope="session")
def private_key() -> RSAPrivateKey:
    return generate_private_key()


@pytest.fixture(scope="session")
def other_private_key() -> RSAPrivateKey:
    return generate_private_key()


@pytest.fixture(scope="session")
def sdk_private_key(private_key: RSAPrivateKey) -> str:
    """The key as merchants hand it to the SDK: bare base64 of the PKCS#1 DER, one line."""
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return base64.b64encode(der).decode("ascii")
