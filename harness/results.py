"""Run directories and records.

A run lives in reports/runs/<run-id>/ with results.jsonl (one JSON record per benchmark, appended
and flushed as each ends, so a killed run keeps what it measured) and benchmark.json
(pytest-benchmark's). reports/latest points at the newest run.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from harness import cases as cases_mod

_ROOT = Path(__file__).resolve().parent.parent
REPORTS = Path(os.environ.get("KERNELS_REPORTS", _ROOT / "reports"))
PROFILES = Path(os.environ.get("KERNELS_PROFILES", _ROOT / "profiles"))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_dir(run_id: str, reports: Path = REPORTS) -> Path:
    return reports / "runs" / run_id


def point_latest(target: Path, link: Path) -> None:
    """Atomically repoints the `link` symlink at `target`."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def start_run(run_id: str, reports: Path = REPORTS) -> Path:
    d = run_dir(run_id, reports)
    d.mkdir(parents=True, exist_ok=True)
    point_latest(d, reports / "latest")
    return d


def start_profiles(run_id: str, profiles: Path = PROFILES) -> Path:
    """profiles/<run-id>/ for the run's traces, with profiles/latest pointing at it."""
    d = profiles / run_id
    d.mkdir(parents=True, exist_ok=True)
    point_latest(d, profiles / "latest")
    return d


def write_text(path: Path, text: str) -> None:
    """Replaces `path` atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def append(path: Path, record: dict) -> None:
    line = json.dumps(record, sort_keys=True, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(path: Path, missing_ok: bool = False) -> list[dict]:
    """Records of a results.jsonl; a line cut short by a kill is ignored. missing_ok: a run
    that has recorded nothing yet (no file) has no records, rather than an error."""
    if missing_ok and not Path(path).exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def record_key(r: dict) -> str:
    mode = r.get("mode", "fwd")
    return f"{r['op']}/{r['impl']}/{r['case']}-{r['dtype']}" + ("" if mode == "fwd" else f"-{mode}")


def recount(r: dict) -> None:
    """The record's FLOPs and bytes by today's count (harness.cases), and its TFLOP/s and GB/s
    with them: a run recorded before a count was corrected (the conv2d and attention byte
    floors) is judged as a new one would be; what it recorded is kept under `recorded_counts`."""
    if not r.get("dims"):
        return
    case, mode = cases_mod.Case(r["op"], r["case"], r["dims"]), r.get("mode", "fwd")
    counts = {"flops": cases_mod.flops(case, mode),
              "bytes": cases_mod.min_bytes(case, r["dtype"], mode)}
    if all(r.get(k) == v for k, v in counts.items()):
        return
    r["recorded_counts"] = {k: r.get(k) for k in counts}
    r.update(counts)
    if r.get("median_s"):
        r.update(cases_mod.rates(counts["flops"], counts["bytes"], r["median_s"]))


def last_of_each(records: list[dict]) -> tuple[list[dict], int]:
    """One record per benchmark, the last one written (results.jsonl files concatenated from
    runs that overlap hold some twice: each would otherwise count in every geomean and the
    best of two would be taken), and how many earlier ones were dropped."""
    last = {record_key(r): r for r in records}
    return [r for r in records if last[record_key(r)] is r], len(records) - len(last)


def for_reports(path: Path, missing_ok: bool = False) -> tuple[list[dict], int]:
    """A run's records as the reports read them: counted by today's FLOP and byte counts, one
    per benchmark (last_of_each: the duplicates dropped are counted)."""
    records, dropped = last_of_each(load(path, missing_ok=missing_ok))
    for r in records:
        recount(r)
    return records, dropped
