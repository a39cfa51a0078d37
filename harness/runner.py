"""Runs benchmarks in-process or in an isolated worker, and never lets one failure end the run.

Isolation: "plugins" (default) sends user plugins to a worker process; "all" also sends the
hand-written kernels (`ISOLATE=1`); "none" runs everything in-process. In-process benchmarks are
bounded by SIGALRM, which ends a hang in Python code; a hang inside native code needs the worker,
whose timeout kills the process.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

from harness.bench import Bench, Session
from harness.worker import IsolatedRunner, WorkerFailure
from kernels import registry

ISOLATION = ("plugins", "all", "none")


@contextmanager
def _alarm(seconds: float):
    def expire(signum, frame):
        raise TimeoutError(f"timeout: no result after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    def __init__(self, session: Session, isolation: str = "plugins", timeout_s: float = 900.0):
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {list(ISOLATION)}, got {isolation!r}")
        self.session, self.isolation, self.timeout_s = session, isolation, timeout_s
        self._worker: IsolatedRunner | None = None

    def isolated(self, b: Bench) -> bool:
        if self.isolation == "none" or b.impl in registry.disabled(b.op):
            return False
        kind = registry.get(b.op, b.impl).kind
        return kind == "plugin" or (self.isolation == "all" and kind == "hand")

    def run(self, b: Bench):
        if not self.isolated(b):
            with _alarm(self.timeout_s):
                return self.session.run(b)
        if self._worker is None:
            self._worker = IsolatedRunner(self.session.settings(), self.timeout_s)
        try:
            record, timing = self._worker.run(b)
        except WorkerFailure as e:
            record = self.session.base_record(b)
            self.session.skipped_or_impl(b, record)
            record.update(status="failed", reason=str(e))
            return record, None
        record["isolated"] = True
        return record, timing

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
