"""otpgate benchmark: the RSA floor, then init and verify load against real servers.

Run it as ``bench/run`` (see ``bench/run --help`` and the README's performance section).

For each store (embedded SQLite by default, PostgreSQL + Redis with ``--store``) and each
worker count (1 and 2 by default) it starts ``otpgate serve --workers N`` on a fresh data dir,
then for each API:

1. pre-signs realistic requests (fresh request id and fresh user per init; a fresh challenge,
   answered with its right code read from the local inbox, per verify);
2. drives a closed loop with C keep-alive connections from a separate process (warm-up, then
   ``--duration`` seconds): requests/s and latency at peak, server CPU per request;
3. drives an open loop at 70 % of that peak for ``--duration`` seconds: p99 at 70 % load.

The server's CPU is the user+system time of ``otpgate serve`` and all its worker processes,
read at the window edges; for init it runs until the outbox is drained, so the delivery each
init causes is paid for by that init. The load generator shares the machine's cores; its own
CPU is measured and reported beside the server's. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from loadgen import tree_cpu_seconds
from prepare import INIT_PATH, VERIFY_PATH, Item, SigningPool

from otpgate.protocol import content_to_sign, generate_private_key, private_key_pem, public_key_pem

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
OTPGATE = Path(sys.executable).with_name("otpgate")
CLIENT_ID = "BENCH_SHOP"
INIT_OK = '"resultCode":"SUCCESS"'
VERIFY_OK = '"isPassed":true'
PG_ADMIN_URL = "postgresql://127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379"
_CODE = re.compile(r"\b(\d{6,10})\b")

# Settings for every benchmark data dir. Every hot-path check stays on; only limits that
# would refuse a benchmark request are relaxed (each init has its own user anyway).
BENCH_SETTINGS: dict[str, Any] = {
    "USER_SEND_INTERVAL_SECONDS": 1,  # checked, never hit: one init per user
    "USER_SENDS_PER_10_MIN": 1000,
    "CLIENT_RATE_PER_SECOND": 1_000_000,  # the limiter runs on every request, never refuses
    "REQUEST_TIME_WINDOW_SECONDS": 86_400,  # freshness parsed and checked; pre-signed is fine
    "OTP_TTL_SECONDS": 3600,  # challenges made during set-up outlive the run
}


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- machine and floor -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from cryptography import __version__ as crypto_version
    from cryptography.hazmat.backends.openssl.backend import backend

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 1
    virt = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        virt = subprocess.run(
            ["systemd-detect-virt"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "virtualization": virt or "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cryptography": crypto_version,
        "openssl": backend.openssl_version_text(),
        "hostname": socket.gethostname(),
    }


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), *args], capture_output=True, timeout=30
        )
        if done.returncode == 0:
            return done.stdout.decode(errors="replace").strip()
    return None


def code_under_test() -> dict[str, Any]:
    """Which otpgate the servers run: the checkout's commit and whether src/ had changes."""
    import otpgate

    info: dict[str, Any] = {"package": str(Path(otpgate.__file__).parent)}
    commit = _git("rev-parse", "--short", "HEAD")
    if commit:
        info["commit"] = commit
        info["src_uncommitted_changes"] = bool(_git("status", "--porcelain", "src"))
        info["src_fingerprint"] = _git("ls-files", "-s", "-m", "-o", "--exclude-standard", "src")
    return info


def export_snapshot(rev: str, into: Path) -> dict[str, Any]:
    """``git archive REV src`` into ``into``, first on PYTHONPATH for every process started
    from now on (servers, CLI): the whole run measures one fixed version of the code, even
    while the working tree changes."""
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    if not sha:
        raise BenchError(f"--commit {rev}: not a commit of {BENCH_DIR.parent}")
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "archive", sha, "src"], capture_output=True
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {sha} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    src = into / "src"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
    )
    return {"commit": sha, "snapshot_of": rev, "package": str(src / "otpgate")}


