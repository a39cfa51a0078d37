"""The run report: one self-contained page and a Markdown summary, from synthetic records and from a
real (tiny) benchmark run."""
import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from harness import compare, memory, peaks, report, results
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
VOID = {"meta", "img", "br", "hr", "link", "input", "wbr"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAKE_PEAKS = {"copy_gbps": 3000.0, "matmul_tflops": {"bfloat16": 800.0, "float32": 60.0},
              "device": "test", "method": "made up for the test"}


# ---------------------------------------------------------------- reading the page back
class Page(HTMLParser):
    """Tags (checked for balance), every src/href, and the text inside each element with an id."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.errors, self.links, self.ids = [], [], [], set()
        self.text_by_id: dict[str, list[str]] = {}
        self.feed(text)
        self.close()
        self.errors += [f"unclosed <{tag}>" for tag, _ in self.stack]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [(tag, attrs[k]) for k in ("src", "href") if k in attrs]
        if "id" in attrs:
            self.ids.add(attrs["id"])
            self.text_by_id[attrs["id"]] = []
        if tag not in VOID:
            self.stack.append((tag, attrs.get("id")))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        for _, element_id in self.stack:
            if element_id:
                self.text_by_id[element_id].append(data)

    def text(self, element_id: str) -> str:
        return " ".join(self.text_by_id[element_id])


def check_page(run_dir: Path) -> Page:
    """Balanced tags; nothing fetched from outside: images inline as PNG, links to anchors on the
    page or to files that exist beside it."""
    page = Page((run_dir / "index.html").read_text())
    assert not page.errors, page.errors[:5]
    images = [src for tag, src in page.links if tag == "img"]
    assert images, "no plots"
    for tag, link in page.links:
        if link.startswith("data:"):
            assert tag == "img" and link.startswith("data:image/png;base64,"), link[:40]
            assert base64.b64decode(link.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
        elif link.startswith("#"):
            assert link[1:] in page.ids, link
        else:
            parsed = urlparse(link)
            assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link
            assert (run_dir / unquote(link)).is_file(), f"broken link {link}"
    return page


# ---------------------------------------------------------------- a synthetic run
def _record(op, impl, framework, kind, case, flops, dtype, median_s, **extra) -> dict:
    nbytes = flops / 20
    rec = {"op": op, "impl": impl, "framework": framework, "kind": kind, "backend": impl,
           "case": case, "dims": {}, "dtype": dtype, "mode": "fwd", "status": "ok", "reason": "",
           "median_s": median_s, "p20_s": median_s * 0.99, "p80_s": median_s * 1.01, "reps": 10,
           "spread": 0.02, "timing_method": "test", "flops": flops, "bytes": nbytes,
           "tflops": flops / median_s / 1e12, "gbps": nbytes / median_s / 1e9,
           "peak_bytes": 1000 if framework == "jax" else 2000, "peak_method": "test_alloc",
           "compile_cold_s": 1.0 if framework == "jax" else 0.01, "compile_warm_s": 0.1,
           "compile_method": "test", "rel_err": 1e-7, "err_budget": 1e-6, "stock_err": 2e-7,
           "device": "Test GPU", "versions": {"torch": "0", "jax": "0"}, "run_id": "syn",
           "time": "2026-01-01T00:00:00+0000", "flags": []}
    rec.update(extra)
    return rec


def _failed(rec: dict, status: str, reason: str) -> dict:
    empty = ("median_s", "p20_s", "p80_s", "tflops", "gbps", "peak_bytes", "compile_cold_s",
             "compile_warm_s", "rel_err", "spread")
    return {**rec, "status": status, "reason": reason, **dict.fromkeys(empty)}


def synthetic_records() -> list[dict]:
    """matmul in two dtypes: XLA faster than torch on the small case, slower on the large one;
    torch.compile in float32 only; a failed and a skipped hand-written kernel; one trace."""
    out = []
    for dtype in ("float32", "bfloat16"):
        for case, flops, torch_s, xla_s in (("64x64x64", 5.2e5, 20e-6, 10e-6),
                                            ("4096x4096x4096", 1.4e11, 1e-3, 2e-3)):
            out.append(_record("matmul", "torch", "torch", "stock", case, flops, dtype, torch_s,
                               trace_path="traces/matmul-torch.json.gz"))
            out.append(_record("matmul", "xla", "jax", "stock", case, flops, dtype, xla_s,
                               timed_layout="a, b, out [N, M]"))
            out.append(_record("matmul", "triton", "torch", "hand", case, flops, dtype,
                               torch_s * 0.8, flags=["throttled:power"],
                               autotuned={"_matmul_kernel": "BLOCK_M=64, warps=4, stages=5"}))
            pallas = _record("matmul", "pallas", "jax", "hand", case, flops, dtype, xla_s)
            out.append(_failed(pallas, "failed", "wrong result: relative error 1 over budget 1e-6")
                       if dtype == "bfloat16" else pallas)
            if dtype == "float32":
                out.append(_record("matmul", "torch_compile", "torch", "stock", case, flops,
                                   dtype, torch_s * 1.5))
    out.append(_failed(out[0], "skipped", "needs a CUDA GPU") | {"impl": "torch_cublaslt"})
    return out


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    run_dir = tmp_path / "runs" / "syn"
    run_dir.mkdir(parents=True)
    for rec in synthetic_records():
        results.append(run_dir / "results.jsonl", rec)
    (run_dir / "traces").mkdir()
    (run_dir / "traces" / "matmul-torch.json.gz").write_bytes(b"")
    results.write_json(run_dir / "env.json", {
        "command": "pytest tests/bench --bench", "device": "Test GPU",
        "telemetry": {"source": "nvml", "samples": 3, "throttled": True,
                      "counters": {"sm_clock_mhz": {"min": 1200, "max": 1980}}}})
    return run_dir


def _benchmark_json(path: Path, medians: dict[str, float]) -> Path:
    path.write_text(json.dumps({"benchmarks": [
        {"name": name, "stats": {"median": m}, "extra_info": {"status": "ok", "spread": 0.02}}
        for name, m in medians.items()]}))
    return path


# ---------------------------------------------------------------- tests
def test_synthetic_run_report(synthetic_run):
    report.main([str(synthetic_run)])
    page = check_page(synthetic_run)
    html = (synthetic_run / "index.html").read_text()
    assert "<table" in html and "sortable" in html and "<script>" in html
    assert "no measured ceilings in this run" in html
    assert 'href="traces/matmul-torch.json.gz"' in html
    assert "throttled:power" in html and "needs a CUDA GPU" in html
    assert "matmul_kernel: BLOCK_M=64, warps=4, stages=5;" in page.text("op-matmul")
    assert "timed in layout a, b, out [N, M];" in page.text("op-matmul")
    assert "pytest tests/bench --bench" in page.text("environment")
    assert "3 samples during the command above, throttling SEEN" in page.text("environment")
    assert "1.25x" in page.text("op-matmul")  # triton over the best stock (torch)
    assert "wrong result" in page.text("problems")

    verdicts = page.text("verdicts")
    assert "Framework verdicts" in verdicts
    faster = page.text("claim-jax-is-faster-than-pytorch")
    assert "depends on size" in faster
    assert "JAX wins up to 520 kFLOP, PyTorch from 140 GFLOP up" in faster
    assert "holds" in page.text("claim-jax-uses-less-memory")
    assert "no data in this run" in page.text("claim-pytorch-is-better-for-convolutions")
    static = page.text("claim-static-graphs-jit-torch-compile-beat-eager-execution")
    assert "torch.compile" in static and "bfloat16" in static

    md = (synthetic_run / "summary.md").read_text()
    assert "## matmul" in md and "## Framework verdicts" in md
    assert "| case | dtype | mode | impl |" in md
    assert "| op | dtype | mode | verdict | evidence | where it flips |" in md
    conv_claim = md.split("### PyTorch is better for convolutions", 1)[1]
    assert "no data in this run" in conv_claim.split("\n## ", 1)[0]
    assert "[trace](traces/matmul-torch.json.gz)" in md


def test_report_elsewhere_links_back_to_the_runs_traces(synthetic_run, tmp_path):
    out = tmp_path / "elsewhere" / "report"
    report.main([str(synthetic_run), "--out", str(out)])
    check_page(out)  # every link resolves from the new place
    assert 'href="../../' in (out / "index.html").read_text()
    assert not (synthetic_run / "index.html").exists()


def test_a_committed_baseline_keeps_its_report(tmp_path, monkeypatch):
    """A committed baseline is one under the repository's reports/baselines, wherever
    KERNELS_REPORTS moves the reports root (it had been looked for under the moved root)."""
    assert report.BASELINES == ROOT / "reports" / "baselines"
    monkeypatch.setattr(results, "REPORTS", tmp_path / "elsewhere")  # KERNELS_REPORTS
    assert report.committed_baseline(ROOT / "reports" / "baselines" / "any-gpu" / "run")
    # a stand-in for the repository's baselines: the real ones are never written by a test
    monkeypatch.setattr(report, "BASELINES", tmp_path / "baselines")
    baseline = tmp_path / "baselines" / "gpu" / "2026-01-01" / "run"
    baseline.mkdir(parents=True)
    (baseline / "results.jsonl").write_text("")
    with pytest.raises(SystemExit, match="committed baseline.*--out DIR"):
        report.write(baseline)
    assert not (baseline / "index.html").exists()
    report.write(baseline, out=tmp_path / "rendered")
    assert (tmp_path / "rendered" / "summary.md").is_file()
    # make compare with the baseline as HEAD compares, and leaves its report alone
    bench = _benchmark_json(baseline / "benchmark.json", {"a": 1e-3})
    assert compare.main([str(bench), str(bench), "--no-table", "--report"]) == 0
    assert not (baseline / "index.html").exists()


def test_a_resumed_runs_telemetry_is_its_last_commands(synthetic_run):
    """env.json holds the telemetry of the command that wrote it last: in a resumed run, the
    report says the earlier commands' samples are not in it."""
    env = json.loads((synthetic_run / "env.json").read_text())
    env.update(command="pytest tests/bench --bench --resume", telemetry=dict(
        env["telemetry"], throttled=False))
    results.write_json(synthetic_run / "env.json", env)
    report.write(synthetic_run)
    environment = check_page(synthetic_run).text("environment")
    assert ("during the command above only, which resumed the run: the earlier commands' "
            "samples are not kept") in environment
    assert "throttling not seen" in environment and "throttled:power: 4" in environment


def test_a_run_is_judged_by_todays_flop_and_byte_counts(tmp_path, capsys):
    """A record made before a count was corrected (the conv2d byte floor, in the 2026-11-23 H100
    baseline: its 1x1 stride-2 shortcut read as 3.13 TB/s, over the copy ceiling) gets today's
    bytes and GB/s in the report, which says so; what it recorded is kept."""
    from harness import cases

    dims = dict(N=32, H=56, W=56, C=256, K=512, KH=1, KW=1, stride=2, padding=0, dilation=1)
    case = cases.Case("conv2d", "c128_shortcut", dims)
    now = cases.min_bytes(case, "bfloat16")
    stale = _record("conv2d", "torch", "torch", "stock", case.name, cases.flops(case), "bfloat16",
                    24.7e-6, dims=dims, bytes=now * 2)  # the whole input, where a quarter is read
    current = _record("matmul", "torch", "torch", "stock", "t", 2 * 4 ** 3, "float32", 1e-6,
                      dims=dict(M=4, K=4, N=4), bytes=4 * 3 * 16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rec in (stale, current):
        results.append(run_dir / "results.jsonl", rec)
    run = report.load_run(run_dir)
    conv, matmul = run.records
    assert conv["bytes"] == now and conv["gbps"] == pytest.approx(now / 24.7e-6 / 1e9)
    assert conv["recorded_counts"] == {"flops": cases.flops(case), "bytes": now * 2}
    assert "recorded_counts" not in matmul
    env = report.environment_section(run)
    assert "1 of 2 records held other counts (bytes)" in report.render_markdown("t", [env])
    # make summary reads the run as the report does: a FLOP count corrected since shows there too
    from harness import summary

    results.append(run_dir / "results.jsonl", {**current, "case": "u", "flops": 1,
                                               "median_s": 2e-6, "tflops": 5e-7})
    summary.main([str(run_dir)])
    lines = capsys.readouterr().out.splitlines()
    row = lines[lines.index("matmul u float32") + 2]
    assert row.split()[6] == "6.4e-05"  # 2 * 4^3 FLOPs in 2 us, not the recorded 5e-07


def test_peaks_give_a_roofline(synthetic_run):
    peaks.save(synthetic_run, FAKE_PEAKS)
    report.write(synthetic_run)
    page = check_page(synthetic_run)
    environment = page.text("environment")
    assert "copy 3000 GB/s" in environment and "bfloat16 800 TFLOP/s" in environment
    assert "no measured ceilings" not in (synthetic_run / "index.html").read_text()
    # 64^3 float32 torch: 0.026 TFLOP/s at intensity 20 under a 60 TFLOP/s ceiling
    assert report.ceiling_tflops(FAKE_PEAKS, "float32", 20.0) == 60.0
    assert report.ceiling_tflops(FAKE_PEAKS, "float32", 0.01) == pytest.approx(0.03)
    assert "% roofline" in (synthetic_run / "summary.md").read_text()


def test_compare_section(synthetic_run, tmp_path):
    base = _benchmark_json(tmp_path / "base.json",
                           {"a": 1e-3, "b": 1e-3, "c": 1e-3, "d": 1e-3, "e": 1e-3,
                            "f": 1e-3})
    head = _benchmark_json(synthetic_run / "benchmark.json",
                           {"a": 1.5e-3, "b": 0.5e-3, "c": 1.01e-3, "d": 1e-3, "e": 1e-3})
    data = json.loads(head.read_text())
    data["benchmarks"][-2]["extra_info"].update(status="failed", reason="wrong result: boom")
    data["benchmarks"][-1]["extra_info"].update(status="skipped", reason="needs a CUDA GPU")
    head.write_text(json.dumps(data))
    report.write(synthetic_run, compare_to=str(base))
    text = check_page(synthetic_run).text("compare")
    assert "3 benchmarks ok in both, 1 regression(s)" in text
    assert ("1 ok in base failed in head; 1 ok in base skipped in head; 1 ok in base not run "
            "in head") in text
    assert all(word in text for word in ("REGRESSION", "faster", "same", "+50.0%",
                                         "FAILED: wrong result: boom",
                                         "SKIPPED: needs a CUDA GPU"))


@pytest.mark.parametrize("calls", ["records alone (WORKERS=N)", "a resumed call's file alone"])
def test_compare_reads_a_base_without_benchmark_json(synthetic_run, tmp_path, monkeypatch,
                                                     capsys, calls):
    """A base run with no benchmark.json (WORKERS=N, a run begun with RESUME, every benchmark
    failed) is compared by its records, and the comparison lands in the head's report; the
    report had been handed the base's missing benchmark.json and stopped after the verdicts."""
    base = tmp_path / "runs" / "base"
    base.mkdir()
    for rec in synthetic_records():
        results.append(base / "results.jsonl", rec)
    if calls != "records alone (WORKERS=N)":
        _benchmark_json(base / "benchmark-resumed-010203.json", {"x": 1e-3})
    assert compare.main([str(base), str(synthetic_run), "--report"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {synthetic_run / 'index.html'}" in out and "0 regression(s)" in out
    assert "0 regression(s)" in check_page(synthetic_run).text("compare")
    # the last two runs by default: the same, base older than head
    monkeypatch.setattr(results, "REPORTS", tmp_path)
    os.utime(base / "results.jsonl", (1, 1))
    assert compare.main(["--no-table", "--report"]) == 0
    assert f"wrote {synthetic_run / 'index.html'}" in capsys.readouterr().out


def test_compare_exits_2_on_a_run_it_cannot_read(synthetic_run, tmp_path, monkeypatch, capsys):
    """No such run, too few runs, or a file that is not JSON: a usage error with its one-line
    message (exit status 2), not the regression that exit status 1 means."""
    monkeypatch.setattr(results, "REPORTS", tmp_path)
    assert compare.main(["nope", str(synthetic_run), "--no-table", "--report"]) == 2
    assert "no benchmark.json or results.jsonl for run 'nope'" in capsys.readouterr().err
    assert compare.main(["--no-table"]) == 2
    assert "need two runs" in capsys.readouterr().err
    cut = tmp_path / "cut.json"
    cut.write_text('{"benchmarks": [')
    assert compare.main([str(cut), str(synthetic_run), "--no-table"]) == 2
    assert "cannot compare: " in capsys.readouterr().err
    # a benchmark JSON file of no run is compared, and no report is written for it
    bench = _benchmark_json(tmp_path / "bench.json", {"a": 1e-3})
    assert compare.main([str(bench), str(bench), "--no-table", "--report"]) == 0
    assert "no report written" in capsys.readouterr().out


def test_summary_takes_a_run_id_or_directory_as_report_does(synthetic_run, capsys):
    """make summary RUN=<directory> had looked under reports/runs/<directory>: the summary takes
    RUN as the report does, a run id under the reports root (KERNELS_REPORTS) or a directory."""
    from harness import summary

    counts = "19 records: 16 ok, 2 failed, 1 skipped"
    for ref in (str(synthetic_run), str(synthetic_run / "results.jsonl")):
        summary.main([ref])
        assert capsys.readouterr().out.strip().endswith(counts), ref
    env = {**outer_env(), "KERNELS_REPORTS": str(synthetic_run.parent.parent),
           "PYTHONPATH": str(ROOT)}
    by_id = subprocess.run([sys.executable, "-m", "harness.summary", "syn"], cwd=synthetic_run,
                           env=env, capture_output=True, text=True, timeout=120)
    assert by_id.stdout.strip().endswith(counts), by_id.stderr[-2000:]
    with pytest.raises(SystemExit, match="no results.jsonl for run 'nope'"):
        summary.main(["nope"])


def test_peaks_measure_on_cpu():
    measured = peaks.measure("cpu")
    assert measured["copy_gbps"] > 0.1
    assert set(measured["matmul_tflops"]) == {"bfloat16", "float32"}
    assert all(v > 0 for v in measured["matmul_tflops"].values())
    assert set(measured["matmul_by"].values()) <= {"torch", "xla"}
    assert "perf_counter" in measured["method"]


def test_a_resumed_run_keeps_its_first_ceilings(tmp_path, monkeypatch):
    measured = iter([{"copy_gbps": 1.0}, {"copy_gbps": 2.0}])
    monkeypatch.setattr(peaks, "measure", lambda device: next(measured))
    peaks.measure_once(tmp_path, "cpu")
    peaks.measure_once(tmp_path, "cpu")  # resumed
    assert peaks.load(tmp_path) == {"copy_gbps": 1.0}


def test_the_faster_stock_matmul_sets_the_ceiling(monkeypatch):
    """The ceiling was torch.matmul's alone: on a CPU XLA's fp32 matmul stood at 119 % of it."""
    import torch

    monkeypatch.setattr(peaks, "_cpu_matmul_n", lambda dtype: 64)
    monkeypatch.setattr(peaks, "_xla_matmul_seconds", lambda a, b, device: 1e-9)
    assert peaks.matmul_tflops("cpu", torch.float32) == (2 * 64 ** 3 / 1e-9 / 1e12, "xla")
    monkeypatch.setattr(peaks, "_xla_matmul_seconds", lambda a, b, device: 1e3)
    assert peaks.matmul_tflops("cpu", torch.float32)[1] == "torch"
    monkeypatch.setattr(peaks, "_xla_matmul_seconds", lambda a, b, device: None)  # no JAX
    assert peaks.matmul_tflops("cpu", torch.float32)[1] == "torch"


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(peaks, "_seconds", lambda fn, framework, device: 1.0)
    assert peaks.copy_gbps("cpu") == pytest.approx(2 * peaks.CPU_COPY_BYTES / 1e9)


def test_a_ceiling_is_timed_by_its_median_as_records_are(monkeypatch):
    from harness import timing

    samples = timing.summarize([1.0, 2.0, 2.0, 2.0, 3.0], "test")  # p20 1.8, median 2
    monkeypatch.setattr(peaks.timing, "time_fn", lambda fn, framework, on_cuda: samples)
    assert peaks._seconds(lambda: None, "torch", "cpu") == 2.0


def test_xla_on_another_kind_of_device_sets_no_ceiling(monkeypatch):
    """CUDA torch beside CPU-only JAX: handing CUDA tensors to JAX raised out of the run's start,
    and no benchmark ran."""
    import jax
    import torch

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert peaks._xla_matmul_seconds(torch.ones(2, 2), torch.ones(2, 2), "cuda") is None
    assert peaks._xla_matmul_seconds(torch.ones(2, 2), torch.ones(2, 2), "cpu") > 0


def test_real_run_report(tmp_path):
    """A real benchmark run (matmul, torch and xla, fp32) in a scratch reports directory; the
    report is made by run id, as a user would."""
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    env = {**outer_env(), "KERNELS_REPORTS": str(tmp_path), "PYTHONPATH": str(ROOT),
           "KERNELS_PROFILES": str(tmp_path / "profiles")}
    bench = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/bench", "-q", "--bench", "--ops", "matmul",
         "--impls", "torch,xla", "--tier", "smoke", "--dtypes", "fp32", "--run-id", "tiny",
         "--benchmark-json", str(run_dir / "benchmark.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    made = subprocess.run([sys.executable, "-m", "harness.report", "tiny", "--compare",
                           str(run_dir / "benchmark.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]

    page = check_page(run_dir)
    assert "no data in this run" in page.text("claim-pytorch-is-better-for-convolutions")
    faster = page.text("claim-jax-is-faster-than-pytorch")
    assert "matmul" in faster and "float32" in faster and "no data" not in faster
    assert "tests/bench" in page.text("environment")  # the command, from env.json
    assert "0 regression(s)" in page.text("compare")  # the run against itself
    records = results.load(run_dir / "results.jsonl")
    assert all(r["case"] in page.text("op-matmul") for r in records)
    assert "| case | dtype | mode | impl |" in (run_dir / "summary.md").read_text()


def test_kernels_vs_best_stock_and_noise_sections():
    """Hand-written kernels as a percentage of the fastest stock op (geometric mean over cases),
    and the noise of benchmarks timed twice, worked out from the records."""
    recs = [_record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 2e-3),
            _record("matmul", "xla", "jax", "stock", "a", 1e9, "bfloat16", 1e-3),
            _record("matmul", "triton", "torch", "hand", "a", 1e9, "bfloat16", 2e-3,
                    median_again_s=2.1e-3, again_change=0.05),
            _record("matmul", "torch", "torch", "stock", "b", 1e9, "bfloat16", 1e-3,
                    median_again_s=0.99e-3, again_change=-0.01),
            _record("matmul", "triton", "torch", "hand", "b", 1e9, "bfloat16", 0.5e-3,
                    median_again_s=0.5e-3, again_change=0.0),
            _record("matmul", "triton", "torch", "hand", "c", 1e9, "bfloat16", 1e-3)]  # no stock
    run = report.Run(Path("unused"), recs, {}, None)
    kernels = report.render_markdown("t", [report.kernels_section(run)])
    # triton: 50% of the best stock on "a" (xla, 1 ms vs 2 ms), 200% on "b": geomean 100%
    row = next(line for line in kernels.splitlines() if "| triton |" in line)
    assert row.split("|")[5:9] == [" 2 ", " 100.0 ", " 50.0 ", " 200.0 "], row
    # grouped convolutions get a row of their own, apart from the dense layers
    conv = [_record("conv2d", "torch", "torch", "stock", "d", 1e9, "bfloat16", 1e-3),
            _record("conv2d", "triton", "torch", "hand", "d", 1e9, "bfloat16", 2e-3),
            _record("conv2d", "torch", "torch", "stock", "g", 1e9, "bfloat16", 1e-3),
            _record("conv2d", "triton", "torch", "hand", "g", 1e9, "bfloat16", 0.5e-3)]
    for r in conv[2:]:
        r["dims"] = {"groups": 8}
    conv_md = report.render_markdown("t", [report.kernels_section(
        report.Run(Path("unused"), conv, {}, None))])
    rows = {line.split("|")[1].strip(): line.split("|")[6].strip()
            for line in conv_md.splitlines() if "| triton |" in line}
    assert rows == {"conv2d": "50.0", "conv2d (grouped)": "200.0"}, conv_md
    noise = report.render_markdown("t", [report.noise_section(run)])
    all_row = next(line for line in noise.splitlines() if line.startswith("| all |"))
    assert all_row.split("|")[2:6] == [" 3 ", " 1.00 ", " 5.00 ", " 1 "], all_row
    assert "largest: matmul a bfloat16 fwd triton (+5.00%)" in noise
    empty = report.Run(Path("unused"), recs[:2], {}, None)
    assert "no benchmark was timed twice" in report.render_markdown(
        "t", [report.noise_section(empty)])


def test_kernels_section_leaves_out_interpreted_kernels_and_counts_flagged_cases():
    """A kernel run in an interpreter (Triton's, Pallas' interpret mode) is timed, but its time
    says nothing about the kernel: no share of the best stock. A case counts as flagged when
    the kernel's record or the best stock one's was (the slower stock's flags do not count)."""
    recs = [_record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 1e-3),
            _record("matmul", "xla", "jax", "stock", "a", 1e9, "bfloat16", 2e-3,
                    flags=["throttled:power"]),
            _record("matmul", "triton", "torch", "hand", "a", 1e9, "bfloat16", 2e-3),
            _record("matmul", "torch", "torch", "stock", "b", 1e9, "bfloat16", 1e-3,
                    flags=["low_clock:1485/1980"]),
            _record("matmul", "triton", "torch", "hand", "b", 1e9, "bfloat16", 1e-3),
            _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", 1e-3),
            _record("matmul", "triton", "torch", "hand", "c", 1e9, "bfloat16", 1e-3,
                    flags=["throttled:power"]),
            _record("matmul", "pallas", "jax", "hand", "a", 1e9, "bfloat16", 80e-3,
                    interpreted=True)]
    section = report.kernels_section(report.Run(Path("unused"), recs, {}, None))
    table = section.blocks[1]
    (row,) = table.rows  # no pallas row
    column = {h: c.text for h, c in zip(table.headers, row)}
    assert column["impl"] == "triton" and column["cases"] == "3"
    assert column["flagged cases"] == "2"  # b (its best stock) and c (its own); not a
    assert section.blocks[0].endswith("records of kernels run in an interpreter here (the Triton "
                                      "interpreter, Pallas' interpret mode) left out, their "
                                      "times saying nothing about the kernels: 1.")
    alone = report.kernels_section(report.Run(Path("unused"), [recs[0], recs[-1]], {}, None))
    assert alone.blocks[0].startswith("no hand-written kernel outside an interpreter measured "
                                      "beside a stock op: records of kernels run in an "
                                      "interpreter here")


def test_record_notes_say_what_limits_a_figure():
    """The end-of-run table and the report's records say, beside a figure: a host-clock time in
    a run timed on the device, a kernel run in an interpreter, the guards' flags; the report
    adds the spread, the repetitions, the timing method, and a lower-bound memory figure."""
    from harness import summary

    device = _record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 1e-3,
                     timing_method="cuda_events+l2_flush+gated", spread=0.123)
    host = _record("matmul", "xla", "jax", "stock", "a", 1e9, "bfloat16", 150e-6,
                   timing_method="perf_counter+block_until_ready+l2_flush",
                   flags=["throttled:power"], peak_method=memory.XLA_CPU_PLAN)
    interpreted = _record("matmul", "triton", "torch", "hand", "a", 1e9, "bfloat16", 9e-2,
                          interpreted=True, timing_method="perf_counter")
    assert summary.notes(host, on_device=True) == ["throttled:power", "timing:host_clock"]
    assert summary.notes(host, on_device=False) == ["throttled:power"]  # all on the host: alike
    assert summary.notes(interpreted, on_device=False) == ["interpreted"]
    assert summary.notes({**device, "retried_after": "OutOfMemoryError: ..."}, True) == [
        "retried:out_of_memory"]
    text = summary.table([device, host, interpreted])
    line = next(x for x in text.splitlines() if x.split()[:1] == ["xla"])
    assert line.endswith("throttled:power timing:host_clock")
    assert next(x for x in text.splitlines() if x.split()[:1] == ["torch"]).split()[4] == "12%"
    run = report.Run(Path("unused"), [device, host, interpreted], {}, None)
    table = report.op_section("matmul", run).blocks[-1]
    rows = {r[3].text: {h: c.text for h, c in zip(table.headers, r)} for r in table.rows}
    assert rows["torch"]["spread"] == "12%" and rows["torch"]["reps"] == "10"
    assert rows["torch"]["timed by"] == "cuda_events+l2_flush+gated"
    assert rows["xla"]["peak mem"] == ">= 1 kB" and rows["torch"]["peak mem"] == "2 kB"
    assert "timing:host_clock" in rows["xla"]["flags / autotuned config / reason"]
    assert "interpreted" in rows["triton"]["flags / autotuned config / reason"]
    # an interpreted kernel's time gives it no speedup over the stock op and no roofline share
    run = report.Run(Path("unused"), [device, host, interpreted], {}, FAKE_PEAKS)
    table = report.op_section("matmul", run).blocks[-1]
    rows = {r[3].text: {h: c.text for h, c in zip(table.headers, r)} for r in table.rows}
    assert rows["triton"]["speedup vs best stock"] == rows["triton"]["% roofline"] == "-"
    assert rows["torch"]["% roofline"] != "-"
    # a record made before the field existed says so by its memory method
    older = {k: v for k, v in interpreted.items() if k != "interpreted"}
    assert summary.notes({**older, "peak_method": memory.INTERPRETED}, False) == ["interpreted"]


def test_a_benchmark_recorded_twice_counts_once_the_last_time(tmp_path, capsys):
    """results.jsonl files concatenated from runs that overlap: the report and the summary keep
    the last record of each benchmark, say how many they left out, and every figure (best
    stock, geomeans) sees one record per benchmark."""
    from harness import summary

    first = _record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 1e-3)
    again = _record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 2e-3)
    kernel = _record("matmul", "triton", "torch", "hand", "a", 1e9, "bfloat16", 2e-3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rec in (first, kernel, again):
        results.append(run_dir / "results.jsonl", rec)
    run = report.load_run(run_dir)
    assert [r["median_s"] for r in run.records] == [2e-3, 2e-3] and run.dropped == 1
    env = report.render_markdown("t", [report.environment_section(run)])
    assert "recorded again later in results.jsonl, left out (the last of each is shown): 1" in env
    kernels = report.render_markdown("t", [report.kernels_section(run)])
    row = next(line for line in kernels.splitlines() if "| triton |" in line)
    assert row.split("|")[6].strip() == "100.0"  # against the last torch record, not the best
    summary.main([str(run_dir)])
    out = capsys.readouterr().out
    assert ("2 records: 2 ok, 0 failed, 0 skipped; earlier records of a benchmark recorded "
            "again later, left out: 1") in out
    assert out.count("  torch ") == 1


def _phases(start_s: float, *steps: tuple[str, float]) -> list[dict]:
    out, t = [], start_s
    for name, seconds in steps:
        out.append({"name": name, "start_ns": int(t * 1e9), "end_ns": int((t + seconds) * 1e9)})
        t += seconds
    return out


def test_time_section_sums_phases_and_the_time_between_benchmarks():
    """Per implementation the sum of each phase; per op the gaps between its benchmarks, except a
    pause longer than a minute (a run stopped and resumed); unknown phase names go to "other"."""
    base = 1_800_000_000.0
    recs = [_record("matmul", "torch", "torch", "stock", "a", 1e9, "bfloat16", 1e-3,
                    phases=_phases(base, ("setup", 1.0), ("timed", 2.0))),
            _record("matmul", "triton", "torch", "hand", "a", 1e9, "bfloat16", 1e-3,
                    phases=_phases(base + 3.5, ("cold_compile", 2.0), ("timed", 0.5),
                                   ("mystery", 0.3))),
            _failed(_record("matmul", "pallas", "jax", "hand", "a", 1e9, "bfloat16", 1e-3),
                    "skipped", "no phases: takes no time"),
            _record("conv2d", "torch", "torch", "stock", "b", 1e9, "bfloat16", 1e-3,
                    phases=_phases(base + 126.3, ("timed", 1.0)))]
    md = report.render_markdown("t", [report.time_section(report.Run(Path("u"), recs, {}, None))])
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| op |"))
    assert [c.strip() for c in header.split("|")[1:-1]] == [
        "op", "impl", "benchmarks", "setup", "cold_compile", "timed", "other", "between",
        "total s", "% of run"]

    def row(op, impl):
        line = next(line for line in lines if line.startswith(f"| {op} | {impl} |"))
        return [c.strip() for c in line.split("|")[3:-1]]

    assert row("matmul", "torch") == ["1", "1.0", "0.0", "2.0", "0.0", "-", "3.0", "41.1"]
    assert row("matmul", "triton") == ["1", "0.0", "2.0", "0.5", "0.3", "-", "2.8", "38.4"]
    assert row("matmul", "all") == ["2", "1.0", "2.0", "2.5", "0.3", "0.5", "6.3", "86.3"]
    assert row("conv2d", "all") == ["1", "0.0", "0.0", "1.0", "0.0", "0.0", "1.0", "13.7"]
    assert "7 s of wall-clock time in all" in md
    no_phases = report.Run(Path("u"), [recs[2]], {}, None)
    assert "no record holds its phases" in report.render_markdown(
        "t", [report.time_section(no_phases)])


def test_wall_clock_counts_side_by_side_benchmarks_once_and_one_dtype_apart():
    """Two workers running 10 s benchmarks side by side for 40 s: 40 s of wall-clock time (the
    phases sum to 80). In a run alternating bf16 and fp32 benchmarks, bf16's time is its own
    benchmarks and the gaps before them, not the fp32 ones between."""
    base = 1_800_000_000.0

    def bench(start, dtype="bfloat16"):
        return _record("matmul", "torch", "torch", "stock", f"c{start}", 1e9, dtype, 1e-3,
                       phases=_phases(base + start, ("timed", 10.0)))

    side_by_side = [bench(t) for t in (0, 0.5, 10, 10.5, 20, 20.5, 30, 30)]
    assert report.run_seconds(side_by_side) == pytest.approx(40.0)
    md = report.render_markdown("t", [report.time_section(
        report.Run(Path("u"), side_by_side, {}, None))])
    assert "40 s of wall-clock time in all (80 s summed over benchmarks that ran side by side" in md
    # one at a time, a benchmark's 2 s check between its phases: in the wall clock, in no phase
    checked = bench(0)
    checked["phases"] += _phases(base + 12.0, ("timed", 6.0))
    md = report.render_markdown("t", [report.time_section(
        report.Run(Path("u"), [checked], {}, None))])
    assert "18 s of wall-clock time in all (2 s of it in benchmarks but in none of their" in md
    assert "| 88.9 |" in md  # 16 s of phases, as a share of the 18
    # 10 s benchmarks with 1 s between them, bf16 and fp32 in turn, and a resumed pause
    alternating = [bench(11 * i, "bfloat16" if i % 2 == 0 else "float32") for i in range(4)]
    alternating.append(bench(11 * 4 + 3600))
    assert report.run_seconds(alternating) == pytest.approx(43 + 10)
    def of(dtype):
        return lambda r: r["dtype"] == dtype

    assert report.run_seconds(alternating, of("bfloat16")) == pytest.approx(10 + 11 + 10)
    assert report.run_seconds(alternating, of("float32")) == pytest.approx(22)
    assert report.run_seconds(alternating, of("float16")) is None


def test_a_wrong_result_keeps_its_time_but_no_share_of_the_best_or_roofline():
    """A wrong result is timed too, and twice as fast as the best ok record here: the end-of-run
    table lists it after the ok ones with no "% best", and the report gives it no % roofline."""
    from harness import summary

    ok = _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", 2e-3)
    wrong = _record("matmul", "pallas", "jax", "hand", "c", 1e9, "bfloat16", 1e-3,
                    status="failed", reason="wrong result: relative error 0.9 over budget 0.01")
    lines = summary.table([wrong, ok]).splitlines()
    assert [line.split()[:2] for line in lines[2:4]] == [["torch", "ok"], ["pallas", "failed"]]
    # median (2 tokens), spread, host/call, TFLOP/s, % best: its rates are not the failed one's
    assert lines[2].split()[4:8] == ["2%", "-", "0.5", "100.0"]
    assert lines[3].split()[4:8] == ["2%", "-", "-", "-"]
    assert report._roofline_pct(ok, FAKE_PEAKS) is not None
    assert report._roofline_pct(wrong, FAKE_PEAKS) is None


@pytest.mark.parametrize("traces_in", ["run", "beside"])
def test_trace_links_find_traces_packed_by_make_gpu(tmp_path, traces_in):
    """make gpu packs profiles/<run>/ as traces/, which a committed baseline keeps in its run's
    directory (the H100 baseline's 8 links all read "not on this disk") or beside it."""
    run_dir = tmp_path / "baseline" / "profile"
    run_dir.mkdir(parents=True)
    rec = _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", 1e-3,
                  trace_path="profiles/20261123-gpu-profile/matmul/torch/c-bfloat16.json.gz")
    results.append(run_dir / "results.jsonl", rec)
    packed = (run_dir if traces_in == "run" else run_dir.parent) / "traces/matmul/torch"
    packed.mkdir(parents=True)
    (packed / "c-bfloat16.json.gz").write_bytes(b"")
    run = report.load_run(run_dir)
    cell = report._trace_cell(run, run.records[0])
    assert cell.href == ("" if traces_in == "run" else "../") + \
        "traces/matmul/torch/c-bfloat16.json.gz"


def test_a_host_timed_jax_loss_counts_only_beyond_the_host_cost():
    """On a GPU, JAX medians hold the host's dispatch; torch's are device events. JAX losing by
    less than a trivial JAX call's time is unclear, by more it is a loss; a JAX win stands."""
    def pair(jax_s, torch_s):
        jax = _record("matmul", "xla", "jax", "stock", "c", 1e9, "bfloat16", jax_s,
                      timing_method="perf_counter+block_until_ready+l2_flush")
        torch = _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", torch_s,
                        timing_method="cuda_events+l2_flush")
        return [jax, torch]

    jax_faster = report.CLAIMS[0].contests[0]
    winner = {}
    for label, recs, host in (("unmeasured", pair(1.1e-3, 1e-3), None),
                              ("beyond", pair(1.1e-3, 1e-3), 0.05e-3),
                              ("within", pair(1.1e-3, 1e-3), 0.2e-3),
                              ("jax wins", pair(0.5e-3, 1e-3), None)):
        (m,) = report.matchups(recs, jax_faster, host)
        winner[label] = m.winner
    assert winner == {"unmeasured": "bound", "beyond": "b", "within": "bound", "jax wins": "a"}
    text = report.render_markdown("t", [report.verdicts_section(pair(1.1e-3, 1e-3), None)])
    assert "1 unclear: the slower side was timed on the host clock" in text
    assert "not measured in this run" in text
    floor = text.split("Smallest problem of each op")[1]
    assert "| 1.1 ms (host clock) |" in floor and "a time marked host clock is a JAX" in floor
    assert "geometric mean of PyTorch time" not in text  # of no ratio that is not unclear
    # an unclear ratio stays out of the mean: JAX 2x faster on c2, unclear on c
    both = pair(1.1e-3, 1e-3) + [dict(r, case="c2") for r in pair(0.5e-3, 1e-3)]
    text = report.render_markdown("t", [report.verdicts_section(both, None)])
    assert ("JAX better at 1 of 2 cases, PyTorch at 0, 0 within noise; geometric mean of "
            "PyTorch time / JAX time over the 1 case not unclear: 2x") in text
    assert "| holds (1 of 2 cases decided) |" in text


