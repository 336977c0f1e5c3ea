"""Building and pre-signing requests, in parallel, before any timed window.

Every request is signed exactly as a merchant SDK would (``content_to_sign`` + ``Signer.sign``,
the server's own protocol code) and turned into the raw HTTP/1.1 bytes the load generator
writes to the socket. Signing RSA-2048 costs ~0.7 ms a request, so it runs in a process pool
while the server sits idle.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from otpgate.protocol import Signer, content_to_sign, load_private_key

INIT_PATH = "/ams/api/v1/users/initAuthentication"
VERIFY_PATH = "/ams/api/v1/users/verifyAuthentication"
CONTENT_TYPE = "application/json; charset=UTF-8"

# (path, request_time, body)
Item = tuple[str, str, bytes]

_signer: Signer | None = None


def build_request(
    signer: Signer, host: str, client_id: str, path: str, request_time: str, body: bytes
) -> bytes:
    """The complete request: what an SDK on a keep-alive connection sends."""
    value = signer.sign(content_to_sign("POST", path, client_id, request_time, body))
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Client-Id: {client_id}\r\n"
        f"Request-Time: {request_time}\r\n"
        f"Signature: algorithm=RSA256,keyVersion={signer.key_version},signature={value}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _init_worker(private_pem: bytes, key_version: int) -> None:
    global _signer
    _signer = Signer(load_private_key(private_pem), key_version)


def _sign_chunk(job: tuple[str, str, Sequence[Item]]) -> list[bytes]:
    host, client_id, items = job
    assert _signer is not None
    return [build_request(_signer, host, client_id, p, t, b) for p, t, b in items]


class SigningPool:
    """A process pool holding the merchant's private key; one per benchmark run."""

    def __init__(self, private_pem: bytes, key_version: int = 1, processes: int = 0) -> None:
        self.processes = processes or os.cpu_count() or 1
        self._pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(private_pem, key_version),
        )

    def sign(self, host: str, client_id: str, items: Sequence[Item]) -> list[bytes]:
        if not items:
            return []
        size = max(1, -(-len(items) // (self.processes * 4)))
        jobs = [(host, client_id, items[i : i + size]) for i in range(0, len(items), size)]
        signed: list[bytes] = []
        for part in self._pool.map(_sign_chunk, jobs):
            signed.extend(part)
        return signed

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
