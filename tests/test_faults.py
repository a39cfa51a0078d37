"""Fault isolation, nothing lost, resume, and parallel workers, end to end through the bench."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import results
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
FAULTY = ROOT / "tests" / "plugins" / "faulty.py"
EXPECTED_FAILURES = {
    "fault_raise": "RuntimeError: kernel launch failed",
    "fault_hang": "timeout: no result after",
    "fault_wrong": "wrong result: relative error",
    "fault_nan": "wrong result: output holds NaN or inf",
    "fault_tuple": "wrong result: output is a tuple of 2, expected one torch.Tensor",
    "fault_kill": "worker process died (signal SIGKILL)",
    "fault_oom": "OutOfMemoryError: CUDA out of memory",
    "fault_lost_context": "CUDA context lost after it",
}


def _bench_cmd(reports: Path, run_id: str, *args: str) -> list[str]:
    run_dir = reports / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", f"--run-id={run_id}",
            "--ops=matmul", "--tier=smoke", "--dtypes=fp32",
            f"--benchmark-json={run_dir / 'benchmark.json'}", *args]


def _env(reports: Path, plugins: str = "") -> dict:
    # TMPDIR inside the test's directory: the run killed on purpose below cannot remove its
    # compile caches, and pytest prunes its own temporary directories
    tmp = reports / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**outer_env(), "KERNELS_REPORTS": str(reports), "KERNELS_PLUGINS": plugins,
            "TMPDIR": str(tmp)}


def _keys(reports: Path, run_id: str) -> list[str]:
    return sorted(results.record_key(r) for r in
                  results.load(reports / "runs" / run_id / "results.jsonl"))


def test_every_fault_is_recorded_and_the_rest_survives(tmp_path):
    impls = ",".join(["torch", "good", *EXPECTED_FAILURES])
    proc = subprocess.run(
        _bench_cmd(tmp_path, "faults", f"--impls={impls}", "--bench-timeout=15",
                   "--retime=good", "-k", "128x128x128"),
        cwd=ROOT, env=_env(tmp_path, str(FAULTY)), capture_output=True, text=True, timeout=600)
    records = {r["impl"]: r for r in results.load(tmp_path / "runs/faults/results.jsonl")}
    assert set(records) == {"torch", "good", *EXPECTED_FAILURES}, proc.stdout[-3000:]
    for ok in ("torch", "good"):
        assert records[ok]["status"] == "ok", records[ok]["reason"]
        assert records[ok]["median_s"] > 0
    for name, reason in EXPECTED_FAILURES.items():
        assert records[name]["status"] == "failed"
        assert reason in records[name]["reason"], (name, records[name]["reason"])
    assert records["good"]["isolated"] is True  # plugins run in the worker by default
    # the worker's session has the run's settings: good is timed a second time there
    assert records["good"]["median_again_s"] > 0
    # the worker whose CUDA context was lost is retired: fault_nan, next, gets a fresh one
    assert "its worker was retired" in records["fault_lost_context"]["reason"]
    assert "context lost" not in records["fault_nan"]["reason"]
    assert proc.returncode == 1  # the failures are reported as failed tests
    # pytest-benchmark gets the device time of the ok ones only: a wrong result's time would
    # count in its comparisons (--benchmark-compare-fail) as if it were the kernel's
    timed = json.loads((tmp_path / "runs/faults/benchmark.json").read_text())["benchmarks"]
    assert sorted(b["extra_info"]["impl"] for b in timed) == ["good", "torch"]


def test_a_lost_cuda_context_in_process_is_resumed_in_a_fresh_one(tmp_path):
    """In-process (ISOLATE=0) nothing can recover a lost context: the benchmarks after it are not
    run, and `make bench` resumes the run in a fresh process until every one has a record."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "bench", f"PYTHON={sys.executable}", "OPS=matmul",
         "DTYPES=fp32", "IMPLS=fault_lost_context,good,torch", "ISOLATE=0", f"PLUGINS={FAULTY}",
         "RUN=lost", "PYTEST_ARGS=-k 128x128x128"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert "resuming run lost in a fresh process" in out, out[-3000:]
    records = results.load(tmp_path / "runs" / "lost" / "results.jsonl")
    assert [(r["impl"], r["status"]) for r in records] == [
        ("fault_lost_context", "failed"), ("good", "ok"), ("torch", "ok")]
    assert list((tmp_path / "runs" / "lost").glob("benchmark-resumed-*.json"))
    assert proc.returncode != 0  # a benchmark failed, though the last pass had no failure


