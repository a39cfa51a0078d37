"""Profiler traces (harness/trace.py) and the run timeline (harness/timeline.py), on CPU."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import inputs, timeline, trace
from harness.cases import Case
from kernels import ON_CUDA, registry
from tests.checking import DEVICE

ROOT = Path(__file__).resolve().parents[1]
REPS = 3
CASE = Case("matmul", "trace", {"M": 32, "K": 48, "N": 40})
PHASES = ("cold_compile", "warm_compile", "warmup", "timed", "trace")


def _matmul_call(impl_name: str):
    impl = registry.get("matmul", impl_name)
    arrays = inputs.make(CASE, "float32", impl.framework, DEVICE)
    call = impl.bind(*arrays.values())
    call()  # compiled and warm, as capture() expects
    return call, impl.framework


@pytest.fixture(scope="module", params=["torch", "xla", "triton"])
def captured(request, tmp_path_factory):
    call, framework = _matmul_call(request.param)
    before = time.time_ns()
    result = trace.capture(call, framework, tmp_path_factory.mktemp("traces") / request.param,
                           reps=REPS)
    return request.param, result, before, time.time_ns()


def test_trace_holds_the_warmup_and_every_repetition(captured):
    _, result, _, _ = captured
    events = trace.read(result["trace_path"])
    names = {e.get("name") for e in events if e.get("ph") == "X"}
    assert {"warmup", *(f"rep {i}" for i in range(REPS))} <= names
    assert len(trace.rep_windows(events)) == REPS


def test_trace_file_is_named_for_its_profiler(captured):
    impl, result, _, _ = captured
    suffix = ".perfetto.json.gz" if impl == "xla" else ".json.gz"
    assert result["trace_path"].endswith(impl + suffix)
    assert result["trace_clock"] == ("profile-relative" if impl == "xla" else "epoch")


def test_trace_offset_puts_the_repetitions_on_the_epoch_clock(captured):
    _, result, before, after = captured
    windows = trace.rep_windows(trace.read(result["trace_path"]))
    for start_us, end_us in windows:
        start_ns = result["trace_offset_ns"] + start_us * 1000
        assert before <= start_ns <= start_ns + (end_us - start_us) * 1000 <= after


def test_trace_names_its_top_kernels_or_host_ops(captured):
    """On a GPU the device kernels and their time per repetition; on a CPU (no device kernels)
    the host ops stand in and there is no device time."""
    impl, result, _, _ = captured
    top = result["top_kernels"]
    assert 0 < len(top) <= 5
    kind = trace.DEVICE_KERNEL if ON_CUDA else trace.CPU_OP
    assert all(k["kind"] == kind and k["total_s"] > 0 and k["count"] > 0 for k in top)
    assert [k["total_s"] for k in top] == sorted((k["total_s"] for k in top), reverse=True)
    if ON_CUDA:
        assert result["trace_device_s"] > 0
    else:
        assert result["trace_device_s"] is None
        if impl == "torch":
            assert "aten::mm" in {k["name"] for k in top}


def test_summary_command_prints_the_top_ops(captured):
    _, result, _, _ = captured
    out = subprocess.run([sys.executable, "-m", "harness.trace", "summary", result["trace_path"]],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert f"repetitions: {REPS}" in out
    assert ("device time per repetition: n/a (no device kernels" in out) is not ON_CUDA
    assert result["top_kernels"][0]["name"] in out


def test_device_time_sums_kernels_inside_each_repetition():
    rep = lambda i, ts: {"ph": "X", "name": f"rep {i}", "cat": "user_annotation",  # noqa: E731
                         "ts": ts, "dur": 100}
    kernel = lambda ts, dur: {"ph": "X", "name": "gemm", "cat": "kernel",  # noqa: E731
                              "ts": ts, "dur": dur}
    events = [rep(0, 0), rep(1, 200), rep(2, 400), kernel(10, 5), kernel(20, 5), kernel(210, 7),
              kernel(220, 7), kernel(410, 30), kernel(150, 1000)]  # the last lies outside
    assert trace.device_time_per_rep(events) == pytest.approx(14e-6)
    assert trace.top_kernels(events, 5) == [
        {"name": "gemm", "total_s": pytest.approx(54e-6), "count": 5, "kind": trace.DEVICE_KERNEL}]


def test_jax_device_kernels_come_from_stream_lines():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "XLA Modules"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "process_name", "pid": 700, "args": {"name": "/host:CPU"}}]
    spans = [{"ph": "X", "pid": 700, "tid": 9, "name": "rep 0", "ts": 0, "dur": 100},
             {"ph": "X", "pid": 1, "tid": 1, "name": "jit_matmul", "ts": 10, "dur": 50},
             {"ph": "X", "pid": 1, "tid": 2, "name": "cutlass_gemm", "ts": 12, "dur": 40}]
    assert trace.device_time_per_rep(meta + spans) == pytest.approx(40e-6)


# ---------------------------------------------------------------- telemetry and the run trace
@pytest.fixture(scope="module")
def samples():
    """The process's counters, which the sampler reads where there is no GPU (on a GPU it
    reads NVML's)."""
    reader = timeline._reader
    timeline._reader = lambda: timeline._ProcessReader()
    try:
        sampler = timeline.Sampler()
    finally:
        timeline._reader = reader
    with sampler:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # keep a core busy so the CPU counter moves
            torch.randn(128, 128) @ torch.randn(128, 128)
    return sampler