def _jax_vs_torch(*records) -> "report.Matchup":
    (m,) = report.matchups(list(records), report.CLAIMS[0].contests[0])  # JAX (a), PyTorch (b)
    return m


def _stock(impl, framework, median_s, case="c", **extra):
    return _record("matmul", impl, framework, "stock", case, 1e9, "bfloat16", median_s, **extra)


def test_a_difference_within_either_sides_spread_is_a_tie_both_ways():
    """5 % apart with a 10 % p20-p80 spread on one side: no winner, whichever side is faster
    and whichever side is noisy."""
    def winner(jax_s, torch_s, jax_spread, torch_spread):
        return _jax_vs_torch(_stock("xla", "jax", jax_s, spread=jax_spread),
                             _stock("torch", "torch", torch_s, spread=torch_spread)).winner

    assert winner(1.00e-3, 1.05e-3, 0.10, 0.01) == "tie"
    assert winner(1.00e-3, 1.05e-3, 0.01, 0.10) == "tie"
    assert winner(1.05e-3, 1.00e-3, 0.10, 0.10) == "tie"
    assert winner(1.00e-3, 1.50e-3, 0.10, 0.10) == "a"
    assert winner(1.50e-3, 1.00e-3, 0.10, 0.10) == "b"


def test_framework_verdicts_count_ok_stock_records_only():
    """A hand-written Pallas kernel is no framework's default, and a wrong result keeps its time
    but is never a side's best."""
    m = _jax_vs_torch(_stock("xla", "jax", 2e-3),
                      _record("matmul", "pallas", "jax", "hand", "c", 1e9, "bfloat16", 0.5e-3),
                      _stock("xla_cudnn", "jax", 0.4e-3, status="failed",
                             reason="wrong result: relative error 0.9 over budget 0.01"),
                      _stock("torch", "torch", 1e-3))
    assert m.a["impl"] == "xla" and m.winner == "b"


