"""bench/run completes on a tiny load and writes the JSON the issue specifies.

A benchmark is not a test: nothing here looks at a time or a rate beyond "it is a positive
number". What is checked is that the benchmark works (every request it sent was answered
as expected) and that its report has the agreed shape.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run"

RESULT_KEYS = {
    "api",
    "store",
    "workers",
    "requests_per_s",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cpu_per_request_s",
    "overhead_ratio",
}


@pytest.mark.slow
def test_bench_run_tiny_load_writes_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [str(BENCH), "--duration", "1", "--requests-prep", "120", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verify" in done.stdout and "init" in done.stdout  # the table

    report = json.loads(out.read_text())
    floor = report["floor"]
    for key in ("rsa_sign_per_s", "rsa_verify_per_s", "cpu_per_request_s"):
        assert floor[key] > 0, key
    assert floor["cpu_per_request_s"] == pytest.approx(
        1 / floor["rsa_sign_per_s"] + 1 / floor["rsa_verify_per_s"]
    )
    assert report["machine"]["logical_cpus"] >= 1
    assert report["machine"]["python"]

    results = report["results"]
    assert {(r["api"], r["store"], r["workers"]) for r in results} == {
        ("init", "sqlite", 1),
        ("verify", "sqlite", 1),
        ("init", "sqlite", 2),
        ("verify", "sqlite", 2),
    }
    for r in results:
        assert r.keys() >= RESULT_KEYS
        for key in RESULT_KEYS - {"api", "store", "workers"}:
            assert isinstance(r[key], float) and r[key] > 0, (r["api"], r["workers"], key)
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert r["overhead_ratio"] == pytest.approx(
            r["cpu_per_request_s"] / floor["cpu_per_request_s"]
        )
        assert r["p99_at_70pct_ms"] is not None and r["p99_at_70pct_ms"] > 0
        # Every request was a realistic one and was answered SUCCESS (isPassed for verify).
        assert r["errors"] == 0
        assert r["requests"] > 0


def test_bench_rejects_a_store_it_cannot_use(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BENCH), "--duration", "1", "--store", "mongodb"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
