"""Peak memory of one call: the bytes it needs at its peak beyond its inputs, output included.

  torch on CUDA:  torch.cuda max_memory_allocated after reset_peak_memory_stats, minus what was
                  allocated before the call.
  jax anywhere:   XLA's compiled memory_analysis(): temporaries plus outputs, read from the very
                  jitted function that was timed, so its compiled executable comes from the jit
                  cache instead of a second compilation.
  torch on CPU:   max_memory_allocated returns 0 there, so the process's peak resident set
                  (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the
                  call. Allocator reuse can hide memory, so this is a lower bound.
"""
from __future__ import annotations

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
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = sync(fn())
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak), "torch.cuda.max_memory_allocated"


def _rss(fn: Callable[[], Any]) -> tuple[int, str]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_kb("VmRSS")
    out = sync(fn())
    peak = (_proc_kb("VmHWM") - before) * 1024
    del out
    return int(max(peak, 0)), "rss_high_water_delta"


def _xla(jitted, args: tuple) -> tuple[int, str]:
    if not hasattr(jitted, "lower"):
        raise TypeError(f"jitted must be a jax.jit-wrapped function, got {type(jitted).__name__}")
    compiled = jitted.lower(*args).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("memory_analysis() unavailable on this backend")
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes), "xla.memory_analysis"


def peak_bytes(fn: Callable[[], Any], framework: str, on_cuda: bool,
               jitted: Callable[..., Any] | None = None,
               args: tuple = ()) -> tuple[int | None, str]:
    """(bytes, method) for one call of `fn`; for JAX, `fn` is jitted(*args) and XLA's analysis
    of that compiled function is read instead of running it."""
    if framework == "jax":
        return _xla(jitted, args)
    if on_cuda:
        return _torch_cuda(fn)
    try:
        return _rss(fn)
    except OSError as e:
        return None, f"unavailable: {e}"
