"""pytest plugin: the options and fixtures that turn tests/bench into the benchmark run.

    pytest tests/bench --bench --ops matmul --impls triton,torch --tier smoke --dtypes bf16

Each benchmark is one test `test_bench[<op>/<case>-<dtype>[-<mode>]/<impl>]`; its record is
appended to reports/runs/<run-id>/results.jsonl as it ends, and its device-time samples are handed
to pytest-benchmark (grouped by case) so --benchmark-compare compares device time.

In any pytest run on a GPU, a test that leaves its process's CUDA context unusable (an illegal
memory access in a kernel does) ends that process, not the tests after it: see
pytest_runtest_protocol.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

from harness import cases as cases_mod
from harness import guards, results


def _pin_gpu() -> None:
    """Under pytest-xdist (WORKERS=N, -n N) each worker gets its own GPU when there are several.
    CUDA reads CUDA_VISIBLE_DEVICES once, when the driver starts, and tests/conftest.py imports
    kernels, whose torch.cuda.is_available() starts it: so this runs as the root conftest.py loads
    this plugin, before that (in pytest_configure, every worker stayed on GPU 0 while its NVML
    flags read another)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    from harness.env import gpu_count

    gpus = gpu_count()
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.removeprefix("gw")) % gpus)


_pin_gpu()


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _once(values) -> list:
    """The values in their order, each once."""
    return list(dict.fromkeys(values))


def pytest_addoption(parser):
    g = parser.getgroup("kernels", "kernel benchmarks")
    g.addoption("--bench", action="store_true", help="run the benchmarks in tests/bench")
    g.addoption("--ops", default="", help="comma-separated ops (default: all)")
    g.addoption("--impls", default="", help="comma-separated implementations (default: all)")
    g.addoption("--tier", default="smoke", help=f"one of {', '.join(cases_mod.TIERS)}")
    g.addoption("--shapes", default="",
                help="comma-separated case names, e.g. 4096x4096x1024 (matmul MxKxN), "
                     "b1_h32_q8192_k8192_d128_causal, n32_56x56x64_k3x3x64_s1_p1_d1: these "
                     "cases instead of the tier's, their ops unless --ops is given")
    g.addoption("--dtypes", default="",
                help="comma-separated dtypes, e.g. bf16,fp32 (default: all)")
    g.addoption("--modes", default="fwd", help="attention modes: fwd, bwd, fwd_bwd (default fwd)")
    g.addoption("--run-id", default="", help="run directory name under reports/runs")
    g.addoption("--profile", action="store_true",
                help="write a profiler trace per benchmark and the run timeline under profiles/")
    g.addoption("--resume", action="store_true",
                help="skip benchmarks already recorded in the run given by --run-id")
    g.addoption("--isolate", default="plugins",
                help="run in a worker process: plugins (default), all (hand-written too), none")
    g.addoption("--bench-timeout", type=float, default=900.0,
                help="seconds one benchmark may take before it is failed (default 900)")
    g.addoption("--compile-cold", default="first", choices=("each", "first"),
                help="cold compile only for the first benchmark of each implementation, dtype "
                     "and mode, the others warm (first, the default), or for every one (each)")
    g.addoption("--targets-first", action="store_true",
                help="run the benchmarks whose records the GPU targets read (harness.targets) "
                     "before the others, so a run cut short still judges every target")
    g.addoption("--retime", default="",
                help="comma-separated implementations timed a second time, after the memory "
                     "measurement, to show the harness's own noise (median_again_s)")


