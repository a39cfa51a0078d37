"""Benchmarks in a separate worker process, so a kernel that hangs, kills its process or poisons
the CUDA context (an illegal memory access does, for the whole process) costs only its own record.

The worker is started once (spawn, so it owns a fresh CUDA context), imports the frameworks, says
it is ready, then serves benchmarks one at a time. A benchmark that does not answer within the
timeout gets its worker killed; a worker that dies is recorded with its exit signal; a worker whose
CUDA context a benchmark poisoned (an illegal memory access raises, and the process lives on unable
to run anything on the GPU) is retired after returning that benchmark's record. Each time the next
benchmark starts a fresh worker.
"""
from __future__ import annotations

import multiprocessing as mp
import signal

from harness import guards

TIMED_OUT = "timeout: no result after"  # in the reason of a benchmark that ran out of time
STARTUP_TIMEOUT_S = 300.0  # importing torch and jax, loading plugins: not the benchmark's time


def _serve(conn, settings: dict) -> None:
    import os

    from harness import env
    from harness.bench import Session
    from kernels import registry

    guards.run_process = os.getppid()  # the run's process: the other workers are its children

    # What the first benchmark would otherwise pay inside its timeout (5 s on the 2-core CPU
    # machine): the implementations, plugins included; the versions every record carries; and
    # torch's dynamo, which torch.profiler (the memory and trace phases) imports at its first
    # use, 1.4-1.8 s.
    registry.load_builtins()
    env.versions()
    import torch._dynamo  # noqa: F401
    session = Session(**settings)
    conn.send("ready")
    while True:
        bench = conn.recv()
        if bench is None:
            return
        conn.send(session.run(bench))


class WorkerFailure(Exception):
    pass


def _ended(exitcode: int | None) -> str:
    return (f"signal {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
            else f"exit code {exitcode}")


class IsolatedRunner:
    def __init__(self, settings: dict, timeout_s: float):
        self.settings = settings  # harness.bench.Session's: the worker's Session is the same
        self.timeout_s = timeout_s
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.settings), daemon=True,
                                name="kernels-bench-worker")
        self.proc.start()
        guards.own_processes.add(self.proc.pid)
        child.close()
        answered = self.conn.poll(STARTUP_TIMEOUT_S)
        try:
            ready = answered and self.conn.recv() == "ready"
        except (EOFError, ConnectionError):  # it died before saying so
            ready = False
        if not ready:
            if answered:
                self.proc.join(10)
            code = self.proc.exitcode
            self._kill()
            raise WorkerFailure(
                f"worker did not start within {STARTUP_TIMEOUT_S:.0f} s" if code is None else
                f"worker failed to start ({_ended(code)}; its traceback is on stderr)")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(10)
            guards.own_processes.discard(self.proc.pid)
        self.proc = None

    def run(self, bench):
        """(record, timing) from the worker; raises WorkerFailure with the reason otherwise."""
        if self.proc is None or not self.proc.is_alive():
            self._kill()
            self._start()
        self.conn.send(bench)
        if not self.conn.poll(self.timeout_s):
            self._kill()
            raise WorkerFailure(f"{TIMED_OUT} {self.timeout_s:g} s; worker killed")
        try:
            record, timing = self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join(10)
            code = self.proc.exitcode
            guards.own_processes.discard(self.proc.pid)
            self.proc = None
            raise WorkerFailure(f"worker process died ({_ended(code)})") from None
        if record.get("context_lost"):
            self._kill()
            record["reason"] += "; its worker was retired, the next benchmark gets a fresh one"
        return record, timing

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
