"""The GPU baseline's targets judged from records (harness.targets) and their report section."""
from pathlib import Path

import pytest

from harness import cases, report, results, targets
from harness.bench import plan

BASELINE = (Path(__file__).resolve().parent.parent / "reports" / "baselines"
            / "nvidia-h100-80gb-hbm3" / "2026-11-23" / "run")
MATMUL = [c.name for c in cases.cases("matmul", "standard")]
ATTENTION = cases.cases("attention", "standard")


def rec(op, impl, case, median_s, status="ok", mode="fwd", dims=None, **extra):
    return {"op": op, "impl": impl, "case": case, "dtype": "bfloat16", "mode": mode,
            "status": status, "median_s": median_s if status == "ok" else None,
            "dims": dims or {}, **extra}


def matmul_run(triton_pct: dict[str, float]) -> list[dict]:
    """cuBLAS at 1 ms on every standard shape; triton at the given percent of it."""
    out = [rec("matmul", "torch", c, 1e-3) for c in MATMUL]
    for c, pct in triton_pct.items():
        out.append(rec("matmul", "triton", c, 1e-3 * 100 / pct) if pct else
                   rec("matmul", "triton", c, None, status="failed"))
    return out


def the(verdicts, target_start, impl):
    (v,) = [v for v in verdicts if v.target.startswith(target_start) and v.impl == impl]
    return v


def test_matmul_against_cublas_is_a_geomean_over_every_standard_shape():
    ok = targets.judge(matmul_run({c: 96.0 for c in MATMUL}), None)
    v = the(ok, "matmul at >= 95%", "triton")
    assert (v.word, round(v.reached, 6), v.failed, v.absent) == ("met", 96.0, (), ())
    low = the(targets.judge(matmul_run({c: 94.0 for c in MATMUL}), None), "matmul at >= 95%",
              "triton")
    assert low.word == "MISSED"
    # a failed shape misses the target even when the others are fast
    failed = {c: 120.0 for c in MATMUL} | {MATMUL[0]: None}
    v = the(targets.judge(matmul_run(failed), None), "matmul at >= 95%", "triton")
    assert v.reached == pytest.approx(120.0) and v.word == "MISSED" and v.failed == (MATMUL[0],)
    # every shape failed: no figure, and still a miss, with the failures in the report
    v = the(targets.judge(matmul_run(dict.fromkeys(MATMUL)), None), "matmul at >= 95%", "triton")
    assert (v.reached, v.word, v.failed) == (None, "MISSED", tuple(sorted(MATMUL)))
    section = report.render_markdown("t", [report.targets_section(
        report.Run(Path("r"), matmul_run(dict.fromkeys(MATMUL)), {}, None))])
    assert f"| triton | MISSED | - | >= 95 % | no case with ok records of both triton and torch; " \
           f"failed: {sorted(MATMUL)[0]}, " in section
    # a shape it never ran: the geomean over the others is not a verdict
    v = the(targets.judge(matmul_run({c: 96.0 for c in MATMUL[1:]}), None), "matmul at >= 95%",
            "triton")
    assert v.word == "incomplete" and v.absent == (MATMUL[0],)
    # the covered shapes are the standard tier's, whatever the run holds: one fast shape of eight
    # says nothing yet
    one = [rec("matmul", "torch", MATMUL[0], 1e-3), rec("matmul", "triton", MATMUL[0], 0.5e-3)]
    v = the(targets.judge(one, None), "matmul at >= 95%", "triton")
    assert v.word == "incomplete" and len(v.absent) == len(MATMUL) - 1
    assert the(ok, "matmul at >= 85%", "pallas").word == "no data"


