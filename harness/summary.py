"""The table `make bench` ends with, from a run's records.

    python -m harness.summary [RUN]

RUN is what harness.report takes (a run id under reports/runs, or any directory holding a
results.jsonl; default reports/latest), or a results.jsonl file.
"""
from __future__ import annotations

import sys
from itertools import groupby
from pathlib import Path

from harness import results, timing


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


def table(records: list[dict]) -> str:
    """Per case: each implementation's median, host time per call (GPU), TFLOP/s, percent of the
    best, error, compile time."""
    head = f"  {'impl':<16}{'status':<9}{'median':>11}{'host/call':>11}{'TFLOP/s':>10}" \
           f"{'% best':>8}" \
           f"{'rel err':>10}{'cold':>10}{'warm':>10}  note"
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
            pct = 100 * r["tflops"] / best if best and r["status"] == "ok" else None
            note = r["reason"] if r["status"] != "ok" else " ".join(
                (r.get("flags") or []) + timing.caveats(r.get("timing_method")))
            lines.append(f"  {r['impl']:<16}{r['status']:<9}{_fmt_time(r['median_s']):>11}"
                         f"{_fmt_time(r.get('host_s')):>11}{_fmt(r['tflops'], '.3g'):>10}"
                         f"{_fmt(pct, '.0f'):>8}"
                         f"{_fmt(r['rel_err'], '.2e'):>10}{_fmt_time(r['compile_cold_s']):>10}"
                         f"{_fmt_time(r['compile_warm_s']):>10}  {note[:90]}")
        lines.append("")
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "skipped")}
    lines.append(f"{len(records)} records: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main(argv=None):
    from harness import report  # here, not at the top: report imports this module

    argv = sys.argv[1:] if argv is None else argv
    ref = argv[0] if argv else None
    path = Path(ref) if ref and Path(ref).is_file() else report.resolve(ref) / "results.jsonl"
    print(table(results.load(path)))


if __name__ == "__main__":
    main()
