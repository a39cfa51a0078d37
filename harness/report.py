"""A run's report: index.html (one self-contained file: plots inline, tables sortable by clicking a
header, nothing fetched from anywhere) and summary.md (the same tables in Markdown), written into
the run directory.

    python -m harness.report [RUN] [--out DIR] [--compare BASE] [--threshold 10]

RUN is a run id under reports/runs, or any directory holding a results.jsonl (a run directory,
reports/baselines/<gpu>/<date>/run); default reports/latest. The report goes into the run's
directory, or DIR: a committed baseline keeps the report its run wrote, so one rendered again
from it needs --out. --compare adds the per-benchmark median changes against another run
(pytest-benchmark files, judged by harness.compare).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from harness import compare, guards, memory, results, targets, timing
from harness import peaks as peaks_mod
from harness import summary
from harness.summary import _fmt, _fmt_time

CANDIDATE_KINDS = ("hand", "plugin")  # measured against the best stock op of the same benchmark
# Peak-memory methods that can only under-count (allocator reuse hides memory from the RSS high
# water mark; XLA:CPU allocates beyond the buffers it planned): a smaller number from one of them
# does not show that less memory was used.
LOWER_BOUND_METHODS = ("rss_high_water_delta", memory.XLA_CPU_PLAN)
# The repository's own committed baselines: KERNELS_REPORTS moves the reports root, not them.
BASELINES = Path(__file__).resolve().parent.parent / "reports" / "baselines"


# ---------------------------------------------------------------- the document
@dataclass
class Cell:
    text: str
    sort: float | None = None  # numeric value a header click sorts by; None sorts by the text
    href: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclass
class Figure:
    png: bytes
    alt: str


@dataclass
class Folded:
    """A block shown on request in the page (a <details>), in full in the Markdown."""
    summary: str
    block: object


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list = field(default_factory=list)  # str (paragraph), Table, Figure, Folded, Section


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _num(x, spec: str, unit: str = "") -> Cell:
    return Cell(_fmt(x, spec) + (unit if x is not None else ""), x)


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _time(s) -> Cell:
    return Cell(_fmt_time(s), s)


def _bytes(n) -> Cell:
    return Cell(_si(n, "B"), n)


def _times(x) -> Cell:
    return Cell("-" if x is None else f"{x:.3g}x", x)


# ---------------------------------------------------------------- rendering
_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;max-width:1600px;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:12px}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eee;cursor:pointer;position:sticky;top:0}th:hover{background:#dde}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%;display:block;margin:.5em 0}
.num{white-space:nowrap}.failed{color:#b00}.skipped{color:#777}nav a{margin-right:1em}"""

# Click a header to sort by it (again to reverse); cells with data-v sort as numbers, first.
_JS = """document.querySelectorAll("table.sortable th").forEach(th => th.onclick = () => {
  const body = th.closest("table").tBodies[0], col = th.cellIndex;
  const asc = th.dataset.dir !== "asc"; th.dataset.dir = asc ? "asc" : "desc";
  const key = r => { const c = r.cells[col];
    return "v" in c.dataset ? [0, +c.dataset.v] : [1, c.textContent]; };
  const rows = [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    const c = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0); return asc ? c : -c; });
  rows.forEach(r => body.appendChild(r));
});"""