def test_a_bad_filter_stops_make_bench_before_a_run_exists(tmp_path):
    """A refused filter is the one message: no report step complaining of a run with no records
    after it, and no empty run directory left behind."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "bench", f"PYTHON={sys.executable}", "OPS=matmul",
         "MODES=bwd", "RUN=refused"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ERROR: no benchmark is selected: op(s) ['matmul']" in out, out[-3000:]
    assert "results.jsonl" not in out
    assert not (tmp_path / "runs" / "refused").exists()


def test_make_gpu_refuses_a_used_run_before_its_tests(tmp_path):
    """A GPU_RUN that holds records, not resumed: refused at once, not after the test stages
    have spent minutes of a short-lived GPU machine (the bench stage would refuse it then)."""
    (tmp_path / "runs" / "used").mkdir(parents=True)
    (tmp_path / "runs" / "used" / "results.jsonl").write_text('{"op": "matmul"}\n')
    proc = subprocess.run(
        ["make", "--no-print-directory", "gpu", f"OUT={tmp_path / 'out'}", "GPU_RUN=used",
         f"GPU_PY={sys.executable}"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "GPU_RUN=used already holds records: RESUME=used continues it" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("status, expected", [
    (pytest.ExitCode.OK, 75), (pytest.ExitCode.TESTS_FAILED, 75),
    (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERRUPTED),
    (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.INTERNAL_ERROR)])
def test_a_run_that_lost_its_context_resumes_unless_it_was_interrupted(status, expected):
    """CONTEXT_LOST_EXIT (75) makes `make bench` resume the run: a run that ended (its failures
    included) gets it; one interrupted (Ctrl-C, make gpu's time limit) or broken keeps its own
    status, and is not resumed (it was before)."""
    from types import SimpleNamespace

    from harness import plugin
    from harness.runner import CONTEXT_LOST_EXIT

    assert CONTEXT_LOST_EXIT == 75
    state = SimpleNamespace(runner=SimpleNamespace(context_lost="x left it unusable"))
    session = SimpleNamespace(exitstatus=status, config=SimpleNamespace(_kernels_run=state))
    plugin.pytest_sessionfinish(session, status)
    assert session.exitstatus == expected


def test_a_test_that_loses_the_cuda_context_ends_its_process(tmp_path):
    """In the test suite, a test after which the process cannot run CUDA work ends its process:
    under pytest-xdist the worker dies and a fresh one runs the rest; without xdist the session
    stops there, saying why."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["harness.plugin"]\n')
    (tmp_path / "test_gpu_like.py").write_text(
        "from harness import guards\n\n\n"
        "def test_a_poisons():\n"
        "    guards.cuda_context_error = lambda: 'AcceleratorError: simulated'\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n\n\n"
        + "".join(f"def test_after_{i}():\n    assert guards.cuda_context_error() is None\n\n\n"
                  for i in range(6)))
    env = {**outer_env(), "PYTHONPATH": str(ROOT)}
    for workers, later_passed in (("2", 6), ("0", 0)):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-n", workers, "test_gpu_like.py"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert "test_a_poisons left this process's CUDA context unusable" in out, out[-3000:]
        assert f"{later_passed} passed" in out if later_passed else "passed" not in out, out
        assert proc.returncode != 0


def test_an_implementation_that_keeps_hanging_is_not_run_again(tmp_path):
    """After two timeouts (harness.runner.HUNG_AFTER) an implementation's remaining benchmarks
    are recorded as failed without running (each would have waited out the timeout); the other
    implementation runs as usual, each time in a fresh worker whose start-up (importing the
    implementations) is not counted in its 3 s."""
    proc = subprocess.run(
        _bench_cmd(tmp_path, "hangs", "--impls=fault_hang,good", "--bench-timeout=3"),
        cwd=ROOT, env=_env(tmp_path, str(FAULTY)), capture_output=True, text=True, timeout=600)
    records = results.load(tmp_path / "runs/hangs/results.jsonl")
    hangs = [r["reason"] for r in records if r["impl"] == "fault_hang"]
    assert len(hangs) == 4, proc.stdout[-3000:]  # the four smoke cases
    # a timed-out worker returns no phases: its whole limit is the record's failed step
    for timed_out in [r for r in records if r["impl"] == "fault_hang"][:2]:
        assert timed_out["isolated"] is True
        (step,) = timed_out["phases"]
        assert step["name"] == "failed_step" and step["end_ns"] - step["start_ns"] >= 3e9
    assert all(reason.startswith("timeout: no result after 3 s") for reason in hangs[:2])
    assert all(reason.startswith("not run: fault_hang timed out in 2 benchmarks of this run "
                                 "before (matmul/128x128x128-float32/fault_hang, ")
               for reason in hangs[2:]), hangs
    assert [r["status"] for r in records if r["impl"] == "good"] == ["ok"] * 4


def test_a_worker_that_dies_starting_is_a_failure_with_its_exit_code():
    """A worker that fails before it is ready (here: a setting its Session does not take) is a
    WorkerFailure, which the runner records, not an EOFError out of the pipe."""
    from harness.bench import Bench
    from harness.cases import cases
    from harness.worker import IsolatedRunner, WorkerFailure

    runner = IsolatedRunner({"no_such_setting": 1}, timeout_s=60)
    with pytest.raises(WorkerFailure, match=r"worker failed to start \(exit code 1; "):
        runner.run(Bench("matmul", "torch", cases("matmul", "smoke")[0], "float32"))
    assert runner.proc is None


def test_a_broken_plugin_file_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import not_a_module_anywhere\n")
    proc = subprocess.run(_bench_cmd(tmp_path, "bad"), cwd=ROOT, env=_env(tmp_path, str(bad)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4
    assert "plugin(s) failed to import" in proc.stderr and "not_a_module_anywhere" in proc.stderr


def test_killed_run_resumes_to_the_same_records(tmp_path):
    impls = "--impls=torch,xla,triton"
    full = subprocess.run(_bench_cmd(tmp_path, "whole", impls), cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:]
    expected = _keys(tmp_path, "whole")
    assert len(expected) == 12

    killed = subprocess.Popen(_bench_cmd(tmp_path, "cut", impls), cwd=ROOT, env=_env(tmp_path),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    path = tmp_path / "runs" / "cut" / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not path.exists() or len(results.load(path)) < 3):
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    before = _keys(tmp_path, "cut")
    assert 3 <= len(before) < len(expected), "the kill should land mid-run"

    resumed = subprocess.run(_bench_cmd(tmp_path, "cut", impls, "--resume"), cwd=ROOT,
                             env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    after = _keys(tmp_path, "cut")
    assert after == expected  # nothing lost, nothing measured twice
    assert set(before) <= set(after)

    # resuming the complete run runs nothing, and that is not pytest's "no tests" failure
    again = subprocess.run(_bench_cmd(tmp_path, "cut", impls, "--resume"), cwd=ROOT,
                           env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "run cut already holds a record of every selected benchmark" in again.stdout
    assert _keys(tmp_path, "cut") == expected
    # the resumed call's table is the whole run's, as make summary prints it
    assert f"{len(expected)} records: {len(expected)} ok" in resumed.stdout, resumed.stdout[-3000:]

    # another call under the run's id, not resuming it, is refused: it would add a second
    # record of each benchmark (an implementation rated against itself)
    reused = subprocess.run(_bench_cmd(tmp_path, "cut", impls), cwd=ROOT, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert reused.returncode == pytest.ExitCode.USAGE_ERROR
    assert (f"run 'cut' already holds {len(expected)} records: RESUME=cut continues it"
            in reused.stderr), reused.stderr[-3000:]
    assert _keys(tmp_path, "cut") == expected


def test_two_workers_make_the_same_records_as_one(tmp_path):
    impls = "--impls=torch,xla"
    one = subprocess.run(_bench_cmd(tmp_path, "w1", impls), cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    two = subprocess.run(_bench_cmd(tmp_path, "w2", impls, "-n", "2", "--dist", "loadgroup"),
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert _keys(tmp_path, "w1") == _keys(tmp_path, "w2")
    assert len(_keys(tmp_path, "w2")) == 8


def test_workers_without_a_run_id_record_into_one_run(tmp_path):
    """pytest -n 2 without --run-id (make always passes one): the controller chooses the run and
    its workers record into it (each had made a run directory of its own, and no table)."""
    cmd = [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", "--ops=matmul",
           "--tier=smoke", "--dtypes=fp32", "--impls=torch,xla", "-k", "128x128x128", "-n", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    records = results.load(run / "results.jsonl")
    assert sorted(r["impl"] for r in records) == ["torch", "xla"]
    assert all(r["worker"] in ("gw0", "gw1") for r in records)
    assert f"records: {run / 'results.jsonl'}" in proc.stdout
    # each worker's env.json names the command that was run (a worker's own argv is execnet's)
    envs = sorted(run.glob("env-gw*.json"))
    assert envs
    for path in envs:
        env = json.loads(path.read_text())
        assert env["command"] == f"{sys.executable} -m pytest " + shlex.join(cmd[3:])


def test_each_framework_has_its_own_worker_and_jax_its_own_on_a_gpu(monkeypatch):
    """A worker serves one framework; on a GPU every JAX implementation runs in the JAX worker
    (its memory pool never shrinks, and its GPU timer is its profiler), unless isolation is
    none; off a GPU the isolation setting alone decides."""
    from harness import runner as runner_mod
    from harness.bench import Bench
    from harness.cases import cases

    case = cases("matmul", "smoke")[0]

    def placed(isolation, on_cuda):
        monkeypatch.setattr(runner_mod, "ON_CUDA", on_cuda)
        r = runner_mod.Runner(object(), isolation)
        return {i: r.worker_for(Bench("matmul", i, case, "float32"))
                for i in ("torch", "triton", "xla", "pallas")}

    assert placed("plugins", False) == dict.fromkeys(("torch", "triton", "xla", "pallas"))
    assert placed("all", False) == {"torch": None, "triton": "torch", "xla": None,
                                    "pallas": "jax"}
    assert placed("plugins", True) == {"torch": None, "triton": None, "xla": "jax",
                                       "pallas": "jax"}
    assert placed("all", True) == {"torch": None, "triton": "torch", "xla": "jax",
                                   "pallas": "jax"}
    assert set(placed("none", True).values()) == {None}


def test_a_torch_benchmark_out_of_memory_beside_the_jax_worker_runs_again_without_it(
        monkeypatch):
    """On a GPU, a torch benchmark that ran out of memory while the JAX worker (and its pool)
    lived, asking for what would fit beside its own process on an empty card, is run again once
    that worker is stopped; the record keeps the first reason and phases. No retry without a
    live JAX worker, for an allocation larger than the card less its own memory, after a lost
    CUDA context, or for another failure."""
    from harness import runner as runner_mod
    from harness.bench import Bench
    from harness.cases import cases

    monkeypatch.setattr(runner_mod, "ON_CUDA", True)

    def oom(asked_gib):
        return (f"OutOfMemoryError: CUDA out of memory. Tried to allocate {asked_gib:.2f} GiB. "
                "GPU 0 has a total capacity of 79.18 GiB of which 15.93 GiB is free. Including "
                "non-PyTorch memory, this process has 4.00 GiB memory in use. Of the allocated "
                "memory 1.50 GiB is allocated by PyTorch")

    class Session:
        def __init__(self, *outcomes):
            self.outcomes = list(outcomes)

        def run(self, b):
            reason, extra = self.outcomes.pop(0)
            return {"status": "failed" if reason else "ok", "reason": reason,
                    "phases": [{"name": "setup", "start_ns": 1, "end_ns": 2}], **extra}, None

    class Worker:
        def __init__(self, alive=True):
            self.alive, self.closed = alive, False

        def close(self):
            self.closed = True

    b = Bench("matmul", "torch", cases("matmul", "smoke")[0], "float32")
    runner, worker = runner_mod.Runner(Session((oom(16), {}), ("", {})), "plugins"), Worker()
    runner._workers["jax"] = worker
    record, _ = runner.run(b)
    assert record["status"] == "ok" and worker.closed and "jax" not in runner._workers
    assert record["retried_after"].startswith(oom(16))
    assert "JAX worker" in record["retried_after"]
    assert [p["name"] for p in record["phases"]] == ["setup", "setup"]
    for first, workers in ((oom(16), {}), (oom(16), {"jax": Worker(alive=False)}),
                           (oom(76), {"jax": Worker()}),  # over 79.18 - 4 GiB: never fits
                           ("RuntimeError: boom", {"jax": Worker()})):
        runner = runner_mod.Runner(Session((first, {}), ("", {})), "plugins")
        runner._workers.update(workers)
        record, _ = runner.run(b)
        assert record["status"] == "failed" and "retried_after" not in record, first
    # other processes' holdings may be listed before this process's own
    other = oom(77).replace("is free. ", "is free. Process 77 has 60.00 GiB memory in use. ")
    assert not runner_mod._fits_without_others(other)
    assert runner_mod._fits_without_others(other.replace("77.00 GiB", "16.00 GiB"))
    lost = runner_mod.Runner(Session((oom(16), {"context_lost": "AcceleratorError: x"}),
                                     ("", {})), "plugins")
    lost._workers["jax"] = Worker()
    assert lost.run(b)[0]["status"] == "failed"


def test_a_workers_siblings_are_the_runs_own_processes_on_the_gpu(monkeypatch):
    """A worker (one per framework) sees its sibling's CUDA context on the GPU: a child of the
    run's process like itself, not another user of the GPU (gpu_shared)."""
    import os

    from harness import guards

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert guards.ours(os.getpid()) and guards.ours(child.pid)  # this process's child
        monkeypatch.setattr(guards, "run_process", os.getppid())  # as in a worker
        assert not guards.ours(child.pid)  # a child of the worker's own: not its sibling
        assert guards.ours(os.getpid())  # a child of the run's process
        assert not guards.ours(1)
    finally:
        child.kill()
        child.wait()
