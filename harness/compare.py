"""Compare two runs: pytest-benchmark's table, then a verdict per benchmark on device-time medians.

    python -m harness.compare [BASE] [HEAD] [--threshold 10]

BASE and HEAD are run ids under reports/runs, run directories, or benchmark.json files; by default
the last two runs that have a benchmark.json. A change counts as a regression only when the median
grew by more than the threshold AND by more than the noise seen in either run (the p20-p80 spread
of its repetitions); a benchmark that was ok in BASE and failed in HEAD is one too. Exit status 1
when there is a regression, 2 when the two runs have no benchmark ok in both (nothing compared) or
when BASE or HEAD is not a run or cannot be read (CannotCompare, its message on stderr).

A run is read from its benchmark.json and the records beside it (results.jsonl), which have the
last word: they hold every benchmark of the run, those of its resumed calls (whose
pytest-benchmark files are benchmark-resumed-*.json) and those that failed before they were
timed (which pytest-benchmark's file lacks), with the same device-time medians. Any other
benchmark JSON file is read as it is. pytest-benchmark's table shows a run's calls together too:
its files merged into one (`merged`), a later call's entry replacing an earlier one's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import results


class CannotCompare(SystemExit):
    """A BASE or HEAD that is not there or cannot be read. Uncaught (harness.report --compare) it
    stops with its message; compare's main makes it exit status 2, as 1 means a regression."""


def is_run(d: Path) -> bool:
    """A run directory: its pytest-benchmark file, or its records alone (a run with WORKERS=N,
    under which pytest-benchmark saves nothing)."""
    return (d / "benchmark.json").is_file() or (d / "results.jsonl").is_file()


def json_path(ref: str) -> Path:
    """A run's benchmark.json (which need not exist: see is_run), or any benchmark JSON file.
    What it returns names the same run again: main hands it on to the report."""
    p = Path(ref)
    if p.is_file() or (p.name == "benchmark.json" and is_run(p.parent)):
        return p
    for d in (p, results.REPORTS / "runs" / ref):
        if is_run(d):
            return d / "benchmark.json"
    raise CannotCompare(f"no benchmark.json or results.jsonl for run {ref!r} (looked in {p} "
                        f"and {results.REPORTS / 'runs' / ref})")


def last_two() -> tuple[Path, Path]:
    runs = sorted((d for d in (results.REPORTS / "runs").glob("*") if is_run(d)),
                  key=lambda d: max(f.stat().st_mtime for f in (d / "benchmark.json",
                                                                 d / "results.jsonl")
                                    if f.is_file()))
    if len(runs) < 2:
        raise CannotCompare(f"need two runs under {results.REPORTS / 'runs'}, found "
                            f"{len(runs)}: run `make bench` twice or pass BASE= and HEAD=")
    return runs[-2] / "benchmark.json", runs[-1] / "benchmark.json"


def _read(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:  # a run of records alone (WORKERS=N)
        raise ValueError(f"{f} does not exist") from None
    except json.JSONDecodeError as e:  # a file cut short: its call killed while writing it
        raise ValueError(f"{f} is not valid JSON ({e})") from None


def merged(path: Path) -> dict:
    """A run's benchmarks in one pytest-benchmark document. A run's benchmark.json is merged
    with its resumed calls' files in the order the calls wrote them (by the time each file holds:
    a name's HHMMSS turns over at midnight and a checkout's mtimes are its own), a benchmark a
    later call timed again taking the later entry. Any other file is taken alone."""
    data = _read(path)
    if path.name == "benchmark.json":
        resumed = [_read(f) for f in path.parent.glob("benchmark-resumed-*.json")]
        calls = [data, *sorted(resumed, key=lambda d: d.get("datetime", ""))]
        data = {**data, "benchmarks": list({b["fullname"]: b for d in calls
                                            for b in d.get("benchmarks", [])}.values())}
    return data


def table_file(path: Path, data: dict, names: set[str], scratch: Path) -> Path:
    """scratch/<run>.json for pytest-benchmark's table (which names each run by its file): the
    run's benchmarks whose fullname is in `names`."""
    run = path.parent.name if path.name == "benchmark.json" else path.stem
    out = scratch / f"{run}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**data, "benchmarks": [b for b in data.get("benchmarks", [])
                                                      if b["fullname"] in names]}))
    return out


def print_table(base: Path, head: Path) -> None:
    """pytest-benchmark's own table of the two runs, grouped by case: a row per benchmark with
    both medians (device time) and the change where this pytest-benchmark has `--between`,
    else a row per benchmark and run."""
    from pytest_benchmark import table

    columns = (["--between=median"] if hasattr(table, "CompareBetweenResults")
               else ["--columns=median,iqr"])
    try:
        runs = [(p, merged(p), side) for p, side in ((base, "base"), (head, "head"))]
    except ValueError as e:
        print(f"no pytest-benchmark table: {e}; the verdicts below read the records",
              file=sys.stderr)
        return
    # The benchmarks both runs timed: pytest-benchmark takes as each group's reference the run
    # holding the group's first name, so a name in one run only made head the reference (its
    # changes printed with the sign flipped), and a name head lacks broke its sort by name.
    both = set.intersection(*({b["fullname"] for b in data.get("benchmarks", [])}
                              for _, data, _ in runs))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        # relative paths: the table labels a file by its path less the files' common prefix
        files = [str(table_file(p, data, both, scratch / side).relative_to(scratch))
                 for p, data, side in runs]
        done = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", *files,
                               *columns, "--group-by=group", "--sort=name"],
                              cwd=tmp, check=False)
    if done.returncode:
        print(f"pytest-benchmark's table failed (exit status {done.returncode}); the verdicts "
              "below do not depend on it", file=sys.stderr)


