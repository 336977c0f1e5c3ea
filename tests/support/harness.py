"""Test harness: real data dirs, real `otpgate serve` processes, signed raw requests.

Black-box tests drive the product the way OPERATOR.md and PROTOCOL.md say: the CLI as a
subprocess or through its `main`, the API over real HTTP, every answer's signature checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from otpgate.cli.main import main as cli_main
from otpgate.protocol import (
    Signer,
    content_to_sign,
    generate_private_key,
    load_public_key,
    parse_signature_header,
    public_key_pem,
    verify_signature,
)

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(data_dir: Path, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stdout)."""
    buffer = io.StringIO()
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        with contextlib.redirect_stdout(buffer):
            code = cli_main([*args, "--data-dir", str(data_dir)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, buffer.getvalue()


def cli_json(data_dir: Path, *args: str) -> Any:
    code, out = cli(data_dir, *args, "--json")
    assert code == 0, out
    return json.loads(out)


@dataclass
class Merchant:
    client_id: str
    private_key: RSAPrivateKey
    key_version: int = 1

    @property
    def signer(self) -> Signer:
        return Signer(self.private_key, self.key_version)


def add_merchant(data_dir: Path, client_id: str, *extra: str) -> Merchant:
    key = generate_private_key()
    path = data_dir / f"{client_id}.pem"
    path.write_text(public_key_pem(key.public_key()))
    code, out = cli(data_dir, "client", "add", client_id, "--public-key", str(path), *extra)
    assert code == 0, out
    return Merchant(client_id, key)


def add_user(data_dir: Path, user_id: str, *extra: str) -> None:
    code, out = cli(data_dir, "user", "add", user_id, *extra)
    assert code == 0, out


def issue_token(data_dir: Path, client_id: str, user_id: str, *extra: str) -> str:
    document = cli_json(
        data_dir, "token", "issue", "--client", client_id, "--user", user_id, *extra
    )
    token: str = document["accessToken"]
    return token


@dataclass
class Answer:
    """A response whose signature has been checked against the server key."""

    status_code: int
    headers: httpx.Headers
    body: dict[str, Any]
    raw: bytes

    @property
    def code(self) -> str:
        return str(self.body["result"]["resultCode"])

    @property
    def status(self) -> str:
        return str(self.body["result"]["resultStatus"])

    @property
    def message(self) -> str:
        return str(self.body["result"].get("resultMessage", ""))


@dataclass
class Server:
    """A running `otpgate serve` process."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    public_key: RSAPublicKey
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check(self, response: httpx.Response, path: str, client_id: str) -> Answer:
        """Assert the protocol's envelope (HTTP 200, signed, lower-case headers) and parse."""
        assert response.status_code == 200, response.text
        header = response.headers.get("signature")
        assert header, "response is not signed"
        response_time = response.headers["response-time"]
        echoed = response.headers["client-id"]
        assert echoed == client_id
        parsed = parse_signature_header(header)
        content = content_to_sign("POST", path, echoed, response_time, response.content)
        assert verify_signature(self.public_key, content, parsed.signature), "bad signature"
        return Answer(response.status_code, response.headers, response.json(), response.content)

    def post(
        self,
        merchant: Merchant | None,
        api: str,
        body: dict[str, Any] | bytes,
        *,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        client_id: str | None = None,
        request_time: str | None = None,
        method: str = "POST",
        sign: bool = True,
        http: httpx.Client | None = None,
    ) -> Answer:
        path = path or f"/ams/api/v1/users/{api}"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        cid = client_id if client_id is not None else (merchant.client_id if merchant else "")
        rtime = request_time if request_time is not None else str(int(time.time() * 1000))
        sent = {"Content-Type": "application/json; charset=UTF-8", "Request-Time": rtime}
        if cid:
            sent["Client-Id"] = cid
        if merchant is not None and sign:
            value = merchant.signer.sign(content_to_sign("POST", path, cid, rtime, raw))
            sent["Signature"] = (
                f"algorithm=RSA256,keyVersion={merchant.key_version},signature={value}"
            )
        sent.update(headers or {})
        client = http or httpx.Client(timeout=30)
        try:
            response = client.request(method, self.url + path, content=raw, headers=sent)
        finally:
            if http is None:
                client.close()
        return self.check(response, path, cid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class World:
    """A running server with merchant M_SHOP, user alice (phone and email) and her token."""

    server: Server
    merchant: Merchant
    user_id: str
    token: str


def init_data_dir(data_dir: Path, **settings: Any) -> Path:
    code, out = cli(data_dir, "init")
    assert code == 0, out
    if settings:
        with (data_dir / "config.toml").open("a") as handle:
            for name, value in settings.items():
                handle.write(f"{name.upper()} = {json.dumps(value)}\n")
    return data_dir


def start_server(
    data_dir: Path, *, workers: int = 1, env: Mapping[str, str] | None = None, port: int = 0
) -> Server:
    port = port or free_port()
    log_path = data_dir / f"serve-{port}.log"
    full_env = {**os.environ, "OTPGATE_DATA_DIR": str(data_dir), **(env or {})}
    handle = log_path.open("wb")
    process = subprocess.Popen(
        [OTPGATE, "serve", "--port", str(port), "--workers", str(workers)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    public_key = load_public_key((data_dir / "server-public-key.pem").read_bytes())
    server = Server(data_dir, port, process, public_key, log_path, dict(env or {}))
    wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def running_server(data_dir: Path, **kwargs: Any) -> Iterator[Server]:
    server = start_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


PreparedRequest = tuple[str, dict[str, str], bytes]
"""(path, headers, body bytes) of a signed request, ready to send as is."""


def signed_request(merchant: Merchant, api: str, body: dict[str, str]) -> PreparedRequest:
    """Sign a request ahead of sending it (load and race tests send hundreds at once)."""
    path = f"/ams/api/v1/users/{api}"
    raw = json.dumps(body).encode()
    now = str(int(time.time() * 1000))
    value = merchant.signer.sign(content_to_sign("POST", path, merchant.client_id, now, raw))
    headers = {
        "Content-Type": "application/json; charset=UTF-8",
        "Client-Id": merchant.client_id,
        "Request-Time": now,
        "Signature": f"algorithm=RSA256,keyVersion={merchant.key_version},signature={value}",
    }
    return path, headers, raw


def init_body(request_id: str, token: str, channel: str = "SMS") -> dict[str, str]:
    return {
        "authenticationType": "OTP",
        "authenticationRequestId": request_id,
        "authenticationChannelType": channel,
        "userIdentityType": "WALLET_TOKEN",
        "userIdentityValue": token,
    }


def verify_body(request_id: str, value: str) -> dict[str, str]:
    return {
        "authenticationType": "OTP",
        "authenticationRequestId": request_id,
        "authenticationValue": value,
    }


def inbox_codes(data_dir: Path, user_id: str, timeout: float = 10, count: int = 1) -> list[str]:
    """Codes delivered to the local inbox for ``user_id``, newest first; waits for ``count``."""
    import re

    deadline = time.time() + timeout
    while True:
        messages = cli_json(data_dir, "inbox", "list", "--user", user_id, "--limit", "100")
        codes = [m.group(0) for m in (re.search(r"\b\d{6,10}\b", x["text"]) for x in messages) if m]
        if len(codes) >= count or time.time() > deadline:
            return codes
        time.sleep(0.05)
