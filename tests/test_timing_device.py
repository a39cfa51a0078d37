"""The GPU timers' logic, run on CPU against a simulated GPU, and the device-span reading of JAX
profiler traces, checked on a trace recorded on the H100.

The simulation is a single in-order stream: work queued at host time t starts when both the host
has queued it and the stream is free. A call whose host launch path takes longer than its kernel
is exactly the case where CUDA events around the call would time the host: the gate must keep
that out of the samples and report it apart as host_s.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness import timing, trace

US = 1e-6
FLUSH_S = 90 * US
CYCLES_PER_S = 2e9


class FakeGPU:
    def __init__(self):
        self.host = 0.0  # the host clock
        self.free = 0.0  # when the stream has done everything queued so far

    def enqueue(self, seconds: float) -> float:
        start = max(self.host, self.free)
        self.free = start + seconds
        return start

    def wait(self):
        self.host = max(self.host, self.free)


@pytest.fixture
def gpu(monkeypatch):
    sim = FakeGPU()

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = sim.enqueue(0.0)

        def synchronize(self):
            sim.wait()

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    fake_cuda = SimpleNamespace(Event=Event, synchronize=sim.wait,
                                _sleep=lambda cycles: sim.enqueue(cycles / CYCLES_PER_S))
    monkeypatch.setattr(timing.torch, "cuda", fake_cuda)
    monkeypatch.setattr(timing, "_flush_l2", lambda: sim.enqueue(FLUSH_S))
    monkeypatch.setattr(timing, "_gate", timing._Gate())
    monkeypatch.setattr(timing, "sync", lambda out: sim.wait() or out)
    clock = SimpleNamespace(perf_counter=lambda: sim.host, time_ns=lambda: int(sim.host * 1e9))
    monkeypatch.setattr(timing, "time", clock)
    return sim


def kernel_call(sim: FakeGPU, host_s: float, kernel_s: float):
    def call():
        sim.host += host_s  # the launch path, on the host
        sim.enqueue(kernel_s)
    return call


POLICY = timing.Policy(warmup_s=0.0, budget_s=0.01, min_reps=10, max_reps=60)


def test_gate_keeps_the_launch_path_out_of_device_time(gpu):
    # a 10 us kernel behind a 250 us launch path: longer than the L2 flush that precedes it,
    # so without the gate each event pair would also hold ~160 us of the GPU waiting
    t = timing.time_cuda_events(kernel_call(gpu, 250 * US, 10 * US), POLICY)
    assert t.method.endswith("+gated")
    assert t.median_s == pytest.approx(10 * US)
    assert t.p80_s == pytest.approx(10 * US)
    assert t.host_s == pytest.approx(250 * US)
    assert t.reps >= POLICY.min_reps


def test_large_kernels_are_timed_as_before(gpu):
    t = timing.time_cuda_events(kernel_call(gpu, 20 * US, 2000 * US), POLICY)
    assert t.median_s == pytest.approx(2000 * US)
    assert t.method.endswith("+gated")
    assert t.reps == 10  # the 10 ms budget over ~2.1 ms per repetition, at least min_reps


def test_small_kernels_get_the_repetitions_the_budget_pays_for(gpu):
    # 10 us kernels after 90 us flushes: the 10 ms budget pays for about 100, capped at 60
    t = timing.time_cuda_events(kernel_call(gpu, 20 * US, 10 * US), POLICY)
    assert t.reps == POLICY.max_reps


def test_the_repetition_count_is_sized_on_flushed_calls(gpu):
    # a repetition is a 90 us flush and a 10 us kernel: a 3 ms budget pays for about 30 (sized
    # on unflushed calls, about 150)
    policy = timing.Policy(warmup_s=0.0, budget_s=3e-3, min_reps=10, max_reps=1000)
    t = timing.time_cuda_events(kernel_call(gpu, 20 * US, 10 * US), policy)
    assert 29 <= t.reps <= 31


def test_every_timed_call_follows_an_l2_flush_of_its_own(gpu, monkeypatch):
    """The simulated GPU has no cache to show a warm L2, so the order itself is checked."""
    flush = timing._flush_l2
    flushed, unflushed = [False], [0]

    def flushing():
        flushed[0] = True
        flush()

    def call():
        unflushed[0] += not flushed[0]
        flushed[0] = False
        gpu.host += 20 * US
        gpu.enqueue(10 * US)

    monkeypatch.setattr(timing, "_flush_l2", flushing)
    timing.time_cuda_events(call, POLICY)
    assert unflushed[0] == 0


def test_gate_grows_when_the_host_slows_down(gpu):
    # the launch path is 5 us while the repetition count is estimated, then 400 us: the first
    # gate is too short, and the batch is queued again behind a longer one
    calls = [0]

    def call():
        calls[0] += 1
        gpu.host += 5 * US if calls[0] <= 7 else 400 * US
        gpu.enqueue(10 * US)

    t = timing.time_cuda_events(call, timing.Policy(0.0, 0.0, 10, 10))
    assert t.method.endswith("+gated")
    assert t.median_s == pytest.approx(10 * US)


def test_a_gate_that_never_holds_is_reported(gpu, monkeypatch):
    monkeypatch.setattr(timing, "GATE_MIN_S", 0.0)
    monkeypatch.setattr(timing, "GATE_MARGIN", 0.0)  # every gate holds for no time at all
    t = timing.time_cuda_events(kernel_call(gpu, 250 * US, 10 * US), timing.Policy(0, 0, 5, 5))
    assert t.method.endswith("+partly_ungated")
    assert t.median_s > 100 * US  # the host time the gate was there to hide


# ---------------------------------------------------------------- JAX device spans
H100_PALLAS_TRACE = (Path(__file__).parent.parent / "reports/baselines/nvidia-h100-80gb-hbm3/"
                     "2026-11-23/profile/traces/attention/pallas/"
                     "b4_h16_q4096_k4096_d128_causal-bfloat16.perfetto.json.gz")


def test_device_spans_of_a_jax_trace_from_the_h100():
    spans = trace.device_spans(trace.read(H100_PALLAS_TRACE))
    assert len(spans) == 3  # "rep 0" .. "rep 2"; the warmup range is not a repetition
    assert [round(s * 1e6, 1) for s in spans] == [1070.1, 1011.8, 953.4]


def _x(name, ts, dur, pid, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_device_spans_cover_first_start_to_last_end_per_repetition():
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}},
        _x("rep 0", 0, 100, 1), _x("rep 1", 200, 100, 1), _x("rep 2", 400, 100, 1),
        _x("fusion", 10, 5, 2, 7), _x("gemm", 20, 30, 2, 7),  # rep 0: 10 .. 50
        _x("gemm", 210, 40, 2, 7),  # rep 1: one kernel
        _x("flush", 150, 40, 2, 7),  # between repetitions: the L2 flush, not counted
    ]
    assert trace.device_spans(events) == [40e-6, 40e-6, None]
    assert trace.device_busy(events) == [35e-6, 40e-6, None]  # rep 0 idle from 15 to 20


def test_device_busy_counts_overlapping_kernels_once():
    events = [
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "Stream #14"}},
        _x("rep 0", 0, 100, 1),
        _x("a", 10, 30, 2, 7), _x("b", 20, 10, 2, 8),  # b inside a
        _x("c", 35, 15, 2, 8), _x("d", 60, 5, 2, 7),  # c past a's end; idle 50 .. 60
    ]
    assert trace.device_spans(events) == [55e-6]
    assert trace.device_busy(events) == [pytest.approx(45e-6)]


def test_busy_time_of_a_jax_trace_from_the_h100():
    """The baseline's Pallas attention: one kernel a repetition, no gap to see."""
    events = trace.read(H100_PALLAS_TRACE)
    assert trace.device_busy(events) == trace.device_spans(events)