def measure_floor(seconds: float) -> dict[str, Any]:
    """RSA-2048 PKCS#1 v1.5 SHA-256 sign and verify on one core (this thread), ops per CPU s."""
    key = generate_private_key()
    public = key.public_key()
    body = json.dumps(
        {
            "authenticationType": "OTP",
            "authenticationRequestId": "floor-" + "0" * 24,
            "authenticationValue": "123456",
        }
    ).encode()
    content = content_to_sign("POST", VERIFY_PATH, CLIENT_ID, str(int(time.time() * 1000)), body)
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

    def rate(op: Any) -> list[float]:
        for _ in range(20):
            op()  # warm caches and OpenSSL's blinding state
        rates = []
        for _ in range(5):  # five rounds; the median shrugs off a noisy neighbour
            count = 0
            start = time.process_time()
            while True:
                for _ in range(10):
                    op()
                count += 10
                spent = time.process_time() - start
                if spent >= seconds / 5:
                    rates.append(count / spent)
                    break
        return sorted(rates)

    signature = key.sign(content, pkcs1, sha256)
    signs = rate(lambda: key.sign(content, pkcs1, sha256))
    verifies = rate(lambda: public.verify(signature, content, pkcs1, sha256))
    sign_per_s, verify_per_s = signs[len(signs) // 2], verifies[len(verifies) // 2]
    return {
        "rsa_sign_per_s": sign_per_s,
        "rsa_verify_per_s": verify_per_s,
        "cpu_per_request_s": 1.0 / sign_per_s + 1.0 / verify_per_s,
        "key_bits": key.key_size,
        "scheme": "RSA PKCS#1 v1.5 SHA-256 (cryptography/OpenSSL, as the server)",
        "rounds_sign_per_s": signs,
        "rounds_verify_per_s": verifies,
        "measured_cpu_s_each": seconds,
    }


# ---- the world: data dir, merchant, users, requests --------------------------------------


@dataclass
class InitItem:
    request: bytes
    request_id: str
    user_id: str


@dataclass
class VerifyItem:
    request: bytes
    request_id: str


@dataclass
class World:
    """One data dir and everything the benchmark created in it."""

    store: str
    workers: int
    data_dir: Path
    host: str
    port: int
    pool: SigningPool | None = None
    env: dict[str, str] = field(default_factory=dict)
    user_seq: int = 0
    request_seq: int = 0
    unsent_inits: deque[InitItem] = field(default_factory=deque)
    awaiting_code: list[InitItem] = field(default_factory=list)
    ready: deque[tuple[str, str]] = field(default_factory=deque)  # (request id, code)
    unsent_verifies: deque[VerifyItem] = field(default_factory=deque)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    runs: int = 0
    backend_patterns: list[str] = field(default_factory=list)

    def next_run(self) -> int:
        self.runs += 1
        return self.runs

    @property
    def label(self) -> str:
        return f"{self.store} {self.workers}w"

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(OTPGATE), *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise BenchError(
                f"`otpgate {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def setup(self, extra_settings: dict[str, Any], signing_key_pem: bytes) -> None:
        self.env = {**os.environ, "OTPGATE_DATA_DIR": str(self.data_dir)}
        self.data_dir.mkdir(parents=True)
        # Settings first, so that `otpgate init` already migrates the right database.
        with (self.data_dir / "config.toml").open("w") as handle:
            for name, value in {**BENCH_SETTINGS, **extra_settings}.items():
                handle.write(f"{name} = {json.dumps(value)}\n")
        self.cli("init")
        from otpgate.protocol import load_private_key

        public = public_key_pem(load_private_key(signing_key_pem).public_key())
        key_file = self.data_dir / "bench-merchant-public.pem"
        key_file.write_text(public)
        self.cli("client", "add", CLIENT_ID, "--public-key", str(key_file), "--name", "Bench Shop")

    def new_users(self, count: int) -> list[tuple[str, str]]:
        """Import ``count`` fresh users and issue each a token: [(user id, token)]."""
        first = self.user_seq
        self.user_seq += count
        ids = [f"bu-{self.tag}-{n:08d}" for n in range(first, first + count)]
        users_file = self.data_dir / "bench-users.jsonl"
        with users_file.open("w") as handle:
            for n, user_id in enumerate(ids, start=first):
                phone = f"+1415{2_000_000 + n % 7_000_000}"
                handle.write(json.dumps({"userId": user_id, "phone": phone}) + "\n")
        self.cli("user", "import", str(users_file))
        ids_file = self.data_dir / "bench-user-ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        out = self.cli("token", "issue-batch", "--client", CLIENT_ID, "--users-file", str(ids_file))
        tokens = {}
        for line in out.splitlines():
            if line.strip():
                record = json.loads(line)
                tokens[record["userId"]] = record["accessToken"]
        return [(user_id, tokens[user_id]) for user_id in ids]

    def _request_id(self, kind: str) -> str:
        self.request_seq += 1
        return f"{kind}-{self.tag}-{self.request_seq:08d}-{uuid.uuid4().hex[:12]}"

    def take_inits(self, count: int) -> list[InitItem]:
        """``count`` signed init requests: left-overs first, then new users."""
        items: list[InitItem] = []
        while self.unsent_inits and len(items) < count:
            items.append(self.unsent_inits.popleft())
        missing = count - len(items)
        if missing > 0:
            assert self.pool is not None
            users = self.new_users(missing)
            plain: list[Item] = []
            meta: list[tuple[str, str]] = []
            for user_id, token in users:
                rid = self._request_id("init")
                body = json.dumps(
                    {
                        "authenticationType": "OTP",
                        "authenticationRequestId": rid,
                        "authenticationChannelType": "SMS",
                        "userIdentityType": "WALLET_TOKEN",
                        "userIdentityValue": token,
                    }
                ).encode()
                plain.append((INIT_PATH, str(int(time.time() * 1000)), body))
                meta.append((rid, user_id))
            signed = self.pool.sign(self.host, CLIENT_ID, plain)
            items += [InitItem(r, rid, uid) for r, (rid, uid) in zip(signed, meta, strict=True)]
        return items

    def settle_inits(self, items: list[InitItem], result: dict[str, Any]) -> None:
        """Sent and answered SUCCESS: a challenge awaits its code; unsent: keep for later."""
        failed = set(result["failed_indices"])
        sent = result["sent"]
        for index, item in enumerate(items):
            if index >= sent:
                self.unsent_inits.append(item)
            elif index not in failed:
                self.awaiting_code.append(item)

    def settle_verifies(self, items: list[VerifyItem], result: dict[str, Any]) -> None:
        for item in items[result["sent"] :]:
            self.unsent_verifies.append(item)

    def collect_codes(self) -> None:
        """Read the codes of every challenge awaiting one from the local inbox."""
        if not self.awaiting_code:
            return
        limit = len(self.awaiting_code) + 1000
        messages = json.loads(self.cli("inbox", "list", "--json", "--limit", str(limit)))
        codes: dict[str, str] = {}
        for message in messages:  # newest first: keep the newest code per user
            found = _CODE.search(message["text"])
            if found and message["userId"] not in codes:
                codes[message["userId"]] = found.group(1)
        missing = [item.user_id for item in self.awaiting_code if item.user_id not in codes]
        if missing:
            raise BenchError(f"{len(missing)} codes never reached the inbox (e.g. {missing[0]})")
        for item in self.awaiting_code:
            self.ready.append((item.request_id, codes[item.user_id]))
        self.awaiting_code.clear()

    def take_verifies(self, count: int) -> list[VerifyItem]:
        """``count`` signed verify requests, each for its own challenge with its right code."""
        items: list[VerifyItem] = []
        while self.unsent_verifies and len(items) < count:
            items.append(self.unsent_verifies.popleft())
        missing = count - len(items)
        if missing > len(self.ready):
            raise BenchError("internal: not enough challenges prepared")
        plain: list[Item] = []
        ids: list[str] = []
        for _ in range(missing):
            rid, code = self.ready.popleft()
            body = json.dumps(
                {
                    "authenticationType": "OTP",
                    "authenticationRequestId": rid,
                    "authenticationValue": code,
                }
            ).encode()
            plain.append((VERIFY_PATH, str(int(time.time() * 1000)), body))
            ids.append(rid)
        if plain:
            assert self.pool is not None
            signed = self.pool.sign(self.host, CLIENT_ID, plain)
            items += [VerifyItem(r, rid) for r, rid in zip(signed, ids, strict=True)]
        return items


# ---- the server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, world: World, workers: int) -> None:
        self.world = world
        self.log_path = world.data_dir / f"serve-{world.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(OTPGATE), "serve", "--port", str(world.port), "--workers", str(workers)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=world.env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{world.port}"
        self.workers = workers

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"otpgate serve exited early:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/readyz", timeout=2) as answer,
            ):
                if answer.status == 200 and self._all_workers_up():
                    return
            time.sleep(0.1)
        raise BenchError(f"otpgate serve not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def _all_workers_up(self) -> bool:
        if self.workers == 1:
            return True
        return len(self.worker_pids()) >= self.workers

    def worker_pids(self) -> list[int]:
        """The processes that answer requests (the server itself when there is one worker)."""
        root = psutil.Process(self.process.pid)
        if self.workers == 1:
            return [root.pid]
        return [
            child.pid
            for child in root.children()
            if "resource_tracker" not in " ".join(child.cmdline())
        ]

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(psutil.Process(self.process.pid))

    def outbox_queued(self) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = re.search(r"^otpgate_outbox_queued\s+(\S+)", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def drain(self, timeout: float = 300) -> None:
        """Wait until every queued message is delivered (the inbox has every code)."""
        deadline = time.time() + timeout
        while self.outbox_queued() > 0:
            if time.time() > deadline:
                raise BenchError("the outbox did not drain")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


# ---- driving load -----------------------------------------------------------------------


def run_loadgen(
    world: World,
    server: ServerProcess,
    requests: list[bytes],
    *,
    mode: str,
    expect: str,
    concurrency: int,
    duration: float = 0.0,
    warmup: float = 0.0,
    rate: float = 0.0,
    warmup_max_requests: int = 0,
) -> dict[str, Any]:
    work = world.data_dir / "loadgen"
    work.mkdir(exist_ok=True)
    requests_file = work / "requests.pkl"
    with requests_file.open("wb") as handle:
        pickle.dump(requests, handle, protocol=pickle.HIGHEST_PROTOCOL)
    spec = {
        "mode": mode,
        "host": "127.0.0.1",
        "port": world.port,
        "requests_file": str(requests_file),
        "out_file": str(work / "result.json"),
        "timeline_file": str(work / f"timeline-{world.next_run()}-{mode}.json"),
        "expect": expect,
        "concurrency": concurrency,
        "duration": duration,
        "warmup": warmup,
        "warmup_max_requests": warmup_max_requests,
        "rate": rate,
        # Connections open this far apart (a ramp that fits well inside the warm-up).
        "connect_gap": min(0.005, warmup / (4 * concurrency)) if warmup else 0.002,
        "server_pid": server.process.pid,
        "backend_patterns": world.backend_patterns,
    }
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    budget = 120 + warmup + duration * 2 + (len(requests) / 50 if mode == "fill" else 0)
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), str(spec_file)],
        capture_output=True,
        text=True,
        timeout=budget,
    )
    if done.returncode != 0:
        raise BenchError(
            f"load generator failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n"
            f"server log:\n{server.log_tail()}"
        )
    result: dict[str, Any] = json.loads((work / "result.json").read_text())
    if result["errors"]:
        log(
            f"  WARNING {world.label} {mode}: {result['errors']} requests did not answer"
            f" as expected, e.g. {result['error_samples'][:2]}"
        )
    return result