def test_a_timed_wrong_result_never_sets_the_best_stock():
    wrong = _stock("torch_math", "torch", 0.5e-3, status="failed",
                   reason="wrong result: relative error 0.9 over budget 0.01")
    assert report._best_stock([wrong, _stock("torch", "torch", 1e-3)]) == {
        ("matmul", "c", "bfloat16", "fwd"): 1e-3}


def test_the_verdicts_ratio_is_a_geometric_mean():
    """JAX twice as fast on one case and half as fast on the other: 1x, where a mean says
    1.25x."""
    records = [_stock("xla", "jax", 1e-3, "c1"), _stock("torch", "torch", 2e-3, "c1"),
               _stock("xla", "jax", 2e-3, "c2"), _stock("torch", "torch", 1e-3, "c2")]
    text = report.render_markdown("t", [report.verdicts_section(records, None)])
    assert "geometric mean of PyTorch time / JAX time: 1x" in text


def test_a_host_timed_loss_within_noise_of_the_host_cost_is_bound():
    """JAX host-timed at 1.1 ms with 0.08 ms of host cost per call, torch's device time 1 ms,
    5 % spreads: JAX's device time is at least 1.02 ms, within torch's noise: not a loss."""
    jax = _stock("xla", "jax", 1.1e-3, spread=0.05,
                 timing_method="perf_counter+block_until_ready+l2_flush")
    torch = _stock("torch", "torch", 1e-3, spread=0.05, timing_method="cuda_events+l2_flush")
    (m,) = report.matchups([jax, torch], report.CLAIMS[0].contests[0], host_call_s=0.08e-3)
    assert m.winner == "bound"