# ---------------------------------------------------------------- the JAX timer's plumbing
@pytest.fixture
def jax_on_cpu(monkeypatch):
    """The JAX timer run on CPU: no L2 to flush, nothing for torch to wait for. The array is
    placed on the CPU, so the computation stays there where JAX also has a GPU."""
    monkeypatch.setattr(timing, "_flush_l2", lambda: None)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((128, 128), jnp.float32), jax.devices("cpu")[0])
    step = jax.jit(lambda a: jnp.tanh(a @ a))
    return lambda: step(x)


def test_jax_timer_reads_each_repetition_from_the_profile(jax_on_cpu, monkeypatch):
    # On a CPU the XLA ops run on host threads: let them stand in for the GPU's kernels.
    monkeypatch.setattr(trace, "device_kernels", trace._cpu_ops)
    t = timing.time_jax_device(jax_on_cpu, timing.Policy(0.0, 0.0, 7, 7))
    assert t.method == f"{timing.PROFILER_METHOD}+l2_flush"
    assert t.reps == 7 and len(t.samples) == 7 and all(s > 0 for s in t.samples)
    assert t.host_s is not None and t.host_s > 0


@pytest.mark.parametrize("busy_us, flagged", [(92.0, False), (88.0, True)])
def test_jax_timer_says_when_the_gpu_sat_idle_between_kernels(jax_on_cpu, monkeypatch, busy_us,
                                                             flagged):
    """A span of 100 us whose kernels ran 88 us: over a tenth of it idle, so the method says so
    and the record keeps the kernels' time; 92 us is not flagged."""
    monkeypatch.setattr(trace, "device_spans", lambda events: [100e-6] * 5)
    monkeypatch.setattr(trace, "device_busy", lambda events: [busy_us * 1e-6] * 5)
    t = timing.time_jax_device(jax_on_cpu, timing.Policy(0.0, 0.0, 5, 5))
    assert t.median_s == pytest.approx(100e-6) and t.busy_s == pytest.approx(busy_us * 1e-6)
    assert t.method.endswith("+idle_gaps") is flagged
    assert timing.caveats(t.method) == (["timing:idle_gaps"] if flagged else [])


