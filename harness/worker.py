"""Benchmarks in a separate worker process, so a kernel that hangs, kills its process or poisons
the CUDA context (an illegal memory access does, for the whole process) costs only its own record.

The worker is started once (spawn, so it owns a fresh CUDA context), imports the frameworks, says
it is ready, then serves benchmarks one at a time. A benchmark that does not answer within the
timeout gets its worker killed; a worker that dies is recorded with its exit signal; either way the
next benchmark starts a fresh worker.
"""
from __future__ import annotations

import multiprocessing as mp
import signal

STARTUP_TIMEOUT_S = 300.0  # importing torch and jax, loading plugins: not the benchmark's time


def _serve(conn, settings: dict) -> None:
    from harness.bench import Session

    session = Session(**settings)
    conn.send("ready")
    while True:
        bench = conn.recv()
        if bench is None:
            return
        conn.send(session.run(bench))


class WorkerFailure(Exception):
    pass


class IsolatedRunner:
    def __init__(self, settings: dict, timeout_s: float):
        self.settings = settings  # harness.bench.Session's: the worker's Session is the same
        self.timeout_s = timeout_s
        self.proc = None
        self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.settings), daemon=True,
                                name="kernels-bench-worker")
        self.proc.start()
        child.close()
        if not self.conn.poll(STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
            self._kill()
            raise WorkerFailure(f"worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(10)
        self.proc = None

    def run(self, bench):
        """(record, timing) from the worker; raises WorkerFailure with the reason otherwise."""
        if self.proc is None or not self.proc.is_alive():
            if self.proc is not None:
                self.restarts += 1
            self._start()
        self.conn.send(bench)
        if not self.conn.poll(self.timeout_s):
            self._kill()
            raise WorkerFailure(f"timeout: no result after {self.timeout_s:g} s; worker killed")
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join(10)
            code = self.proc.exitcode
            self.proc = None
            died = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                    else f"exit code {code}")
            raise WorkerFailure(f"worker process died ({died})") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
