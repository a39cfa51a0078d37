"""The performance targets of the GPU baseline, judged from a run's own records.

Each target is data (what it compares, over which cases, its threshold); `judge` gives one Verdict
per target and implementation: the figure reached, the cases behind it, and a word for it. The
cases a target covers are the standard tier's (its shapes, ResNet-50 layers or long attention),
whatever the run holds. A covered case whose record failed misses the target; one with no record to
compare (not run, skipped, its stock op failed) makes the verdict "incomplete" at best: a figure
over the cases that happened to run would flatter the kernel. The targets are for bfloat16; records
of other dtypes are not looked at.
"""
from __future__ import annotations

import functools
import operator
import statistics
from dataclasses import dataclass
from typing import Callable

from harness import cases as cases_mod
from harness import guards, timing

DTYPE = "bfloat16"
NOISE_MIN_S = 100e-6  # the noise target is for kernels over 100 us
_COMPARE = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Verdict:
    target: str  # what is asked, in words
    impl: str
    reached: float | None  # in `unit`; None: nothing to judge
    compare: str  # how reached must stand to the threshold: ">=", ">", "<" or "<="
    threshold: float
    unit: str
    detail: str  # the cases behind the figure, worst and best
    failed: tuple[str, ...] = ()  # covered cases whose record failed
    absent: tuple[str, ...] = ()  # covered cases with nothing to compare
    absent_means: str = "nothing to compare"

    @property
    def word(self) -> str:
        """A failed covered case misses the target, also when no case gave a figure."""
        if self.reached is None and not self.failed:
            return "no data"
        if self.failed or not _COMPARE[self.compare](self.reached, self.threshold):
            return "MISSED" + (" (incomplete)" if self.absent else "")
        return "incomplete" if self.absent else "met"

    @property
    def lacking(self) -> str:
        """The covered cases that failed or had nothing to compare, in words."""
        parts = [f"failed: {_names(self.failed)}"] if self.failed else []
        parts += [f"{self.absent_means}: {_names(self.absent)}"] if self.absent else []
        return "; ".join(parts)


def _names(names: tuple[str, ...], shown: int = 6) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _long_d128(case: cases_mod.Case) -> bool:
    return case.dims["D"] == 128 and min(case.dims["Sq"], case.dims["Sk"]) >= 4096


def _records(records: list[dict], op: str, impl: str, mode: str = "fwd") -> dict[str, dict]:
    """impl's bf16 records of op in this mode, by case."""
    return {r["case"]: r for r in records if r["op"] == op and r["impl"] == impl
            and r["dtype"] == DTYPE and r.get("mode", "fwd") == mode}


def _ok(recs: dict[str, dict]) -> dict[str, dict]:
    return {c: r for c, r in recs.items() if r["status"] == "ok" and r.get("median_s")}


def _covered(op: str, keep: Callable[[cases_mod.Case], bool]) -> list[str]:
    """The standard-tier cases of op the target covers, whatever this run holds."""
    return sorted(c.name for c in cases_mod.cases(op, "standard") if keep(c))


def _every(case: cases_mod.Case) -> bool:
    return True


def _resnet50(case: cases_mod.Case) -> bool:
    return case.name in cases_mod.RESNET50_LAYERS


# The stock ops and hand-written kernels the targets compare, and the records they read: per op,
# the implementations, modes and cases. `make gpu` runs these benchmarks first (bench
# --targets-first), so a bench stage cut at its limit has still measured what every target needs.
CUBLAS = CUDNN = "torch"
MATMUL_AT_95, MATMUL_AT_85 = ("triton", "triton_tma"), ("pallas", "pallas_mosaic")
READS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[cases_mod.Case], bool]]] = {
    "matmul": (MATMUL_AT_95 + MATMUL_AT_85 + (CUBLAS,), ("fwd",), _every),
    "conv2d": (("triton", CUDNN), ("fwd",), _resnet50),
    "attention": (("triton",), ("fwd", "bwd"), _every),  # forward throughput, backward / forward
}


