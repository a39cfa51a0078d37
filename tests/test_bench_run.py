"""End to end: the benchmark run as `make bench` drives it, in a subprocess with its own reports
directory; then `harness.compare` on two runs, with a regression injected."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cases, compare, plugin, results, targets
from harness.bench import plan
from kernels import registry
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("op", "impl", "framework", "case", "dims", "dtype", "status", "reason", "median_s",
            "p20_s", "p80_s", "tflops", "gbps", "peak_bytes", "peak_method", "compile_cold_s",
            "compile_warm_s", "rel_err", "device", "versions")


def _bench(reports: Path, run_id: str, *args: str) -> subprocess.CompletedProcess:
    tmp = reports / "tmp"  # the run's temporary directories, to check that none is left behind
    tmp.mkdir(exist_ok=True)
    env = {**outer_env(), "KERNELS_REPORTS": str(reports), "TMPDIR": str(tmp)}
    run_dir = reports / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", f"--run-id={run_id}",
           f"--benchmark-json={run_dir / 'benchmark.json'}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    args = ("--ops=matmul", "--impls=torch,xla", "--tier=smoke", "--dtypes=fp32")
    runs = [_bench(reports, rid, *args) for rid in ("run1", "run2")]
    return reports, runs


def test_records_written_for_every_benchmark(two_runs):
    reports, runs = two_runs
    assert runs[0].returncode == 0, runs[0].stdout[-3000:] + runs[0].stderr[-3000:]
    records = results.load(reports / "runs" / "run1" / "results.jsonl")
    assert len(records) == 4 * 2  # 4 smoke cases x 2 implementations, one dtype
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["status"] == "ok" and r["median_s"] > 0 and r["rel_err"] <= r["err_budget"]
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
    assert (reports / "latest").resolve() == (reports / "runs" / "run2").resolve()
    # the command as it can be run again, not pytest's __main__.py path
    env = json.loads((reports / "runs" / "run1" / "env.json").read_text())
    assert env["command"].startswith(f"{sys.executable} -m pytest tests/bench -q --bench ")
    # the table at the end, after pytest-benchmark's own tables
    out = runs[0].stdout
    assert "kernel benchmarks" in out and "TFLOP/s" in out
    assert out.index("kernel benchmarks") > out.rindex("benchmark 'matmul/")


def test_compile_caches_removed_after_the_run(two_runs):
    reports, runs = two_runs
    assert runs[1].returncode == 0
    assert not list((reports / "tmp").glob("kernels-compile-*"))


def test_pytest_benchmark_holds_device_time(two_runs):
    reports, _ = two_runs
    data = json.loads((reports / "runs" / "run1" / "benchmark.json").read_text())
    records = {results.record_key(r): r for r in
               results.load(reports / "runs" / "run1" / "results.jsonl")}
    assert len(data["benchmarks"]) == len(records)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rec = records[f"matmul/{info['impl']}/{info['case']}-{info['dtype']}"]
        assert b["stats"]["median"] == pytest.approx(rec["median_s"], rel=1e-9)
        assert b["stats"]["rounds"] == rec["reps"]
        assert b["group"] == f"matmul/{info['case']}-{info['dtype']}"


def test_compare_passes_then_fails_on_injected_regression(two_runs, tmp_path):
    reports, _ = two_runs
    base = reports / "runs" / "run1" / "benchmark.json"
    same = compare.main([str(base), str(base), "--no-table"])
    assert same == 0
    data = json.loads(base.read_text())
    for b in data["benchmarks"]:
        b["stats"]["median"] *= 1.5  # +50%: over the 10% threshold and over the noise
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(data))
    assert compare.main([str(base), str(slower), "--no-table"]) == 1
    assert compare.main([str(base), str(slower), "--no-table", "--threshold", "80"]) == 0


def _run_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a run directory whose records went through `edit` (one record -> record)."""
    dst.mkdir()
    (dst / "benchmark.json").write_text((src / "benchmark.json").read_text())
    recs = [edit(r) for r in results.load(src / "results.jsonl")]
    (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


def test_compare_reads_every_record_of_a_run(two_runs, tmp_path, capsys):
    """A run is compared by its records: a benchmark ok in base that failed in head (and so has
    no pytest-benchmark entry, or a stale one) is a regression; one recorded by a resumed call,
    absent from benchmark.json, is compared; runs with nothing ok in both exit 2."""
    reports, _ = two_runs
    run1 = reports / "runs" / "run1"
    first = results.record_key(results.load(run1 / "results.jsonl")[0])

    def fail_first(r):
        if results.record_key(r) == first:
            return {**r, "status": "failed", "median_s": None, "reason": "wrong result: boom"}
        return r

    broken = _run_copy(run1, tmp_path / "broken", fail_first)
    assert compare.main([str(run1), str(broken), "--no-table"]) == 1
    out = capsys.readouterr().out
    assert f"{first}" in out and "FAILED: wrong result: boom" in out
    assert "1 ok in base and failed in head" in out

    def skip_first(r):
        if results.record_key(r) == first:
            return {**r, "status": "skipped", "median_s": None, "reason": "needs a CUDA GPU"}
        return r

    skipping = _run_copy(run1, tmp_path / "skipping", skip_first)
    assert compare.main([str(run1), str(skipping), "--no-table"]) == 0  # listed, not a regression
    out = capsys.readouterr().out
    assert f"{first}" in out and "SKIPPED: needs a CUDA GPU" in out
    assert "1 ok in base and skipped in head" in out

    def quiet(r):  # a CPU run's spread can pass 100%: none here, so +50% is a regression
        return {**r, "spread": 0.0}

    def slower_first(r):
        return {**r, "median_s": r["median_s"] * 1.5} if results.record_key(r) == first else r

    base = _run_copy(run1, tmp_path / "base", quiet)
    resumed = _run_copy(base, tmp_path / "resumed", slower_first)
    (resumed / "benchmark.json").write_text(json.dumps({"benchmarks": []}))
    assert compare.main([str(base), str(resumed), "--no-table"]) == 1
    assert "1 regression(s)" in capsys.readouterr().out

    # a run of records alone (WORKERS=N: pytest-benchmark saves nothing under xdist)
    records_only = _run_copy(run1, tmp_path / "records_only", lambda r: r)
    (records_only / "benchmark.json").unlink()
    assert compare.main([str(run1), str(records_only), "--no-table"]) == 0
    compared = len(results.load(run1 / "results.jsonl"))
    assert f"{compared} benchmarks compared, 0 regression(s)" in capsys.readouterr().out

    elsewhere = _run_copy(run1, tmp_path / "elsewhere", lambda r: {**r, "case": "1x1x1"})
    (elsewhere / "benchmark.json").write_text(json.dumps({"benchmarks": []}))
    assert compare.main([str(run1), str(elsewhere), "--no-table"]) == 2
    assert "nothing to compare" in capsys.readouterr().out


def test_compare_table_shows_every_call_of_a_run(two_runs, tmp_path, capfd):
    """pytest-benchmark's table (make compare's first part) names both runs and has a row for
    every benchmark, those of a resumed call's file included."""
    reports, _ = two_runs
    run2 = reports / "runs" / "run2"
    resumed = _run_copy(run2, tmp_path / "resumed", lambda r: r)
    data = json.loads((run2 / "benchmark.json").read_text())
    first, later = data["benchmarks"][:3], data["benchmarks"][3:]
    (resumed / "benchmark.json").write_text(json.dumps({**data, "benchmarks": first}))
    (resumed / "benchmark-resumed-010203.json").write_text(
        json.dumps({**data, "benchmarks": later}))
    assert compare.main([str(run2), str(resumed)]) == 0
    out = capfd.readouterr().out
    table = out[:out.index(f"base {run2}")]
    assert "base/run2" in table and "head/resumed" in table
    names = {b["name"] for b in data["benchmarks"]}
    assert len(names) == 8 and all(n in table for n in names)

    # a file cut short (its call killed while writing it): no table, the verdicts still come
    (resumed / "benchmark.json").write_text(json.dumps(data)[:500])
    assert compare.main([str(run2), str(resumed)]) == 0
    out, err = capfd.readouterr()
    assert "benchmark.json is not valid JSON" in err and "8 benchmarks compared" in out


def test_compare_table_holds_only_what_both_runs_timed(two_runs, tmp_path, capfd):
    """pytest-benchmark's table takes as a group's reference the run holding its first name: a
    benchmark only head had, sorting first, made head the reference (its changes printed with
    the sign flipped), and one head lacked broke the table's sort. It now shows the benchmarks
    both runs timed, base as the reference."""
    reports, _ = two_runs
    run2 = reports / "runs" / "run2"
    data = json.loads((run2 / "benchmark.json").read_text())
    mine = sorted(data["benchmarks"], key=lambda b: b["fullname"])
    assert mine[0]["group"] == mine[1]["group"] != mine[-1]["group"]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**data, "benchmarks": mine[1:]}))  # the group's first: head only
    slower = [{**b, "stats": {**b["stats"], "median": 2 * b["stats"]["median"]}} for b in mine]
    head = tmp_path / "head.json"
    head.write_text(json.dumps({**data, "benchmarks": slower[:-1]}))  # the last: base only
    compare.print_table(base, head)
    out, err = capfd.readouterr()
    assert "table failed" not in err, err
    assert mine[0]["name"] not in out and mine[-1]["name"] not in out
    assert all(b["name"] in out for b in mine[1:-1])
    assert "+100" in out and "-50" not in out, out


