"""Operations endpoints: health, readiness, Prometheus metrics, trace ids, JSON logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from support.harness import World, init_body, running_server, verify_body


def test_health_ready_and_trace_id(world: World) -> None:
    server = world.server
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok"}
    answer = server.post(world.merchant, "verifyAuthentication", verify_body("nope", "123456"))
    trace_id = answer.headers["trace-id"]
    assert len(trace_id) == 16
    logged: list[dict[str, object]] = []
    deadline = time.time() + 3  # access lines are written in batches, at least every 0.2 s
    while not logged and time.time() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        logged = [line for line in lines if line.get("trace_id") == trace_id]
        time.sleep(0.05)
    assert logged and logged[0]["result_code"] == "AUTHENTICATION_REQUEST_ID_INVALID"
    assert logged[0]["api"] == "verifyAuthentication"


def test_metrics_count_answers_across_worker_processes(data_dir: Path) -> None:
    with running_server(data_dir, workers=2) as server, httpx.Client() as http:
        for _ in range(10):
            server.post(None, "initAuthentication", init_body("r", "t"), method="GET", http=http)
        text = httpx.get(server.url + "/metrics").text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("otpgate_requests_total") and "METHOD_NOT_SUPPORTED" in line
    )
    assert float(line.rsplit(" ", 1)[1]) == 10.0  # both processes' answers, not one's
    assert "otpgate_request_seconds_bucket" in text
    assert "otpgate_outbox_queued" in text


def test_openapi_document_is_served(world: World) -> None:
    document = httpx.get(world.server.url + "/openapi.json")
    assert document.status_code == 200
    assert document.headers["content-type"].startswith("application/json")