def read_by_targets(op: str, impl: str, case: cases_mod.Case, dtype: str, mode: str) -> bool:
    """Whether the targets read this benchmark's record: bf16, and an implementation, mode and
    standard-tier case that a target compares."""
    if dtype != DTYPE or op not in READS:
        return False
    impls, modes, keep = READS[op]
    return impl in impls and mode in modes and case.name in _covered(op, keep)


def _failed_absent(covered, mine: dict, judged) -> tuple[tuple, tuple]:
    failed = tuple(c for c in covered if mine.get(c, {}).get("status") == "failed")
    return failed, tuple(c for c in covered if c not in judged and c not in failed)


def vs_stock(records, target: str, op: str, impl: str, stock: str, threshold_pct: float,
             keep: Callable[[cases_mod.Case], bool]) -> Verdict:
    """impl's throughput as a percentage of `stock`'s on the same cases, geometric mean."""
    covered = _covered(op, keep)
    mine = _records(records, op, impl)
    ok, theirs = _ok(mine), _ok(_records(records, op, stock))
    pct = {c: 100 * theirs[c]["median_s"] / ok[c]["median_s"]
           for c in covered if c in ok and c in theirs}
    failed, absent = _failed_absent(covered, mine, pct)
    if not pct:
        return Verdict(target, impl, None, ">=", threshold_pct, "%",
                       f"no case with ok records of both {impl} and {stock}", failed, absent)
    worst, best = min(pct, key=pct.get), max(pct, key=pct.get)
    # a JAX kernel its profile could not time, against device-timed stock: dispatch included
    host = [c for c in pct if timing.timed_by(ok[c], timing.HOST_CLOCK_METHOD)
            and not timing.timed_by(theirs[c], timing.HOST_CLOCK_METHOD)]
    return Verdict(target, impl, statistics.geometric_mean(pct.values()), ">=", threshold_pct,
                   "%", f"{len(pct)} cases; worst {worst} {pct[worst]:.1f}%, best {best} "
                        f"{pct[best]:.1f}%" + (
                            f"; {len(host)} of them timed on the host clock against {stock}'s "
                            "device time, dispatch included (a lower bound)" if host else "")
                        + _flagged_text([(ok[c], theirs[c]) for c in pct]),
                   failed, absent)


def _flagged_text(compared: list[tuple[dict, ...]]) -> str:
    """How many of the compared cases a measurement guard flagged in any of their records."""
    flagged = sum(any(guards.flagged(r) for r in records) for records in compared)
    return (f"; {flagged} of them flagged by a measurement guard (throttled, low clock, shared "
            "GPU or NVML unreadable)" if flagged else "")


def ahead_on_a_class(records, target: str, op: str, impl: str, stock: str,
                     keep: Callable[[cases_mod.Case], bool]) -> Verdict:
    """The layer class (kernel size and stride) where impl does best against `stock`, geometric
    mean over its layers: ahead when above 100%."""
    mine = _records(records, op, impl)
    ok, theirs = _ok(mine), _ok(_records(records, op, stock))
    covered = _covered(op, keep)
    judged = [c for c in covered if c in ok and c in theirs]
    classes: dict[str, list[float]] = {}
    for c in judged:
        d = ok[c]["dims"]
        stride = cases_mod.pair(d["stride"])
        name = f"{d['KH']}x{d['KW']}" + ("" if stride == (1, 1) else f"/{stride[0]}")
        classes.setdefault(name, []).append(theirs[c]["median_s"] / ok[c]["median_s"])
    failed, absent = _failed_absent(covered, mine, judged)
    if not classes:
        return Verdict(target, impl, None, ">", 100.0, "%",
                       f"no case with ok records of both {impl} and {stock}", failed, absent)
    pct = {k: 100 * statistics.geometric_mean(v) for k, v in classes.items()}
    best = max(pct, key=pct.get)
    return Verdict(target, impl, pct[best], ">", 100.0, "%", f"best class {best}; " + "; ".join(
        f"{k} {pct[k]:.1f}% ({len(classes[k])} layer{'s' * (len(classes[k]) > 1)})"
        for k in sorted(pct)) + _flagged_text([(ok[c], theirs[c]) for c in judged]),
                   failed, absent)