class Selection:
    """The validated filters; bad values are usage errors naming the valid choices."""

    def __init__(self, config):
        from kernels import registry

        # the user's own cases (ValueError for a name in no case format), each once
        self.shapes = list({c.name: c for c in map(cases_mod.parse,
                                                   _csv(config.getoption("shapes")))}.values())
        self.ops = _once(_csv(config.getoption("ops"))) or [
            op for op in registry.ops() if not self.shapes or op in {c.op for c in self.shapes}]
        self.impls = _once(_csv(config.getoption("impls")))
        self.tier = config.getoption("tier")
        # each once: a dtype named twice (fp32,float32) ran its benchmarks twice, the second
        # trace overwriting the first
        self.dtypes = _once(cases_mod.normalize_dtype(d)
                            for d in _csv(config.getoption("dtypes"))) or list(cases_mod.DTYPES)
        self.modes = _once(_csv(config.getoption("modes"))) or ["fwd"]
        bad_ops = [o for o in self.ops if o not in registry.ops()]
        if bad_ops:
            raise pytest.UsageError(f"unknown op(s) {bad_ops}; valid: {registry.ops()}")
        # first: the implementations a plugin that failed would have added are unknown below
        broken = {p: e for p, e in registry.import_errors().items()
                  if p in registry.plugin_paths()}
        if broken:
            raise pytest.UsageError("plugin(s) failed to import: " + "; ".join(
                f"{p}: {e}" for p, e in broken.items()))
        known = {n for op in self.ops for n in set(registry.impls(op)) | set(registry.disabled(op))}
        for option, names in (("", self.impls), (" to retime", _csv(config.getoption("retime")))):
            bad_impls = [i for i in names if i not in known]
            if bad_impls:
                raise pytest.UsageError(f"unknown implementation(s){option} {bad_impls}; valid "
                                        f"for {self.ops}: {sorted(known)}")
        unselected = [c.name for c in self.shapes if c.op not in self.ops]
        if unselected:
            raise pytest.UsageError(f"shape(s) {unselected} are not of the selected op(s) "
                                    f"{self.ops}")
        if self.tier not in cases_mod.TIERS:
            raise pytest.UsageError(f"unknown tier {self.tier!r}; valid: {list(cases_mod.TIERS)}")
        self.isolation = config.getoption("isolate")
        from harness.runner import ISOLATION
        if self.isolation not in ISOLATION:
            raise pytest.UsageError(f"unknown isolation {self.isolation!r}; "
                                    f"valid: {list(ISOLATION)}")
        if config.getoption("resume") and not config.getoption("run_id"):
            raise pytest.UsageError("--resume needs --run-id (make bench RESUME=<run-id>)")
        if not config.getoption("bench_timeout") > 0:  # in-process 0 had meant no limit
            raise pytest.UsageError(f"--bench-timeout (TIMEOUT) must be a number of seconds "
                                    f"> 0, got {config.getoption('bench_timeout')}")
        bad_modes = [m for m in self.modes if m not in cases_mod.ATTENTION_MODES]
        if bad_modes:
            raise pytest.UsageError(f"unknown mode(s) {bad_modes}; valid: "
                                    f"{list(cases_mod.ATTENTION_MODES)}")
        from harness.bench import plan

        # every benchmark selected, computed once: the tests are parametrized with them
        self.benchmarks = plan(self.ops, self.impls, self.tier, self.dtypes, self.modes,
                               self.shapes)
        if not self.benchmarks:
            hint = ("; only attention has a backward (matmul and conv2d: fwd)"
                    if "fwd" not in self.modes else "")
            raise pytest.UsageError(
                f"no benchmark is selected: op(s) {self.ops}, implementation(s) "
                f"{self.impls or 'all'}, mode(s) {self.modes}, shape(s) "
                f"{[c.name for c in self.shapes] or f'the tier {self.tier!r}'}{hint}")


def _selection(config) -> Selection:
    if not hasattr(config, "_kernels_selection"):
        try:
            config._kernels_selection = Selection(config)
        except ValueError as e:  # a bad dtype name or shape
            raise pytest.UsageError(str(e)) from None
    return config._kernels_selection


def pytest_configure(config):
    if config.getoption("bench"):
        _selection(config)  # bad filters are refused before anything is collected
        worker = getattr(config, "workerinput", None)
        if not config.getoption("run_id"):
            # one run for all pytest-xdist workers, chosen by the controller (each worker had
            # chosen a run, and a directory, of its own)
            config.option.run_id = worker["kernels_run_id"] if worker else results.new_run_id()
        if worker is None:
            _check_run_id(config)


