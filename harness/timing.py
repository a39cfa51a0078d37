"""Device-accurate timers.

CUDA: the L2 cache is flushed before every repetition by writing a buffer larger than it, so each
repetition reads its inputs from memory as a one-off kernel call would.
  torch / Triton  CUDA events around each call. The repetitions are queued in batches behind a
                  gate: a spin kernel (torch.cuda._sleep) holds the GPU while the host queues the
                  batch, so the events time the kernels and never the host's launch path (tens of
                  microseconds for a Triton launch, more than a small kernel takes). Whether the
                  gate held is checked per batch and written into the timing method.
  JAX             the device time of each call read from the JAX profiler: the span from its first
                  kernel's start to its last kernel's end on the GPU (harness.trace.device_spans),
                  and the time its kernels ran (busy_s; the method says idle_gaps where the GPU
                  sat idle between them for over a tenth of the span).
                  The host clock around dispatch and block_until_ready read 149 us for a 1024^3
                  bf16 XLA matmul on the H100, where cuBLAS takes 10 us.
Both also report `host_s`, the host time of one call (the launch or dispatch path), apart.
CPU: perf_counter around the call. Repetitions run until a time budget is spent (at least
`min_reps`), after warmup; the median and the 20th/80th percentiles summarise them.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # H100 L2 is 50 MB


@dataclass(frozen=True)
class Policy:
    warmup_s: float
    budget_s: float
    min_reps: int
    max_reps: int


GPU_POLICY = Policy(warmup_s=0.05, budget_s=0.25, min_reps=10, max_reps=500)
# How a record was timed starts with one of these (its timing_method); reports compare them.
EVENTS_METHOD = "cuda_events"  # device time between CUDA events
PROFILER_METHOD = "jax_profiler"  # device time from the JAX profiler's kernel events
HOST_CLOCK_METHOD = "perf_counter"  # host clock around the call, dispatch included
ESTIMATE_REPS = 5  # calls timed together to size the repetition count
GATE_BATCH = 25  # repetitions queued behind one gate: a few hundred launches, far inside the
#                  CUDA launch queue, which would otherwise block the host while the gate holds
GATE_MARGIN = 2.0  # the gate holds for this multiple of the host's expected time to queue a batch
GATE_MIN_S = 200e-6
GATE_TRIES = 3  # a batch whose queueing outlasted its gate is re-run with a longer gate
PROFILED_MAX_REPS = 100  # JAX repetitions per profiler session: the trace stays small
# timing_method endings saying that a GPU figure may hold host time (see the timers below)
UNGATED = "partly_ungated"  # the gate did not always hold while the host queued
NO_KERNELS = "no_kernels_in_profile"  # JAX on the host clock: its trace held no kernels
PROFILER_FAILED = "profiler_failed"  # JAX on the host clock: the profiler did not run
# JAX: over IDLE_GAP_SHARE of the median span the GPU sat idle between the call's kernels (each
# repetition starts from an idle GPU, so a kernel shorter than the host's next launch leaves a
# gap; CUDA events behind a gate never see one): busy_s is the kernels' own time
IDLE_GAPS = "idle_gaps"
IDLE_GAP_SHARE = 0.1
CAVEATS = (UNGATED, NO_KERNELS, PROFILER_FAILED, IDLE_GAPS)
# No warmup on CPU: there are no clocks to raise, the bench has just made its checked first calls,
# and one call of an interpreted kernel takes up to seconds.
CPU_POLICY = Policy(warmup_s=0.0, budget_s=0.3, min_reps=3, max_reps=200)


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int
    method: str
    samples: list[float] = field(repr=False)
    phases: list[dict] = field(default_factory=list, repr=False)  # warmup and timed spans
    host_s: float | None = None  # median host time of one call (launch / dispatch path)
    busy_s: float | None = None  # JAX profiler: median time the call's kernels ran (no gaps)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the run's own noise, used to judge changes between runs."""
        return (self.p80_s - self.p20_s) / self.median_s if self.median_s > 0 else 0.0


def timed_by(record: dict, method: str) -> bool:
    """Whether a record was timed by `method` (the first part of its timing_method)."""
    return (record.get("timing_method") or "").startswith(method)


def device_timed(records: list[dict]) -> bool:
    """Whether any of the records was timed on the device (CUDA events or the JAX profile)."""
    return any(timed_by(r, m) for r in records for m in (EVENTS_METHOD, PROFILER_METHOD))


def caveats(method: str | None) -> list[str]:
    """Flags for a record whose timing method carries a caveat, e.g. "timing:partly_ungated"."""
    parts = (method or "").split("+")
    return [f"timing:{c}" for c in CAVEATS if c in parts]


def _leaves(out: Any):
    if isinstance(out, (tuple, list)):
        for x in out:
            yield from _leaves(x)
    elif isinstance(out, dict):
        for x in out.values():
            yield from _leaves(x)
    else:
        yield out