def _html_cell(c: Cell, tag: str = "td") -> str:
    sort = "" if c.sort is None or not math.isfinite(c.sort) else f' data-v="{c.sort:.6g}"'
    text = html.escape(c.text)
    if c.href:
        text = f'<a href="{html.escape(c.href)}">{text}</a>'
    css = {"failed": "failed", "skipped": "skipped"}.get(c.text, "num" if sort else "")
    css = f' class="{css}"' if css else ""
    return f"<{tag}{sort}{css}>{text}</{tag}>"


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "\n".join("<tr>" + "".join(map(_html_cell, row)) + "</tr>" for row in t.rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead>\n' \
           f"<tbody>\n{body}\n</tbody></table>"


def _html_block(block, level: int) -> str:
    if isinstance(block, Section):
        inner = "\n".join(_html_block(b, level + 1) for b in block.blocks)
        return f'<section id="{block.anchor}">\n<h{level}>{html.escape(block.title)}</h{level}>' \
               f"\n{inner}\n</section>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Folded):
        return f"<details><summary>{html.escape(block.summary)}</summary>\n" \
               f"{_html_block(block.block, level)}\n</details>"
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode()
        return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    return f"<p>{html.escape(block)}</p>"


def render_html(title: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(_html_block(s, 2) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
            f"<script>{_JS}</script>\n</body>\n</html>\n")


def _md_cell(c: Cell) -> str:
    text = c.text.replace("|", "\\|").replace("\n", " ")
    return f"[{text}]({c.href})" if c.href else text


def _md_block(block, level: int) -> str:
    if isinstance(block, Section):
        inner = "\n\n".join(filter(None, (_md_block(b, level + 1) for b in block.blocks)))
        return f"{'#' * level} {block.title}\n\n{inner}"
    if isinstance(block, Table):
        lines = ["| " + " | ".join(block.headers) + " |", "|" + "---|" * len(block.headers)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Folded):
        return _md_block(block.block, level)
    if isinstance(block, Figure):
        return ""  # plots live in index.html only
    return block


def render_markdown(title: str, sections: list[Section]) -> str:
    body = "\n\n".join(_md_block(s, 2) for s in sections)
    return f"# {title}\n\nPlots and sortable tables: index.html in this directory.\n\n{body}\n"


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    dir: Path
    records: list[dict]
    env: dict
    peaks: dict | None
    out: Path | None = None  # where the report goes (links are relative to it): default `dir`
    dropped: int = 0  # records of a benchmark recorded again later in the file (not shown)

    @property
    def report_dir(self) -> Path:
        return self.out or self.dir


def resolve(ref: str | None) -> Path:
    """The directory holding the run's results.jsonl."""
    # once each: an absolute ref is its own run_dir
    candidates = list(dict.fromkeys([Path(ref), results.run_dir(ref)] if ref
                                    else [results.REPORTS / "latest"]))
    for d in candidates:
        if (d / "results.jsonl").is_file():
            return d.resolve()
    raise SystemExit(f"no results.jsonl for run {ref!r} (looked in "
                     + ", ".join(map(str, candidates)) + ")")


def _load_env(run_dir: Path) -> dict:
    """env.json, or the first pytest-xdist worker's env-gwN.json; {} when the run has none."""
    for path in [run_dir / "env.json", *sorted(run_dir.glob("env-*.json"))]:
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def load_run(run_dir: Path) -> Run:
    records, dropped = results.for_reports(run_dir / "results.jsonl")
    return Run(run_dir, records, _load_env(run_dir), peaks_mod.load(run_dir), dropped=dropped)


def _benchmark(r: dict) -> tuple:
    return r["op"], r["case"], r["dtype"], r.get("mode", "fwd")


def _by_benchmark(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[_benchmark(r)].append(r)
    return groups


def _ok(records, metric: str = "median_s") -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r.get(metric) is not None]


def _ordered(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["op"], r["dtype"], r.get("mode", "fwd"), r["flops"],
                                          r["case"], r["impl"]))


# ---------------------------------------------------------------- roofline
def ceiling_tflops(peaks: dict | None, dtype: str, intensity: float) -> float | None:
    """The roofline at this arithmetic intensity (FLOP per byte): compute- or bandwidth-bound."""
    compute = (peaks or {}).get("matmul_tflops", {}).get(dtype)
    if compute is None or not peaks.get("copy_gbps"):
        return None
    return min(compute, intensity * peaks["copy_gbps"] / 1e3)


def _roofline_pct(r: dict, peaks: dict | None) -> float | None:
    """Achieved over attainable TFLOP/s, for an ok record (a wrong result is timed too) of a
    kernel not run in an interpreter."""
    if (r["status"] != "ok" or r.get("tflops") is None or not r.get("bytes")
            or summary.interpreted(r)):
        return None
    ceiling = ceiling_tflops(peaks, r["dtype"], r["flops"] / r["bytes"])
    return 100 * r["tflops"] / ceiling if ceiling else None


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(draw: Callable, panels: list[str], alt: str) -> Figure:
    """One row of log-log panels, `draw(ax, panel)` filling each, and one legend beside them
    (colours are per implementation across panels, so one legend serves all)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 5.5 * len(panels), 4.2),
                             squeeze=False, layout="constrained")
    legend = {}
    for ax, panel in zip(axes[0], panels):
        draw(ax, panel)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _label_log_axis(ax.xaxis, *ax.get_xlim())
        ax.grid(True, which="both", alpha=0.3)
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return Figure(buf.getvalue(), alt)


def _label_log_axis(axis, lo: float, hi: float) -> None:
    """Short labels (20, 50, 100 k, 1 M) at 1, 2, 5 x 10^k over short ranges, at decades over
    long ones: matplotlib's own minor labels (2x10^0, 3x10^0, ...) collide on a short log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    subs = (1.0, 2.0, 5.0) if hi / lo < 1e2 else (1.0,)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _si(v, "")))
    axis.set_minor_formatter(NullFormatter())


def _series(records: list[dict]) -> dict[str, list[dict]]:
    """Records per line on a plot: an implementation (and mode, when not the forward)."""
    out = defaultdict(list)
    for r in sorted(records, key=lambda r: r["flops"]):
        mode = r.get("mode", "fwd")
        out[r["impl"] + ("" if mode == "fwd" else f" {mode}")].append(r)
    return out


def _colors(records: list[dict]) -> dict[str, object]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {impl: cmap(i % 10) for i, impl in enumerate(sorted({r["impl"] for r in records}))}


def latency_figure(op: str, ok: list[dict]) -> Figure:
    colors = _colors(ok)

    def draw(ax, dtype):
        for label, rows in _series(r for r in ok if r["dtype"] == dtype).items():
            ax.plot([r["flops"] for r in rows], [r["median_s"] for r in rows], "o-",
                    label=label, color=colors[rows[0]["impl"]], markersize=4)
        ax.set(title=f"{op} {dtype}: median latency", xlabel="FLOPs per call",
               ylabel="median time (s)")

    return _figure(draw, sorted({r["dtype"] for r in ok}), f"{op} latency vs problem size")


def roofline_figure(op: str, ok: list[dict], peaks: dict | None) -> Figure:
    colors = _colors(ok)

    def draw(ax, dtype):
        rows = [r for r in ok if r["dtype"] == dtype]
        for label, series in _series(rows).items():
            ax.plot([r["flops"] / r["bytes"] for r in series], [r["tflops"] for r in series],
                    "o", label=label, color=colors[series[0]["impl"]], markersize=4)
        intensities = [r["flops"] / r["bytes"] for r in rows]
        xs = [min(intensities) / 2 * 1.1 ** i for i in range(1 + int(
            math.log(4 * max(intensities) / min(intensities), 1.1)))]
        roof = [ceiling_tflops(peaks, dtype, x) for x in xs]
        if None not in roof:
            ax.plot(xs, roof, "k-", linewidth=1, label="measured roofline")
            title = "roofline"
        else:
            title = f"no measured ceiling for {dtype}" if peaks else \
                "no measured ceilings in this run"
        ax.set(title=f"{op} {dtype}: {title}", xlabel="arithmetic intensity (FLOP/byte)",
               ylabel="achieved TFLOP/s")

    return _figure(draw, sorted({r["dtype"] for r in ok}), f"{op} roofline")


# ---------------------------------------------------------------- per-op tables
def _best_stock(records: list[dict]) -> dict[tuple, float]:
    """The fastest stock median per benchmark: the speed a hand-written kernel has to beat."""
    best = {}
    for key, group in _by_benchmark(records).items():
        stock = [r["median_s"] for r in _ok(group) if r.get("kind") == "stock"]
        if stock:
            best[key] = min(stock)
    return best


def _trace_places(run: Run, trace_path: str):
    """Where a record's trace may be: its path (profiles/<run>/...) from the repository, from the
    run's directory, and, as `make gpu` packs them (profiles/<run>/ as traces/, which a committed
    baseline keeps in its run's directory or beside it), under traces/."""
    path = Path(trace_path)
    yield from (root / path for root in (run.dir, Path.cwd(), results.PROFILES.parent))
    if path.parts[:1] == ("profiles",) and len(path.parts) > 2:
        yield from (root.joinpath("traces", *path.parts[2:]) for root in (run.dir, run.dir.parent))


def _trace_href(run: Run, trace_path: str) -> str | None:
    """A link to the trace relative to the report, or None when it is not on this disk."""
    for target in _trace_places(run, trace_path):
        if target.is_file():
            return quote(os.path.relpath(target.resolve(), run.report_dir.resolve()))
    return None


def _trace_cell(run: Run, r: dict) -> Cell:
    path = r.get("trace_path")
    if not path:
        return Cell("")
    href = _trace_href(run, path)
    return Cell("trace", href=href) if href else Cell(f"{path} (not on this disk)")


def _err_cell(r: dict) -> Cell:
    err, budget = r.get("rel_err"), r.get("err_budget")
    if err is None:
        return Cell("-")
    return Cell(f"{err:.2e} / {_fmt(budget, '.2e')}", err / budget if budget else None)


RECORD_HEADERS = ["case", "dtype", "mode", "impl", "kind", "status", "median", "spread", "reps",
                  "timed by", "host per call", "TFLOP/s", "GB/s",
                  "% roofline", "speedup vs best stock", "peak mem", "cold compile",
                  "warm compile", "rel err / budget", "flags / autotuned config / reason",
                  "trace"]


def _peak_cell(r: dict) -> Cell:
    """Peak memory; a lower bound (a process's RSS growth, XLA:CPU's buffer plan) says so."""
    cell = _bytes(r.get("peak_bytes"))
    if r.get("peak_bytes") is not None and r.get("peak_method") in LOWER_BOUND_METHODS:
        return Cell(f">= {cell.text}", cell.sort)
    return cell


def _record_row(r: dict, run: Run, best_stock: dict, on_device: bool) -> list[Cell]:
    """One record; a failed one keeps its time (a wrong result is timed) but no rates."""
    ok = r["status"] == "ok"
    best = best_stock.get(_benchmark(r))
    speedup = (best / r["median_s"] if best and r.get("kind") in CANDIDATE_KINDS
               and ok and r.get("median_s") and not summary.interpreted(r) else None)
    note = r.get("reason") if not ok else " ".join(
        summary.notes(r, on_device)
        + ([f"timed in layout {r['timed_layout']};"] if r.get("timed_layout") else [])
        + [f"{kernel.strip('_')}: {config};" for kernel, config in
           (r.get("autotuned") or {}).items()])
    spread = r.get("spread")
    return [Cell(r["case"]), Cell(r["dtype"]), Cell(r.get("mode", "fwd")), Cell(r["impl"]),
            Cell(r.get("kind") or "-"), Cell(r["status"]), _time(r.get("median_s")),
            _num(None if spread is None else 100 * spread, ".0f", "%"),
            _num(r.get("reps"), "d"), Cell(r.get("timing_method") or "-"),
            _time(r.get("host_s")), _num(r.get("tflops") if ok else None, ".3g"),
            _num(r.get("gbps") if ok else None, ".3g"),
            _num(_roofline_pct(r, run.peaks), ".1f"), _times(speedup),
            _peak_cell(r), _time(r.get("compile_cold_s")), _warm_cell(r),
            _err_cell(r), Cell(note or ""), _trace_cell(run, r)]


def _warm_cell(r: dict) -> Cell:
    return Cell(summary.warm_text(r), r.get("compile_warm_s"))


def op_section(op: str, run: Run) -> Section:
    records = _ordered([r for r in run.records if r["op"] == op])
    ok = _ok(records)
    counts = ", ".join(f"{sum(r['status'] == s for r in records)} {s}"
                       for s in ("ok", "failed", "skipped"))
    blocks = [f"{len(records)} records ({counts}). Speedup: the best stock median of the same "
              "case, dtype and mode over the hand-written kernel's (above 1: the kernel is "
              "faster). % roofline: achieved TFLOP/s over the measured ceiling at the record's "
              "arithmetic intensity (FLOPs / fewest bytes)."]
    if ok:
        blocks += [latency_figure(op, ok), roofline_figure(op, ok, run.peaks)]
    else:
        blocks.append("no successful records to plot")
    if not run.peaks:
        blocks.append("no measured ceilings in this run (no peaks.json): no roofline drawn, "
                      "no % of roofline (python -m harness.peaks RUN_DIR measures them)")
    best, on_device = _best_stock(records), timing.device_timed(run.records)
    blocks.append(Table(RECORD_HEADERS, [_record_row(r, run, best, on_device)
                                         for r in records]))
    return Section(op, f"op-{op}", blocks)


def problems_section(run: Run) -> Section:
    bad = _ordered([r for r in run.records if r["status"] != "ok"])
    if not bad:
        return Section("Failed and skipped", "problems", ["none: every record is ok"])
    rows = [[Cell(r["op"]), Cell(r["case"]), Cell(r["dtype"]), Cell(r.get("mode", "fwd")),
             Cell(r["impl"]), Cell(r["status"]), Cell(r.get("reason") or "")] for r in bad]
    return Section("Failed and skipped", "problems", [
        Table(["op", "case", "dtype", "mode", "impl", "status", "reason"], rows)])


def _op_family(r: dict) -> str:
    """The op, with grouped convolutions (depthwise among them: memory-bound, another contest
    than the dense layers' GEMMs) apart: "conv2d (grouped)"."""
    grouped = r["op"] == "conv2d" and (r.get("dims") or {}).get("groups", 1) > 1
    return f"{r['op']} (grouped)" if grouped else r["op"]


def kernels_section(run: Run) -> Section:
    """Each hand-written kernel against the best stock op, over the cases both ran: the geometric
    mean of the throughput ratio (100% = as fast as the best stock), and its share of the
    roofline."""
    best = _best_stock(run.records)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    interpreted = 0
    for r in _ok(run.records):
        if r.get("kind") in CANDIDATE_KINDS and _benchmark(r) in best:
            if summary.interpreted(r):
                interpreted += 1
                continue
            groups[(_op_family(r), r.get("mode", "fwd"), r["dtype"], r["impl"])].append(r)
    left_out = (f"records of kernels run in an interpreter here (the Triton interpreter, "
                f"Pallas' interpret mode) left out, their times saying nothing about the "
                f"kernels: {interpreted}." if interpreted else "")
    if not groups:
        return Section("Hand-written kernels vs the best stock", "kernels", [
            f"no hand-written kernel outside an interpreter measured beside a stock op: {left_out}"
            if interpreted else
            "no hand-written kernel and stock op measured on the same benchmark"])
    on_device = timing.device_timed(run.records)
    stock_flagged = {_benchmark(r) for r in _ok(run.records) if r.get("kind") == "stock"
                     and guards.flagged(r) and best.get(_benchmark(r)) == r["median_s"]}
    rows = []
    for (op, mode, dtype, impl), recs in sorted(groups.items()):
        ratios = [best[_benchmark(r)] / r["median_s"] for r in recs]
        roof = [x for x in (_roofline_pct(r, run.peaks) for r in recs) if x is not None]
        host = sum(on_device and timing.timed_by(r, timing.HOST_CLOCK_METHOD) for r in recs)
        flagged = sum(guards.flagged(r) or _benchmark(r) in stock_flagged for r in recs)
        rows.append([Cell(op), Cell(mode), Cell(dtype), Cell(impl), Cell(str(len(recs))),
                     _num(100 * statistics.geometric_mean(ratios), ".1f"),
                     _num(100 * min(ratios), ".1f"), _num(100 * max(ratios), ".1f"),
                     _num(statistics.mean(roof) if roof else None, ".1f"), Cell(str(host)),
                     Cell(str(flagged))])
    return Section("Hand-written kernels vs the best stock", "kernels", [
        "Throughput as a percentage of the fastest stock implementation of the same case, dtype "
        "and mode (geometric mean, worst and best case), and the mean share of the measured "
        "roofline. On a GPU, a case timed on the host clock (a JAX kernel its profile could "
        "not time) holds its dispatch: its percentage is a lower bound. Flagged: cases where a "
        "measurement guard flagged the kernel's record or the best stock one's (throttling, a "
        "low clock, a shared GPU, or NVML unreadable; the records' notes say which)."
        + (f" {left_out}" if left_out else ""),
        Table(["op", "mode", "dtype", "impl", "cases", "% of best stock (geomean)", "worst %",
               "best %", "% roofline (mean)", "host-clock cases", "flagged cases"], rows)])


NOISE_MIN_S = targets.NOISE_MIN_S  # below this, launch and clock jitter dominate any timer


def noise_section(run: Run) -> Section:
    """The harness's own noise: benchmarks timed a second time later in the same run (--retime)."""
    twice = targets.retimed(run.records)
    if not twice:
        return Section("Harness noise", "noise", ["no benchmark was timed twice (--retime)"])
    rows = []
    for label, recs in (("all", twice),
                        (f"median >= {NOISE_MIN_S * 1e6:.0f} us",
                         targets.retimed(run.records, NOISE_MIN_S))):
        changes = [abs(r["again_change"]) * 100 for r in recs]
        if changes:
            rows.append([Cell(label), Cell(str(len(changes))),
                         _num(statistics.median(changes), ".2f"), _num(changes[0], ".2f"),
                         Cell(str(sum(c >= 2 for c in changes)))])
    worst = twice[0]
    return Section("Harness noise", "noise", [
        "The same benchmark timed twice in this run, with its memory measurement in between: "
        "|second median / first - 1|.",
        Table(["benchmarks", "count", "median |change| %", "max |change| %", "2% or more"], rows),
        f"largest: {worst['op']} {worst['case']} {worst['dtype']} {worst.get('mode', 'fwd')} "
        f"{worst['impl']} ({100 * worst['again_change']:+.2f}%)"])


def targets_section(run: Run) -> Section:
    """The GPU baseline's targets (harness.targets), judged on this run's bf16 records."""
    rows = []
    for v in targets.judge(run.records, run_seconds(run.records, targets.timed_for_tier)):
        rows.append([Cell(v.target), Cell(v.impl), Cell(v.word),
                     _num(v.reached, ".2f" if v.unit == "x" else ".1f"),
                     Cell(f"{v.compare} {v.threshold:g} {v.unit}"),
                     Cell("; ".join(filter(None, (v.detail, v.lacking))))])
    return Section("Targets", "targets", [
        "The targets of the GPU baseline, judged on this run's bfloat16 records only. A case a "
        "target covers whose record failed misses it; one with nothing to compare (not run, "
        "skipped, or its stock op failed) makes the verdict incomplete at best. Percentages are "
        "throughput against the named stock implementation on the same case (its median over "
        "the kernel's). On a machine without a GPU these say nothing about a GPU.",
        Table(["target", "impl", "verdict", "reached", "target value", "over"], rows)])


# Each record's phases, in the order a benchmark runs them (harness.bench.Session._measure).
PHASES = ("setup", "compiler_start_up", "cold_compile", "warm_compile", "warmup", "timed",
          "memory", "retime", "trace", timing.FAILED_STEP)
RESUMED_GAP_S = 60.0  # a longer pause between two benchmarks is a run stopped and resumed


def _time_spent(records: list[dict]):
    """Per (op, impl): seconds in each phase and the number of benchmarks; per op: the seconds
    between its benchmarks. None when no record holds its phases."""
    placed = sorted((r for r in records if r.get("phases")),
                    key=lambda r: min(p["start_ns"] for p in r["phases"]))
    if not placed:
        return None
    spent: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[tuple, int] = defaultdict(int)
    between: dict[str, float] = defaultdict(float)
    prev_end = None
    for r in placed:
        start = min(p["start_ns"] for p in r["phases"])
        gap_s = (start - prev_end) / 1e9 if prev_end is not None else None
        if gap_s is not None and 0 <= gap_s < RESUMED_GAP_S:
            between[r["op"]] += gap_s
        prev_end = max(prev_end or 0, max(p["end_ns"] for p in r["phases"]))
        key = (r["op"], r["impl"])
        counts[key] += 1
        for p in r["phases"]:
            name = p["name"] if p["name"] in PHASES else "other"
            spent[key][name] += (p["end_ns"] - p["start_ns"]) / 1e9
    return spent, counts, between


def run_seconds(records: list[dict],
                keep: Callable[[dict], bool] | None = None) -> float | None:
    """The run's wall-clock seconds, or those of the benchmarks whose records `keep` accepts:
    each benchmark's span from the end of the one before it (the time between benchmarks; a
    pause of RESUMED_GAP_S or more, a run stopped and resumed, left out) to its own end, and of
    these spans the union, so benchmarks run side by side (WORKERS=N) count once. None when no
    record kept holds its phases."""
    placed = sorted(((min(p["start_ns"] for p in r["phases"]),
                      max(p["end_ns"] for p in r["phases"]), r)
                     for r in records if r.get("phases")), key=lambda s: s[0])
    spans, latest_end = [], None
    for start, end, rec in placed:
        gap_ns = start - latest_end if latest_end is not None else None
        if gap_ns is not None and 0 <= gap_ns < RESUMED_GAP_S * 1e9:
            start = latest_end
        latest_end = max(latest_end or end, end)
        if keep is None or keep(rec):
            spans.append((start, end))
    if not spans:
        return None
    total_ns, (lo, hi) = 0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            total_ns, lo, hi = total_ns + hi - lo, start, end
        else:
            hi = max(hi, end)
    return (total_ns + hi - lo) / 1e9


def _total_s(time_spent) -> float:
    spent, _, between = time_spent
    return sum(sum(v.values()) for v in spent.values()) + sum(between.values())


def time_section(run: Run) -> Section:
    """Where the run's wall-clock time went: per op and implementation, the sum of each phase over
    its benchmarks; per op, the time between benchmarks (pytest, writing records, freeing
    memory)."""
    time_spent = _time_spent(run.records)
    if time_spent is None:
        return Section("Where the time went", "time", ["no record holds its phases"])
    spent, counts, between = time_spent
    columns = [c for c in PHASES + ("other",) if any(v.get(c) for v in spent.values())]
    total, wall = _total_s(time_spent), run_seconds(run.records)
    # Benchmarks run side by side (WORKERS=N) sum to more than the wall-clock time; one at a
    # time, to less: the wall clock also holds a benchmark's steps outside its phases.
    side_by_side = total > 1.01 * wall
    share_of = total if side_by_side else wall
    if side_by_side:
        note = (f" ({total:.0f} s summed over benchmarks that ran side by side; the shares "
                "below are of that sum)")
    elif wall - total >= 0.01 * wall:
        note = (f" ({wall - total:.0f} s of it in benchmarks but in none of their phases: the "
                "correctness check, its call included, a backward's untimed forwards, the "
                "telemetry flags)")
    else:
        note = ""
    rows = []
    for op in sorted({op for op, _ in spent}):
        keys = sorted((k for k in spent if k[0] == op), key=lambda k: -sum(spent[k].values()))
        for key in keys + [(op, None)]:
            if key[1] is None:  # the op's total row, with the time between its benchmarks
                phase_s = {c: sum(spent[k][c] for k in keys) for c in columns}
                n, label, gap = sum(counts[k] for k in keys), "all", between[op]
            else:
                phase_s, n, label, gap = spent[key], counts[key], key[1], None
            own = sum(phase_s.values()) + (gap or 0)
            rows.append([Cell(op), Cell(label), Cell(str(n))]
                        + [_num(phase_s.get(c, 0.0), ".1f") for c in columns]
                        + [_num(gap, ".1f"), _num(own, ".1f"),
                           _num(100 * own / share_of, ".1f")])
    return Section("Where the time went", "time", [
        f"{wall:.0f} s of wall-clock time in all{note}, in seconds per phase of each "
        "benchmark: setup "
        "(float64 reference, computed once per case, and inputs), compiler start-up (once a "
        "process), compiles, warmup (and the "
        "estimate that sizes the repetitions), timed repetitions, the memory measurement, the "
        "second timing (--retime) and the profiler trace. Pauses over "
        f"{RESUMED_GAP_S:.0f} s between benchmarks (a run stopped and resumed) are left out.",
        Table(["op", "impl", "benchmarks", *columns, "between", "total s", "% of run"], rows)])


# ---------------------------------------------------------------- environment
def _telemetry_text(telemetry: dict, command: str) -> str:
    """env.json's telemetry: the samples of the command that wrote it, the run's last."""
    counters = "; ".join(f"{name} {_fmt(v.get('min'), '.4g')}..{_fmt(v.get('max'), '.4g')}"
                         for name, v in (telemetry.get("counters") or {}).items())
    # a resumed run's env.json is its last command's: the earlier commands' samples are gone,
    # while each record's own flags (the next row) were taken as it was measured
    covers = ("during the command above only, which resumed the run: the earlier commands' "
              "samples are not kept (the flags on records cover every command)"
              if "--resume" in command.split() else "during the command above")
    return (f"{telemetry.get('source', '?')}, {telemetry.get('samples', 0)} samples {covers}, "
            f"throttling {'SEEN' if telemetry.get('throttled') else 'not seen'}"
            + (f"; {counters}" if counters else ""))


def _peaks_text(peaks: dict | None) -> str:
    if not peaks:
        return "no measured ceilings in this run"
    by = peaks.get("matmul_by", {})  # a run before it was recorded: torch.matmul's
    mm = ", ".join(f"{dt} {tf:.3g} TFLOP/s" + (f" ({by[dt]})" if dt in by else "")
                   for dt, tf in peaks.get("matmul_tflops", {}).items())
    flags = peaks.get("flags")
    flags = "not recorded" if flags is None else ", ".join(flags) or "none"
    return (f"copy {peaks.get('copy_gbps', 0):.4g} GB/s; matmul {mm} ({peaks.get('method', '')}"
            f"; flags while measured: {flags})")


def _recounted_text(records: list[dict]) -> str:
    changed = [r for r in records if r.get("recorded_counts")]
    if not changed:
        return "as recorded (harness.cases)"
    what = sorted({k for r in changed for k, v in r["recorded_counts"].items() if v != r.get(k)})
    return (f"today's (harness.cases): {len(changed)} of {len(records)} records held other "
            f"counts ({', '.join(what)}), from the code that ran them; their TFLOP/s, GB/s and "
            f"% of roofline here are recomputed from the recorded medians")


def environment_section(run: Run) -> Section:
    env, recs = run.env, run.records
    versions = env.get("versions") or (recs[0].get("versions") if recs else None) or {}
    flags = defaultdict(int)
    for r in recs:
        for f in r.get("flags") or []:
            flags[f] += 1
    times = sorted(r["time"] for r in recs if r.get("time"))

    def distinct(key):
        return ", ".join(sorted({str(r[key]) for r in recs if r.get(key)})) or "-"

    rows = [("run", str(run.dir)), ("device", env.get("device") or distinct("device")),
            ("jax device", distinct("jax_device")), ("host", distinct("host")),
            ("driver", versions.get("driver") or (env.get("gpu") or {}).get("driver") or "-"),
            ("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v)),
            ("command", env.get("command") or "- (no env.json in this run)"),
            ("time", f"{times[0]} .. {times[-1]}" if times else "-"),
            ("clocks / throttling", _telemetry_text(env["telemetry"], env.get("command", ""))
             if env.get("telemetry") else "- (no telemetry recorded)"),
            ("flags on records", ", ".join(f"{f}: {n}" for f, n in sorted(flags.items()))
             or "none"),
            ("records written twice", "earlier records of a benchmark recorded again later in "
             f"results.jsonl, left out (the last of each is shown): {run.dropped}"
             if run.dropped else "none"),
            ("measured ceilings", _peaks_text(run.peaks)),
            ("FLOP and byte counts", _recounted_text(recs))]
    return Section("Environment", "environment",
                   [Table(["", ""], [[Cell(k), Cell(v)] for k, v in rows])])


# ---------------------------------------------------------------- framework verdicts
Side = Callable[[dict], bool]


def torch_stock(r: dict) -> bool:
    return r.get("kind") == "stock" and r.get("framework") == "torch"


def jax_stock(r: dict) -> bool:
    return r.get("kind") == "stock" and r.get("framework") == "jax"


def torch_compiled(r: dict) -> bool:
    return torch_stock(r) and "compile" in r["impl"]  # torch_compile and its variants


def torch_eager(r: dict) -> bool:
    return torch_stock(r) and not torch_compiled(r)


def static_graph(r: dict) -> bool:
    return torch_compiled(r) or jax_stock(r)  # every JAX implementation runs under jax.jit


@dataclass(frozen=True)
class Contest:
    """Side a (the one a claim favours) against side b, each by its best record per benchmark."""
    label: str
    a_name: str
    a: Side
    b_name: str
    b: Side
    metric: str = "median_s"  # smaller is better: "median_s" or "peak_bytes"
    ops: tuple[str, ...] = ()  # only these ops; () for every op
    modes: tuple[str, ...] = ()  # only these modes; () for every mode


@dataclass(frozen=True)
class Claim:
    title: str
    contests: tuple[Contest, ...]
    small_size_floor: bool = False  # also show each path's time on the smallest problems


CLAIMS = (
    Claim("JAX is faster than PyTorch", (
        Contest("best stock JAX vs best stock PyTorch, median time", "JAX", jax_stock,
                "PyTorch", torch_stock),)),
    # A backward alone (bwd) is measured from what its forward saved: a backward that recomputes
    # the attention matrix counts it, one that saved it does not (XLA's saved 16 MiB of
    # probabilities in b1_h2_q1024_k1024_d64 float32 on a CPU, torch's fused kernel 0.5 MB), so
    # only the calls that hold the whole forward are compared.
    Claim("JAX uses less memory", (
        Contest("best stock JAX vs best stock PyTorch, peak memory (fwd and fwd_bwd; a backward "
                "alone leaves out what its forward saved for it)", "JAX", jax_stock, "PyTorch",
                torch_stock, "peak_bytes", modes=("fwd", "fwd_bwd")),)),
    Claim("static graphs (jit / torch.compile) beat eager execution", (
        Contest("best static graph (torch.compile or XLA jit) vs best eager PyTorch", "static",
                static_graph, "eager", torch_eager),
        Contest("torch.compile vs eager PyTorch", "torch.compile", torch_compiled, "eager",
                torch_eager),
        Contest("XLA jit vs eager PyTorch", "XLA jit", jax_stock, "eager", torch_eager)),
        small_size_floor=True),
    Claim("PyTorch is better for convolutions", (
        Contest("best stock PyTorch vs best stock JAX on conv2d, median time", "PyTorch",
                torch_stock, "JAX", jax_stock, ops=("conv2d",)),)),
)


def _host_timed_against_events(x: dict, y: dict) -> bool:
    """x timed on the host clock around dispatch and block_until_ready (JAX on a GPU), y with
    device events: x's median also holds the host's per-call cost."""
    return (timing.timed_by(x, timing.HOST_CLOCK_METHOD)
            and timing.timed_by(y, timing.EVENTS_METHOD))


@dataclass
class Matchup:
    key: tuple  # (op, case, dtype, mode)
    flops: float
    a: dict
    b: dict
    metric: str
    # a trivial JAX call timed as the JAX benchmarks are (peaks.json "jax_call_s"): the least
    # host time inside a host-timed median; None when the run did not measure it
    host_call_s: float | None = None

    @property
    def ratio(self) -> float:
        """b's value over a's: above 1, side a is better (smaller)."""
        va, vb = self.a[self.metric], self.b[self.metric]
        return 1.0 if va == vb else (math.inf if va == 0 else vb / va)

    @property
    def noise(self) -> float:
        """Medians are only as exact as the p20-p80 spread of their repetitions."""
        if self.metric != "median_s":
            return 0.0
        return max(self.a.get("spread") or 0.0, self.b.get("spread") or 0.0)

    @property
    def winner(self) -> str:
        """"a", "b", "tie" (within noise) or "bound" (the better value is only a lower bound)."""
        if self.ratio > 1 + self.noise:
            better = "a"
        elif self.ratio < 1 / (1 + self.noise):
            better = "b"
        else:
            return "tie"
        if self.metric == "peak_bytes":
            method = getattr(self, better).get("peak_method")
            return "bound" if method in LOWER_BOUND_METHODS else better
        win, lose = (self.a, self.b) if better == "a" else (self.b, self.a)
        if _host_timed_against_events(lose, win):
            # the loser's device time is at least its median less the host's per-call cost
            device_floor = lose["median_s"] - (self.host_call_s if self.host_call_s is not None
                                               else lose["median_s"])
            if device_floor <= win["median_s"] * (1 + self.noise):
                return "bound"
        return better


def _best(records: list[dict], side: Side, metric: str) -> dict | None:
    return min((r for r in _ok(records, metric) if side(r)), key=lambda r: r[metric], default=None)


def matchups(records: list[dict], contest: Contest,
             host_call_s: float | None = None) -> list[Matchup]:
    out = []
    for key, group in _by_benchmark(records).items():
        if (contest.ops and key[0] not in contest.ops) or (contest.modes
                                                           and key[3] not in contest.modes):
            continue
        a, b = _best(group, contest.a, contest.metric), _best(group, contest.b, contest.metric)
        if a and b:
            out.append(Matchup(key, a["flops"], a, b, contest.metric, host_call_s))
    return sorted(out, key=lambda m: (m.key[0], m.key[2], m.key[3], m.flops, m.key[1]))


def _flips(ms: list[Matchup]) -> tuple[list[tuple[float, str]], list[int]]:
    """The sizes (FLOPs) with a winner beyond noise, each as (flops, "a", "b" or "both": cases
    of that size won by different sides), and the indices among them where the winner changes.
    Cases of equal size are one size: their order (by name) says nothing about size."""
    won: dict[float, set[str]] = {}
    for m in ms:
        if m.winner in ("a", "b"):
            won.setdefault(m.flops, set()).add(m.winner)
    sizes = [(flops, next(iter(w)) if len(w) == 1 else "both") for flops, w in sorted(won.items())]
    changes = [i for i in range(1, len(sizes)) if sizes[i][1] != sizes[i - 1][1]]
    return sizes, changes


def _size_condition(ms: list[Matchup], contest: Contest) -> str:
    """Where along problem size (FLOPs) the winner changes, if it does: said of the sizes where
    one side is clearly better, with how many others were within noise or unclear."""
    sizes, flips = _flips(ms)
    name = {"a": contest.a_name, "b": contest.b_name}
    undecided = sum(m.winner not in ("a", "b") for m in ms)
    rest = f"; {undecided} of {len(ms)} cases within noise or unclear" if undecided else ""
    where = " where one side is clearly better" if undecided else " measured"
    both = [flops for flops, w in sizes if w == "both"]
    if not sizes:
        return "no size where one side is clearly better"
    if both:
        return (f"no single size threshold: cases of equal size go both ways at "
                f"{', '.join(_si(f, 'FLOP') for f in both)}{rest}")
    if not flips:
        return (f"{name[sizes[0][1]]} wins at every size{where} ({_si(sizes[0][0], 'FLOP')} .. "
                f"{_si(sizes[-1][0], 'FLOP')}){rest}")
    if len(flips) == 1:
        (lo, lo_w), (hi, hi_w) = sizes[flips[0] - 1], sizes[flips[0]]
        return (f"{name[lo_w]} wins up to {_si(lo, 'FLOP')}, {name[hi_w]} from "
                f"{_si(hi, 'FLOP')} up{where if undecided else ''}{rest}")
    return (f"no single size threshold: the winner changes {len(flips)} times along "
            f"size{rest}")


def _verdict_word(ms: list[Matchup]) -> str:
    """The claim's verdict on the cases with a winner beyond noise, saying how few they are when
    others had none (one clear case among ten ties is not a claim that holds)."""
    sizes, flips = _flips(ms)
    winners = {w for _, w in sizes}
    if not winners:
        return "inconclusive"
    if winners == {"a"}:
        word = "holds"
    elif winners == {"b"}:
        word = "does not hold"
    else:
        word = "depends on size" if len(flips) == 1 and "both" not in winners else "mixed"
    decided = sum(m.winner in ("a", "b") for m in ms)
    return word if decided == len(ms) else f"{word} ({decided} of {len(ms)} cases decided)"


def _evidence(ms: list[Matchup], contest: Contest) -> str:
    count = {w: sum(m.winner == w for m in ms) for w in ("a", "b", "tie", "bound")}
    # an unclear ratio (one side's value only bounds it) would carry its bias into the mean
    finite = [m.ratio for m in ms if m.winner != "bound" and 0 < m.ratio < math.inf]
    what = "time" if contest.metric == "median_s" else "peak memory"
    n = len(finite)
    over = f" over the {n} case{'s' * (n != 1)} not unclear" if count["bound"] else ""
    gm = f"; geometric mean of {contest.b_name} {what} / {contest.a_name} {what}{over}: " \
         f"{statistics.geometric_mean(finite):.3g}x" if finite else ""
    text = (f"{contest.a_name} better at {count['a']} of {len(ms)} cases, {contest.b_name} at "
            f"{count['b']}, {count['tie']} within noise{gm}")
    if count["bound"] and contest.metric == "peak_bytes":
        text += (f"; {count['bound']} unclear: the smaller number is a lower bound "
                 f"({', '.join(LOWER_BOUND_METHODS)})")
    elif count["bound"]:
        text += (f"; {count['bound']} unclear: the slower side was timed on the host clock "
                 "(dispatch included) against device events, and by less than that host cost")
    methods = {r["peak_method"] for m in ms for r in (m.a, m.b) if r.get("peak_method")}
    if contest.metric == "peak_bytes" and len(methods) > 1:
        text += f"; measured by different methods: {', '.join(sorted(methods))}"
    return text


def _repay_calls(m: Matchup) -> str:
    """Calls after which the faster side's extra cold compile time is paid back; "-" without a
    winner or without both sides' cold compile (under COLD=first a later case has none)."""
    if m.winner not in ("a", "b") or None in (m.a.get("compile_cold_s"),
                                              m.b.get("compile_cold_s")):
        return "-"
    fast, slow = (m.a, m.b) if m.winner == "a" else (m.b, m.a)
    extra = fast["compile_cold_s"] - slow["compile_cold_s"]
    if extra <= 0:
        return "0 (compiles no longer)"
    calls = extra / (slow["median_s"] - fast["median_s"])
    return f"{calls:,.0f}" if calls >= 10 else f"{calls:.2g}"


def _detail_table(ms: list[Matchup], contest: Contest) -> Table:
    timed = contest.metric == "median_s"
    value = _time if timed else _bytes
    headers = ["op", "case", "dtype", "mode", "FLOPs", f"best {contest.a_name}",
               f"best {contest.b_name}", f"{contest.b_name} / {contest.a_name}", "better"]
    headers += ["cold compile a / b", "calls to repay compile"] if timed else ["method a / b"]
    winner = {"a": contest.a_name, "b": contest.b_name, "tie": "within noise",
              "bound": "unclear (host-timed side)" if timed else "unclear (lower bound)"}
    rows = []
    for m in ms:
        a, b = value(m.a[m.metric]), value(m.b[m.metric])
        row = [Cell(m.key[0]), Cell(m.key[1]), Cell(m.key[2]), Cell(m.key[3]),
               Cell(_si(m.flops, "FLOP"), m.flops), Cell(f"{m.a['impl']} {a.text}", a.sort),
               Cell(f"{m.b['impl']} {b.text}", b.sort), _times(m.ratio),
               Cell(winner[m.winner])]
        if timed:
            row += [Cell(f"{_fmt_time(m.a.get('compile_cold_s'))} / "
                         f"{_fmt_time(m.b.get('compile_cold_s'))}"), Cell(_repay_calls(m))]
        else:
            row.append(Cell(f"{m.a.get('peak_method')} / {m.b.get('peak_method')}"))
        rows.append(row)
    return Table(headers, rows)


def _contest_blocks(records: list[dict], contest: Contest, host_call_s: float | None) -> list:
    ms = matchups(records, contest, host_call_s)
    ops = contest.ops or sorted({r["op"] for r in records})
    rows = []
    for op in ops:
        groups = defaultdict(list)
        for m in ms:
            if m.key[0] == op:
                groups[(m.key[2], m.key[3])].append(m)
        if not groups:
            rows.append([Cell(op), Cell("-"), Cell("-"), Cell("no data in this run"),
                         Cell(f"no benchmark with ok records of both {contest.a_name} and "
                              f"{contest.b_name}"), Cell("-")])
        for (dtype, mode), group in sorted(groups.items()):
            rows.append([Cell(op), Cell(dtype), Cell(mode), Cell(_verdict_word(group)),
                         Cell(_evidence(group, contest)), Cell(_size_condition(group, contest))])
    blocks = [f"{contest.label}:", Table(["op", "dtype", "mode", "verdict", "evidence",
                                          "where it flips"], rows)]
    detail = Folded(f"numbers per size ({len(ms)} benchmarks)", _detail_table(ms, contest))
    return blocks + ([detail] if ms else [])


def _floor_blocks(records: list[dict]) -> list:
    """The smallest problem per op and dtype, with its caption: a fixed per-call cost (host
    dispatch, launch) shows there, where the arithmetic is negligible."""
    sides = (("eager PyTorch", torch_eager), ("torch.compile", torch_compiled),
             ("XLA jit", jax_stock))
    smallest: dict[tuple, list[dict]] = {}
    for (op, _, dtype, mode), group in _by_benchmark(records).items():
        seen = smallest.get((op, dtype, mode))
        if seen is None or group[0]["flops"] < seen[0]["flops"]:
            smallest[(op, dtype, mode)] = group
    on_device = timing.device_timed(records)
    host_timed = []

    def median(r: dict | None) -> Cell:
        cell = _time(r["median_s"] if r else None)
        if on_device and r and timing.timed_by(r, timing.HOST_CLOCK_METHOD):  # dispatch included
            host_timed.append(r)
            return Cell(f"{cell.text} (host clock)", cell.sort)
        return cell

    rows = []
    for (op, dtype, mode), group in sorted(smallest.items()):
        best = [_best(group, side, "median_s") for _, side in sides]
        if any(best):
            rows.append([Cell(op), Cell(group[0]["case"]), Cell(dtype), Cell(mode),
                         Cell(_si(group[0]["flops"], "FLOP"), group[0]["flops"])]
                        + [c for b in best for c in (median(b), _time(b and b.get("host_s")))])
    if not rows:
        return []
    headers = [f"{n} {what}" for n, _ in sides for what in ("time", "host per call")]
    caption = ("Smallest problem of each op, where there is almost no arithmetic: each path's "
               "time and the host time of one call (its launch or dispatch path; on a GPU the "
               "time column is device time, which that host time does not delay while the host "
               "keeps ahead of the GPU" + ("; a time marked host clock is a JAX record its "
                                           "profile could not time: dispatch included"
                                           if host_timed else "") + ").")
    return [caption, Table(["op", "smallest case", "dtype", "mode", "FLOPs"] + headers, rows)]


def verdicts_section(records: list[dict], host_call_s: float | None = None) -> Section:
    claims = []
    for claim in CLAIMS:
        blocks = [b for contest in claim.contests
                  for b in _contest_blocks(records, contest, host_call_s)]
        if claim.small_size_floor:
            blocks += _floor_blocks(records)
        claims.append(Section(claim.title, f"claim-{_slug(claim.title)}", blocks))
    intro = ("Each claim is tested per op, dtype and mode on the best record of each side for "
             "the same case (stock implementations only; hand-written kernels are not a "
             "framework's default). A side is better when its value is smaller by more than the "
             "p20-p80 spread of either median; the ratio is the other side's value over the "
             "claimed side's, so above 1 the claim holds. Verdicts say only what these records "
             "show, on this device.")
    events = any(timing.timed_by(r, timing.EVENTS_METHOD) for r in records)
    if events and any(timing.timed_by(r, timing.HOST_CLOCK_METHOD) for r in records):
        intro += (" On this GPU, some JAX records were timed on the host clock (dispatch "
                  "included) and torch with device events: such a JAX loss counts only when it "
                  "exceeds the cost of a trivial JAX call timed the same way"
                  + (f" ({_fmt_time(host_call_s)} in this run)." if host_call_s is not None
                     else " (not measured in this run: such losses are marked unclear)."))
    return Section("Framework verdicts", "verdicts", [intro] + claims)


# ---------------------------------------------------------------- comparison with another run
def compare_section(run: Run, base_ref: str, threshold_pct: float) -> Section:
    head = run.dir / "benchmark.json"
    if not compare.is_run(run.dir):
        return Section("Changes vs base", "compare", [
            f"this run has neither records nor a benchmark.json ({head}) to compare"])
    base = compare.json_path(base_ref)
    threshold = threshold_pct / 100
    rows, regressions, failed, skipped = [], 0, 0, 0
    base_entries, head_entries = compare.entries(base), compare.entries(head)
    for c in compare.changes(base_entries, head_entries):
        verdict = c.verdict(threshold)
        regressions += verdict == "REGRESSION"
        failed += verdict == "FAILED"
        skipped += verdict == "SKIPPED"
        change = Cell("-") if c.change is None else Cell(f"{100 * c.change:+.1f}%", c.change)
        rows.append([Cell(c.name), _time(c.base_s), _time(c.head_s), change,
                     _num(100 * c.noise, ".1f"),
                     Cell(f"{verdict}: {c.failure}" if c.failure else verdict)])
    text = (f"base {base}, head {head}: {len(rows) - failed - skipped} benchmarks ok in both, "
            f"{regressions} regression(s): median grew by more than {threshold_pct:g}% and by "
            f"more than the noise (p20-p80 spread) of either run; {failed} ok in base failed in "
            f"head; {skipped} ok in base skipped in head; "
            f"{len(compare.not_run(base_entries, head_entries))} ok in base not run in head.")
    return Section("Changes vs base", "compare", [text, Table(
        ["benchmark", "base median", "head median", "change", "noise %", "verdict"], rows)])


# ---------------------------------------------------------------- writing
def build(run: Run, compare_to: str | None = None, threshold_pct: float = 10.0) -> list[Section]:
    ops = sorted({r["op"] for r in run.records})
    sections = [environment_section(run),
                verdicts_section(run.records, (run.peaks or {}).get("jax_call_s")),
                kernels_section(run),
                targets_section(run),
                noise_section(run),
                time_section(run)]
    sections += [op_section(op, run) for op in ops] + [problems_section(run)]
    if compare_to:
        sections.append(compare_section(run, compare_to, threshold_pct))
    return sections


def committed_baseline(path: Path) -> bool:
    return path.resolve().is_relative_to(BASELINES.resolve())


def write(run_dir: Path, compare_to: str | None = None, threshold_pct: float = 10.0,
          out: Path | None = None) -> Path:
    """Writes index.html and summary.md into `out` (default: the run directory, which must not
    be a committed baseline: its report is the one its run wrote)."""
    out = Path(out or run_dir)
    if committed_baseline(out):
        raise SystemExit(f"{out} is a committed baseline under {BASELINES}: "
                         "its report is the one its run wrote; render it elsewhere with --out DIR "
                         "(make report REPORT_OUT=DIR)")
    run = load_run(run_dir)
    run.out = out
    sections = build(run, compare_to, threshold_pct)
    title = f"Kernel benchmarks: {run_dir.name}"
    out.mkdir(parents=True, exist_ok=True)
    results.write_text(out / "index.html", render_html(title, sections))
    results.write_text(out / "summary.md", render_markdown(title, sections))
    return out / "index.html"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="run id, run directory (default reports/latest)")
    ap.add_argument("--out", type=Path, help="write the report here (default: the run directory)")
    ap.add_argument("--compare", metavar="BASE", help="another run: per-benchmark changes")
    ap.add_argument("--threshold", type=float, default=10.0, help="regression percent (10)")
    args = ap.parse_args(argv)
    page = write(resolve(args.run), args.compare, args.threshold, args.out)
    print(f"wrote {page} and {page.with_name('summary.md')}")


if __name__ == "__main__":
    main()