def test_a_run_failed_by_benchmark_compare_fail_still_ends_with_its_table(two_runs, tmp_path):
    """pytest-benchmark's --benchmark-compare-fail raises its PerformanceRegression in the
    terminal summary, which ended it before the suite's table; the table still comes."""
    reports, _ = two_runs
    data = json.loads((reports / "runs" / "run1" / "benchmark.json").read_text())

    def faster(stats):  # a base 100 times faster than run1: every benchmark regresses
        return {k: v / 100 if k in ("min", "max", "mean", "median", "q1", "q3", "iqr") else v
                for k, v in stats.items()}

    from pytest_benchmark.utils import get_machine_id

    storage = tmp_path / "storage"
    (storage / get_machine_id()).mkdir(parents=True)
    (storage / get_machine_id() / "0001_base.json").write_text(json.dumps(
        {**data, "benchmarks": [{**b, "stats": faster(b["stats"])}
                                for b in data["benchmarks"]]}))
    done = _bench(reports, "run3", "--ops=matmul", "--impls=torch", "--tier=smoke",
                  "--dtypes=fp32", f"--benchmark-storage=file://{storage}",
                  "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Performance has regressed" in out, out[-3000:]
    assert "kernel benchmarks" in done.stdout and "records:" in done.stdout


def test_regression_must_exceed_noise():
    noisy = compare.Change("x", base_s=1.0, head_s=1.2, noise=0.3)
    assert not noisy.regression(0.10)
    quiet = compare.Change("x", base_s=1.0, head_s=1.2, noise=0.05)
    assert quiet.regression(0.10)
    assert compare.Change("x", base_s=1.0, head_s=0.8, noise=0.3).verdict(0.10) == "same"
    assert compare.Change("x", base_s=1.0, head_s=0.5, noise=0.3).verdict(0.10) == "faster"


def test_the_noisier_run_sets_the_noise():
    """The base's 30 % spread, the head quiet: a 20 % slowdown is within the noise."""
    (change,) = compare.changes({"x": compare.Entry("ok", 1.0, 0.3)},
                                {"x": compare.Entry("ok", 1.2, 0.0)})
    assert change.noise == 0.3 and not change.regression(0.10)


class _Options:
    """The bench options as pytest's config hands them to the plugin: defaults, then `given`."""

    DEFAULTS = {"ops": "matmul", "impls": "", "tier": "smoke", "dtypes": "", "modes": "",
                "isolate": "plugins", "resume": False, "run_id": "", "shapes": "",
                "bench_timeout": 900.0, "retime": ""}

    def __init__(self, **given):
        self.values = {**self.DEFAULTS, **given}

    def getoption(self, name):
        return self.values[name]


@pytest.mark.parametrize("option, message", [
    ("--ops=softmax", "unknown op(s) ['softmax']; valid: ['attention', 'conv2d', 'matmul']"),
    ("--impls=nope", "unknown implementation(s) ['nope']"),
    ("--tier=huge", "unknown tier 'huge'; valid: ['smoke', 'standard', 'full']"),
    ("--dtypes=int8", "dtype must be one of"),
    ("--modes=sideways", "unknown mode(s) ['sideways']"),
    ("--modes=bwd", "no benchmark is selected: op(s) ['matmul'], implementation(s) all, mode(s) "
                    "['bwd'], shape(s) the tier 'smoke'; only attention has a backward"),
    ("--retime=trtion", "unknown implementation(s) to retime ['trtion']; valid for ['matmul']"),
    ("--shapes=4096x4096", "shape '4096x4096' is in none of the case formats (matmul: MxKxN"),
    ("--shapes=b1_h2_q5_k9_d16_full", "shape(s) ['b1_h2_q5_k9_d16_full'] are not of the "
                                      "selected op(s) ['matmul']"),
])
def test_bad_options_list_the_valid_ones(option, message):
    name, value = option.removeprefix("--").split("=")
    with pytest.raises(pytest.UsageError) as refused:
        plugin._selection(_Options(**{name: value}))
    assert message in str(refused.value)


@pytest.mark.parametrize("given", [dict(impls="triton_tma"), dict(shapes="33x17x9")])
def test_a_selection_of_no_benchmark_is_refused(given):
    """Each filter valid, none of the benchmarks they leave has a backward: a Hopper matmul, or
    matmul shapes only."""
    with pytest.raises(pytest.UsageError, match=r"no benchmark is selected: op\(s\) \['matmul', "
                                                r"'attention'\]"):
        plugin._selection(_Options(ops="matmul,attention", modes="bwd", **given))


def test_a_plugin_that_failed_to_import_is_named_before_its_implementations(monkeypatch):
    """IMPLS naming a plugin's implementation had been refused as unknown, hiding the cause."""
    registry.load_builtins()  # first: loading it would try mine.py itself and say it is missing
    monkeypatch.setenv("KERNELS_PLUGINS", "mine.py")
    monkeypatch.setitem(registry._IMPORT_ERRORS, "mine.py", "SyntaxError: '(' was never closed")
    with pytest.raises(pytest.UsageError, match=r"plugin\(s\) failed to import: mine.py: "
                                                r"SyntaxError: '\(' was never closed"):
        plugin._selection(_Options(impls="my_matmul"))


def test_resuming_a_run_with_no_records_says_it_starts_it(tmp_path, capsys):
    """RESUME of a run id that holds nothing (a typo, or a first call that recorded nothing) is
    not refused (make gpu RESUME=<run> resumes its profile run, <run>-profile, which a call cut
    before its profile stage never started) but said."""
    run = str(tmp_path / "new")  # an absolute id: run_dir puts it where it says
    plugin._check_run_id(_Options(run_id=run, resume=True))
    assert capsys.readouterr().out == f"run {run!r} holds no records yet: starting it\n"
    plugin._check_run_id(_Options(run_id=run, resume=False))  # a new run: nothing to say
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("seconds", [0.0, -5.0, float("nan")])
def test_a_time_limit_must_be_positive(seconds):
    """TIMEOUT=0 had meant no limit in-process and failed every isolated benchmark at once."""
    with pytest.raises(pytest.UsageError, match=r"--bench-timeout \(TIMEOUT\) must be a number "
                       r"of seconds > 0"):
        plugin._selection(_Options(bench_timeout=seconds))


def test_each_filter_value_counts_once():
    """A dtype named twice under two spellings (fp32, float32) ran its benchmarks twice, the
    second one's trace written over the first's."""
    sel = plugin._selection(_Options(ops="matmul,matmul", impls="torch,xla,torch",
                                      dtypes="fp32,float32,bf16", modes="fwd,fwd"))
    assert (sel.ops, sel.impls, sel.dtypes, sel.modes) == (
        ["matmul"], ["torch", "xla"], ["float32", "bfloat16"], ["fwd"])


def test_shapes_replace_the_tier_and_choose_the_ops():
    """SHAPES: the user's own cases, each once, of their ops only, in place of the tier's."""
    sel = plugin._selection(_Options(ops="", shapes="100x37x53, n1_9x7x3_k3x2x5_s2x1_p1_d1,"
                                                    "100x37x53"))
    assert sel.ops == ["conv2d", "matmul"]
    planned = plan(sel.ops, ["torch"], sel.tier, ["float32"], ["fwd"], sel.shapes)
    assert [b.key for b in planned] == ["conv2d/torch/n1_9x7x3_k3x2x5_s2x1_p1_d1-float32",
                                        "matmul/torch/100x37x53-float32"]
    assert len(plan(["matmul"], ["torch"], "smoke", ["float32"], ["fwd"])) == \
        len(cases.cases("matmul", "smoke"))


def test_targets_first_moves_what_the_targets_read_ahead(tmp_path):
    """make gpu's order (--targets-first): the benchmarks the targets read, then the others, each
    part in the plan's order (op as given, then case, dtype, mode, implementation)."""
    ops, modes = ["matmul", "conv2d", "attention"], ["fwd", "bwd"]
    proc = _bench(tmp_path, "order", "--collect-only", f"--ops={','.join(ops)}",
                  "--tier=standard", "--dtypes=bf16", f"--modes={','.join(modes)}",
                  "--targets-first")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines()
                 if line.startswith("tests/bench/test_bench.py::test_bench[")]
    planned = plan(ops, [], "standard", ["bfloat16"], modes)
    first = [b.id for b in planned if targets.read_by_targets(b.op, b.impl, b.case, b.dtype,
                                                             b.mode)]
    assert collected == first + [b.id for b in planned if b.id not in first]
    assert collected[0] == "matmul/1024x1024x1024-bfloat16/pallas" and len(first) == 120