def test_where_the_winner_flips_counts_sizes_within_noise_and_merges_equal_sizes():
    """"At every size" only when every size has a winner beyond noise; a threshold is said of
    the sizes with one, naming how many had none; cases of one size (FLOPs) are one size, so
    their order by name makes no flip."""
    def matchups(*cases):  # (case, flops, jax median, torch median)
        recs = [r for case, flops, jax_s, torch_s in cases for r in (
            _record("matmul", "xla", "jax", "stock", case, flops, "bfloat16", jax_s),
            _record("matmul", "torch", "torch", "stock", case, flops, "bfloat16", torch_s))]
        return report.matchups(recs, contest)

    contest = report.CLAIMS[0].contests[0]  # JAX (a) against PyTorch (b)
    win_and_ties = matchups(("s1", 1e6, 1e-3, 2e-3), ("s2", 1e9, 1e-3, 1e-3),
                            ("s3", 1e12, 1e-3, 1e-3))
    assert report._verdict_word(win_and_ties) == "holds (1 of 3 cases decided)"
    assert report._size_condition(win_and_ties, contest) == (
        "JAX wins at every size where one side is clearly better (1 MFLOP .. 1 MFLOP); "
        "2 of 3 cases within noise or unclear")
    all_won = matchups(("s1", 1e6, 1e-3, 2e-3), ("s2", 1e9, 1e-3, 2e-3))
    assert report._size_condition(all_won, contest) == (
        "JAX wins at every size measured (1 MFLOP .. 1 GFLOP)")
    flip_then_tie = matchups(("s1", 1e6, 1e-3, 2e-3), ("s2", 1e9, 2e-3, 1e-3),
                             ("s3", 1e12, 1e-3, 1e-3))
    assert report._verdict_word(flip_then_tie) == "depends on size (2 of 3 cases decided)"
    assert report._size_condition(flip_then_tie, contest) == (
        "JAX wins up to 1 MFLOP, PyTorch from 1 GFLOP up where one side is clearly better; "
        "1 of 3 cases within noise or unclear")
    same_size = matchups(("a_layer", 3e9, 1e-3, 2e-3), ("b_layer", 3e9, 2e-3, 1e-3))
    assert report._verdict_word(same_size) == "mixed"
    assert report._size_condition(same_size, contest) == (
        "no single size threshold: cases of equal size go both ways at 3 GFLOP")