def _check_run_id(config) -> None:
    """A run's records come from one call and the calls that resume it. Another call under its
    id added records of benchmarks it already held: an implementation rated against itself."""
    run_id, resume = config.getoption("run_id"), config.getoption("resume")
    held = results.load(results.run_dir(run_id) / "results.jsonl", missing_ok=True)
    if held and not resume:
        raise pytest.UsageError(f"run {run_id!r} already holds {len(held)} records: "
                                f"RESUME={run_id} continues it, another RUN starts a new run")
    if resume and not held:
        print(f"run {run_id!r} holds no records yet: starting it")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist's controller, starting a worker: the run it records into."""
    node.workerinput["kernels_run_id"] = node.config.getoption("run_id")


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    items = _selection(metafunc.config).benchmarks
    # xdist_group is to keep a case's implementations on one worker (WORKERS=N, --dist
    # loadgroup), sharing one float64 reference; pytest-xdist 3.8 does not group them under
    # pytest 9.2 (README, "Many GPUs"), where each worker computes the reference itself.
    metafunc.parametrize("bench_item", [
        pytest.param(b, id=b.id, marks=pytest.mark.xdist_group(b.group)) for b in items])


def _bench_item(item):
    """The benchmark a collected test runs, or None for a test that is not one."""
    return getattr(item, "callspec", None) and item.callspec.params.get("bench_item")


def _jax_framework(item) -> bool:
    from kernels import registry

    b = _bench_item(item)
    if b is None or b.impl in registry.disabled(b.op):
        return False
    return registry.get(b.op, b.impl).framework == "jax"


def pytest_collection_modifyitems(config, items):
    """--resume: benchmarks whose record the run already holds are deselected. --targets-first:
    the benchmarks the targets read move ahead of the others. --profile: the JAX
    implementations' benchmarks before all others (the targets' order within each part), since
    JAX's timer on a GPU is its profiler: CUDA before 13.2 (the H100 machine's 13.0) lets one
    CUPTI subscriber in at a time, and torch.profiler's (Kineto's) may hold its subscription for
    the rest of the process, where the JAX profile would see no kernels and fall back to the
    host clock. Each part keeps its own order."""
    if config.getoption("resume"):
        _deselect_recorded(config, items)
    if config.getoption("targets_first"):
        from harness import targets

        def later(item) -> bool:
            b = _bench_item(item)
            return b is None or not targets.read_by_targets(b.op, b.impl, b.case, b.dtype, b.mode)

        items.sort(key=later)  # stable
    if config.getoption("profile"):
        items.sort(key=lambda item: not _jax_framework(item))  # stable


def _deselect_recorded(config, items) -> None:
    path = results.run_dir(config.getoption("run_id")) / "results.jsonl"
    done = {results.record_key(r) for r in results.load(path, missing_ok=True)}
    keep, skip = [], []
    for item in items:
        b = _bench_item(item)
        (skip if b is not None and b.key in done else keep).append(item)
    if skip:
        config.hook.pytest_deselected(items=skip)
        items[:] = keep
    # every benchmark selected already has its record: the run is complete, not empty
    config._kernels_resumed_complete = bool(skip) and not keep