def test_sampler_reads_process_rss_and_cpu_without_a_gpu(samples):
    assert samples.source == "process"
    by_name = {}
    for t, name, value in samples.samples:
        by_name.setdefault(name, []).append((t, value))
    assert set(by_name) == {"rss_bytes", "cpu_percent"}
    assert len(by_name["rss_bytes"]) >= 4  # ~0.3 s at one sample per 50 ms
    assert all(v > 0 for _, v in by_name["rss_bytes"])
    assert max(v for _, v in by_name["cpu_percent"]) > 0
    summary = samples.summary()
    assert summary["throttled"] is False
    assert summary["counters"]["rss_bytes"]["min"] <= summary["counters"]["rss_bytes"]["max"]


def test_sampler_reads_the_benchmark_worker_processes_too(monkeypatch):
    """Benchmarks isolated in worker processes (guards.own_processes) do their work there: a busy
    worker shows in workers_cpu_percent and workers_rss_bytes, and once it is gone they stop."""
    import subprocess
    import sys

    from harness import guards

    worker = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    monkeypatch.setattr(guards, "own_processes", {worker.pid})
    try:
        read = timeline._ProcessReader()
        read()
        time.sleep(0.3)
        busy = read()
    finally:
        worker.kill()
        worker.wait()
    assert busy["workers_rss_bytes"] > 0
    assert busy["workers_cpu_percent"] > 10  # a spinning process, sampled over 0.3 s
    assert "workers_cpu_percent" not in read() and "rss_bytes" in read()


def _record(impl: str, start_ns: int) -> dict:
    step = 10_000_000
    phases = [{"name": name, "start_ns": start_ns + i * step, "end_ns": start_ns + (i + 1) * step}
              for i, name in enumerate(PHASES)]
    return {"op": "matmul", "impl": impl, "case": "square", "dims": {"M": 64, "K": 64, "N": 64},
            "dtype": "bfloat16", "mode": "fwd", "median_s": 1.5e-5, "tflops": 0.035,
            "rel_err": 2e-3, "status": "ok", "reason": "", "trace_path": f"/t/{impl}.json.gz",
            "phases": phases}


def test_run_trace_lays_out_benchmarks_phases_and_counters(samples, tmp_path):
    t0 = samples.samples[0][0]
    records = [_record("torch", t0), _record("xla", t0 + 100_000_000),
               {"op": "matmul", "impl": "torch_flash", "status": "skipped"}]  # no phases: left out
    path = tmp_path / "run.pftrace"
    timeline.write_run_trace(path, records, samples.samples)
    back = timeline.read_run_trace(path)

    assert set(back["tracks"]) == {"matmul/torch", "matmul/xla"}
    for name, slices in back["tracks"].items():
        bench, *phases = slices
        assert (bench["name"], bench["depth"]) == ("square bfloat16", 0)
        assert [p["name"] for p in phases] == list(PHASES)
        assert all(p["depth"] == 1 for p in phases)
        assert all(bench["start_ns"] <= p["start_ns"] < p["end_ns"] <= bench["end_ns"]
                   for p in phases)
        args = bench["args"]
        assert args["impl"] == name.split("/")[1] and args["status"] == "ok"
        assert args["dims"] == {"M": 64, "K": 64, "N": 64}
        assert args["median_s"] == pytest.approx(1.5e-5) and args["dtype"] == "bfloat16"
        assert args["trace_path"].endswith(".json.gz") and "reason" not in args

    counts = {}
    for _, name, _ in samples.samples:
        counts[name] = counts.get(name, 0) + 1
    assert {n: len(v) for n, v in back["counters"].items()} == counts
    assert all(v > 0 for v in back["counters"]["rss_bytes"])