def sync(out: Any) -> Any:
    """Waits until `out` is computed: a CUDA torch tensor or a jax array, or a tuple, list or
    dict of them (a backward's gradients). Before tuples of torch tensors were waited for, a
    backward's warmup, a loop of calls until 50 ms had passed, queued calls as fast as the host
    could launch them: 1.35 s of warmup per torch or Triton backward in the 2026-11-23 H100
    run (38 of them, 51 s; 7.5 s for one 50 ms call), against 0.06 s per forward."""
    leaves = list(_leaves(out))
    cuda = next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda), None)
    if cuda is not None:
        torch.cuda.synchronize(cuda.device)
    if all(isinstance(t, torch.Tensor) for t in leaves):
        return out
    try:
        import jax
    except ImportError:
        return out
    return jax.block_until_ready(out)


def _quantile(sorted_samples: list[float], q: float) -> float:
    i = q * (len(sorted_samples) - 1)
    lo, hi = int(i), min(int(i) + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (i - lo)


def summarize(samples: list[float], method: str, phases: list[dict] | None = None,
              host: list[float] | None = None) -> Timing:
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), method,
                  list(samples), phases or [], statistics.median(host) if host else None)


# The phase of a failed benchmark from its last recorded phase to its record (harness.runner)
FAILED_STEP = "failed_step"


def span(name: str, start_ns: int) -> dict:
    """A phase of a benchmark on the wall clock (epoch ns), for the run timeline."""
    return {"name": name, "start_ns": start_ns, "end_ns": time.time_ns()}


@contextmanager
def phase(phases: list[dict], name: str):
    """Appends the block's span to `phases` when the block ends (also when it raises)."""
    start_ns = time.time_ns()
    try:
        yield
    finally:
        phases.append(span(name, start_ns))


def _warm_then_time(fn: Callable[[], Any], policy: Policy, one: Callable[[], float],
                    method: str) -> Timing:
    t0 = time.time_ns()
    _warmup(fn, policy)
    warm = span("warmup", t0)
    t1 = time.time_ns()
    samples = _reps(policy, one)
    return summarize(samples, method, [warm, span("timed", t1)])


class _L2Flusher:
    def __init__(self):
        self.buf = None

    def __call__(self):
        if self.buf is None:
            self.buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self.buf.zero_()


_flush_l2 = _L2Flusher()


def _reps(policy: Policy, one: Callable[[], float]) -> list[float]:
    samples: list[float] = []
    spent = 0.0
    while len(samples) < policy.max_reps and (len(samples) < policy.min_reps
                                              or spent < policy.budget_s):
        dt = one()
        samples.append(dt)
        spent += dt
    return samples


def _warmup(fn: Callable[[], Any], policy: Policy) -> None:
    """Calls fn for policy.warmup_s, at least once; a policy with no warmup time makes no call."""
    if policy.warmup_s <= 0:
        return
    start = time.perf_counter()
    sync(fn())
    while time.perf_counter() - start < policy.warmup_s:
        sync(fn())


class _Gate:
    """Holds the GPU for a given time with torch.cuda._sleep, a kernel that spins for a number
    of clock cycles; cycles per second are measured once (the SM clock)."""

    CALIBRATION_CYCLES = 20_000_000  # about 10 ms at the H100's 1.98 GHz

    def __init__(self):
        self.cycles_per_s: float | None = None

    def calibrate(self) -> None:
        if self.cycles_per_s is not None:
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(self.CALIBRATION_CYCLES)
        end.record()
        end.synchronize()
        self.cycles_per_s = self.CALIBRATION_CYCLES / (start.elapsed_time(end) / 1e3)

    def hold(self, seconds: float) -> None:
        torch.cuda._sleep(int(seconds * self.cycles_per_s))


_gate = _Gate()


@dataclass
class _Batch:
    samples: list[float]  # device seconds per call
    host: list[float]  # host seconds per call
    gated: bool  # the host had queued every call before the gate opened


def _gated_batch(fn: Callable[[], Any], n: int, host_per_call_s: float) -> _Batch:
    """n repetitions (L2 flush, start event, call, end event) queued while the gate holds the
    GPU. A batch whose queueing took longer than the gate held is re-run with a longer gate: the
    GPU may have waited for the host inside a timed window."""
    _gate.calibrate()
    hold_s = max(GATE_MIN_S, GATE_MARGIN * n * host_per_call_s)
    for _ in range(GATE_TRIES):
        gate_start, gate_end, *marks = [torch.cuda.Event(enable_timing=True)
                                        for _ in range(2 + 2 * n)]
        starts, ends = marks[:n], marks[n:]
        host = []
        torch.cuda.synchronize()
        gate_start.record()
        _gate.hold(hold_s)
        gate_end.record()
        queue_start = time.perf_counter()
        for start, end in zip(starts, ends):
            _flush_l2()
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            end.record()
        queued_s = time.perf_counter() - queue_start
        ends[-1].synchronize()
        batch = _Batch([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], host,
                       queued_s < gate_start.elapsed_time(gate_end) / 1e3)
        if batch.gated:
            return batch
        hold_s = max(2 * hold_s, GATE_MARGIN * queued_s)
    return batch


