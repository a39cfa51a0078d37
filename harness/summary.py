"""The table `make bench` ends with, from a run's records.

    python -m harness.summary [RUN]

RUN is what harness.report takes (a run id under reports/runs, or any directory holding a
results.jsonl; default reports/latest), or a results.jsonl file.
"""
from __future__ import annotations

import sys
from itertools import groupby
from pathlib import Path

from harness import memory, results, timing


def _fmt_time(s):
    if s is None:
        return "-"
    if s == 0:  # a compile time clamped at zero (its first call no slower than the median): no unit
        return "0"
    s = float(f"{s:.3g}")  # rounded first: 999.6 us is "1 ms", not "1e+03 us"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def interpreted(r: dict) -> bool:
    """Whether the record's kernel ran in an interpreter (the Triton interpreter, Pallas'
    interpret mode): its time says nothing about the kernel. Records made before the field
    existed say so by their memory method."""
    return bool(r.get("interpreted")) or r.get("peak_method") == memory.INTERPRETED


def notes(r: dict, on_device: bool) -> list[str]:
    """What a reader must know before trusting an ok record's figures: the measurement guards'
    flags (throttling, a low clock, a shared GPU), the timing method's caveats, a host-clock
    time in a run whose others are device times (dispatch included: not comparable with them),
    a kernel run in an interpreter (its time says nothing about the kernel), and a benchmark run
    a second time after running out of memory beside the JAX worker (retried_after says why)."""
    host = on_device and timing.timed_by(r, timing.HOST_CLOCK_METHOD)
    return ((r.get("flags") or []) + timing.caveats(r.get("timing_method"))
            + (["timing:host_clock"] if host else [])
            + (["interpreted"] if interpreted(r) else [])
            + (["retried:out_of_memory"] if r.get("retried_after") else []))


def warm_text(r: dict) -> str:
    """Warm compile time; "(N built)" when the warm call compiled kernels no earlier benchmark
    of its implementation had (N files added to the disk caches): partly a cold compile."""
    built = r.get("compile_warm_built")
    return _fmt_time(r.get("compile_warm_s")) + (f" ({built} built)" if built else "")


def table(records: list[dict], dropped: int = 0) -> str:
    """Per case: each implementation's median and its spread (p20 to p80 over the median), host
    time per call (GPU), TFLOP/s, percent of the best, error, compile time. A failed record's
    time is shown (a wrong result is timed), its rates are not."""
    head = f"  {'impl':<16}{'status':<9}{'median':>11}{'spread':>8}{'host/call':>11}" \
           f"{'TFLOP/s':>10}{'% best':>8}" \
           f"{'rel err':>10}{'cold':>10}{'warm':>19}  note"
    on_device = timing.device_timed(records)
    lines = []

    def group(r):
        return (r["op"], r["case"], r["dtype"], r.get("mode", "fwd"))

    for (op, case, dtype, mode), rows in groupby(sorted(records, key=group), key=group):
        # ok first, fastest first; a failed record may hold a time (a wrong result is timed)
        rows = sorted(rows, key=lambda r: (r["status"] != "ok", r["median_s"] is None,
                                           r["median_s"] or 0))
        best = max((r["tflops"] for r in rows if r["status"] == "ok" and r["tflops"]), default=None)
        lines.append(f"{op} {case} {dtype}" + ("" if mode == "fwd" else f" {mode}"))
        lines.append(head)
        for r in rows:
            ok = r["status"] == "ok"
            pct = 100 * r["tflops"] / best if best and ok else None
            spread = 100 * r["spread"] if r.get("spread") is not None else None
            note = " ".join(notes(r, on_device)) if ok else r["reason"]
            lines.append(f"  {r['impl']:<16}{r['status']:<9}{_fmt_time(r['median_s']):>11}"
                         f"{_fmt(spread, '.0f') + ('%' if spread is not None else ''):>8}"
                         f"{_fmt_time(r.get('host_s')):>11}"
                         f"{_fmt(r['tflops'] if ok else None, '.3g'):>10}"
                         f"{_fmt(pct, '.1f'):>8}"
                         f"{_fmt(r['rel_err'], '.2e'):>10}{_fmt_time(r['compile_cold_s']):>10}"
                         f"{warm_text(r):>19}  {note[:90]}")
        lines.append("")
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "skipped")}
    lines.append(f"{len(records)} records: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                 + (f"; earlier records of a benchmark recorded again later, left out: {dropped}"
                    if dropped else ""))
    return "\n".join(lines)


def main(argv=None):
    from harness import report  # here, not at the top: report imports this module

    argv = sys.argv[1:] if argv is None else argv
    ref = argv[0] if argv else None
    path = Path(ref) if ref and Path(ref).is_file() else report.resolve(ref) / "results.jsonl"
    print(table(*results.for_reports(path)))


if __name__ == "__main__":
    main()