def test_attention_throughput_covers_d128_from_4k_tokens_only():
    long = [c for c in ATTENTION if c.dims["D"] == 128 and c.dims["Sq"] >= 4096]
    assert long and all(c.dims["Sk"] >= 4096 for c in long)
    d64 = next(c for c in ATTENTION if c.dims["D"] == 64)
    d128_1k = next(c for c in ATTENTION if c.dims["D"] == 128 and c.dims["Sq"] == 1024)
    runs = [rec("attention", "triton", c.name, 1e-3, dims=c.dims, tflops=600.0) for c in long]
    runs += [rec("attention", "triton", c.name, 1e-3, dims=c.dims, tflops=100.0)
             for c in (d64, d128_1k)]
    v = the(targets.judge(runs, None), "attention forward", "triton")
    assert (v.word, v.reached) == ("met", 600.0)  # D=64 and 1k tokens are not covered
    runs[0]["tflops"] = 549.0
    v = the(targets.judge(runs, None), "attention forward", "triton")
    assert (v.word, v.reached) == ("MISSED", 549.0)
    assert f"{len(long) - 1} of {len(long)} cases at or above" in v.detail


def test_backward_within_two_and_a_half_forwards():
    """Over every standard attention case: the largest backward / forward ratio; a case without
    both ok records makes the verdict incomplete, a failed one misses it."""
    names = [c.name for c in ATTENTION]

    def run(bwd_s: dict[str, float | None]):
        out = [rec("attention", "triton", c, 1e-3, tflops=100.0) for c in names]
        return out + [rec("attention", "triton", c, s, mode="bwd", status="ok" if s else "failed")
                      for c, s in bwd_s.items()]

    def verdict(bwd_s):
        return the(targets.judge(run(bwd_s), None), "attention backward", "triton")

    assert verdict(dict.fromkeys(names, 2.4e-3)).word == "met"
    v = verdict(dict.fromkeys(names, 2.4e-3) | {names[1]: 2.6e-3})
    assert v.word == "MISSED" and v.reached == pytest.approx(2.6)
    assert f"worst {names[1]}" in v.detail
    # backward run on one case only: 2.4x there says nothing of the others
    v = verdict({names[0]: 2.4e-3})
    assert v.word == "incomplete" and v.absent == tuple(sorted(names[1:]))
    # a failed backward misses the target
    v = verdict(dict.fromkeys(names, 2.4e-3) | {names[0]: None})
    assert v.word == "MISSED" and v.failed == (names[0],)
    # cases outside the standard tier are not judged
    v = the(targets.judge(run(dict.fromkeys(names, 2.4e-3)) + [
        rec("attention", "triton", "odd", 1e-3, tflops=1.0), rec("attention", "triton", "odd", 9e-3,
                                                     mode="bwd")], None),
        "attention backward", "triton")
    assert (v.word, v.reached) == ("met", pytest.approx(2.4))


def test_conv2d_targets_take_the_resnet50_layers_and_classes_by_kernel_and_stride():
    resnet = [c for c in cases.cases("conv2d", "standard") if c.name in cases.RESNET50_LAYERS]
    odd = next(c for c in cases.cases("conv2d", "standard") if c.name.startswith("odd_"))
    assert len(resnet) == 24
    runs = []
    for c in resnet + [odd]:
        dims = {**c.dims, "stride": list(cases.pair(c.dims["stride"]))}  # as read from JSON
        fast = c.dims["KH"] == 7 or c is odd  # ahead only on the stem (and an odd case)
        runs += [rec("conv2d", "torch", c.name, 1e-3, dims=dims),
                 rec("conv2d", "triton", c.name, 0.8e-3 if fast else 1.25e-3, dims=dims)]
    verdicts = targets.judge(runs, None)
    geomean = the(verdicts, "conv2d at >= 85%", "triton")
    assert geomean.word == "MISSED" and "24 cases" in geomean.detail  # the odd case left out
    ahead = the(verdicts, "conv2d ahead", "triton")
    assert ahead.word == "met" and ahead.reached == pytest.approx(125.0)
    assert "best class 7x7/2" in ahead.detail and "3x3/2 80.0%" in ahead.detail


