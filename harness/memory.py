"""Peak memory of one call: the bytes it needs at its peak beyond its inputs, output included.

  torch on CUDA:  torch.cuda max_memory_allocated after reset_peak_memory_stats, minus what was
                  allocated before the call. torch keeps a cuBLAS(Lt) workspace per handle and
                  stream (32 MiB on Hopper by default), allocated by its first matmul and held
                  from then on, outside any later call's figure; XLA's executables plan theirs
                  into their temporaries. So it is freed before the call, which allocates it
                  again inside the measurement.
  jax anywhere:   XLA's compiled memory_analysis(): temporaries plus outputs, read from the very
                  jitted function that was timed, so its compiled executable comes from the jit
                  cache instead of a second compilation. On a GPU XLA allocates what it planned;
                  XLA:CPU allocates beyond its plan (its runtime's own buffers: an attention
                  forward at 1k tokens planned 17.3 MB and allocated 26.4, its backward 27.3 and
                  69.8, counted by a malloc hook), so there the figure is a lower bound and says
                  so (XLA_CPU_PLAN).
  torch on CPU:   max_memory_allocated returns 0 there. torch.profiler's memory events
                  instead: every CPU tensor allocation and free during the call, in order; the
                  peak of their running sum. The fallback where the profiler cannot run, the
                  process's resident-set high water mark, is noise at this scale: three calls
                  of SDPA's math path at 128 tokens, which allocate 426 KB each, read 12.4 MB,
                  131 KB and 328 KB (the allocator reuses memory the process already holds, and
                  a first call pages in more than it allocates).
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import Any, Callable

import torch

from harness.timing import sync


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _torch_cuda(fn: Callable[[], Any]) -> tuple[int, str]:
    torch.cuda.synchronize()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:  # see the module's docstring
        clear_workspaces()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = sync(fn())
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak), "torch.cuda.max_memory_allocated"


def _torch_cpu(fn: Callable[[], Any]) -> tuple[int, str] | None:
    """None where the profiler cannot start."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        prof.start()
    except RuntimeError:
        return None
    try:
        out = fn()
    finally:
        prof.stop()
    del out
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "[memory]" events: Bytes > 0 an allocation, < 0 a free; Device Type 0 is the CPU
    changes = [e["args"]["Bytes"] for e in sorted(events, key=lambda e: e.get("ts", 0))
               if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *itertools.accumulate(changes)]), "torch.profiler.cpu_allocations"


def _rss(fn: Callable[[], Any]) -> tuple[int, str]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_kb("VmRSS")
    out = sync(fn())
    peak = (_proc_kb("VmHWM") - before) * 1024
    del out
    return int(max(peak, 0)), "rss_high_water_delta"


XLA_METHOD = "xla.memory_analysis"
XLA_CPU_PLAN = "xla.memory_analysis.cpu_plan"  # a lower bound: see the module's docstring
# a kernel run in an interpreter here: its memory (numpy arrays, XLA's emulation buffers) would
# be the interpreter's, not the kernel's
INTERPRETED = "not measured: the kernel runs in an interpreter here"


def _xla(jitted, args: tuple) -> tuple[int, str]:
    if not hasattr(jitted, "lower"):
        raise TypeError(f"jitted must be a jax.jit-wrapped function, got {type(jitted).__name__}")
    stats = jitted.lower(*args).compile().memory_analysis()
    if stats is None:
        raise RuntimeError("memory_analysis() unavailable on this backend")
    import jax

    platforms = {d.platform for a in jax.tree_util.tree_leaves(args) if isinstance(a, jax.Array)
                 for d in a.devices()} or {jax.default_backend()}
    on_cpu = platforms == {"cpu"}
    return (int(stats.temp_size_in_bytes + stats.output_size_in_bytes),
            XLA_CPU_PLAN if on_cpu else XLA_METHOD)


def peak_bytes(fn: Callable[[], Any], framework: str, on_cuda: bool,
               jitted: Callable[..., Any] | None = None,
               args: tuple = ()) -> tuple[int | None, str]:
    """(bytes, method) for one call of `fn`; for JAX, `fn` is jitted(*args) and XLA's analysis
    of that compiled function is read instead of running it."""
    if framework == "jax":
        return _xla(jitted, args)
    if on_cuda:
        return _torch_cuda(fn)
    measured = _torch_cpu(fn)
    if measured is not None:
        return measured
    try:
        return _rss(fn)
    except OSError as e:
        return None, f"unavailable: {e}"
