"""The ASGI application: the signed API plus the ops endpoints, wired from settings.

``create_app`` is the uvicorn factory; each worker process builds its own store connection,
keys and limiter once, at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from otpgate.config import Settings, load_settings
from otpgate.core.models import FailurePolicy, SendLimits
from otpgate.core.otp import CodeHasher
from otpgate.core.service import AuthenticationService, OtpPolicy
from otpgate.datadir import load_secrets, load_server_key
from otpgate.delivery.setup import build_providers, build_worker, channel_providers
from otpgate.delivery.templates import render_message
from otpgate.protocol import Signer
from otpgate.server.api import ApiSettings, SignedApi
from otpgate.server.directory import ClientDirectory
from otpgate.server.logs import AccessLog, configure_logging
from otpgate.server.observe import RequestRecorder
from otpgate.server.ratelimit import ClientRateLimiter
from otpgate.store import Store, open_store

log = logging.getLogger("otpgate.server")

OPS_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")


def policy_from(settings: Settings) -> OtpPolicy:
    return OtpPolicy(
        ttl_seconds=settings.otp_ttl_seconds,
        max_attempts=settings.otp_max_attempts,
        code_length=settings.otp_length,
        send_limits=SendLimits(
            min_interval_seconds=settings.user_send_interval_seconds,
            max_per_window=settings.user_sends_per_10_min,
            window_seconds=600,
        ),
        failure=FailurePolicy(
            budget=settings.user_failure_budget,
            lockout_seconds=settings.user_lockout_seconds,
            max_lockout_seconds=settings.user_lockout_max_seconds,
        ),
    )


class OtpGateApp:
    """Routes ops paths to Starlette and everything else to the signed API."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recorder = RequestRecorder()
        self.api: SignedApi | None = None
        self._ops = Starlette(
            routes=[
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
                Route("/metrics", self._metrics),
                Route("/openapi.json", self._openapi),
            ],
            lifespan=self._lifespan,
        )
        self._store: Store | None = None
        self._limiter: ClientRateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPS_PATHS and self.api is not None:
            await self.api(scope, receive, send)
        else:
            await self._ops(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        settings = self.settings
        secrets = load_secrets(settings)
        store = await open_store(settings)
        self._store = store
        limiter = (
            ClientRateLimiter.redis(settings.redis_url, settings.redis_prefix)
            if settings.redis_url
            else ClientRateLimiter.in_memory()
        )
        self._limiter = limiter
        providers = build_providers(settings)
        worker = build_worker(store, providers, settings, self.recorder)
        in_process = settings.delivery_in_process
        access_log = AccessLog() if settings.access_log else None
        service = AuthenticationService(
            store,
            CodeHasher(secrets.hmac_keys, secrets.hmac_current),
            render_message,
            channel_providers(settings),
            policy_from(settings),
            on_queued=worker.wake if in_process else None,
        )
        self.api = SignedApi(
            service,
            ClientDirectory(store, settings.client_cache_seconds),
            Signer(load_server_key(settings), settings.server_key_version),
            limiter,
            ApiSettings(
                max_body_bytes=settings.max_body_bytes,
                request_time_window_seconds=settings.request_time_window_seconds,
                client_rate_per_second=settings.client_rate_per_second,
            ),
            self.recorder,
            access_log,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop)) if in_process else None
        flusher = asyncio.create_task(_flush_every(access_log, 0.2, stop)) if access_log else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task
            if flusher is not None:
                await flusher
            for provider in providers.values():
                await provider.aclose()
            await store.close()

    async def _healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, _request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            assert self._store is not None
            await asyncio.wait_for(self._store.ping(), timeout=2.0)
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"down: {type(exc).__name__}"
        if self.settings.redis_url and self._limiter is not None:
            try:
                ok = await asyncio.wait_for(self._limiter.ping(), timeout=2.0)
                checks["redis"] = "ok" if ok else "down"
            except Exception as exc:
                checks["redis"] = f"down: {type(exc).__name__}"
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def _openapi(self, _request: Request) -> Response:
        return Response(OPENAPI_DOCUMENT.read_bytes(), media_type="application/json")

    async def _metrics(self, _request: Request) -> Response:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self.recorder.outbox_depth.set(await self._store.outbox_depth())
        return Response(self.recorder.exposition(), media_type="text/plain; version=0.0.4")


async def _flush_every(access_log: AccessLog, seconds: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        access_log.flush()


def create_app() -> OtpGateApp:
    """uvicorn factory: settings from the environment (``OTPGATE_DATA_DIR`` etc.).

    Each worker process calls it, so each sets up its own JSON logging here."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return OtpGateApp(settings)