def test_the_targets_read_what_make_gpu_runs_first_and_no_more():
    """targets.READS (bench --targets-first) holds every benchmark a target compares: with those
    records alone each kernel's target has a figure over all of its cases, and without any one of
    them some target lacks a case."""
    tier = plan(["matmul", "conv2d", "attention"], [], "standard", ["bfloat16"], ["fwd", "bwd"])
    read = [b for b in tier if targets.read_by_targets(b.op, b.impl, b.case, b.dtype, b.mode)]
    # matmul: 8 shapes x (cuBLAS and four kernels); conv2d: 24 ResNet-50 layers x (cuDNN,
    # triton); attention: triton on 16 cases, forward and backward
    assert len(read) == 8 * 5 + 24 * 2 + 16 * 2
    records = [rec(b.op, b.impl, b.case.name, 1e-3, mode=b.mode, dims=b.case.dims, tflops=600.0)
               for b in read]
    kernels = [v for v in targets.judge(records, None) if v.impl != "all"]  # not noise, tier time
    assert all(v.reached is not None and not v.absent and not v.failed for v in kernels)
    for i, b in enumerate(read):
        fewer = targets.judge(records[:i] + records[i + 1:], None)
        assert any(v.absent for v in fewer if v.impl != "all"), b.key
    assert not targets.read_by_targets("matmul", "triton", read[0].case, "float16", "fwd")


def test_noise_counts_kernels_over_100_us_timed_twice():
    runs = [rec("matmul", "triton", "a", 200e-6, median_again_s=203e-6, again_change=0.015),
            rec("matmul", "triton", "b", 50e-6, median_again_s=60e-6, again_change=0.2)]
    v = the(targets.judge(runs, None), "timing noise", "all")
    assert v.word == "met" and v.reached == pytest.approx(1.5)
    runs[0]["again_change"] = -0.025
    assert the(targets.judge(runs, None), "timing noise", "all").word == "MISSED"


def test_tier_time_is_the_tiers_only_when_the_run_holds_all_of_it():
    whole = [rec("matmul", impl, c, 1e-3) for c in MATMUL for impl in ("torch", "triton")]
    assert the(targets.judge(whole, 300.0), "the whole standard tier", "all").word == "met"
    assert the(targets.judge(whole, 500.0), "the whole standard tier", "all").word == "MISSED"
    v = the(targets.judge(whole[1:], 300.0), "the whole standard tier", "all")
    assert v.word == "incomplete" and v.absent == (f"matmul/torch/{MATMUL[0]}-fwd",)
    assert "15 of the 16 benchmarks" in v.detail
    assert the(targets.judge(whole[1:], 500.0), "the whole standard tier",
               "all").word == "MISSED (incomplete)"
    smoke = [rec("matmul", "torch", c.name, 1e-3) for c in cases.cases("matmul", "smoke")]
    assert the(targets.judge(smoke, 30.0), "the whole standard tier", "all").word == "no data"


def test_a_host_timed_kernel_against_device_timed_stock_is_said_to_be_a_lower_bound():
    """On a GPU a JAX kernel its profile could not time is timed on the host clock, dispatch
    included: the target's figure says how many of its cases were, and the report's kernel
    table counts them."""
    runs = [rec("matmul", "torch", c, 1e-3, timing_method="cuda_events+l2_flush+gated",
                kind="stock", framework="torch", flops=1e9) for c in MATMUL]
    runs += [rec("matmul", "pallas", c, 2e-3, kind="hand", framework="jax", flops=1e9,
                 timing_method=("perf_counter+block_until_ready+l2_flush" if i < 3
                                else "jax_profiler+l2_flush")) for i, c in enumerate(MATMUL)]
    v = the(targets.judge(runs, None), "matmul at >= 85%", "pallas")
    assert v.reached == pytest.approx(50.0)
    assert "3 of them timed on the host clock against torch's device time" in v.detail
    section = report.kernels_section(report.Run(Path("u"), runs, {}, None))
    table = section.blocks[1]
    (row,) = table.rows
    column = dict(zip(table.headers, row))
    assert [column["impl"].text, column["host-clock cases"].text] == ["pallas", "3"]