@dataclass
class Change:
    name: str
    base_s: float
    head_s: float | None  # None: the benchmark failed or was skipped in head
    noise: float
    failure: str = ""  # why it failed or was skipped in head
    # skipped in head: listed, not a regression (the head's machine may lack the backend)
    skipped: bool = False

    @property
    def change(self) -> float | None:
        return None if self.head_s is None else self.head_s / self.base_s - 1.0

    def regression(self, threshold: float) -> bool:
        if self.head_s is None:
            return not self.skipped
        return self.change > threshold and self.change > self.noise

    def verdict(self, threshold: float) -> str:
        if self.head_s is None:
            return "SKIPPED" if self.skipped else "FAILED"
        if self.regression(threshold):
            return "REGRESSION"
        return "faster" if self.change < -max(threshold, self.noise) else "same"


@dataclass
class Entry:
    status: str
    median_s: float | None
    spread: float
    reason: str = ""


def entries(path: Path) -> dict[str, Entry]:
    """A run's benchmarks by record key (op/impl/case-dtype[-mode]; a benchmark this suite did
    not write by its name): those of the pytest-benchmark file, then, for a run's
    benchmark.json, the records beside it, which say the last word."""
    out = {}
    records = path.parent / "results.jsonl"
    with_records = path.name == "benchmark.json" and records.is_file()
    try:
        benchmarks = _read(path).get("benchmarks", [])
    except ValueError as e:
        if not with_records:
            raise CannotCompare(f"cannot compare: {e}") from None
        benchmarks = []  # the records hold every benchmark of the run
    for b in benchmarks:
        stats, info = b.get("stats") or {}, b.get("extra_info") or {}
        key = results.record_key(info) if {"op", "impl", "case", "dtype"} <= info.keys() \
            else b["name"]
        out[key] = Entry(info.get("status", "ok"), stats.get("median"), info.get("spread") or 0.0,
                         info.get("reason") or "")
    if with_records:
        out.update({results.record_key(r): Entry(r["status"], r.get("median_s"),
                                                 r.get("spread") or 0.0, r.get("reason") or "")
                    for r in results.load(records)})
    return out


def _ok(e: Entry) -> bool:
    return e.status == "ok" and bool(e.median_s)


def not_run(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """The benchmarks ok in base `a` that head `b` did not run."""
    return sorted(n for n, e in a.items() if _ok(e) and n not in b)


def changes(a: dict[str, Entry], b: dict[str, Entry]) -> list[Change]:
    """Every benchmark ok in base `a` that head `b` ran (`entries` of each): its change, or its
    failure or skip in head."""
    out = []
    for name in sorted(n for n in a.keys() & b.keys() if _ok(a[n])):
        if _ok(b[name]):
            out.append(Change(name, a[name].median_s, b[name].median_s,
                              max(a[name].spread, b[name].spread)))
        else:
            out.append(Change(name, a[name].median_s, None, a[name].spread, b[name].reason,
                              skipped=b[name].status != "failed"))
    return out


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
    try:
        base, head = map(json_path, args.runs) if args.runs else last_two()
        base_entries, head_entries = entries(base), entries(head)
    except CannotCompare as e:
        print(e, file=sys.stderr)
        return 2
    if not args.no_table:
        print_table(base, head)
    found = changes(base_entries, head_entries)
    threshold = args.threshold / 100
    print(f"\nbase {base}\nhead {head}\n")
    print(f"{'benchmark':<70}{'base':>11}{'head':>11}{'change':>9}{'noise':>8}  verdict")
    bad = 0
    for c in found:
        verdict = c.verdict(threshold)
        bad += c.regression(threshold)
        if c.head_s is None:
            print(f"{c.name[:69]:<70}{c.base_s * 1e6:>9.1f}us{verdict.lower():>11}{'':>9}"
                  f"{'':>8}  {verdict}: {c.failure[:200]}")
            continue
        print(f"{c.name[:69]:<70}{c.base_s * 1e6:>9.1f}us{c.head_s * 1e6:>9.1f}us"
              f"{100 * c.change:>+8.1f}%{100 * c.noise:>7.1f}%  {verdict}")
    if args.report:
        from harness import report

        if not (head.parent / "results.jsonl").is_file():  # a benchmark JSON file of no run
            print(f"no report written: {head} is not in a run directory")
        elif report.committed_baseline(head.parent):  # its report is the one its run wrote
            print(f"no report written: {head.parent} is a committed baseline")
        else:
            print("wrote", report.write(head.parent, str(base), args.threshold))
    skipped = sum(c.skipped for c in found)
    failed = sum(c.head_s is None for c in found) - skipped
    print(f"\n{len(found) - failed - skipped} benchmarks compared, {bad - failed} regression(s) "
          f"over {args.threshold:g}% and over the measured noise, {failed} ok in base and failed "
          f"in head, {skipped} ok in base and skipped in head, "
          f"{len(not_run(base_entries, head_entries))} ok in base and not run in head")
    if len(found) == skipped:
        print("nothing to compare: no benchmark is ok in base and run in head (other ops, cases "
              "or implementations?)")
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