def test_a_profiled_run_profiles_the_jax_implementations_first(tmp_path):
    """--profile: JAX's benchmarks before torch's (a torch.profiler session may keep CUPTI from
    JAX's profiler, JAX's timer on a GPU, for the rest of the process), each part in the plan's
    order."""
    impls = ["pallas", "torch", "triton", "xla"]
    proc = _bench(tmp_path, "prof", "--collect-only", "--profile", "--ops=matmul",
                  f"--impls={','.join(impls)}", "--tier=smoke", "--dtypes=fp32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines()
                 if line.startswith("tests/bench/test_bench.py::test_bench[")]
    planned = [b.id for b in plan(["matmul"], impls, "smoke", ["float32"], ["fwd"])]
    jax_first = [i for i in planned if i.endswith(("/pallas", "/xla"))]
    assert collected == jax_first + [i for i in planned if i not in jax_first]
    assert len(jax_first) == len(planned) // 2
    # with --targets-first too: still every JAX benchmark first, the targets' first in each part
    proc = _bench(tmp_path, "prof2", "--collect-only", "--profile", "--targets-first",
                  "--ops=matmul", f"--impls={','.join(impls)}", "--tier=standard",
                  "--dtypes=bf16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines()
                 if line.startswith("tests/bench/test_bench.py::test_bench[")]
    is_jax = [i.endswith(("/pallas", "/xla")) for i in collected]
    assert is_jax == sorted(is_jax, reverse=True) and any(is_jax) and not all(is_jax)


def test_a_bad_option_stops_the_run_as_a_usage_error(tmp_path):
    """End to end, once: pytest's usage-error exit (4), the message, no traceback."""
    proc = _bench(tmp_path, "bad", "--ops=matmul", "--tier=huge")
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unknown tier 'huge'; valid: ['smoke', 'standard', 'full']" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