def test_a_target_counts_the_cases_measured_under_a_guards_flag():
    """A throttled or low-clock record (either side of a comparison) was measured at other
    clocks than the rest: each target's figure says how many of its cases hold one."""
    runs = [rec("matmul", "torch", c, 1e-3, flags=["throttled:power"] if i == 0 else [])
            for i, c in enumerate(MATMUL)]
    runs += [rec("matmul", "triton", c, 1e-3, flags=["low_clock:1485/1980"] if i < 2 else [])
             for i, c in enumerate(MATMUL)]
    v = the(targets.judge(runs, None), "matmul at >= 95%", "triton")
    assert v.detail.endswith("; 2 of them flagged by a measurement guard (throttled, low clock, "
                             "shared GPU or NVML unreadable)")
    clean = [{**r, "flags": []} for r in runs]
    assert "flagged" not in the(targets.judge(clean, None), "matmul at >= 95%", "triton").detail


def test_tier_time_counts_the_standard_tiers_benchmarks_only():
    """Standard matmuls of 10 s with a 50 s full-tier matmul and a 50 s float32 one after each
    (1 s apart): the tier's time is its own benchmarks and the second before each, not the rest
    of the run."""
    full_only = [c.name for c in cases.cases("matmul", "full") if c.name not in MATMUL]
    start, records = 1_800_000_000 * 10**9, []

    def bench(case, seconds, dtype="bfloat16"):
        nonlocal start
        records.append(dict(rec("matmul", "torch", case, 1e-3), dtype=dtype, phases=[
            {"name": "timed", "start_ns": start, "end_ns": start + int(seconds * 1e9)}]))
        start += int((seconds + 1) * 1e9)

    for case, other in zip(MATMUL, full_only):
        bench(case, 10)
        bench(other, 50)
        bench(case, 50, "float32")
    run_s = report.run_seconds(records, targets.timed_for_tier)
    assert run_s == pytest.approx(8 * 10 + 7)
    v = the(targets.judge(records, run_s), "the whole standard tier", "all")
    assert v.word == "met" and v.reached == pytest.approx(87)
    assert "8 of the 8 benchmarks" in v.detail


def test_the_h100_baseline_judged():
    """The committed 2026-11-23 H100 run: matmul and conv2d complete, attention D=64 only."""
    run = report.load_run(BASELINE)
    verdicts = targets.judge(run.records, report.run_seconds(run.records))
    matmul = the(verdicts, "matmul at >= 95%", "triton")
    assert matmul.word == "MISSED" and matmul.reached == pytest.approx(61.7, abs=0.05)
    assert "8 cases" in matmul.detail
    assert the(verdicts, "attention forward", "triton").word == "no data"  # no D=128 records
    conv = the(verdicts, "conv2d at >= 85%", "triton")
    assert conv.word == "MISSED" and "24 cases" in conv.detail
    tier = the(verdicts, "the whole standard tier", "all")
    assert tier.word == "MISSED (incomplete)" and "384 of the" in tier.detail
    section = report.targets_section(run)
    assert [row[2].text for row in section.blocks[1].rows] == [v.word for v in verdicts]


def test_targets_section_in_the_written_report(tmp_path):
    for name in ("results.jsonl", "env.json", "peaks.json"):
        (tmp_path / name).write_bytes((BASELINE / name).read_bytes())
    report.write(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "## Targets" in text and "| matmul at >= 95% of cuBLAS" in text
    assert results.load(tmp_path / "results.jsonl")  # the records are read, not rewritten


def test_a_throughput_exactly_at_its_target_meets_it():
    """The target reads ">= 550 TFLOP/s": 550 in every case it covers meets it."""
    long = [c for c in cases.cases("attention", "standard")
            if c.dims["D"] == 128 and min(c.dims["Sq"], c.dims["Sk"]) >= 4096]
    runs = [rec("attention", "triton", c.name, 1e-3, dims=c.dims, tflops=550.0) for c in long]
    (verdict,) = [v for v in targets.judge(runs, None)
                  if v.target.startswith("attention forward") and v.impl == "triton"]
    assert (verdict.word, verdict.reached) == ("met", 550.0)