def test_calls_to_repay_compile_only_where_both_cold_compiles_were_measured():
    """JAX 0.5 ms faster per call after a cold compile 1 s longer: repaid after 2000 calls. A
    side without a cold compile (COLD=first times it in an implementation's first case only) is
    not a side that compiled in no time: the column says nothing then."""
    def pair(jax_cold):
        return [_record("matmul", "xla", "jax", "stock", "c", 1e9, "bfloat16", 0.5e-3,
                        timing_method="jax_profiler+l2_flush", compile_cold_s=jax_cold),
                _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", 1e-3,
                        timing_method="cuda_events+l2_flush", compile_cold_s=0.0)]

    def repay(jax_cold):
        text = report.render_markdown("t", [report.verdicts_section(pair(jax_cold), None)])
        row = next(line for line in text.splitlines() if line.startswith("| matmul | c |"))
        return row.rstrip(" |").rsplit("| ", 1)[1]

    assert repay(1.0) == "2,000"
    assert repay(None) == "-"


def test_device_timed_jax_is_compared_directly_and_host_time_shown_apart():
    """JAX timed from its profile and torch with gated events are both device times: a JAX loss
    is a loss. The smallest-problem table shows each side's host time per call beside it, and a
    record whose timing may hold host time says so."""
    jax = _record("matmul", "xla", "jax", "stock", "c", 1e9, "bfloat16", 1.1e-3,
                  timing_method="jax_profiler+l2_flush", host_s=31e-6)
    torch = _record("matmul", "torch", "torch", "stock", "c", 1e9, "bfloat16", 1e-3,
                    timing_method="cuda_events+l2_flush+gated", host_s=7e-6)
    triton = _record("matmul", "triton", "torch", "hand", "c", 1e9, "bfloat16", 1e-3,
                     timing_method="cuda_events+l2_flush+partly_ungated", host_s=60e-6)
    (m,) = report.matchups([jax, torch], report.CLAIMS[0].contests[0], None)
    assert m.winner == "b"
    text = report.render_markdown("t", [report.verdicts_section([jax, torch], None)])
    assert "host clock" not in text
    floor = text.split("Smallest problem of each op")[1]
    assert "| matmul | c | bfloat16 | fwd | 1 GFLOP | 1 ms | 7 us | - | - | 1.1 ms | 31 us |" \
        in floor, floor
    assert "marked host clock" not in floor
    run = report.Run(Path("unused"), [jax, torch, triton], {}, None)
    rows = report.render_markdown("t", [report.op_section("matmul", run)])
    assert "timing:partly_ungated" in next(line for line in rows.splitlines()
                                           if "| triton |" in line)


