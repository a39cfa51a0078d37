"""The roofline's ceilings, measured on the machine itself: copy bandwidth and matmul throughput.

    python -m harness.peaks [RUN_DIR]      # measure here, write RUN_DIR/peaks.json

A datasheet peak is never reached; what a large device-to-device copy and a large vendor matmul
reach on this machine is the ceiling a kernel can fairly be held to.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from harness import env, guards, results, timing

FILE = "peaks.json"
CUDA_COPY_BYTES = 2**30  # far beyond L2 (50 MB on an H100), so it measures HBM
CPU_COPY_BYTES = 256 * 2**20  # beyond any last-level cache
CUDA_MATMUL_N = 8192
# One CPU matmul takes 0.1-0.5 s: long enough to be stable, short enough that the whole
# measurement stays within a few seconds.
CPU_MATMUL_MIN_S, CPU_MATMUL_MAX_S = 0.1, 0.5
CPU_MATMUL_MAX_N = 4096


def _seconds(fn: Callable[[], object], framework: str, device: str) -> float:
    """The median time of fn, timed as the benchmarks are (harness.timing.time_fn: on a GPU L2
    flushed, a warmup, repetitions over a time budget), after a first call (compilation, page
    faults, library handles), so that the method is not what differs between a ceiling and a
    record. The clocks still can: the ceilings are measured first, on a cool GPU (the flags
    below say how it ran). In the 2026-11-23 H100 run five calls back to back put the bf16
    ceiling at 789 TFLOP/s, and the same cuBLAS matmul, benchmarked later at a power-capped
    1560 MHz, reached 86 % of it."""
    timing.sync(fn())
    return timing.time_fn(fn, framework, device.startswith("cuda")).median_s


def _cpu_seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_gbps(device: str) -> float:
    """Bytes read plus bytes written per second by a large tensor copy."""
    nbytes = CUDA_COPY_BYTES if device.startswith("cuda") else CPU_COPY_BYTES
    # filled, not torch.empty: untouched pages would be faulted in during the timing
    src = torch.full((nbytes // 4,), 1.5, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _seconds(lambda: dst.copy_(src), "torch", device)
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


def matmul_tflops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(TFLOP/s, by which library): the faster of torch.matmul and XLA's jnp.matmul, so that no
    stock op stands over the ceiling (on a CPU XLA's fp32 matmul reached 119 % of torch's)."""
    n = CUDA_MATMUL_N if device.startswith("cuda") else _cpu_matmul_n(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    seconds = {"torch": _seconds(lambda: a @ b, "torch", device)}
    xla = _xla_matmul_seconds(a, b, device)
    if xla is not None:
        seconds["xla"] = xla
    by = min(seconds, key=seconds.get)
    return 2.0 * n**3 / seconds[by] / 1e12, by


def _xla_matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: str) -> float | None:
    """jax.jit(jnp.matmul) on the same values on JAX's default device, at full precision (fp32 on
    a GPU would otherwise be TF32). None without JAX, or with JAX on another kind of device than
    torch's (CUDA torch beside CPU-only JAX: its matmul is no GPU's ceiling, and the CUDA
    tensors cannot be handed to it)."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    if (jax.default_backend() == "gpu") != device.startswith("cuda"):
        return None
    from harness import inputs

    x, y = inputs.to_jax({"a": a, "b": b}).values()
    step = jax.jit(lambda p, q: jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST))
    return _seconds(lambda: step(x, y), "jax", device)


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
        timer, copy = (f"CUDA events, XLA by the JAX profiler; L2 flushed; median over "
                       f"{timing.GPU_POLICY.budget_s} s"), f"{CUDA_COPY_BYTES >> 20} MiB"
        mm = f"{CUDA_MATMUL_N}^3"
    else:
        timer, copy = (f"perf_counter, median over {timing.CPU_POLICY.budget_s} s, at least "
                       f"{timing.CPU_POLICY.min_reps}"), f"{CPU_COPY_BYTES >> 20} MiB"
        mm = (f"n^3, n a power of two taking {CPU_MATMUL_MIN_S}-{CPU_MATMUL_MAX_S} s per call "
              f"(at most {CPU_MATMUL_MAX_N})")
    extra = {"jax_call_s": jax_call_seconds()} if on_cuda else {}
    matmul = {str(dt).removeprefix("torch."): matmul_tflops(device, dt) for dt in dtypes}
    return {
        **extra,
        "copy_gbps": copy_gbps(device),
        "matmul_tflops": {name: tflops for name, (tflops, _) in matmul.items()},
        "matmul_by": {name: by for name, (_, by) in matmul.items()},
        "flags": guards.flags(),  # throttling or low clocks while they were measured
        "device": env.device_name(),
        "method": f"timed as the benchmarks are ({timer}); copy: torch copy_ of {copy}, "
                  f"bytes = read + write; matmul: the faster of torch.matmul and "
                  f"jax.jit(jnp.matmul) (precision HIGHEST), {mm}",
    }


def save(run_dir: Path, peaks: dict) -> None:
    results.write_json(Path(run_dir) / FILE, peaks)


def measure_once(run_dir: Path, device: str) -> None:
    """Measures the run's ceilings as it starts; a resumed run keeps those of its first start,
    so that all its records are judged against one measurement (it measured again, and its
    earlier records were judged against ceilings taken after them)."""
    if load(run_dir) is None:
        save(run_dir, measure(device))


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
