"""The roofline's ceilings, measured on the machine itself: copy bandwidth and matmul throughput.

    python -m harness.peaks [RUN_DIR]      # measure here, write RUN_DIR/peaks.json

A datasheet peak is never reached; what a large device-to-device copy and a large vendor matmul
reach on this machine is the ceiling a kernel can fairly be held to.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from harness import env, results, timing

FILE = "peaks.json"
CUDA_COPY_BYTES = 2**30  # far beyond L2 (50 MB on an H100), so it measures HBM
CPU_COPY_BYTES = 256 * 2**20  # beyond any last-level cache
CUDA_MATMUL_N = 8192
# One CPU matmul takes 0.1-0.5 s: long enough to be stable, short enough that the whole
# measurement stays within a few seconds.
CPU_MATMUL_MIN_S, CPU_MATMUL_MAX_S = 0.1, 0.5
CPU_MATMUL_MAX_N = 4096
REPS = 5


def _cuda_seconds(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _cpu_seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_seconds(fn: Callable[[], object], device: str, reps: int = REPS) -> float:
    clock = _cuda_seconds if device.startswith("cuda") else _cpu_seconds
    clock(fn)  # warmup: page faults, cuBLAS handle and heuristics
    return statistics.median(clock(fn) for _ in range(reps))


def copy_gbps(device: str) -> float:
    """Bytes read plus bytes written per second by a large tensor copy."""
    nbytes = CUDA_COPY_BYTES if device.startswith("cuda") else CPU_COPY_BYTES
    # filled, not torch.empty: untouched pages would be faulted in during the timing
    src = torch.full((nbytes // 4,), 1.5, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds / 1e9


def _cpu_matmul_n(dtype: torch.dtype) -> int:
    """The power-of-two size whose matmul takes CPU_MATMUL_MIN_S..MAX_S, as near as doubling
    allows (CPU bf16 can be many times slower or faster than fp32: one size does not fit both)."""
    n = 256
    while n < CPU_MATMUL_MAX_N:
        a = torch.randn(n, n).to(dtype)
        seconds = _cpu_seconds(lambda: a @ a)
        if seconds >= CPU_MATMUL_MIN_S or seconds * 8 > CPU_MATMUL_MAX_S:  # doubling n costs 8x
            break
        n *= 2
    return n


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = CUDA_MATMUL_N if device.startswith("cuda") else _cpu_matmul_n(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    return 2.0 * n**3 / _median_seconds(lambda: a @ b, device) / 1e12


def jax_call_seconds() -> float | None:
    """A trivial jitted JAX call timed on the host clock (L2 flush, dispatch and
    block_until_ready): the host's share of a JAX median on a GPU when the profiler showed no
    kernels and the JAX timer fell back to that clock; the report's framework verdicts allow for
    it. None without JAX."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    x = jnp.ones((8,), jnp.float32)
    step = jax.jit(lambda v: v + 1)
    return timing.time_wall(lambda: step(x), timing.GPU_POLICY, flush=True).median_s


def measure(device: str) -> dict:
    """{"copy_gbps", "matmul_tflops": {dtype: TFLOP/s}, "device", "method"} on `device`
    ("cuda", "cuda:0" or "cpu"); on CUDA also "jax_call_s" (see jax_call_seconds). float16 only
    on CUDA, where it costs nothing extra."""
    on_cuda = device.startswith("cuda")
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if on_cuda else (torch.bfloat16,
                                                                             torch.float32)
    if on_cuda:
        timer, copy = "CUDA events", f"{CUDA_COPY_BYTES >> 20} MiB"
        mm = f"{CUDA_MATMUL_N}^3"
    else:
        timer, copy = "perf_counter", f"{CPU_COPY_BYTES >> 20} MiB"
        mm = (f"n^3, n a power of two taking {CPU_MATMUL_MIN_S}-{CPU_MATMUL_MAX_S} s per call "
              f"(at most {CPU_MATMUL_MAX_N})")
    extra = {"jax_call_s": jax_call_seconds()} if on_cuda else {}
    return {
        **extra,
        "copy_gbps": copy_gbps(device),
        "matmul_tflops": {str(dt).removeprefix("torch."): matmul_tflops(device, dt)
                          for dt in dtypes},
        "device": env.device_name(),
        "method": f"median of {REPS} after a warmup, {timer}; copy: torch copy_ of {copy}, "
                  f"bytes = read + write; matmul: torch.matmul {mm}",
    }


def save(run_dir: Path, peaks: dict) -> None:
    results.write_json(Path(run_dir) / FILE, peaks)


def load(run_dir: Path) -> dict | None:
    """The run's measured ceilings, or None when it has none."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0]) if argv else results.REPORTS / "latest"
    peaks = measure("cuda" if torch.cuda.is_available() else "cpu")
    save(run, peaks)
    print(json.dumps(peaks, indent=1))


if __name__ == "__main__":
    main()
