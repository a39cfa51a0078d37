"""Compare two runs: pytest-benchmark's table, then a verdict per benchmark on device-time medians.

    python -m harness.compare [BASE] [HEAD] [--threshold 10]

BASE and HEAD are run ids under reports/runs, run directories, or benchmark.json files; by default
the last two runs that have a benchmark.json. A change counts as a regression only when the median
grew by more than the threshold AND by more than the noise seen in either run (the p20-p80 spread
of its repetitions). Exit status 1 when there is a regression.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import results


def json_path(ref: str) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    for d in (p, results.REPORTS / "runs" / ref):
        if (d / "benchmark.json").is_file():
            return d / "benchmark.json"
    raise SystemExit(f"no benchmark.json for run {ref!r} (looked in {p} and "
                     f"{results.REPORTS / 'runs' / ref})")


def last_two() -> tuple[Path, Path]:
    runs = sorted((results.REPORTS / "runs").glob("*/benchmark.json"),
                  key=lambda p: p.stat().st_mtime)
    if len(runs) < 2:
        raise SystemExit(f"need two runs with a benchmark.json under {results.REPORTS / 'runs'}, "
                         f"found {len(runs)}: run `make bench` twice or pass BASE= and HEAD=")
    return runs[-2], runs[-1]


@dataclass
class Change:
    name: str
    base_s: float
    head_s: float
    noise: float

    @property
    def change(self) -> float:
        return self.head_s / self.base_s - 1.0

    def regression(self, threshold: float) -> bool:
        return self.change > threshold and self.change > self.noise

    def verdict(self, threshold: float) -> str:
        if self.regression(threshold):
            return "REGRESSION"
        return "faster" if self.change < -max(threshold, self.noise) else "same"


def _medians(path: Path) -> dict[str, tuple[float, float]]:
    data = json.loads(path.read_text())
    out = {}
    for b in data.get("benchmarks", []):
        stats, info = b.get("stats") or {}, b.get("extra_info") or {}
        if info.get("status") == "ok" and stats.get("median"):
            out[b["name"]] = (stats["median"], info.get("spread") or 0.0)
    return out


def changes(base: Path, head: Path) -> list[Change]:
    a, b = _medians(base), _medians(head)
    return [Change(n, a[n][0], b[n][0], max(a[n][1], b[n][1])) for n in sorted(a.keys() & b.keys())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="BASE HEAD (default: the last two runs)")
    ap.add_argument("--threshold", type=float, default=10.0, help="percent (default 10)")
    ap.add_argument("--no-table", action="store_true", help="skip pytest-benchmark's table")
    ap.add_argument("--report", action="store_true",
                    help="also add the comparison to HEAD's report (index.html, summary.md)")
    args = ap.parse_args(argv)
    if len(args.runs) not in (0, 2):
        ap.error("give both BASE and HEAD, or neither")
    base, head = (map(json_path, args.runs) if args.runs else last_two())
    if not args.no_table:
        subprocess.run([sys.executable, "-m", "pytest_benchmark.cli", "compare", str(base),
                        str(head), "--columns=median,iqr", "--group-by=group", "--sort=name"],
                       check=False)
    found = changes(base, head)
    threshold = args.threshold / 100
    print(f"\nbase {base}\nhead {head}\n")
    print(f"{'benchmark':<70}{'base':>11}{'head':>11}{'change':>9}{'noise':>8}  verdict")
    bad = 0
    for c in found:
        verdict = c.verdict(threshold)
        bad += verdict == "REGRESSION"
        print(f"{c.name[:69]:<70}{c.base_s * 1e6:>9.1f}us{c.head_s * 1e6:>9.1f}us"
              f"{100 * c.change:>+8.1f}%{100 * c.noise:>7.1f}%  {verdict}")
    if args.report:
        from harness import report

        if report.committed_baseline(head.parent):  # its report is the one its run wrote
            print(f"no report written: {head.parent} is a committed baseline")
        else:
            print("wrote", report.write(head.parent, str(base), args.threshold))
    print(f"\n{len(found)} benchmarks compared, {bad} regression(s) over {args.threshold:g}% "
          "and over the measured noise")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
