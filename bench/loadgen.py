"""The load generator: replays pre-signed HTTP/1.1 requests over keep-alive connections.

It runs in its own process (``python bench/loadgen.py SPEC.json``) so that its CPU is not the
server's, and it does as little as it can per request: the request bytes are built and signed
before it starts, and a response is parsed only as far as the status line, ``content-length``
and a byte search of the body for the expected result. No RSA, no JSON, no HTTP library.

Modes:

``closed``  C connections, each sends its next request as soon as the previous answer is in
            (peak throughput). A warm-up period comes first; the measured window then runs
            ``duration`` seconds or until the prepared requests run out.
``open``    Requests are scheduled at a fixed arrival rate, whatever the server does; latency
            is measured from the *scheduled* time, so queueing in the generator counts
            (no coordinated omission). Used for "p99 at 70 % of peak".
``fill``    Closed loop until every prepared request is sent; no measurement (set-up work).

The server's CPU is read with psutil (the supervisor and all its children) at the exact
window boundaries, together with the generator's own CPU, and everything is written as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import pickle
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

perf = time.perf_counter


def tree_cpu_times(root: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU seconds of ``root`` and every live descendant."""
    user = system = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            user += times.user
            system += times.system
    return user, system


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and every live descendant."""
    return sum(tree_cpu_times(root))


def percentiles(samples: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds."""
    if not samples:
        return {
            "p50_ms": 0.0,
            "p90_ms": 0.0,
            "p99_ms": 0.0,
            "p999_ms": 0.0,
            "max_ms": 0.0,
            "mean_ms": 0.0,
        }
    ordered = sorted(samples)
    count = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(count - 1, max(0, math.ceil(q * count) - 1))] * 1000.0

    return {
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "p999_ms": rank(0.999),
        "max_ms": ordered[-1] * 1000.0,
        "mean_ms": sum(ordered) / count * 1000.0,
    }


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight (no pipelining)."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buffer = bytearray()
        self.head_end = -1
        self.total = -1
        self.index = -1
        self.started = 0.0
        self.status_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, index: int, started: float) -> None:
        self.index = index
        self.started = started
        self.transport.write(self.gen.requests[index])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.total < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.gen.fail(self, "response without content-length")
                return
            stop = head.find(b"\r\n", at + 17)
            length = int(head[at + 17 : stop if stop > 0 else None])
            self.head_end = end + 4
            self.total = self.head_end + length
            self.status_ok = head.startswith(b"http/1.1 200")
        if len(buffer) < self.total:
            return
        body = bytes(buffer[self.head_end : self.total])
        del buffer[: self.total]
        self.total = -1
        self.gen.done(self, self.status_ok and self.gen.expect in body, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.index >= 0:
            self.gen.fail(self, f"connection lost: {exc}")


class Generator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        with open(spec["requests_file"], "rb") as handle:
            self.requests: list[bytes] = pickle.load(handle)
        self.expect = spec["expect"].encode()
        self.mode: str = spec["mode"]
        self.server = psutil.Process(spec["server_pid"]) if spec.get("server_pid") else None
        self.backend_patterns: list[str] = list(spec.get("backend_patterns") or [])
        self.per_process: dict[str, dict[int, tuple[float, int]]] = {}
        self.next_index = 0
        self.limit = len(self.requests)
        self.in_flight = 0
        self.measuring = False
        self.warming = False
        self.warmed = 0
        self.warmup_max = int(spec.get("warmup_max_requests") or 0)
        self.start_window: Any = None
        self.ramped = False
        self.warmup_over = False
        self.accepting = True
        self.latencies: list[float] = []
        self.starts: list[float] = []  # when each measured request was sent (or scheduled)
        self.window_ok = 0
        self.window_errors = 0
        self.tail = 0
        self.ok = 0
        self.errors = 0
        self.failed: list[int] = []
        self.samples: list[str] = []
        self.idle: deque[Connection] = deque()
        self.backlog: deque[tuple[int, float]] = deque()
        self.finished: asyncio.Future[None] | None = None
        self.marks: dict[str, float] = {}
        self.last_progress = perf()

    # -- bookkeeping ---------------------------------------------------------------------

    def mark(self, name: str) -> None:
        """Record wall time, server CPU and own CPU at a window boundary."""
        self.marks[name + "_wall"] = perf()
        user, system = tree_cpu_times(self.server) if self.server else (0.0, 0.0)
        self.marks[name + "_server_cpu"] = user + system
        self.marks[name + "_server_sys"] = system
        self.marks[name + "_gen_cpu"] = time.process_time()
        machine = psutil.cpu_times()
        self.marks[name + "_machine_busy"] = (
            sum(machine)
            - machine.idle
            - getattr(machine, "iowait", 0.0)
            - getattr(machine, "guest", 0.0)
            - getattr(machine, "guest_nice", 0.0)
            - getattr(machine, "steal", 0.0)
        )
        self.marks[name + "_machine_steal"] = getattr(machine, "steal", 0.0)
        if self.backend_patterns:
            self.marks[name + "_backend_cpu"] = self.backend_cpu()
        if self.server is not None:
            self.per_process[name] = self.process_view()

    def process_view(self) -> dict[int, tuple[float, int]]:
        """Per server process: (CPU seconds, established connections on the API port)."""
        assert self.server is not None
        port = int(self.spec["port"])
        view = {}
        for proc in [self.server, *self.server.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                conns = sum(
                    1
                    for c in proc.net_connections(kind="tcp")
                    if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                )
                view[proc.pid] = (times.user + times.system, conns)
        return view

    def backend_cpu(self) -> float:
        """CPU of the external services this server uses (its PostgreSQL backends, Redis)."""
        total = 0.0
        for proc in psutil.process_iter(["cmdline", "cpu_times"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            times = proc.info["cpu_times"]
            if times is not None and any(p in cmdline for p in self.backend_patterns):
                total += times.user + times.system
        return total

    def done(self, conn: Connection, ok: bool, body: bytes) -> None:
        now = perf()
        self.last_progress = now
        self.in_flight -= 1
        index = conn.index
        conn.index = -1
        if ok:
            self.ok += 1
        else:
            self.errors += 1
            self.failed.append(index)
            if len(self.samples) < 5:
                self.samples.append(body[:300].decode("utf-8", "replace"))
        if self.measuring:
            self.latencies.append(now - conn.started)
            self.starts.append(conn.started)
            if ok:
                self.window_ok += 1
            else:
                self.window_errors += 1
        elif self.warming:
            self.warmed += 1
            if self.warmup_max and self.warmed >= self.warmup_max:
                self.start_window()  # a small prepared set: warm up on a fifth of it at most
        elif "end_wall" in self.marks:
            self.tail += 1  # answered after the window: its CPU may fall after the end mark
        self.next_for(conn)

    def fail(self, conn: Connection, why: str) -> None:
        if conn.index >= 0:
            self.failed.append(conn.index)
            self.in_flight -= 1
            conn.index = -1
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(why)
        if conn.transport is not None:
            conn.transport.abort()
        self.check_finished()

    def next_for(self, conn: Connection) -> None:
        if self.mode == "open":
            if self.backlog:
                index, scheduled = self.backlog.popleft()
                self.in_flight += 1
                conn.send(index, scheduled)
            else:
                self.idle.append(conn)
                self.check_finished()
            return
        if self.accepting and self.next_index < self.limit:
            index = self.next_index
            self.next_index += 1
            self.in_flight += 1
            conn.send(index, perf())
            return
        self.check_finished()

    def check_finished(self) -> None:
        if self.in_flight == 0 and self.finished is not None and not self.finished.done():
            if self.mode == "open":
                done = self.next_index >= self.limit and not self.backlog
            else:
                done = self.next_index >= self.limit or not self.accepting
            if done:
                self.finished.set_result(None)

    # -- phases --------------------------------------------------------------------------

    async def connect(self, conns: list[Connection], count: int, gap: float, busy: bool) -> None:
        """Open ``count`` connections ``gap`` seconds apart, like clients arriving over time.

        A burst of connects is accepted by whichever worker process is waiting in accept()
        at that instant, and uvicorn's workers share one listening socket: 32 connections
        opened at once often all land on one worker, and keep-alive keeps them there. With
        ``busy`` each connection starts sending at once, so a worker that is busy answering
        leaves the next accept to another. The resulting spread is reported.
        """
        loop = asyncio.get_running_loop()
        for n in range(count):
            _, proto = await loop.create_connection(
                lambda: Connection(self), self.spec["host"], self.spec["port"]
            )
            conns.append(proto)
            if busy and self.mode == "open":
                if self.next_index < self.limit:  # one warm-up request, then idle
                    self.next_index += 1
                    self.in_flight += 1
                    proto.send(self.next_index - 1, perf())
                else:
                    self.idle.append(proto)
            elif busy:
                self.next_for(proto)
            if gap > 0 and n + 1 < count:
                await asyncio.sleep(gap)

    async def watchdog(self) -> None:
        stall = float(self.spec.get("stall_seconds", 60))
        while True:
            await asyncio.sleep(1)
            if self.in_flight and perf() - self.last_progress > stall:
                raise TimeoutError(f"no answer for {stall:.0f}s with {self.in_flight} in flight")

    async def run_closed(self, conns: list[Connection], warmup: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        measure = self.mode == "closed"

        def end_window() -> None:
            if self.measuring:
                self.measuring = False
                self.mark("end")
            self.accepting = False
            self.check_finished()

        def start_window() -> None:
            # The window opens once every connection is open, and after ``warmup`` seconds
            # or ``warmup_max_requests`` answers, whichever comes first.
            if self.warming and self.ramped:
                self.warming = False
                self.mark("start")
                self.measuring = True
                loop.call_later(duration, end_window)

        def warm_timer() -> None:
            self.warmup_over = True
            start_window()

        self.warming = measure
        self.start_window = start_window
        if measure and warmup > 0:
            loop.call_later(warmup, warm_timer)
        gap = float(self.spec.get("connect_gap", 0.005))
        await self.connect(conns, int(self.spec["concurrency"]), gap, busy=True)
        self.ramped = True
        if measure and (
            warmup <= 0 or self.warmup_over or (self.warmup_max and self.warmed >= self.warmup_max)
        ):
            start_window()
        await self.finished
        if measure and self.measuring:
            # The prepared requests ran out before the duration: the window ends here.
            self.measuring = False
            self.mark("end")
            self.marks["truncated"] = 1.0
        elif measure and "start_wall" not in self.marks:
            # Ran out during the warm-up: nothing measured. Say so rather than divide by 0.
            self.mark("start")
            self.mark("end")
            self.marks["truncated"] = 1.0

    async def run_open(self, conns: list[Connection], rate: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        # Open the pool the way the closed loop does: each new connection carries one
        # (unmeasured) request at once, so accepts spread over the worker processes.
        gap = float(self.spec.get("connect_gap", 0.005))
        await self.connect(conns, int(self.spec["concurrency"]), gap, busy=True)
        while self.in_flight:
            await asyncio.sleep(0.005)
        self.finished = loop.create_future()
        first = self.next_index
        self.limit = min(self.limit, first + max(1, int(rate * duration)))
        interval = 1.0 / rate
        self.mark("start")
        self.measuring = True
        t0 = perf()
        while self.next_index < self.limit:
            now = perf()
            due = min(self.limit, first + int((now - t0) * rate) + 1)
            while self.next_index < due:
                index = self.next_index
                scheduled = t0 + (index - first) * interval
                self.next_index += 1
                if self.idle:
                    self.in_flight += 1
                    self.idle.popleft().send(index, scheduled)
                else:
                    self.backlog.append((index, scheduled))
            delay = t0 + (self.next_index - first) * interval - perf()
            await asyncio.sleep(delay if delay > 0 else 0)
        self.check_finished()
        await self.finished
        self.measuring = False
        self.mark("end")
        self.marks["scheduled_s"] = (self.limit - first) * interval

    async def main(self) -> dict[str, Any]:
        spec = self.spec
        conns: list[Connection] = []
        dog = asyncio.ensure_future(self.watchdog())
        try:
            work: Any
            if self.mode == "open":
                work = self.run_open(conns, float(spec["rate"]), float(spec["duration"]))
            else:
                work = self.run_closed(
                    conns, float(spec.get("warmup", 0)), float(spec.get("duration", 1e9))
                )
            task = asyncio.ensure_future(work)
            done, _ = await asyncio.wait({task, dog}, return_when=asyncio.FIRST_COMPLETED)
            if dog in done:
                task.cancel()
                dog.result()
            task.result()
        finally:
            dog.cancel()
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        return self.report()

    def report(self) -> dict[str, Any]:
        marks = self.marks
        window = marks.get("end_wall", 0.0) - marks.get("start_wall", 0.0)
        measured = self.window_ok + self.window_errors
        result: dict[str, Any] = {
            "mode": self.mode,
            "prepared": len(self.requests),
            "sent": self.next_index,
            "ok": self.ok,
            "errors": self.errors,
            "failed_indices": self.failed,
            "error_samples": self.samples,
            "window_s": window,
            "window_requests": measured,
            "window_ok": self.window_ok,
            "window_errors": self.window_errors,
            "tail_requests": self.tail,
            "requests_per_s": measured / window if window > 0 else 0.0,
            "truncated": bool(marks.get("truncated")),
            "server_cpu_start": marks.get("start_server_cpu", 0.0),
            "server_cpu_end": marks.get("end_server_cpu", 0.0),
            "server_sys_s": marks.get("end_server_sys", 0.0) - marks.get("start_server_sys", 0.0),
            "loadgen_cpu_s": marks.get("end_gen_cpu", 0.0) - marks.get("start_gen_cpu", 0.0),
            "scheduled_s": marks.get("scheduled_s", 0.0),
            "backend_cpu_s": marks.get("end_backend_cpu", 0.0)
            - marks.get("start_backend_cpu", 0.0),
            # Every process on the machine, this one and the server included.
            "machine_busy_cpu_s": marks.get("end_machine_busy", 0.0)
            - marks.get("start_machine_busy", 0.0),
            "machine_steal_cpu_s": marks.get("end_machine_steal", 0.0)
            - marks.get("start_machine_steal", 0.0),
        }
        result.update(percentiles(self.latencies))
        start, end = self.per_process.get("start", {}), self.per_process.get("end", {})
        # The processes that held API connections or burned CPU in the window (the workers).
        result["processes"] = [
            {"pid": pid, "connections": start[pid][1], "cpu_s": end[pid][0] - start[pid][0]}
            for pid in sorted(start)
            if pid in end and (start[pid][1] or end[pid][0] - start[pid][0] > 0.05)
        ]
        return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    generator = Generator(spec)
    result = asyncio.run(generator.main())
    Path(spec["out_file"]).write_text(json.dumps(result))
    if spec.get("timeline_file"):
        # (seconds since the window opened, latency ms) per measured request: for finding
        # out *when* a tail happened (bench/run --keep leaves it in the data dir).
        t0 = generator.marks.get("start_wall", 0.0)
        timeline = [
            (round(s - t0, 4), round(lat * 1000, 3))
            for s, lat in zip(generator.starts, generator.latencies, strict=True)
        ]
        Path(spec["timeline_file"]).write_text(json.dumps(timeline))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