def time_cuda_events(fn: Callable[[], Any], policy: Policy = GPU_POLICY) -> Timing:
    """After warmup, a short estimate sizes the repetition count to the policy's time budget;
    the repetitions then run in gated batches (see _gated_batch), each queued back to back as
    triton.testing.do_bench does, so the GPU runs at the clocks of sustained work. The method
    ends in "+gated" when every batch was queued before its gate opened, "+partly_ungated"
    otherwise (then small kernels may include host time, as do_bench's do)."""
    t0 = time.time_ns()
    _warmup(fn, policy)
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    queue_start = time.perf_counter()
    for _ in range(ESTIMATE_REPS):
        _flush_l2()
        fn()
    host_per_call_s = (time.perf_counter() - queue_start) / ESTIMATE_REPS
    last.record()
    last.synchronize()
    per_rep_s = max(first.elapsed_time(last) / 1e3 / ESTIMATE_REPS, 1e-7)
    warm = span("warmup", t0)
    reps = min(max(int(policy.budget_s / per_rep_s), policy.min_reps), policy.max_reps)
    t1 = time.time_ns()
    batches = []
    while (done := sum(len(b.samples) for b in batches)) < reps:
        batches.append(_gated_batch(fn, min(GATE_BATCH, reps - done), host_per_call_s))
    gated = "+gated" if all(b.gated for b in batches) else f"+{UNGATED}"
    return summarize([s for b in batches for s in b.samples], f"{EVENTS_METHOD}+l2_flush{gated}",
                     [warm, span("timed", t1)], [h for b in batches for h in b.host])


def time_jax_device(fn: Callable[[], Any], policy: Policy = GPU_POLICY) -> Timing:
    """JAX on a GPU: each repetition (L2 flush, then the call in its own "rep i" range, waited
    for) runs under the JAX profiler, and its device time is the span of its kernels in the
    trace. Falls back to the host clock, and says so in the method, when the trace holds no
    kernels for some repetition or the profiler could not run."""
    import tempfile
    from pathlib import Path

    import jax

    from harness import trace

    t0 = time.time_ns()
    _warmup(fn, policy)
    estimate = [_host_clock_rep(fn, flush=True) for _ in range(ESTIMATE_REPS)]
    warm = span("warmup", t0)
    reps = min(max(int(policy.budget_s / statistics.median(estimate)), policy.min_reps),
               policy.max_reps, PROFILED_MAX_REPS)
    host: list[float] = []

    def profiled():
        for i in range(reps):
            _flush_l2()
            torch.cuda.synchronize()
            with jax.profiler.TraceAnnotation(f"{trace.REP_PREFIX}{i}"):
                start = time.perf_counter()
                out = fn()
                host.append(time.perf_counter() - start)
                sync(out)

    t1 = time.time_ns()
    with tempfile.TemporaryDirectory(prefix="jax-timing-") as tmp:
        path = Path(tmp) / "trace.json.gz"
        try:
            trace.run_jax_profiled(profiled, path)
            events = trace.read(path)
            spans, busy, caveat = trace.device_spans(events), trace.device_busy(events), NO_KERNELS
        except TimeoutError:  # the benchmark's limit (harness.runner) ends it, here as anywhere
            raise
        except Exception:  # the profiler could not run; a failing call fails again below
            spans, caveat = [], PROFILER_FAILED
    phases = [warm, span("timed", t1)]
    if len(spans) == reps and None not in spans:
        t = summarize(spans, f"{PROFILER_METHOD}+l2_flush", phases, host)
        t.busy_s = statistics.median(busy)
        if t.busy_s < (1 - IDLE_GAP_SHARE) * t.median_s:
            t.method += f"+{IDLE_GAPS}"
        return t
    fallback = time_wall(fn, policy, flush=True)
    fallback.method += f"+{caveat}"
    return fallback


def _host_clock_rep(fn: Callable[[], Any], flush: bool) -> float:
    if flush:
        _flush_l2()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def time_wall(fn: Callable[[], Any], policy: Policy, flush: bool) -> Timing:
    method = f"{HOST_CLOCK_METHOD}+block_until_ready" + ("+l2_flush" if flush else "")
    return _warm_then_time(fn, policy, lambda: _host_clock_rep(fn, flush), method)


def time_fn(fn: Callable[[], Any], framework: str, on_cuda: bool,
            policy: Policy | None = None) -> Timing:
    """Times a zero-argument callable with the right clock for its framework and device."""
    if on_cuda and framework == "torch":
        return time_cuda_events(fn, policy or GPU_POLICY)
    if on_cuda:
        return time_jax_device(fn, policy or GPU_POLICY)
    return time_wall(fn, policy or CPU_POLICY, flush=False)
