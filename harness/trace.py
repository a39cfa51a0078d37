"""Profiler traces of one benchmark, readable in the Perfetto UI, and what they say.

capture() runs an already compiled and warmed call under its framework's profiler: one "warmup"
range, then one range per repetition ("rep 0", "rep 1", ...), each synchronised inside so its
device work lies inside its time window.

  torch / Triton  torch.profiler -> Chrome JSON, `<base>.json.gz`. Timestamps are microseconds
                  since the file's `baseTimeNanoseconds` (an epoch time); device kernels have
                  cat == "kernel".
  jax             jax.profiler -> `<base>.perfetto.json.gz`. Timestamps are microseconds since
                  the profile started; device work lies in processes named "/device:GPU:0" (or
                  TPU). The epoch time of the profile's zero is found by reading the clock just
                  before the "warmup" annotation and matching it with that event (error: a few us).

Either way `trace_offset_ns + ts * 1000` is the event's epoch time in ns, so the traces of one run
line up with each other and with the run timeline (harness/timeline.py).

    python -m harness.trace summary <trace.json[.gz]>   # top kernels, device time per repetition
"""
from __future__ import annotations

import bisect
import gzip
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

WARMUP = "warmup"
REP_PREFIX = "rep "
_PHASE_NAME = re.compile(r"warmup|rep \d+")
DEVICE_KERNEL = "device kernel"
CPU_OP = "cpu op (self time)"
# Lines of a JAX device process that summarise the kernels rather than hold them.
_JAX_OP_LINE = "XLA Ops"
_JAX_STREAM_PREFIX = "Stream #"


# ---------------------------------------------------------------- capture
def capture(call: Callable[[], Any], framework: str, path_base: Path, reps: int = 3,
            warmup: int = 1) -> dict:
    """Profiles `warmup` then `reps` calls and writes one trace next to `path_base`.

    Returns trace_path, trace_device_s (device time per repetition; None without device
    kernels), top_kernels, trace_clock and trace_offset_ns (epoch ns of the trace's time zero).
    """
    path_base = Path(path_base)
    path_base.parent.mkdir(parents=True, exist_ok=True)
    if framework in ("torch", "triton"):
        path, offset_ns, clock = _capture_torch(call, path_base, reps, warmup)
    elif framework == "jax":
        path, offset_ns, clock = _capture_jax(call, path_base, reps, warmup)
    else:
        raise ValueError(f"framework={framework!r} must be 'torch', 'triton' or 'jax'")
    events = read(path)
    return {"trace_path": str(path), "trace_device_s": device_time_per_rep(events),
            "top_kernels": top_kernels(events, 5), "trace_clock": clock,
            "trace_offset_ns": offset_ns}


def _run_phases(call: Callable[[], Any], reps: int, warmup: int,
                annotate: Callable[[str], AbstractContextManager],
                wait: Callable[[Any], None]) -> int:
    """The profiled calls; returns the epoch ns read just before the "warmup" range opens."""
    anchor_ns = time.time_ns()
    with annotate(WARMUP):
        for _ in range(warmup):
            wait(call())
    for i in range(reps):
        with annotate(f"{REP_PREFIX}{i}"):
            wait(call())
    return anchor_ns


def _capture_torch(call, path_base: Path, reps: int, warmup: int) -> tuple[Path, int, str]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from harness.timing import sync  # here, so `summary` starts without loading torch

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    # No profile_memory / with_stack: together they crash key_averages() on torch 2.13.
    with profile(activities=activities) as prof:
        _run_phases(call, reps, warmup, record_function, sync)
    path = path_base.with_name(path_base.name + ".json.gz")
    prof.export_chrome_trace(str(path))  # a .gz name makes torch gzip it
    # Older kineto writes epoch microseconds and no base: the offset is then 0.
    return path, int(_load(path).get("baseTimeNanoseconds", 0)), "epoch"


