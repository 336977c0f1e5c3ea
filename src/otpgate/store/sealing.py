"""Encryption at rest for message payloads (they hold the plaintext code until delivered).

AES-256-GCM with a key kept in the data dir, not in the database: a database dump or backup
alone never reveals a live code.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE = 12


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, context: bytes = b"otpgate") -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), context)

    def open(self, sealed: bytes, context: bytes = b"otpgate") -> str:
        return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context).decode()