@dataclass
class Plan:
    duration: float
    warmup: float
    concurrency: int
    open_concurrency: int
    load_fraction: float
    requests_cap: int
    cores: int
    floor_cpu: float
    quiet_wait: float = 0.0
    quiet_cores: float = 0.3


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
        - getattr(t, "steal", 0.0)
    )


def wait_for_quiet(server: ServerProcess, plan: Plan, label: str) -> None:
    """On a shared machine, wait (up to ``plan.quiet_wait`` s) until other jobs go quiet.

    "Other" is every CPU second on the machine that is neither the server's nor this
    benchmark's own (its signing pool included), sampled over one-second intervals.
    """
    if plan.quiet_wait <= 0:
        return
    me = psutil.Process()
    deadline = time.time() + plan.quiet_wait
    waited = False
    while True:
        before = (machine_busy_seconds(), server.cpu_seconds(), tree_cpu_seconds(me))
        time.sleep(1.0)
        after = (machine_busy_seconds(), server.cpu_seconds(), tree_cpu_seconds(me))
        other = (after[0] - before[0]) - (after[1] - before[1]) - (after[2] - before[2])
        if other <= plan.quiet_cores:
            if waited:
                log(f"  {label}: background load down to {other:.2f} cores; going on")
            return
        if time.time() > deadline:
            log(f"  {label}: WARNING background load still {other:.2f} cores; measuring anyway")
            return
        if not waited:
            log(f"  {label}: other jobs use {other:.2f} cores; waiting for quiet")
            waited = True


def prepared_count(plan: Plan, bound_rps: float) -> int:
    """Requests to prepare for a closed loop: enough for ``bound_rps`` over warm-up + window."""
    count = math.ceil(bound_rps * (plan.warmup + plan.duration) * 1.05) + plan.concurrency
    return min(count, plan.requests_cap) if plan.requests_cap else count