def test_memory_verdict_leaves_out_a_backward_alone_and_a_planned_cpu_figure():
    """A backward alone (bwd) leaves out what its forward saved, which differs between a
    recomputing backward and one that saved the probabilities: the memory claim compares fwd
    and fwd_bwd only. XLA:CPU allocates beyond the buffers its memory analysis plans, so a
    smaller JAX figure from that plan decides nothing."""
    jax_less = report.CLAIMS[1].contests[0]

    def pair(mode, jax_method="xla.memory_analysis"):
        return [_record("attention", "xla", "jax", "stock", "c", 1e9, "float32", 1e-3,
                        mode=mode, peak_bytes=1000, peak_method=jax_method),
                _record("attention", "torch", "torch", "stock", "c", 1e9, "float32", 1e-3,
                        mode=mode, peak_bytes=2000)]

    assert [m.key[3] for m in report.matchups(
        pair("fwd") + pair("bwd") + pair("fwd_bwd"), jax_less)] == ["fwd", "fwd_bwd"]
    (m,) = report.matchups(pair("fwd"), jax_less)
    assert m.winner == "a"
    (m,) = report.matchups(pair("fwd", memory.XLA_CPU_PLAN), jax_less)
    assert m.winner == "bound"


def test_times_are_rounded_before_their_unit_is_chosen():
    from harness.summary import _fmt_time

    assert [_fmt_time(s) for s in (0.0009996, 0.99996, 0.00099949, 1.5e-5, 2e-9, 0.0, None)] == [
        "1 ms", "1 s", "999 us", "15 us", "2 ns", "0", "-"]


def test_device_time_fed_to_pytest_benchmark_survives_its_profiling_call():
    """--benchmark-cprofile makes pytest-benchmark call the target once more after the rounds:
    with no sample left for it, the replay once raised StopIteration in every benchmark."""
    from tests.bench.test_bench import _feed_device_time

    class Benchmark:  # pedantic as pytest-benchmark runs it, plus the profiling call
        def pedantic(self, target, rounds, iterations, warmup_rounds):
            self.durations = []
            for _ in range(warmup_rounds):  # a warmup round would take a sample untimed
                target()
            for _ in range(rounds):
                start = self._timer()
                target()
                self.durations.append(self._timer() - start)
            target()

    bench = Benchmark()
    _feed_device_time(bench, [1e-3, 2e-3, 3e-3])
    assert bench.durations == pytest.approx([1e-3, 2e-3, 3e-3])
