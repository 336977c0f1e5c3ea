"""The data directory: the server's key pair, the OTP HMAC keyring and the sealing key.

Secrets live in files beside the database, never in it (mode 0600). ``otpgate init`` creates
them once and never overwrites them; every process loads them once at start.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from otpgate.config import CONFIG_FILE, Settings, default_config_text
from otpgate.protocol.signing import generate_private_key, load_private_key, private_key_pem

PRIVATE_KEY_FILE = "server-private-key.pem"
PUBLIC_KEY_FILE = "server-public-key.pem"
SECRETS_FILE = "secrets.json"


class DataDirError(Exception):
    """The data dir is missing or incomplete; the message says to run ``otpgate init``."""


@dataclass(frozen=True)
class ServerSecrets:
    hmac_keys: dict[str, bytes]
    hmac_current: str
    sealing_key: bytes  # AES-256-GCM key for outbox and inbox payloads


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def init_data_dir(directory: Path) -> list[str]:
    """Create whatever is missing; return the names of the files created."""
    from otpgate.protocol.signing import public_key_pem

    directory.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    private_path = directory / PRIVATE_KEY_FILE
    if not private_path.exists():
        key = generate_private_key()
        _write_private(private_path, private_key_pem(key))
        (directory / PUBLIC_KEY_FILE).write_text(public_key_pem(key.public_key()))
        created += [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]
    secrets_path = directory / SECRETS_FILE
    if not secrets_path.exists():
        document = {
            "hmac_current": "k1",
            "hmac_keys": {"k1": base64.b64encode(secrets.token_bytes(32)).decode()},
            "sealing_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        _write_private(secrets_path, json.dumps(document, indent=2).encode())
        created.append(SECRETS_FILE)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        config_path.write_text(default_config_text())
        created.append(CONFIG_FILE)
    return created


def load_server_key(settings: Settings) -> RSAPrivateKey:
    path = settings.data_dir / PRIVATE_KEY_FILE
    if not path.exists():
        raise DataDirError(f"no server key in {settings.data_dir}; run `otpgate init` first")
    return load_private_key(path.read_bytes())


def load_secrets(settings: Settings) -> ServerSecrets:
    path = settings.data_dir / SECRETS_FILE
    if not path.exists():
        raise DataDirError(f"no secrets in {settings.data_dir}; run `otpgate init` first")
    document = json.loads(path.read_text())
    return ServerSecrets(
        hmac_keys={k: base64.b64decode(v) for k, v in document["hmac_keys"].items()},
        hmac_current=document["hmac_current"],
        sealing_key=base64.b64decode(document["sealing_key"]),
    )
