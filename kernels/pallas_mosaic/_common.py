"""What every Mosaic GPU launcher shares: where it can run, interpret mode off a GPU, and the
shared-memory layout the tensor cores read."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.pallas._common import compile_interpreted_threads_once

# Largest shared memory a block may use on Hopper (227 KiB); Mosaic GPU refuses more when lowering.
SHARED_BYTES = 227 * 1024


@functools.cache
def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.cache
def unavailable() -> str:
    """Why these kernels cannot run here, or "" where they can: a Hopper GPU (compute capability
    9.x: warpgroup MMA, which neither earlier GPUs nor Blackwell's tcgen05 have), or no GPU at all
    (interpret mode)."""
    if not on_gpu():
        return ""
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if not capability.startswith("9."):
        return ("Mosaic GPU kernels here are written for Hopper (sm_90); "
                f"this GPU is sm_{capability}")
    return ""


def tags() -> tuple[str, ...]:
    """"hopper": benchmarked on a Hopper GPU only (harness.bench); "interpreted" off a GPU."""
    return ("hopper",) if on_gpu() else ("hopper", "interpreted")


@functools.cache
def interpret_params():
    """None on a GPU (compile with Mosaic GPU); elsewhere GPU interpret mode with the race detector
    on and every buffer starting as NaN, so an unwritten output element fails the check."""
    if on_gpu():
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    compile_interpreted_threads_once()
    return InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def races_found() -> bool:
    """Whether the race detector flagged the last kernel run in GPU interpret mode."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    try:
        return interpret_pallas_call.get_races().races_found
    except AssertionError:  # no kernel has run in interpret mode yet
        return False


def swizzled(cols: int, dtype) -> tuple:
    """Shared-memory transforms for tiles whose rows are `cols` wide: 8-row tiling and the widest
    swizzle the row allows, the layout wgmma reads without bank conflicts and TMA writes."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))