def run_jax_profiled(run: Callable[[], Any], dest: Path) -> Any:
    """Runs `run` under jax.profiler and leaves its Perfetto JSON trace at `dest`; returns what
    `run` returned. Also the device timer of JAX benchmarks on a GPU (harness.timing)."""
    import jax

    options = jax.profiler.ProfileOptions()
    # The Python tracer records every Python call: large, slow traces with nothing a kernel
    # benchmark needs. TraceAnnotation ranges come from the host tracer, which stays on.
    options.python_tracer_level = 0
    tmp = Path(tempfile.mkdtemp(prefix="jax-trace-"))
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=options):
            result = run()
        found = sorted(tmp.glob("plugins/profile/*/perfetto_trace.json.gz"))
        if not found:
            raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {tmp}")
        shutil.move(str(found[-1]), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _capture_jax(call, path_base: Path, reps: int, warmup: int) -> tuple[Path, int, str]:
    import jax

    from harness.timing import sync

    path = path_base.with_name(path_base.name + ".perfetto.json.gz")
    anchor_ns = run_jax_profiled(
        lambda: _run_phases(call, reps, warmup, jax.profiler.TraceAnnotation, sync), path)
    warmup_start_us = _ranges(read(path))[WARMUP][0]
    return path, anchor_ns - round(warmup_start_us * 1000), "profile-relative"


# ---------------------------------------------------------------- reading
def _load(path: Path | str) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    return doc if isinstance(doc, dict) else {"traceEvents": doc}  # a bare event array is valid


def read(path: Path | str) -> list[dict]:
    """The events of a Chrome/Perfetto JSON trace (.json or .json.gz)."""
    return _load(path).get("traceEvents", [])


def _spans(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _ranges(events: list[dict]) -> dict[str, tuple[float, float]]:
    """The host-side "warmup" and "rep i" windows (start, end) in trace microseconds. torch on a
    GPU repeats each range on the device timeline (gpu_user_annotation); the host one is kept."""
    out: dict[str, tuple[float, float]] = {}
    for e in _spans(events):
        name = e.get("name", "")
        on_host = e.get("cat") != "gpu_user_annotation"
        if on_host and _PHASE_NAME.fullmatch(name):
            out.setdefault(name, (e["ts"], e["ts"] + e["dur"]))
    return out


def rep_windows(events: list[dict]) -> list[tuple[float, float]]:
    """The "rep i" windows in repetition order."""
    ranges = _ranges(events)
    reps = sorted((n for n in ranges if n.startswith(REP_PREFIX)),
                  key=lambda n: int(n[len(REP_PREFIX):]))
    return [ranges[n] for n in reps]


def _metadata_names(events: list[dict], kind: str) -> dict:
    """process_name (keyed by pid) or thread_name (keyed by (pid, tid)) metadata."""
    out = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == kind:
            key = e.get("pid") if kind == "process_name" else (e.get("pid"), e.get("tid"))
            out[key] = e.get("args", {}).get("name", "")
    return out


def _jax_device_pids(events: list[dict]) -> set:
    return {pid for pid, name in _metadata_names(events, "process_name").items()
            if name.startswith(("/device:GPU", "/device:TPU"))}


def _jax_device_ops(events: list[dict]) -> list[dict]:
    """Kernels of a JAX trace: on a GPU the "Stream #..." lines of the device process; where
    there are none (TPU) its "XLA Ops" line. Other lines ("XLA Modules", "Steps", ...) span
    several kernels and would count them twice."""
    pids = _jax_device_pids(events)
    threads = {k: v for k, v in _metadata_names(events, "thread_name").items() if k[0] in pids}
    lines = ({k for k, v in threads.items() if v.startswith(_JAX_STREAM_PREFIX)}
             or {k for k, v in threads.items() if v == _JAX_OP_LINE})
    device = [e for e in _spans(events) if e.get("pid") in pids]
    return [e for e in device if (e.get("pid"), e.get("tid")) in lines] if lines else device


def device_kernels(events: list[dict]) -> list[dict]:
    """Device kernel events: torch/kineto cat == "kernel", else a JAX trace's device ops."""
    kineto = [e for e in _spans(events) if e.get("cat") == "kernel"]
    return kineto or _jax_device_ops(events)


def _in_windows(spans: list[dict], windows: list[tuple[float, float]]) -> list[dict]:
    if not windows:
        return spans
    return [e for e in spans if any(lo <= e["ts"] < hi for lo, hi in windows)]


def _kernels_per_rep(events: list[dict]) -> list[list[dict]]:
    """The device kernels that start inside each "rep i" window, in repetition order, each
    window's by start time."""
    kernels = sorted(device_kernels(events), key=lambda e: e["ts"])
    starts = [e["ts"] for e in kernels]
    return [kernels[bisect.bisect_left(starts, lo):bisect.bisect_left(starts, hi)]
            for lo, hi in rep_windows(events)]


def device_time_per_rep(events: list[dict]) -> float | None:
    """Median over the repetitions of the kernel time inside each "rep i" window, in seconds;
    None when the trace holds no device kernels (a CPU run) or no repetitions."""
    per_rep = _kernels_per_rep(events)
    if not any(per_rep):
        return None
    return statistics.median(sum(e["dur"] for e in inside) for inside in per_rep) / 1e6


def device_spans(events: list[dict]) -> list[float | None]:
    """Per "rep i" window, in repetition order: seconds from the start of its first device
    kernel to the end of its last (what CUDA events around the call measure when the host keeps
    ahead of the GPU); None for a window holding no device kernel."""
    return [(max(e["ts"] + e["dur"] for e in inside) - inside[0]["ts"]) / 1e6 if inside
            else None for inside in _kernels_per_rep(events)]


def device_busy(events: list[dict]) -> list[float | None]:
    """Per "rep i" window, as device_spans: seconds its kernels ran, overlaps counted once (the
    span less the gaps where the GPU sat idle between them)."""
    out = []
    for inside in _kernels_per_rep(events):
        busy, end = 0.0, -math.inf
        for e in inside:  # by start time: add what each kernel runs past those before it
            busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
            end = max(end, e["ts"] + e["dur"])
        out.append(busy / 1e6 if inside else None)
    return out


def _self_times(spans: list[dict]) -> list[tuple[dict, float]]:
    """Each span with its duration less that of the spans nested directly in it (same thread)."""
    by_thread = defaultdict(list)
    for e in spans:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread in by_thread.values():
        stack: list[list] = []  # [event, self_us]
        for e in sorted(thread, key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                out.append(tuple(stack.pop()))
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, e["dur"]])
        out += [tuple(s) for s in stack]
    return out


def _cpu_ops(events: list[dict]) -> list[dict]:
    """Host-side op events: torch's aten ops (cat "cpu_op"), else XLA's ops on the host (events
    carrying an "hlo_op" argument outside the device processes)."""
    spans = _spans(events)
    torch_ops = [e for e in spans if e.get("cat") == "cpu_op"]
    if torch_ops:
        return torch_ops
    device = _jax_device_pids(events)
    return [e for e in spans if "hlo_op" in e.get("args", {}) and e.get("pid") not in device]


def top_kernels(events: list[dict], n: int = 5) -> list[dict]:
    """The n kernels with the most time inside the repetitions, as {name, total_s, count, kind}.
    Without device kernels (CPU) the host ops by self time stand in, with kind CPU_OP."""
    windows = rep_windows(events)
    kernels = _in_windows(device_kernels(events), windows)
    if kernels:
        timed, kind = [(e, e["dur"]) for e in kernels], DEVICE_KERNEL
    else:
        timed, kind = _self_times(_in_windows(_cpu_ops(events), windows)), CPU_OP
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e, us in timed:
        totals[e.get("name", "?")][0] += us
        totals[e.get("name", "?")][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": name, "total_s": us / 1e6, "count": count, "kind": kind}
            for name, (us, count) in ranked]


# ---------------------------------------------------------------- command line
def summary_text(path: Path | str, events: list[dict], n: int = 10) -> str:
    reps = len(rep_windows(events))
    per_rep = device_time_per_rep(events)
    top = top_kernels(events, n)
    everything = sum(k["total_s"] for k in top_kernels(events, sys.maxsize)) or 1.0
    lines = [f"trace: {path}", f"repetitions: {reps}",
             "device time per repetition: " + (f"{per_rep * 1e6:.2f} us" if per_rep is not None
                                               else "n/a (no device kernels: a CPU trace)")]
    if top:
        lines.append(f"top by time ({top[0]['kind']}):")
        lines.append(f"  {'total':>12}  {'count':>6}  {'share':>6}  name")
        lines += [f"  {k['total_s'] * 1e6:>9.2f} us  {k['count']:>6}  "
                  f"{k['total_s'] / everything:>6.1%}  {k['name']}" for k in top]
    else:
        lines.append("no kernels or ops found")
    return "\n".join(lines)


def _refuse(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "summary":
        return _refuse("usage: python -m harness.trace summary <trace.json[.gz]>")
    path = Path(argv[1])
    if not path.is_file():
        return _refuse(f"summary: no trace file at {path}")
    # A native Perfetto trace (run.pftrace, the run timeline) is protobuf, not JSON, and holds
    # benchmark slices and counters: no kernels or repetitions to summarise.
    try:
        events = read(path)
    except (ValueError, gzip.BadGzipFile):  # undecodable, not JSON, not gzip
        return _refuse(f"summary: {path} is not a Chrome/Perfetto JSON trace; it reads"
                       " the benchmark traces torch.profiler and jax.profiler write"
                       " (.json.gz, .perfetto.json.gz), not a native Perfetto .pftrace (open that"
                       " at ui.perfetto.dev)")
    print(summary_text(path, events))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