def ensure_challenges(world: World, server: ServerProcess, plan: Plan, count: int) -> None:
    """Make sure ``count`` verify requests can be built: run extra inits (untimed) if short."""
    have = len(world.unsent_verifies) + len(world.ready) + len(world.awaiting_code)
    short = count - have
    if short > 0:
        log(f"  {world.label}: {short} more challenges needed; running inits")
        items = world.take_inits(short)
        result = run_loadgen(
            world,
            server,
            [i.request for i in items],
            mode="fill",
            expect=INIT_OK,
            concurrency=plan.concurrency,
        )
        world.settle_inits(items, result)
    if world.awaiting_code:
        server.drain()
        world.collect_codes()


def summarise(
    api: str,
    store: str,
    workers: int,
    floor_cpu: float,
    closed: dict[str, Any],
    server_cpu: float,
    requests_for_cpu: int,
    open_loop: dict[str, Any] | None,
    open_cpu: float | None,
    concurrency: int,
) -> dict[str, Any]:
    cpu_per_request = server_cpu / requests_for_cpu if requests_for_cpu else 0.0
    window = closed["window_s"]
    window_cpu = closed["server_cpu_end"] - closed["server_cpu_start"]
    measured = closed["window_requests"]
    entry: dict[str, Any] = {
        "api": api,
        "store": store,
        "workers": workers,
        "requests_per_s": closed["requests_per_s"],
        "p50_ms": closed["p50_ms"],
        "p99_ms": closed["p99_ms"],
        "p999_ms": closed["p999_ms"],
        "cpu_per_request_s": cpu_per_request,
        "overhead_ratio": cpu_per_request / floor_cpu if floor_cpu else 0.0,
        "p99_at_70pct_ms": open_loop["p99_ms"] if open_loop else None,
        "requests": measured,
        "errors": closed["errors"] + (open_loop["errors"] if open_loop else 0),
        "window_s": window,
        "truncated": closed["truncated"],
        "concurrency": concurrency,
        "server_cores_busy": window_cpu / window if window > 0 else 0.0,
        "server_system_cpu_share": closed["server_sys_s"] / max(1e-9, window_cpu),
        "loadgen_cpu_per_request_s": closed["loadgen_cpu_s"] / measured if measured else 0.0,
        "loadgen_cores_busy": closed["loadgen_cpu_s"] / window if window else 0.0,
        # Everything else the machine ran meanwhile (other jobs, the kernel's own threads):
        # the server and the generator compete with it for the same cores.
        "other_cores_busy": max(
            0.0,
            closed["machine_busy_cpu_s"]
            - window_cpu
            - closed["loadgen_cpu_s"]
            - closed.get("backend_cpu_s", 0.0),
        )
        / window
        if window
        else 0.0,
        "steal_cores": closed["machine_steal_cpu_s"] / window if window else 0.0,
        "latency_ms": {k: closed[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")},
        # Per worker process: keep-alive connections it held and CPU it used in the window.
        "worker_processes": closed.get("processes", []),
    }
    if closed.get("backend_cpu_s"):
        backend = closed["backend_cpu_s"] / measured if measured else 0.0
        entry["backend_cpu_per_request_s"] = backend
        entry["overhead_ratio_with_backends"] = (
            (cpu_per_request + backend) / floor_cpu if floor_cpu else 0.0
        )
    if open_loop is not None:
        done = open_loop["window_requests"]
        entry["open_loop"] = {
            "target_rate_per_s": open_loop["target_rate"],
            "answered_per_s": done / open_loop["window_s"] if open_loop["window_s"] else 0.0,
            "requests": done,
            "connections": open_loop["connections"],
            "worker_processes": open_loop.get("processes", []),
            "cpu_per_request_s": (open_cpu or 0.0) / done if done else 0.0,
            **{k: open_loop[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")},
        }
    return entry


def closed_then_open(
    api: str,
    world: World,
    server: ServerProcess,
    plan: Plan,
    bound_rps: float,
    profiler: Profiler | None,
) -> dict[str, Any]:
    expect = INIT_OK if api == "init" else VERIFY_OK
    label = world.label

    def prepare(count: int) -> tuple[list[bytes], list[Any]]:
        if api == "init":
            inits = world.take_inits(count)
            return [i.request for i in inits], list(inits)
        ensure_challenges(world, server, plan, count)
        verifies = world.take_verifies(count)
        return [v.request for v in verifies], list(verifies)

    def settle(items: list[Any], result: dict[str, Any]) -> None:
        if api == "init":
            world.settle_inits(items, result)
        else:
            world.settle_verifies(items, result)

    count = prepared_count(plan, bound_rps)
    log(f"  {label} {api}: preparing {count} signed requests for the closed loop")
    requests, items = prepare(count)
    wait_for_quiet(server, plan, label)
    log(f"  {label} {api}: closed loop, {plan.concurrency} connections, {plan.duration:g}s")
    closed = run_loadgen(
        world,
        server,
        requests,
        mode="closed",
        expect=expect,
        concurrency=plan.concurrency,
        duration=plan.duration,
        warmup=plan.warmup,
        warmup_max_requests=max(1, len(requests) // 5),
    )
    settle(items, closed)
    requests_for_cpu = closed["window_requests"]
    window_cpu = server_cpu = closed["server_cpu_end"] - closed["server_cpu_start"]
    if api == "init":
        # Delivery of the codes is part of what an init costs: count until the outbox is empty.
        server.drain()
        server_cpu = server.cpu_seconds() - closed["server_cpu_start"]
        requests_for_cpu = closed["window_requests"] + closed["tail_requests"]
    if closed["truncated"]:
        log(f"  {label} {api}: prepared requests ran out after {closed['window_s']:.1f}s")
    log(
        f"  {label} {api}: {closed['requests_per_s']:.0f} req/s, p99 {closed['p99_ms']:.1f} ms,"
        f" server CPU {server_cpu / max(1, requests_for_cpu) * 1e3:.3f} ms/req"
        f" ({closed['server_sys_s'] / max(1e-9, window_cpu):.0%} kernel)"
    )

    open_loop = None
    open_cpu = None
    rate = closed["requests_per_s"] * plan.load_fraction
    if rate > 0:
        # + one warm-up request per pool connection (see loadgen.run_open)
        count = max(1, math.ceil(rate * plan.duration)) + plan.open_concurrency
        if plan.requests_cap:
            count = min(count, plan.requests_cap)
        log(f"  {label} {api}: preparing {count} requests for the open loop at {rate:.0f}/s")
        requests, items = prepare(count)
        wait_for_quiet(server, plan, label)
        open_loop = run_loadgen(
            world,
            server,
            requests,
            mode="open",
            expect=expect,
            concurrency=plan.open_concurrency,
            duration=plan.duration,
            rate=rate,
        )
        settle(items, open_loop)
        open_loop["target_rate"] = rate
        open_loop["connections"] = plan.open_concurrency
        open_cpu = open_loop["server_cpu_end"] - open_loop["server_cpu_start"]
        if api == "init":
            server.drain()
            open_cpu = server.cpu_seconds() - open_loop["server_cpu_start"]
        log(
            f"  {label} {api}: open loop {open_loop['window_requests']} req,"
            f" p50 {open_loop['p50_ms']:.1f} ms, p99 {open_loop['p99_ms']:.1f} ms"
        )

    if profiler is not None:
        profiler.profile(api, world, server, plan, bound_rps, prepare, settle, expect)

    return summarise(
        api,
        world.store,
        world.workers,
        plan.floor_cpu,
        closed,
        server_cpu,
        requests_for_cpu,
        open_loop,
        open_cpu,
        plan.concurrency,
    )


# ---- profiling ------------------------------------------------------------------------


class Profiler:
    """py-spy on the worker during an extra (unmeasured) closed loop: flame graph + top list."""

    def __init__(self, out_dir: Path, seconds: int, rate: int, native: bool = False) -> None:
        found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(found).exists():
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.py_spy = found
        self.out_dir = out_dir
        self.seconds = seconds
        self.rate = rate
        self.native = native
        self.outputs: dict[str, dict[str, str]] = {}

    def profile(
        self,
        api: str,
        world: World,
        server: ServerProcess,
        plan: Plan,
        bound_rps: float,
        prepare: Any,
        settle: Any,
        expect: str,
    ) -> None:
        if world.workers != 1:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"profile-{world.store}-{api}-1w"
        outputs: dict[str, str] = {}
        cpu_per_request = 0.0
        # Two recordings, one after the other: py-spy pauses the worker for each sample (exact
        # stacks; --nonblocking tears them), and two tracers cannot share one process.
        for fmt, suffix in (("raw", ".collapsed.txt"), ("flamegraph", ".svg")):
            target = self.out_dir / (stem + suffix)
            count = math.ceil(bound_rps * (self.seconds + 3) * 1.05) + plan.concurrency
            if plan.requests_cap:
                count = min(count, plan.requests_cap)
            log(f"  {world.label} {api}: py-spy {fmt} for {self.seconds:g}s -> {target}")
            requests, items = prepare(count)
            pid = server.worker_pids()[0]
            spy = subprocess.Popen(
                [
                    self.py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(self.seconds),
                    "--rate",
                    str(self.rate),
                    "--format",
                    fmt,
                    "-o",
                    str(target),
                    *(["--native"] if self.native else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            result = run_loadgen(
                world,
                server,
                requests,
                mode="closed",
                expect=expect,
                concurrency=plan.concurrency,
                duration=self.seconds + 1,
                warmup=0.5,
            )
            settle(items, result)
            if fmt == "raw" and result["window_requests"]:
                cpu = result["server_cpu_end"] - result["server_cpu_start"]
                cpu_per_request = cpu / result["window_requests"]
            _, err = spy.communicate(timeout=120)
            if spy.returncode != 0 or not target.exists():
                raise BenchError(f"py-spy failed: {err.decode(errors='replace').strip()}")
            if api == "init":
                server.drain()
            outputs["flamegraph" if fmt == "flamegraph" else "collapsed"] = str(target)
        collapsed = Path(outputs["collapsed"])
        text_file = self.out_dir / (stem + ".top.txt")
        text_file.write_text(top_list(collapsed.read_text(), api, cpu_per_request))
        outputs["top"] = str(text_file)
        self.outputs[api] = outputs
        log(f"  {world.label} {api}: top list {text_file}")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# What a sample is spent on: the frame nearest the leaf that matches decides; within one
# frame the first matching row wins. (category, file part, function or "" for any).
_CATEGORIES: list[tuple[str, str, str]] = [
    ("RSA sign (response)", "otpgate/protocol/signing.py", "Signer.sign"),
    ("RSA verify (request)", "otpgate/protocol/signing.py", "verify_signature"),
    ("signature header/base64/quote", "otpgate/protocol/signing.py", ""),
    ("signature header/base64/quote", "otpgate/protocol/headers.py", ""),
    ("Request-Time parse, response-time format", "otpgate/protocol/timeparse.py", ""),
    ("body decode/encode (msgspec)", "otpgate/protocol/messages.py", ""),
    ("SQLite store", "otpgate/store/sqlite.py", ""),
    ("PostgreSQL store", "otpgate/store/postgres.py", ""),
    ("audit hash chain", "otpgate/store/audit.py", ""),
    ("AES-GCM sealing", "otpgate/store/sealing.py", ""),
    ("OTP code, HMAC, token hash", "otpgate/core/otp.py", ""),
    ("message template", "otpgate/delivery/templates.py", ""),
    ("delivery worker", "otpgate/delivery/", ""),
    ("access log (logging)", "otpgate/server/logs.py", ""),
    ("metrics (prometheus_client)", "otpgate/server/observe.py", ""),
    ("client rate limiter (limits)", "otpgate/server/ratelimit.py", ""),
    ("client directory", "otpgate/server/directory.py", ""),
    ("service rules", "otpgate/core/", ""),
    ("API pipeline (server/api.py)", "otpgate/server/api.py", ""),
    ("app routing", "otpgate/server/app.py", ""),
    ("metrics (prometheus_client)", "prometheus_client/", ""),
    ("client rate limiter (limits)", "limits/", ""),
    ("access log (logging)", "logging/", ""),
    ("HTTP (uvicorn/httptools)", "uvicorn/", ""),
    ("HTTP (uvicorn/httptools)", "httptools", ""),
    ("event loop (asyncio/uvloop)", "asyncio/", ""),
    ("event loop (asyncio/uvloop)", "uvloop", ""),
    ("SQLite store", "sqlite", ""),
]


def _parse_collapsed(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack_text, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = []
        for raw in stack_text.split(";"):
            found = _FRAME.match(raw.strip())
            if found:
                frames.append((found.group("func"), found.group("file")))
            else:
                frames.append((raw.strip(), ""))
        stacks.append((frames, count))
    return stacks


def _category(frames: list[tuple[str, str]]) -> str:
    for func, file in reversed(frames):
        for name, path_part, function in _CATEGORIES:
            if path_part in file and (not function or func == function):
                return name
    return "other (interpreter, stdlib)"


def top_list(collapsed: str, api: str, cpu_per_request: float = 0.0, top: int = 20) -> str:
    """A text report of a py-spy raw (collapsed) profile: categories, self and total time."""
    stacks = _parse_collapsed(collapsed)
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    categories: dict[str, int] = {}
    total = 0
    side_threads = 0
    for frames, count in stacks:
        # py-spy's first frames are process/thread labels; real frames carry a file.
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        if frames[0][0] == "Thread._bootstrap":
            # Not the event loop: e.g. uvicorn's supervisor ping thread, blocked in a pipe
            # read that py-spy does not recognise as idle. It costs no CPU to speak of.
            side_threads += count
            continue
        total += count
        leaf = frames[-1]
        own_key = f"{leaf[0]} ({leaf[1]})"
        own[own_key] = own.get(own_key, 0) + count
        for key in {f"{f} ({p})" for f, p in frames}:
            inclusive[key] = inclusive.get(key, 0) + count
        cat = _category(frames)
        categories[cat] = categories.get(cat, 0) + count
    total = total or 1

    def row(count: int, what: str) -> str:
        ms = f"{count / total * cpu_per_request * 1e3:7.3f} ms" if cpu_per_request else ""
        return f"  {100 * count / total:5.1f}% {ms}  {what}"

    lines = [f"py-spy profile of one worker under closed-loop {api} load: {total} samples"]
    if side_threads:
        lines.append(f"({side_threads} samples of other threads left out, see the code)")
    if cpu_per_request:
        lines.append(
            f"server CPU per request in this run: {cpu_per_request * 1e3:.3f} ms"
            " (ms columns = share x that)"
        )
    lines += ["", "By category (the frame nearest the leaf that names one):"]
    lines += [row(c, n) for n, c in sorted(categories.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Top {top} functions by self time:"]
    lines += [row(c, k) for k, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines += [
        "",
        f"Top {top} functions by total (inclusive) time, without the trunk every request"
        " runs through (frames in >= 90% of samples):",
    ]
    branches = {k: c for k, c in inclusive.items() if c < 0.9 * total}
    lines += [row(c, k) for k, c in sorted(branches.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


# ---- stores ------------------------------------------------------------------------------


def _pg(sql: str) -> None:
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def preflight_postgres() -> None:
    """Fail early, with a message that says what is missing."""
    if importlib.util.find_spec("otpgate.store.postgres") is None:
        raise BenchError(
            "--store postgres: this checkout has no PostgreSQL store yet"
            " (otpgate.store.postgres is missing); run with --store sqlite"
        )
    try:
        _pg("SELECT 1")
    except Exception as exc:
        raise BenchError(
            f"--store postgres: cannot reach PostgreSQL at {PG_ADMIN_URL}: {exc}"
            " (scripts/services-up starts it)"
        ) from None
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        raise BenchError(
            f"--store postgres: cannot reach Redis at {REDIS_URL}: {exc}"
            " (scripts/services-up starts it)"
        ) from None


@dataclass
class StoreSetup:
    name: str
    settings: dict[str, Any]
    database: str | None = None

    def drop(self) -> None:
        if self.database:
            with contextlib.suppress(Exception):
                _pg(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def store_setup(store: str, workers: int) -> StoreSetup:
    if store == "sqlite":
        return StoreSetup("sqlite", {})
    database = f"otpgate_bench_{os.getpid()}_{workers}w_{uuid.uuid4().hex[:6]}"
    _pg(f'CREATE DATABASE "{database}"')
    return StoreSetup(
        "postgres",
        {
            "DATABASE_URL": f"postgresql://127.0.0.1:5432/{database}",
            "REDIS_URL": REDIS_URL,
            "REDIS_PREFIX": f"otpgate-bench-{database}",
        },
        database,
    )


# ---- the run ------------------------------------------------------------------------------


def bound_for(
    api: str, store: str, workers: int, plan: Plan, results: list[dict[str, Any]]
) -> float:
    """An upper bound on peak req/s, to size the prepared requests (never the measurement)."""
    bound = min(workers, plan.cores) / plan.floor_cpu
    for entry in results:
        same = entry["api"] == api and entry["store"] == store
        if same and entry["workers"] < workers and not entry["truncated"]:
            scaled = entry["requests_per_s"] * workers / entry["workers"] * 1.25
            bound = min(bound, scaled)
    return bound


def run_config(
    store: str,
    workers: int,
    apis: list[str],
    plan: Plan,
    work_root: Path,
    pool: SigningPool,
    key_pem: bytes,
    results: list[dict[str, Any]],
    profiler: Profiler | None,
) -> None:
    setup = store_setup(store, workers)
    port = free_port()
    world = World(store, workers, work_root / f"{store}-{workers}w", f"127.0.0.1:{port}", port)
    world.pool = pool
    if setup.database:
        # This server's PostgreSQL backends (their title names the database) and Redis.
        world.backend_patterns = [f" {setup.database} ", "redis-server"]
    server: ServerProcess | None = None
    try:
        log(f"{world.label}: setting up {world.data_dir}")
        world.setup(setup.settings, key_pem)
        server = ServerProcess(world, workers)
        server.wait_ready()
        log(f"{world.label}: otpgate serve --workers {workers} ready on port {port}")
        # init first: the challenges it creates are the ones verify answers.
        for api in sorted(apis, key=lambda a: a != "init"):
            bound = bound_for(api, store, workers, plan, results)
            entry = closed_then_open(api, world, server, plan, bound, profiler)
            entry["cpu_per_request_floor_s"] = plan.floor_cpu
            results.append(entry)
    finally:
        if server is not None:
            server.stop()
        setup.drop()


def describe_code(info: dict[str, Any]) -> str:
    if info.get("snapshot_of"):
        text = f"commit {info['commit']} (snapshot of {info['snapshot_of']})"
    elif info.get("commit") and info["package"].startswith(str(BENCH_DIR.parent)):
        text = f"commit {info['commit']}"
        if info.get("src_uncommitted_changes"):
            text += " + uncommitted changes in src/"
        if info.get("src_changed_during_run"):
            text += " (src/ CHANGED DURING THE RUN)"
    else:
        text = f"imported from {info['package']}"
    return text + (f"; {info['note']}" if info.get("note") else "")


def render_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    f = report["floor"]
    lines = [
        f"otpgate benchmark  {report['started_at']}",
        f"machine: {m['cpu_model']}, {m['usable_cpus']} CPUs ({m['virtualization']}),"
        f" {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, {m['openssl']}",
        f"otpgate: {describe_code(report['otpgate'])}",
        f"floor (1 core): RSA-2048 sign {f['rsa_sign_per_s']:.0f}/s, verify"
        f" {f['rsa_verify_per_s']:.0f}/s -> {f['cpu_per_request_s'] * 1e3:.3f} ms CPU/request",
        f"load: closed loop with {report['settings']['concurrency']} connections,"
        f" {report['settings']['duration_s']:g}s after {report['settings']['warmup_s']:g}s"
        f" warm-up; open loop at {report['settings']['load_fraction']:.0%} of peak."
        " The load generator shares the cores (see gen column).",
        "",
    ]
    header = (
        f"{'api':<7}{'store':<9}{'wrk':>4}{'req/s':>9}{'p50':>8}{'p99':>8}{'p99.9':>8}"
        f"{'p99@70%':>9}{'cpu/req':>9}{'ratio':>7}{'srv':>6}{'gen':>6}{'other':>6}{'err':>5}"
        f"  {'conns':<8}"
    )
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        p99_70 = r["p99_at_70pct_ms"]
        lines.append(
            f"{r['api']:<7}{r['store']:<9}{r['workers']:>4}{r['requests_per_s']:>9.0f}"
            f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['p999_ms']:>8.1f}"
            f"{(f'{p99_70:.1f}' if p99_70 is not None else '-'):>9}"
            f"{r['cpu_per_request_s'] * 1e3:>9.3f}{r['overhead_ratio']:>7.2f}"
            f"{r['server_cores_busy']:>6.2f}{r['loadgen_cores_busy']:>6.2f}"
            f"{r['other_cores_busy']:>6.2f}{r['errors']:>5}"
            f"  {'/'.join(str(w['connections']) for w in r['worker_processes']) or '-':<8}"
            + ("  (ran out of requests)" if r["truncated"] else "")
        )
    lines += [
        "",
        "latencies in ms; cpu/req = server CPU ms per request (all processes);"
        " ratio = cpu/req / floor; srv, gen, other = cores busy at peak (server, load"
        " generator, everything else on the machine); conns = keep-alive connections each"
        " worker process held",
    ]
    for r in report["results"]:
        if "backend_cpu_per_request_s" in r:
            lines.append(
                f"{r['api']} {r['store']} {r['workers']}w: PostgreSQL backends + Redis add"
                f" {r['backend_cpu_per_request_s'] * 1e3:.3f} ms CPU/request (ratio with them"
                f" {r['overhead_ratio_with_backends']:.2f})"
            )
    if report.get("scaling"):
        lines.append(
            "scaling 2 vs 1 worker: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in report["scaling"].items())
        )
    if report.get("targets"):
        lines.append("targets (informational, never asserted):")
        for target in report["targets"]:
            mark = "met" if target["met"] else "MISSED"
            lines.append(f"  {mark:<7}{target['what']}: {target['value']}")
    return "\n".join(lines)


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    results = report["results"]
    for r in results:
        if r["store"] != "sqlite":
            continue
        limit = 1.25 if r["api"] == "verify" else 1.35
        targets.append(
            {
                "what": f"{r['api']} {r['workers']}w overhead ratio <= {limit}",
                "value": round(r["overhead_ratio"], 2),
                "met": r["overhead_ratio"] <= limit,
            }
        )
        if r["p99_at_70pct_ms"] is not None:
            targets.append(
                {
                    "what": f"{r['api']} {r['workers']}w p99 at 70% of peak <= 20 ms",
                    "value": round(r["p99_at_70pct_ms"], 1),
                    "met": r["p99_at_70pct_ms"] <= 20,
                }
            )
    for key, ratio in report.get("scaling", {}).items():
        if key.endswith("sqlite"):
            targets.append(
                {
                    "what": f"{key} 2 workers >= 1.6x 1 worker",
                    "value": round(ratio, 2),
                    "met": ratio >= 1.6,
                }
            )
    return targets


def scaling(results: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for r in results:
        if r["workers"] != 2:
            continue
        for base in results:
            same = (base["api"], base["store"], base["workers"]) == (r["api"], r["store"], 1)
            if same and base["requests_per_s"] > 0:
                out[f"{r['api']} {r['store']}"] = r["requests_per_s"] / base["requests_per_s"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark otpgate: RSA floor, then init/verify load on 1 and 2 workers.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="measured seconds per scenario and phase (default 10)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres", "both"],
        default="sqlite",
        help="sqlite: embedded default (default); postgres: PostgreSQL + Redis"
        f" ({PG_ADMIN_URL}, fresh database per server); both",
    )
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--apis", default="init,verify", help="APIs (default init,verify)")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="closed-loop connections (default 16 per worker)"
    )
    parser.add_argument(
        "--open-connections",
        type=int,
        default=64,
        help="connection pool of the open loop (default 64)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds before each closed loop (default min(2, duration/5))",
    )
    parser.add_argument(
        "--load-fraction",
        type=float,
        default=0.7,
        help="open-loop rate as a fraction of the measured peak (default 0.7)",
    )
    parser.add_argument(
        "--requests-prep",
        type=int,
        default=0,
        metavar="N",
        help="at most N prepared requests per phase (tiny runs; default: enough for the duration)",
    )
    parser.add_argument(
        "--floor-seconds",
        type=float,
        default=None,
        help="CPU seconds for each RSA floor measurement (default min(2, d/5))",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one worker with py-spy (flame graph + top list)",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=None,
        help="py-spy recording seconds (default: --duration)",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (OpenSSL, SQLite, uvloop)",
    )
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS_DIR),
        help="where profiles go (default bench/results, git-ignored)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine, wait up to SECONDS before each measured phase for other"
        " jobs to use less than --quiet-cores (default 0: do not wait)",
    )
    parser.add_argument("--quiet-cores", type=float, default=0.3, help="see --quiet-wait")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="measure this commit's src/ (git archive to a temp dir, first on PYTHONPATH)"
        " instead of the working tree",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dirs")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not OTPGATE.exists():
        print(f"bench: {OTPGATE} not found; run `make install` first", file=sys.stderr)
        return 2
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    if set(apis) - {"init", "verify"} or not apis:
        print("bench: --apis takes init and/or verify", file=sys.stderr)
        return 2
    try:
        if "postgres" in stores:
            preflight_postgres()
        profiler = None
        if args.profile:
            profiler = Profiler(
                Path(args.results_dir),
                max(1, round(args.profile_seconds or args.duration)),
                args.profile_rate,
                args.profile_native,
            )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    work_root = Path(tempfile.mkdtemp(prefix="otpgate-bench-"))
    try:
        code = export_snapshot(args.commit, work_root / "snapshot") if args.commit else None
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        shutil.rmtree(work_root, ignore_errors=True)
        return 2
    code = code or code_under_test()
    if args.note:
        code["note"] = args.note
    machine = machine_info()
    cores = machine["usable_cpus"]
    floor_seconds = args.floor_seconds or min(2.0, max(0.3, args.duration / 5))
    log(f"measuring the RSA floor ({floor_seconds:g} CPU s per operation)")
    floor = measure_floor(floor_seconds)
    log(
        f"floor: sign {floor['rsa_sign_per_s']:.0f}/s, verify {floor['rsa_verify_per_s']:.0f}/s,"
        f" {floor['cpu_per_request_s'] * 1e3:.3f} ms CPU per request"
    )
    warmup = args.warmup if args.warmup is not None else min(2.0, args.duration / 5)
    results: list[dict[str, Any]] = []
    key = generate_private_key()
    key_pem = private_key_pem(key)
    pool = SigningPool(key_pem, processes=cores)
    status = 0
    try:
        for store in stores:
            for workers in workers_list:
                concurrency = args.concurrency or 16 * workers
                plan = Plan(
                    duration=args.duration,
                    warmup=warmup,
                    concurrency=concurrency,
                    open_concurrency=args.open_connections,
                    load_fraction=args.load_fraction,
                    requests_cap=args.requests_prep,
                    cores=cores,
                    floor_cpu=floor["cpu_per_request_s"],
                    quiet_wait=args.quiet_wait,
                    quiet_cores=args.quiet_cores,
                )
                run_config(
                    store,
                    workers,
                    apis,
                    plan,
                    work_root,
                    pool,
                    key_pem,
                    results,
                    profiler if workers == 1 and store == stores[0] else None,
                )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        pool.close()
        if args.keep:
            log(f"data dirs kept in {work_root}")
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    if status:
        return status
    if "src_fingerprint" in code:
        # Servers import src/ when they start: if it changed meanwhile, rows measured
        # different code. Say so (use --commit to measure a fixed snapshot).
        now = code_under_test()
        code["src_changed_during_run"] = now.get("src_fingerprint") != code.pop(
            "src_fingerprint"
        ) or now.get("commit") != code.get("commit")
        if code["src_changed_during_run"]:
            log("WARNING src/ changed during the run; the rows may measure different code")

    report: dict[str, Any] = {
        "started_at": started,
        "machine": machine,
        "otpgate": code,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": warmup,
            "concurrency": args.concurrency or "16 per worker",
            "open_loop_connections": args.open_connections,
            "load_fraction": args.load_fraction,
            "requests_prep": args.requests_prep,
            "quiet_wait_s": args.quiet_wait,
            "server_settings": BENCH_SETTINGS,
        },
        "floor": floor,
        "results": results,
    }
    report["scaling"] = scaling(results)
    report["targets"] = evaluate_targets(report)
    if profiler is not None:
        report["profiles"] = profiler.outputs
    print(render_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
