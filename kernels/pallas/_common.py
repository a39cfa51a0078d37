"""What every Pallas launcher shares: interpret mode off a GPU, padding to block multiples."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def interpret() -> bool:
    """Pallas kernels compile for the GPU; anywhere else they run in interpret mode."""
    return jax.default_backend() != "gpu"


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