class RunState:
    """One process's part of a run: its records file, its runner, its telemetry and traces."""

    def __init__(self, config):
        from harness.bench import Session
        from harness.runner import Runner
        from harness.timeline import Sampler

        run_id = config.getoption("run_id")
        self.dir = results.start_run(run_id)
        self.path = self.dir / "results.jsonl"
        self.cache_root = tempfile.mkdtemp(prefix="kernels-compile-")
        self.profile_dir = results.start_profiles(run_id) if config.getoption("profile") else None
        self.workerinput = getattr(config, "workerinput", {})
        self.worker = self.workerinput.get("workerid")
        self.runner = Runner(Session(run_id, self.cache_root, profile_dir=self.profile_dir,
                                     retime=tuple(_csv(config.getoption("retime"))),
                                     compile_cold=config.getoption("compile_cold")),
                             _selection(config).isolation, config.getoption("bench_timeout"))
        if self.worker in (None, "gw0"):  # one process measures the roofline ceilings
            from harness import peaks

            peaks.measure_once(self.dir, Session.device_type())
        self.sampler = Sampler().start()

    def add(self, record: dict) -> None:
        if self.worker:  # benchmarks on several workers overlap in time: the timeline keeps
            record["worker"] = self.worker  # each worker's on tracks of its own
        # the timing of median_s (not a retime's, after the memory and trace steps)
        timed = [(p["start_ns"], p["end_ns"]) for p in record.get("phases") or []
                 if p["name"] == "timed"]
        if timed and self.sampler.source == "nvml":  # on a GPU: what the one reading missed
            record["flags"] = guards.with_samples(record.get("flags") or [],
                                                  self.sampler.during(timed))
        results.append(self.path, record)

    def finish(self) -> None:
        """Telemetry and command into env.json; with --profile the run timeline as well."""
        from harness import env

        self.runner.close()
        shutil.rmtree(self.cache_root, ignore_errors=True)  # the cold-compile caches
        samples = self.sampler.stop()
        suffix = f"-{self.worker}" if self.worker else ""
        results.write_json(self.dir / f"env{suffix}.json", {
            # an xdist worker's own argv is execnet's: the command is the controller's
            "command": env.command(self.workerinput.get("mainargv", sys.argv)),
            "device": env.device_name(),
            "versions": env.versions(), "gpu": env.nvml_info(),
            "telemetry": self.sampler.summary()})
        if self.profile_dir is not None:
            from harness.timeline import write_run_trace

            # every record of the run, those of the calls it resumes included (this process's
            # alone left a resumed run's timeline with its last part), none for a call cut before
            # its first; the counters are this process's samples
            write_run_trace(self.profile_dir / f"run{suffix}.pftrace",
                            results.load(self.path, missing_ok=True), samples)


@pytest.fixture(scope="session")
def bench_run(request):
    state = RunState(request.config)
    request.config._kernels_run = state
    yield state
    state.finish()


# A wrapper, its table printed after pytest-benchmark's own, so a run ends with it, and also
# when --benchmark-compare-fail raises its PerformanceRegression there (which ended the summary
# before this table).
@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, config):
    try:
        return (yield)
    finally:
        _print_table(terminalreporter, config)


def _print_table(terminalreporter, config) -> None:
    if not config.getoption("bench"):
        return
    if not config.getoption("run_id"):
        return
    # the whole run's, as make summary prints them: a resumed run's too, and under xdist the
    # workers'
    path = results.run_dir(config.getoption("run_id")) / "results.jsonl"
    records, dropped = results.for_reports(path, missing_ok=True)
    if not records:
        return
    from harness.summary import table

    terminalreporter.section("kernel benchmarks")
    terminalreporter.write_line(table(records, dropped))
    terminalreporter.write_line(f"records: {path}")


def pytest_sessionfinish(session, exitstatus):
    """A bench run whose CUDA context was lost in-process exits with CONTEXT_LOST_EXIT (the
    benchmarks it could not run are skipped, unrecorded), on which `make bench` resumes it.
    Resuming a run that already holds a record of every selected benchmark runs nothing and
    exits 0, saying so (pytest's "no tests" exit stays for a selection that is empty)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and getattr(
            session.config, "_kernels_resumed_complete", False):
        print(f"\nrun {session.config.getoption('run_id')} already holds a record of every "
              "selected benchmark: nothing left to resume")
        session.exitstatus = pytest.ExitCode.OK
    state = getattr(session.config, "_kernels_run", None)
    # an interrupted run (Ctrl-C, make gpu's time limit) keeps its status: it is not resumed
    if state is not None and state.runner.context_lost and session.exitstatus in (
            pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        from harness.runner import CONTEXT_LOST_EXIT

        session.exitstatus = CONTEXT_LOST_EXIT


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Outside the benchmarks (which handle it themselves, harness.runner): after each test,
    whether this process can still run CUDA work. If not, every later GPU test here would fail
    with the first one's error, so the process ends: under pytest-xdist by dying, on which xdist
    reports this test as crashed and hands the tests this worker had not run to a fresh one;
    without xdist the session stops, saying why."""
    result = yield
    if not item.config.getoption("bench"):
        lost = guards.cuda_context_error()
        if lost:
            message = (f"{item.nodeid} left this process's CUDA context unusable ({lost}); "
                       f"no later test could use the GPU in this process")
            if os.environ.get("PYTEST_XDIST_WORKER"):
                print(message, file=sys.stderr, flush=True)
                os._exit(1)
            pytest.exit(message)
    return result