def test_run_trace_gives_each_worker_its_tracks_and_each_counter_its_unit(tmp_path):
    """Under WORKERS=N two workers' benchmarks of one implementation overlap in time: on one
    track, a slice end closes the newest open slice, so they nested wrongly (a benchmark ran on
    to the other's end). Each worker now has its own track; counters carry their units."""
    t0 = 1_800_000_000_000_000_000
    a = dict(_record("xla", t0), worker="gw0")
    b = dict(_record("xla", t0 + 25_000_000), worker="gw1", case="other")  # starts inside a
    samples = [(t0, "rss_bytes", 1e9), (t0, "sm_clock_mhz", 1980.0), (t0, "throttled", 0.0)]
    path = tmp_path / "run.pftrace"
    timeline.write_run_trace(path, [a, b], samples)
    back = timeline.read_run_trace(path)
    assert set(back["tracks"]) == {"matmul/xla gw0", "matmul/xla gw1"}
    for rec in (a, b):
        bench, *phases = back["tracks"][f"matmul/xla {rec['worker']}"]
        assert (bench["start_ns"], bench["end_ns"]) == (rec["phases"][0]["start_ns"],
                                                        rec["phases"][-1]["end_ns"])
        assert [(p["start_ns"], p["end_ns"]) for p in phases] == [
            (p["start_ns"], p["end_ns"]) for p in rec["phases"]]

    from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

    trace = pb.Trace()
    trace.ParseFromString(path.read_bytes())
    units = {p.track_descriptor.name: (p.track_descriptor.counter.unit,
                                       p.track_descriptor.counter.unit_name)
             for p in trace.packet if p.track_descriptor.HasField("counter")}
    assert units == {"rss_bytes": (pb.CounterDescriptor.UNIT_SIZE_BYTES, ""),
                     "sm_clock_mhz": (0, "MHz"), "throttled": (0, "")}


def test_summary_refuses_a_missing_file_and_the_run_timeline(tmp_path, capsys):
    """A missing file ended in a FileNotFoundError traceback, the run timeline (a protobuf
    .pftrace, which holds no kernels) in a UnicodeDecodeError; both are one-line refusals."""
    t0 = 1_800_000_000_000_000_000
    timeline.write_run_trace(tmp_path / "run.pftrace", [_record("xla", t0)],
                             [(t0, "rss_bytes", 1e9)])
    assert trace.main(["summary", str(tmp_path / "missing.json.gz")]) == 2
    assert capsys.readouterr().err == f"summary: no trace file at {tmp_path / 'missing.json.gz'}\n"
    assert trace.main(["summary", str(tmp_path / "run.pftrace")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "run.pftrace is not a Chrome/Perfetto JSON trace" in err
    assert "not a native Perfetto .pftrace" in err


def test_a_jax_traces_offset_converts_the_warmups_start_from_us_to_ns(tmp_path, monkeypatch):
    """The epoch offset is the clock read just before "warmup" opened, less the warmup's start
    in the profile (in us). On a CPU the warmup opens about 18 us into the profile, too close
    for the real capture's window to tell us from ns; here it opens 5 ms in."""
    anchor_ns = 1_800_000_000_000_000_000
    monkeypatch.setattr(trace, "run_jax_profiled", lambda run, path: anchor_ns)
    monkeypatch.setattr(trace, "read", lambda path: [
        {"ph": "X", "name": "warmup", "ts": 5000.0, "dur": 100.0, "pid": 1, "tid": 1}])
    _, offset_ns, clock = trace._capture_jax(lambda: None, tmp_path / "xla", 1, 1)
    assert clock == "profile-relative"
    assert offset_ns == anchor_ns - 5_000_000
