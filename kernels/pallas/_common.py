"""What every Pallas launcher shares: interpret mode off a GPU, padding to block multiples."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def interpret() -> bool:
    """Pallas kernels compile for the GPU; anywhere else they run in interpret mode."""
    return jax.default_backend() != "gpu"


def multiprocessors() -> int:
    """The GPU's multiprocessors, by which launchers size their grids: the device's count, 132
    (an H100's) where the device does not say (lowering for CUDA on a machine without a GPU), and
    2 in interpret mode, so that small test problems are split as large ones are on a GPU."""
    if interpret():
        return 2
    return getattr(jax.devices()[0], "core_count", None) or 132


def tags() -> tuple[str, ...]:
    """Registry tags: "interpreted" where the kernels run in interpret mode."""
    return ("interpreted",) if interpret() else ()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` up to a multiple of `multiple` (no copy when it already is one)."""
    extra = round_up(x.shape[axis], multiple) - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def gpu_compiler_params(num_warps: int, num_stages: int):
    """Compiler params for Pallas' GPU (Triton) lowering (callers pass None in interpret mode).
    The class was TritonCompilerParams before it became CompilerParams."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)