def throughput(records, target: str, op: str, impl: str, threshold_tflops: float,
               keep: Callable[[cases_mod.Case], bool]) -> Verdict:
    """impl's TFLOP/s on every case the target covers; reached is the worst of them."""
    covered = _covered(op, keep)
    mine = _records(records, op, impl)
    tflops = {c: r["tflops"] for c, r in _ok(mine).items() if c in covered}
    failed, absent = _failed_absent(covered, mine, tflops)
    if not tflops:
        return Verdict(target, impl, None, ">=", threshold_tflops, "TFLOP/s",
                       f"no ok {impl} record of a case it covers", failed, absent)
    above = sum(t >= threshold_tflops for t in tflops.values())
    return Verdict(target, impl, min(tflops.values()), ">=", threshold_tflops, "TFLOP/s",
                   f"{above} of {len(tflops)} cases at or above; "
                   + ", ".join(f"{c} {tflops[c]:.0f}" for c in sorted(tflops))
                   + _flagged_text([(mine[c],) for c in tflops]), failed, absent)


def backward_over_forward(records, target: str, op: str, impl: str, limit: float) -> Verdict:
    """impl's backward time over its forward time on each standard case of op; reached is the
    largest ratio. A case whose forward or backward failed misses it, one without ok records of
    both makes it incomplete."""
    covered = _covered(op, _every)
    fwd, bwd = _records(records, op, impl, "fwd"), _records(records, op, impl, "bwd")
    ok_fwd, ok_bwd = _ok(fwd), _ok(bwd)
    ratio = {c: ok_bwd[c]["median_s"] / ok_fwd[c]["median_s"]
             for c in covered if c in ok_fwd and c in ok_bwd}
    failed = tuple(c for c in covered if "failed" in (fwd.get(c, {}).get("status"),
                                                       bwd.get(c, {}).get("status")))
    absent = tuple(c for c in covered if c not in ratio and c not in failed)
    if not ratio:
        return Verdict(target, impl, None, "<=", limit, "x",
                       f"no case with ok {impl} records of both forward and backward", failed,
                       absent)
    worst, best = max(ratio, key=ratio.get), min(ratio, key=ratio.get)
    return Verdict(target, impl, ratio[worst], "<=", limit, "x",
                   f"{len(ratio)} cases; worst {worst} {ratio[worst]:.2f}x, best {best} "
                   f"{ratio[best]:.2f}x" + _flagged_text([(ok_fwd[c], ok_bwd[c]) for c in ratio]),
                   failed, absent)


def retimed(records: list[dict], min_s: float = 0.0) -> list[dict]:
    """The ok records timed a second time in their run (RETIME) whose first median is at least
    min_s, the largest |second median / first - 1| first."""
    return sorted((r for r in records if r["status"] == "ok" and r.get("median_again_s")
                   and r["median_s"] >= min_s), key=lambda r: -abs(r["again_change"]))


def noise(records, target: str, limit_pct: float) -> Verdict:
    """The largest |second median / first - 1| of the benchmarks over NOISE_MIN_S timed twice."""
    twice = retimed([r for r in records if r["dtype"] == DTYPE], NOISE_MIN_S)
    if not twice:
        return Verdict(target, "all", None, "<", limit_pct, "%",
                       f"no bf16 benchmark over {NOISE_MIN_S * 1e6:.0f} us timed twice (RETIME)")
    changes = [100 * abs(r["again_change"]) for r in twice]
    worst = twice[0]
    return Verdict(target, "all", changes[0], "<", limit_pct, "%",
                   f"{len(twice)} benchmarks, median {statistics.median(changes):.2f}%, "
                   f"{sum(c >= limit_pct for c in changes)} at or over; worst {worst['op']} "
                   f"{worst['case']} {worst.get('mode', 'fwd')} {worst['impl']}")


