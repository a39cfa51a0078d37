"""Runs benchmarks in-process or in an isolated worker, and never lets one failure end the run.

Isolation: "plugins" (default) sends user plugins to a worker process; "all" also sends the
hand-written kernels (`ISOLATE=1`); "none" runs everything in-process. A worker serves one
framework: torch's implementations and JAX's never share one. On a GPU (unless "none") every JAX
implementation runs in the JAX worker: JAX's memory pool grows to the largest working set it
has met (up to its default cap, 75% of the card) and never gives memory back, so torch beside it
in one process ran out of memory with the card's memory held by JAX (the 2026-11-23 H100 run:
`torch_compile` attention at 16k tokens failed to allocate 16 GiB where the process held 63 GiB,
3 GiB of it torch's); and JAX's profiler (its GPU timer) never meets a torch.profiler session
in its process. The processes still share the card's memory, and the JAX worker's pool stays
after its benchmarks: a torch benchmark that runs out of GPU memory while the JAX worker lives,
asking for what would fit beside its own process's memory on an otherwise empty card, is run
again, once, after that worker is stopped (its pool freed; the next JAX benchmark starts a fresh
one, whose first benchmark of each implementation compiles cold again), and its record keeps the
first attempt's reason (`retried_after`) and phases. In-process benchmarks are bounded by
SIGALRM, which ends a hang in Python code; a hang inside native code needs the worker, whose
timeout kills the process.

A benchmark that poisons its process's CUDA context (harness.guards.cuda_context_error) costs a
worker its life; in-process, where nothing can recover the context, the benchmarks after it that
would run in-process are not run (and not recorded), and the run exits with CONTEXT_LOST_EXIT:
`make bench` then resumes it in a fresh process, which runs exactly those.

An implementation that timed out HUNG_AFTER times in a run is most likely hanging (a kernel, or
one of its autotune configs, that never ends): its remaining benchmarks are recorded as failed
without running, instead of each spending the whole timeout.
"""
from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager

from harness.bench import Bench, Session
from harness.timing import FAILED_STEP, span
from harness.worker import TIMED_OUT, IsolatedRunner, WorkerFailure
from kernels import ON_CUDA, registry

ISOLATION = ("plugins", "all", "none")
CONTEXT_LOST_EXIT = 75  # the Makefile's bench target resumes the run on this exit status
HUNG_AFTER = 2
OUT_OF_MEMORY = "out of memory"  # in torch's OutOfMemoryError ("CUDA out of memory. ...")
_GIB = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10}
# torch's OutOfMemoryError: what it asked for, the card's size, what this process held (other
# processes' holdings, "Process N has X memory in use.", may come between)
_TORCH_OOM = re.compile(r"Tried to allocate ([\d.]+) (\w+)\. GPU \d+ has a total capacity of "
                        r"([\d.]+) (\w+) of which [\d.]+ \w+ is free\..*?Including "
                        r"non-PyTorch memory, this process has ([\d.]+) (\w+) memory in use")


def _fits_without_others(reason: str) -> bool:
    """Whether the allocation torch could not make would fit beside this process's own memory
    on a card with no other process on it; True where the message does not say."""
    m = _TORCH_OOM.search(reason)
    if m is None or any(unit not in _GIB for unit in m.group(2, 4, 6)):
        return True
    asked, total, held = (float(m.group(i)) * _GIB[m.group(i + 1)] for i in (1, 3, 5))
    return asked <= total - held


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
        self._workers: dict[str, IsolatedRunner] = {}  # framework -> its worker
        self.context_lost: str | None = None  # which in-process benchmark lost it, and how
        self.timed_out: dict[tuple[str, str], list[str]] = {}  # (op, impl) -> benchmark ids

    def cannot_run(self, b: Bench) -> str | None:
        """Why `b` cannot run now (None: it can): it would run in this process, whose CUDA
        context an earlier benchmark lost."""
        if self.context_lost is None or self.worker_for(b) is not None:
            return None
        return (f"not run: {self.context_lost}; a resumed run (make bench RESUME=<run-id>) "
                f"runs it in a fresh process")

    def worker_for(self, b: Bench) -> str | None:
        """The framework whose worker process runs `b`; None: this process."""
        if self.isolation == "none" or b.impl in registry.disabled(b.op):
            return None
        impl = registry.get(b.op, b.impl)
        apart = (impl.kind == "plugin" or (self.isolation == "all" and impl.kind == "hand")
                 or (ON_CUDA and impl.framework == "jax"))
        return impl.framework if apart else None

    def run(self, b: Bench):
        hung = self.timed_out.setdefault((b.op, b.impl), [])
        if len(hung) >= HUNG_AFTER:
            return self._failed(b, f"not run: {b.impl} timed out in {len(hung)} benchmarks of "
                                   f"this run before ({', '.join(hung)}), most likely a hang")
        start_ns = time.time_ns()
        record, timing = self._run(b)
        if self._jax_pool_in_the_way(b, record):
            self._workers.pop("jax").close()
            first = record
            record, timing = self._run(b)
            record["retried_after"] = (f"{first['reason']}; run again after the JAX worker, "
                                       "whose memory pool held the GPU's memory, was stopped")
            # the first attempt's time stays in the run's breakdown
            record["phases"] = (first.get("phases") or []) + (record.get("phases") or [])
        if record["status"] == "failed":
            _account_until_now(record, start_ns)
        if TIMED_OUT in record["reason"]:
            hung.append(b.id)
        return record, timing

    def _jax_pool_in_the_way(self, b: Bench, record: dict) -> bool:
        """Whether `b`, not a JAX benchmark, ran out of GPU memory while the JAX worker lived,
        asking for what would have fit without it (a CUDA context `b` lost ends the matter)."""
        reason = record.get("reason") or ""
        worker = self._workers.get("jax")
        return (ON_CUDA and record["status"] == "failed" and worker is not None and worker.alive
                and not record.get("context_lost") and OUT_OF_MEMORY in reason.lower()
                and self.worker_for(b) != "jax" and _fits_without_others(reason))

    def _run(self, b: Bench):
        framework = self.worker_for(b)
        if framework is None:
            with _alarm(self.timeout_s):
                record, timing = self.session.run(b)
            if record.get("context_lost"):
                self.context_lost = (f"{b.id} left this process's CUDA context unusable "
                                     f"({record['context_lost']})")
            return record, timing
        if framework not in self._workers:
            self._workers[framework] = IsolatedRunner(self.session.settings(), self.timeout_s)
        try:
            record, timing = self._workers[framework].run(b)
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
        for worker in self._workers.values():
            worker.close()


def _account_until_now(record: dict, start_ns: int) -> None:
    """A failed benchmark's time from its last recorded phase (or its start) to now, as the
    phase FAILED_STEP: the step it failed in returns no phases of its own (a timeout's whole
    limit, a worker that died), and the run's time breakdown would lose it."""
    phases = record.setdefault("phases", [])
    last_ns = max([start_ns] + [p["end_ns"] for p in phases])
    phases.append(span(FAILED_STEP, last_ns))
