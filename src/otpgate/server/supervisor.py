"""``serve --workers N``: N uvicorn processes, each with its own SO_REUSEPORT listening socket.

uvicorn's own ``workers=N`` shares one listening socket between the processes, and under a
burst of new connections whichever process wakes first accepts them all: the benchmark saw
all 32 keep-alive connections land on one of two workers in 3 runs of 4, leaving a core idle.
With one SO_REUSEPORT socket per process the kernel spreads connections across them.

The supervisor forwards SIGTERM/SIGINT to the workers (each drains its in-flight requests),
restarts a worker that dies unexpectedly, and exits 0 after a drained shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("otpgate.server")

_BACKLOG = 2048  # uvicorn's default


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(_BACKLOG)
    return sock


def _check_port_free(host: str, port: int) -> None:
    """Fail clearly if anything listens on the port already.

    A plain bind (without SO_REUSEPORT) is refused even by another otpgate's SO_REUSEPORT
    sockets, so two servers can never silently share a port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def uvicorn_options() -> dict[str, Any]:
    """The uvicorn settings of every serving process (single or supervised)."""
    return {
        "factory": True,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "proxy_headers": False,  # the API never uses the client address
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }


def _worker_main(host: str, port: int) -> None:
    import uvicorn

    sock = listening_socket(host, port)
    # uvicorn re-raises the signal it handled once drained; a no-op handler absorbs it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    config = uvicorn.Config("otpgate.server.app:create_app", **uvicorn_options())
    uvicorn.Server(config).run(sockets=[sock])


def run_workers(count: int, host: str, port: int) -> int:
    """Run ``count`` serving processes until SIGTERM or SIGINT; return the exit status.

    The processes share a fresh Prometheus multiprocess directory, so a scrape of any one of
    them reports all of them; it is removed when they have stopped."""
    _check_port_free(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="otpgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(count, host, port)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(count: int, host: str, port: int) -> int:
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker_main, args=(host, port), daemon=False)
        process.start()
        return process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.is_alive() and process.pid is not None:
                _signal_quietly(process.pid, signal.SIGTERM)

    # Handlers first, so a signal during start-up is never lost; workers started after it
    # are signalled as soon as they all exist.
    workers: list[BaseProcess] = []
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers.extend(start() for _ in range(count))
    if stopping:
        stop(signal.SIGTERM, None)
    while not stopping:
        time.sleep(0.2)
        for index, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                log.warning("worker %s exited with %s; restarting", process.pid, process.exitcode)
                workers[index] = start()
    deadline = time.monotonic() + 15
    for process in workers:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)
    return 0


def _signal_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