def timed_for_tier(record: dict) -> bool:
    """Whether the tier-time target counts this record's time: a bf16 benchmark of a standard
    tier case (a run may also hold other dtypes, full-tier or SHAPES cases)."""
    return record["dtype"] == DTYPE and record["case"] in _standard_names(record["op"])


@functools.cache
def _standard_names(op: str) -> frozenset[str]:
    return frozenset(_covered(op, _every))


def tier_time(records, target: str, limit_s: float, run_s: float | None) -> Verdict:
    """The wall-clock time in and between the run's benchmarks that timed_for_tier keeps, run_s
    (report.run_seconds; pytest's start-up, the ceilings measured before the first benchmark and
    the report after the last are not in the records). It is the standard tier's time only when
    the run holds every benchmark of it: each standard case of each op in the run, in each mode
    the run measured that op in, for each implementation it ran."""
    ran = [r for r in records if timed_for_tier(r)]
    if not ran or run_s is None:
        return Verdict(target, "all", None, "<", limit_s, "s",
                       "no bf16 record of a standard case with its phases")
    tier, missing = 0, []
    for op in sorted({r["op"] for r in ran}):
        mine = [r for r in ran if r["op"] == op]
        have = {(r["case"], r.get("mode", "fwd"), r["impl"]) for r in mine}
        modes, impls = {r.get("mode", "fwd") for r in mine}, {r["impl"] for r in mine}
        wanted = [(c, m, i) for c in _covered(op, _every) for m in sorted(modes)
                  for i in sorted(impls)]
        tier += len(wanted)
        missing += [f"{op}/{i}/{c}-{m}" for c, m, i in wanted if (c, m, i) not in have]
    return Verdict(target, "all", run_s, "<", limit_s, "s",
                   "in and between benchmarks (start-up and ceilings not counted); "
                   f"{tier - len(missing)} of the {tier} benchmarks of the standard tier (its "
                   "ops, modes and implementations as this run ran them)",
                   absent=tuple(missing), absent_means="not run")


def judge(records: list[dict], run_s: float | None) -> list[Verdict]:
    """Every target, judged on the records (run_s: the wall-clock seconds of the run's
    benchmarks that timed_for_tier keeps)."""
    return [
        *(vs_stock(records, "matmul at >= 95% of cuBLAS, geomean over the standard shapes",
                   "matmul", impl, CUBLAS, 95.0, _every) for impl in MATMUL_AT_95),
        *(vs_stock(records, "matmul at >= 85% of cuBLAS, geomean over the standard shapes",
                   "matmul", impl, CUBLAS, 85.0, _every) for impl in MATMUL_AT_85),
        throughput(records, "attention forward at D=128, S >= 4k: >= 550 TFLOP/s in every case",
                   "attention", "triton", 550.0, _long_d128),
        backward_over_forward(records, "attention backward within 2.5x of the forward's time",
                              "attention", "triton", 2.5),
        vs_stock(records, "conv2d at >= 85% of cuDNN, geomean over the ResNet-50 layers",
                 "conv2d", "triton", CUDNN, 85.0, _resnet50),
        ahead_on_a_class(records, "conv2d ahead of cuDNN on at least one ResNet-50 layer class",
                         "conv2d", "triton", CUDNN, _resnet50),
        noise(records, f"timing noise under 2% for kernels over {NOISE_MIN_S * 1e6:.0f} us", 2.0),
        tier_time(records, "the whole standard tier in under 8 minutes, compilation included",
                  480.0, run_s),
    ]
