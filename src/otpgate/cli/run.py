"""Commands that set up or run things: init, public-key, serve, worker, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from otpgate.cli.output import CommandError, emit, settings_of
from otpgate.config import Settings
from otpgate.datadir import PUBLIC_KEY_FILE, init_data_dir, load_server_key
from otpgate.protocol.signing import public_key_bare, public_key_pem
from otpgate.store import open_store

log = logging.getLogger("otpgate")


def _configure_logging(settings: Settings) -> None:
    from otpgate.server.logs import configure_logging

    configure_logging(settings.log_level)


def _migrate(settings: Settings) -> int:
    async def go() -> int:
        store = await open_store(settings)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except OSError as exc:
        raise CommandError(f"cannot reach the database: {exc}") from None


def cmd_init(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    try:
        created = init_data_dir(settings.data_dir)
    except OSError as exc:
        raise CommandError(f"cannot create {settings.data_dir}: {exc.strerror}") from None
    version = _migrate(settings)
    emit(
        args,
        {"dataDir": str(settings.data_dir), "created": created, "schemaVersion": version},
        [f"data dir {settings.data_dir} ready (schema version {version})"]
        + [f"  created {name}" for name in created],
    )
    return 0


def _require_init(settings: Settings) -> None:
    if not (settings.data_dir / PUBLIC_KEY_FILE).exists():
        raise CommandError(f"{settings.data_dir} is not initialised; run `otpgate init` first")


def cmd_public_key(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    _require_init(settings)
    key = load_server_key(settings).public_key()
    text = public_key_bare(key) if args.bare else public_key_pem(key).rstrip("\n")
    emit(args, {"publicKey": text, "format": "bare" if args.bare else "pem"}, text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_of(args)
    _require_init(settings)
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    _migrate(settings)
    # Worker processes re-read settings from the environment.
    os.environ["OTPGATE_DATA_DIR"] = str(settings.data_dir.resolve())
    _configure_logging(settings)
    store_kind = "sqlite" if settings.uses_sqlite else "postgresql"
    log.info(
        "otpgate listening on http://%s:%d (workers=%d, store=%s)",
        args.host,
        args.port,
        args.workers,
        store_kind,
    )
    from otpgate.server.supervisor import run_workers, uvicorn_options

    try:
        if args.workers > 1:
            return run_workers(args.workers, args.host, args.port)
        # uvicorn re-raises the SIGTERM it handled once it has drained; a no-op handler
        # installed first receives that re-raise, so a drained shutdown exits 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        uvicorn.run(
            "otpgate.server.app:create_app", host=args.host, port=args.port, **uvicorn_options()
        )
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Delivery alone, for scale-out: SIGTERM finishes the batch in hand and exits 0."""
    from otpgate.delivery.setup import build_providers, build_worker

    settings = settings_of(args)
    _require_init(settings)
    _configure_logging(settings)

    async def go() -> None:
        store = await open_store(settings)
        providers = build_providers(settings)
        worker = build_worker(store, providers, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("otpgate delivery worker started")
        try:
            await worker.run(stop)
        finally:
            for provider in providers.values():
                await provider.aclose()
            await store.close()
        log.info("otpgate delivery worker stopped")

    asyncio.run(go())
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cmd_demo(args: argparse.Namespace) -> int:
    """A merchant, a user, a token, init, the code from the inbox, verify: every step printed."""
    import uvicorn

    from otpgate.cli.main import main as cli
    from otpgate.client import OtpgateClient
    from otpgate.config import load_settings
    from otpgate.protocol.signing import generate_private_key, private_key_pem
    from otpgate.server.app import OtpGateApp

    def step(text: str) -> None:
        print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="otpgate-demo-") as tmp:
        data = Path(tmp) / "data"
        step(f"1. otpgate init --data-dir {data}")
        if cli(["init", "--data-dir", str(data)]) != 0:
            return 1
        merchant_key = generate_private_key()
        key_file = Path(tmp) / "merchant-public.pem"
        key_file.write_text(public_key_pem(merchant_key.public_key()))
        step("2. merchant DEMO_MERCHANT registers its public key")
        cli(
            [
                "client",
                "add",
                "DEMO_MERCHANT",
                "--public-key",
                str(key_file),
                "--name",
                "Demo Shop",
                "--data-dir",
                str(data),
            ]
        )
        step("3. wallet user alice with phone +14155550123")
        cli(
            [
                "user",
                "add",
                "alice",
                "--phone",
                "+14155550123",
                "--email",
                "alice@example.com",
                "--data-dir",
                str(data),
            ]
        )
        step("4. access token for DEMO_MERCHANT -> alice")
        # The demo prints its own steps; the per-request access log would only interleave.
        settings = dataclasses.replace(load_settings(data), access_log=False)
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            cli(
                [
                    "token",
                    "issue",
                    "--client",
                    "DEMO_MERCHANT",
                    "--user",
                    "alice",
                    "--data-dir",
                    str(data),
                ]
            )
        token = buffer.getvalue().strip()
        step(f"   token {token[:8]}… (shown once; stored hashed)")

        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                OtpGateApp(settings),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise CommandError("demo server did not start")
        step(f"5. otpgate serving on http://127.0.0.1:{port}")
        try:
            server_key = load_server_key(settings).public_key()
            with OtpgateClient(
                f"http://127.0.0.1:{port}",
                "DEMO_MERCHANT",
                private_key_pem(merchant_key),
                server_key,
            ) as client:
                request_id = f"demo-{uuid.uuid4().hex[:12]}"
                init = client.init_authentication(request_id, "SMS", token)
                step(
                    f"6. initAuthentication {request_id} -> {init.result.code}"
                    f" ({init.result.status})"
                )
                if not init.result.ok:
                    return 1
                text = _await_inbox(settings)
                step(f"7. inbox: {text}")
                found = re.search(rf"\b\d{{{settings.otp_length}}}\b", text)
                code = found.group(0) if found else ""
                wrong = str((int(code or "0") + 1) % 10**settings.otp_length).zfill(len(code))
                miss = client.verify_authentication(request_id, wrong)
                step(
                    f"8. verifyAuthentication with a wrong code -> {miss.result.code}"
                    f" isPassed={str(miss.is_passed).lower()}"
                )
                verify = client.verify_authentication(request_id, code)
                step(
                    f"9. verifyAuthentication with the code -> {verify.result.code}"
                    f" isPassed={str(verify.is_passed).lower()}"
                )
                passed = verify.result.ok and verify.is_passed
                step("verification passed" if passed else "verification FAILED")
                return 0 if passed else 1
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def _await_inbox(settings: Settings) -> str:
    async def newest() -> str | None:
        store = await open_store(settings)
        try:
            messages = await store.list_inbox("alice", 1)
            return messages[0].text if messages else None
        finally:
            await store.close()

    deadline = time.time() + 10
    while time.time() < deadline:
        text = asyncio.run(newest())
        if text:
            return text
        time.sleep(0.05)
    print("no message reached the inbox", file=sys.stderr)
    raise CommandError("delivery did not reach the local inbox within 10 s")