def test_jax_timer_falls_back_to_the_host_clock_without_kernels(jax_on_cpu):
    t = timing.time_jax_device(jax_on_cpu, timing.Policy(0.0, 0.0, 5, 5))
    assert t.method.startswith(timing.HOST_CLOCK_METHOD)
    assert t.method.endswith("+no_kernels_in_profile")
    assert t.reps == 5


def test_jax_timer_falls_back_when_the_profiler_cannot_run(jax_on_cpu, monkeypatch):
    def busy(run, dest):
        raise RuntimeError("a profiler session is already running")

    monkeypatch.setattr(trace, "run_jax_profiled", busy)
    t = timing.time_jax_device(jax_on_cpu, timing.Policy(0.0, 0.0, 5, 5))
    assert t.method.endswith("+profiler_failed") and t.reps == 5
    assert timing.caveats(t.method) == ["timing:profiler_failed"]


def test_the_benchmarks_time_limit_ends_the_jax_timer(jax_on_cpu, monkeypatch):
    """The in-process limit (harness.runner's alarm) raising TimeoutError under the profiler is
    not a profiler failure: it had been caught as one, the repetitions run again unbounded on the
    host clock and the record said ok, "+profiler_failed"."""
    def times_out(run, dest):
        raise TimeoutError("timeout: no result after 1 s")

    monkeypatch.setattr(trace, "run_jax_profiled", times_out)
    with pytest.raises(TimeoutError, match="no result after"):
        timing.time_jax_device(jax_on_cpu, timing.Policy(0.0, 0.0, 5, 5))


def test_a_failing_jax_call_still_fails(monkeypatch):
    monkeypatch.setattr(timing, "_flush_l2", lambda: None)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)
    calls = [0]

    def breaks_after_warmup():
        calls[0] += 1
        if calls[0] > 6:
            raise ValueError("the kernel broke")

    with pytest.raises(ValueError, match="the kernel broke"):
        timing.time_jax_device(breaks_after_warmup, timing.Policy(0.0, 0.0, 5, 5))


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device, for sync() to see one."""

    @property
    def is_cuda(self):
        return True


def test_sync_waits_for_a_backwards_gradients(monkeypatch):
    """A backward returns a tuple of gradients: sync() must wait for them, or a warmup loop
    queues calls as fast as the host can launch them (seconds of GPU work in the H100 run)."""
    waits = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: waits.append(device))
    grads = tuple(torch.ones(2).as_subclass(_OnCuda) for _ in range(3))
    assert timing.sync(grads) is grads and len(waits) == 1
    assert timing.sync([{"dq": grads[0]}, None]) is not None and len(waits) == 2
    assert timing.sync(grads[0]) is grads[0] and len(waits) == 3
    timing.sync((torch.ones(2), torch.ones(3)))  # CPU tensors: nothing to wait for
    assert len(waits) == 3


def test_sync_waits_for_jax_pytrees(monkeypatch):
    import jax
    import jax.numpy as jnp

    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda out: waited.append(out) or out)
    grads = (jnp.ones(2), jnp.ones(3))
    assert timing.sync(grads) is grads and waited == [grads]
