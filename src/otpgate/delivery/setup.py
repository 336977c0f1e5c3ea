"""Builds the configured providers from settings (OPERATOR.md, Delivery settings)."""

from __future__ import annotations

from collections.abc import Mapping

from otpgate.config import Settings
from otpgate.delivery.base import DeliveryProvider
from otpgate.delivery.worker import DeliveryListener, DeliveryWorker, OutboxStore


def channel_providers(settings: Settings) -> dict[str, str]:
    """Channel -> provider name for non-sandbox clients."""
    return {"EMAIL": settings.email_provider, "SMS": settings.sms_provider}


def build_providers(settings: Settings) -> dict[str, DeliveryProvider]:
    """The real providers the settings enable; the inbox needs no object (the store is it)."""
    providers: dict[str, DeliveryProvider] = {}
    if settings.email_provider == "smtp":
        from otpgate.delivery.smtp import SmtpProvider

        providers["smtp"] = SmtpProvider(
            host=settings.smtp_host,
            port=settings.smtp_port,
            tls=settings.smtp_tls,  # type: ignore[arg-type]  # validated by config
            username=settings.smtp_username or None,
            password=settings.smtp_password or None,
            from_address=settings.smtp_from,
            timeout_seconds=settings.smtp_timeout_seconds,
        )
    if settings.sms_provider == "http":
        from otpgate.delivery.http_sms import HttpSmsProvider

        extra = {"from_number": settings.sms_http_from} if settings.sms_http_from else {}
        providers["http"] = HttpSmsProvider(
            url=settings.sms_http_url,
            headers=settings.sms_headers(),
            timeout_seconds=settings.sms_http_timeout_seconds,
            preset=settings.sms_http_preset,
            **extra,  # type: ignore[arg-type]
        )
    return providers


def build_worker(
    store: OutboxStore,
    providers: Mapping[str, DeliveryProvider],
    settings: Settings,
    listener: DeliveryListener | None = None,
) -> DeliveryWorker:
    """The delivery worker with the outbox settings: one place for `serve` and `worker`."""
    return DeliveryWorker(
        store,
        providers,
        max_tries=settings.outbox_max_tries,
        lease_seconds=settings.outbox_lease_seconds,
        poll_seconds=settings.outbox_poll_seconds,
        retry_base_seconds=settings.outbox_retry_base_seconds,
        listener=listener,
    )
