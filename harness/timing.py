"""Device-accurate timers.

CUDA (torch, Triton and JAX on the GPU): the L2 cache is flushed before every repetition by
writing a buffer larger than it, so each repetition reads its inputs from memory as a one-off
kernel call would. torch/Triton are timed with CUDA events around the call, the repetitions queued
back to back (as triton.testing.do_bench; tests/test_gpu_timing.py checks the two agree); JAX with
perf_counter around the call and block_until_ready, which includes the host dispatch and lets
the GPU idle between repetitions (on the H100, a 1024^3 bf16 matmul read 149 us through XLA
against 10 us for cuBLAS: below about 0.5 ms the JAX figures are mostly dispatch).
CPU: perf_counter around the call. Repetitions run until a time budget is spent (at least
`min_reps`), after warmup; the median and the 20th/80th percentiles summarise them.
"""
from __future__ import annotations

import statistics
import time
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
HOST_CLOCK_METHOD = "perf_counter"  # host clock around the call, dispatch included
ESTIMATE_REPS = 5  # CUDA events: calls timed together to size the repetition count
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

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the run's own noise, used to judge changes between runs."""
        return (self.p80_s - self.p20_s) / self.median_s if self.median_s > 0 else 0.0


def sync(out: Any) -> Any:
    """Waits until `out` is computed: jax arrays (and pytrees of them) and CUDA torch tensors."""
    if isinstance(out, torch.Tensor):
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
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


def summarize(samples: list[float], method: str, phases: list[dict] | None = None) -> Timing:
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), method,
                  list(samples), phases or [])


def span(name: str, start_ns: int) -> dict:
    """A phase of a benchmark on the wall clock (epoch ns), for the run timeline."""
    return {"name": name, "start_ns": start_ns, "end_ns": time.time_ns()}


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
    start = time.perf_counter()
    sync(fn())
    while time.perf_counter() - start < policy.warmup_s:
        sync(fn())


def time_cuda_events(fn: Callable[[], Any], policy: Policy = GPU_POLICY) -> Timing:
    """As triton.testing.do_bench does: after warmup, every repetition (L2 flush, start event, the
    call, end event) is queued back to back and the host waits once at the end, so the GPU never
    idles between repetitions and runs at the clocks of sustained work. The repetition count
    comes from a short estimate, to fill the policy's time budget."""
    t0 = time.time_ns()
    _warmup(fn, policy)
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    for _ in range(ESTIMATE_REPS):
        _flush_l2()
        fn()
    last.record()
    last.synchronize()
    per_rep_s = max(first.elapsed_time(last) / 1e3 / ESTIMATE_REPS, 1e-7)
    warm = span("warmup", t0)
    reps = min(max(int(policy.budget_s / per_rep_s), policy.min_reps), policy.max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    t1 = time.time_ns()
    for start, end in zip(starts, ends):
        _flush_l2()
        start.record()
        fn()
        end.record()
    ends[-1].synchronize()
    samples = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    return summarize(samples, f"{EVENTS_METHOD}+l2_flush", [warm, span("timed", t1)])


def time_wall(fn: Callable[[], Any], policy: Policy, flush: bool) -> Timing:
    def one() -> float:
        if flush:
            _flush_l2()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sync(fn())
        return time.perf_counter() - t0

    method = f"{HOST_CLOCK_METHOD}+block_until_ready" + ("+l2_flush" if flush else "")
    return _warm_then_time(fn, policy, one, method)


def time_fn(fn: Callable[[], Any], framework: str, on_cuda: bool,
            policy: Policy | None = None) -> Timing:
    """Times a zero-argument callable with the right clock for its framework and device."""
    if on_cuda and framework == "torch":
        return time_cuda_events(fn, policy or GPU_POLICY)
    if on_cuda:
        return time_wall(fn, policy or GPU_POLICY, flush=True)
    return time_wall(fn, policy or CPU_POLICY, flush=False)
