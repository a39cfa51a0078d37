"""Runs benchmarks in-process or in an isolated worker, and never lets one failure end the run.

Isolation: "plugins" (default) sends user plugins to a worker process; "all" also sends the
hand-written kernels (`ISOLATE=1`); "none" runs everything in-process. In-process benchmarks are
bounded by SIGALRM, which ends a hang in Python code; a hang inside native code needs the worker,
whose timeout kills the process.

A benchmark that poisons its process's CUDA context (harness.guards.cuda_context_error) costs a
worker its life; in-process, where nothing can recover the context, the benchmarks after it that
would run in-process are not run (and not recorded), and the run exits with CONTEXT_LOST_EXIT:
`make bench` then resumes it in a fresh process, which runs exactly those.

An implementation that timed out HUNG_AFTER times in a run is most likely hanging (a kernel, or
one of its autotune configs, that never ends): its remaining benchmarks are recorded as failed
without running, instead of each spending the whole timeout.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager

from harness.bench import Bench, Session
from harness.timing import FAILED_STEP, span
from harness.worker import TIMED_OUT, IsolatedRunner, WorkerFailure
from kernels import registry

ISOLATION = ("plugins", "all", "none")
CONTEXT_LOST_EXIT = 75  # the Makefile's bench target resumes the run on this exit status
HUNG_AFTER = 2


@contextmanager
def _alarm(seconds: float):
    def expire(signum, frame):
        raise TimeoutError(f"{TIMED_OUT} {seconds:g} s")

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
        self.context_lost: str | None = None  # which in-process benchmark lost it, and how
        self.timed_out: dict[tuple[str, str], list[str]] = {}  # (op, impl) -> benchmark ids

    def cannot_run(self, b: Bench) -> str | None:
        """Why `b` cannot run now (None: it can): it would run in this process, whose CUDA
        context an earlier benchmark lost."""
        if self.context_lost is None or self.isolated(b):
            return None
        return (f"not run: {self.context_lost}; a resumed run (make bench RESUME=<run-id>) "
                f"runs it in a fresh process")

    def isolated(self, b: Bench) -> bool:
        if self.isolation == "none" or b.impl in registry.disabled(b.op):
            return False
        kind = registry.get(b.op, b.impl).kind
        return kind == "plugin" or (self.isolation == "all" and kind == "hand")

    def run(self, b: Bench):
        hung = self.timed_out.setdefault((b.op, b.impl), [])
        if len(hung) >= HUNG_AFTER:
            return self._failed(b, f"not run: {b.impl} timed out in {len(hung)} benchmarks of "
                                   f"this run before ({', '.join(hung)}), most likely a hang")
        start_ns = time.time_ns()
        record, timing = self._run(b)
        if record["status"] == "failed":
            _account_until_now(record, start_ns)
        if TIMED_OUT in record["reason"]:
            hung.append(b.id)
        return record, timing

    def _run(self, b: Bench):
        if not self.isolated(b):
            with _alarm(self.timeout_s):
                record, timing = self.session.run(b)
            if record.get("context_lost"):
                self.context_lost = (f"{b.id} left this process's CUDA context unusable "
                                     f"({record['context_lost']})")
            return record, timing
        if self._worker is None:
            self._worker = IsolatedRunner(self.session.settings(), self.timeout_s)
        try:
            record, timing = self._worker.run(b)
        except WorkerFailure as e:
            record, timing = self._failed(b, str(e))
        record["isolated"] = True
        return record, timing

    def _failed(self, b: Bench, reason: str):
        """The record of a benchmark that gave no record of its own."""
        record = self.session.base_record(b)
        self.session.skipped_or_impl(b, record)
        record.update(status="failed", reason=reason)
        return record, None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


def _account_until_now(record: dict, start_ns: int) -> None:
    """A failed benchmark's time from its last recorded phase (or its start) to now, as the
    phase FAILED_STEP: the step it failed in returns no phases of its own (a timeout's whole
    limit, a worker that died), and the run's time breakdown would lose it."""
    phases = record.setdefault("phases", [])
    last_ns = max([start_ns] + [p["end_ns"] for p in phases])
    phases.append(span(FAILED_STEP, last_ns))
