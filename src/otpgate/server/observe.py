"""Metrics for the ops endpoint ``/metrics`` (Prometheus text format).

Recording is a counter increment and a histogram observation: a few microseconds, nothing
beside the ~1 ms of RSA every request pays anyway.

With ``serve --workers N`` a scrape reaches one worker process at random, so ``serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory and every process writes its samples there;
the exposition then aggregates all of them (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestRecorder:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "otpgate_requests",
            "API answers by API and result code",
            ["api", "result_code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "otpgate_request_seconds",
            "Time to answer, by API",
            ["api"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "otpgate_outbox_queued",
            "Messages waiting in the outbox",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.deliveries = Counter(
            "otpgate_deliveries",
            "Delivery attempts by provider and outcome",
            ["provider", "outcome"],
            registry=self.registry,
        )

    def record(self, api: str, result_code: str, seconds: float) -> None:
        # Labelled children are cached: ``.labels()`` costs more than the increment itself.
        key = (api, result_code)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self.requests.labels(api, result_code),
                self.latency.labels(api),
            )
        series[0].inc()
        series[1].observe(seconds)

    def delivery(self, provider: str, outcome: str) -> None:
        self.deliveries.labels(provider, outcome).inc()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
