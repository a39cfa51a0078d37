"""`make profile` end to end on CPU: a parsable trace per benchmark with its phase ranges, and a
run timeline with one track per implementation and the telemetry counters."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness import results, timeline, trace
from kernels import ON_CUDA
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ["pallas", "torch", "torch_compile", "triton", "xla"]
PHASES = {"setup", "cold_compile", "warmup", "timed", "trace"}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiled")
    run_dir = root / "reports" / "runs" / "prof"
    run_dir.mkdir(parents=True)
    env = {**outer_env(), "KERNELS_REPORTS": str(root / "reports"),
           "KERNELS_PROFILES": str(root / "profiles")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", "--profile",
         "--run-id=prof", "--ops=matmul", f"--impls={','.join(IMPLS)}", "--tier=smoke",
         "--dtypes=bf16", "-k", "257x131x67", f"--benchmark-json={run_dir / 'b.json'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, results.load(run_dir / "results.jsonl")


def test_every_benchmark_has_a_trace_with_its_phases(profiled):
    root, records = profiled
    assert sorted(r["impl"] for r in records) == IMPLS
    for r in records:
        path = root / r["trace_path"]
        assert path.is_file() and path.name.endswith(".json.gz"), r["trace_path"]
        events = trace.read(path)
        names = {e.get("name") for e in events}
        assert {"warmup", "rep 0", "rep 1", "rep 2"} <= names, (r["impl"], sorted(names)[:20])
        assert len(trace.rep_windows(events)) == 3
        if ON_CUDA:
            assert r["trace_device_s"] > 0, r["impl"]
        else:
            assert r["trace_device_s"] is None  # no device kernels on a CPU
        assert r["top_kernels"], r["impl"]
        assert PHASES <= {p["name"] for p in r["phases"]}
        # memory is measured for all but the interpreted kernels (Triton, Pallas on a CPU)
        measured = "memory" in {p["name"] for p in r["phases"]}
        interpreted = not ON_CUDA and r["impl"] in ("triton", "pallas")
        assert measured == (not interpreted) == (r["peak_bytes"] is not None)
    assert (root / "profiles" / "latest").resolve() == (root / "profiles" / "prof").resolve()


def test_run_timeline_has_a_track_per_implementation_and_counters(profiled):
    root, records = profiled
    run = timeline.read_run_trace(root / "profiles" / "prof" / "run.pftrace")
    for impl in IMPLS:
        slices = run["tracks"][f"matmul/{impl}"]
        bench = [s for s in slices if s["depth"] == 0]
        assert [s["name"] for s in bench] == ["257x131x67 bfloat16"]
        assert bench[0]["args"]["status"] == "ok"
        inner = {s["name"] for s in slices if s["depth"] == 1}
        assert PHASES <= inner
        for s in slices:
            assert bench[0]["start_ns"] <= s["start_ns"] <= s["end_ns"] <= bench[0]["end_ns"]
    # the GPU's counters (NVML) where there is one, else the process's
    assert ({"sm_clock_mhz", "power_w"} if ON_CUDA else {"rss_bytes", "cpu_percent"}) \
        <= set(run["counters"])
    assert all(len(v) >= 2 for v in run["counters"].values())


def test_a_resumed_runs_timeline_holds_every_call(tmp_path):
    """The second call of a run (RESUME) writes the run timeline again: with the benchmarks of
    both calls, not its own alone."""
    env = {**outer_env(), "KERNELS_REPORTS": str(tmp_path / "reports"),
           "KERNELS_PROFILES": str(tmp_path / "profiles")}
    for impls, resume in (("torch", []), ("torch,xla", ["--resume"])):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", "--profile",
             "--run-id=two", "--ops=matmul", f"--impls={impls}", "--tier=smoke",
             "--dtypes=fp32", "-k", "257x131x67", *resume],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = timeline.read_run_trace(tmp_path / "profiles" / "two" / "run.pftrace")
    assert {"matmul/torch", "matmul/xla"} <= set(run["tracks"])


def test_trace_summary_cli(profiled):
    root, records = profiled
    path = root / records[0]["trace_path"]
    proc = subprocess.run([sys.executable, "-m", "harness.trace", "summary", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert records[0]["top_kernels"][0]["name"] in proc.stdout


def test_a_run_interrupted_before_its_first_record_still_ends_cleanly(tmp_path):
    """A call cut before any benchmark finished (make gpu's profile stage at its limit) has no
    results file: it still writes its timeline (the telemetry counters) and ends as interrupted,
    not with a traceback from the session's teardown."""
    plugin = tmp_path / "interrupts.py"
    plugin.write_text(
        "from kernels import registry\n\n\n"
        "@registry.register('matmul', 'interrupts', framework='torch')\n"
        "def interrupts(a, b):\n"
        "    raise KeyboardInterrupt\n")
    env = {**outer_env(), "KERNELS_REPORTS": str(tmp_path / "reports"),
           "KERNELS_PROFILES": str(tmp_path / "profiles"), "KERNELS_PLUGINS": str(plugin)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", "--profile",
         "--run-id=cut", "--ops=matmul", "--impls=interrupts", "--isolate=none",
         "--tier=smoke", "--dtypes=fp32", "-k", "257x131x67"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "fixture was not used" not in output, output[-3000:]  # torn down at the session's end
    assert not (tmp_path / "reports" / "runs" / "cut" / "results.jsonl").exists()
    run = timeline.read_run_trace(tmp_path / "profiles" / "cut" / "run.pftrace")
    assert run["tracks"] == {} and run["counters"]
