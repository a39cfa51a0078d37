"""What every Pallas TPU launcher shares: TPU interpret mode with race detection off a TPU,
compiler params, and block sizes that respect the TPU's (8, 128) tiling.

A TPU block's last two dims must be multiples of (sublane, 128) or span the whole array dim; the
sublane multiple is 8 for 32-bit dtypes and 16 for 16-bit ones (two values pack into one 32-bit
sublane). The launchers here always pick aligned blocks and zero-pad the arrays to block multiples,
so odd shapes never reach Mosaic as unaligned vectors.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernels.pallas._common import compile_interpreted_threads_once, idiv, pad_axis, round_up

__all__ = ["LANES", "on_tpu", "interpret_params", "compiler_params", "sublanes", "fit_block",
           "idiv", "check_dtype_supported", "races_found", "pad_axis", "round_up"]

LANES = 128


@functools.cache
def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


# Simulated TensorCores per chip in interpret mode. Two, as on a megacore chip (v4, v5p, v7x): the
# interpreter hands each core its share of the "parallel" grid dims (in a shuffled order), so a
# reduction wrongly marked "parallel" gives a wrong answer or a race that one core never shows.
INTERPRET_CORES = 2


@functools.cache
def interpret_params() -> pltpu.InterpretParams | None:
    """None on a TPU (compile with Mosaic); elsewhere TPU interpret mode with the race detector on
    and every buffer (outputs and VMEM scratch included) starting as NaN, so an output element the
    kernel never writes comes back as NaN (or, when its VMEM buffer was reused, as a stale value of
    another block) instead of a plausible number. A race is printed ("RACE DETECTED") and sets
    `interpret_pallas_call.races.races_found` (see `races_found()`); it raises nothing."""
    if on_tpu():
        return None
    compile_interpreted_threads_once()
    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                                 num_cores_or_threads=INTERPRET_CORES)


def races_found() -> bool:
    """Whether the race detector flagged the last kernel run in TPU interpret mode. The state is
    created afresh for every interpreted pallas_call, so check right after the call."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    state = interpret_pallas_call.races
    return bool(state is not None and state.races_found)


def compiler_params(dimension_semantics: tuple[str, ...]) -> pltpu.CompilerParams:
    """Mosaic params; "parallel" grid dims may be split across TensorCores (megacore), the
    "arbitrary" ones (reductions carried in scratch) run in order on one core."""
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))


def sublanes(dtype) -> int:
    """Rows of one (sublane, 128) VMEM tile: 8 for 32-bit, 16 for 16-bit dtypes."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def fit_block(dim: int, cap: int, align: int) -> int:
    """The block for an array dim of size `dim`: `cap` (a multiple of `align`), shrunk to `dim`
    rounded up to `align` so a small problem is not padded to a large tile."""
    if cap % align:
        raise ValueError(f"block cap {cap} must be a multiple of the alignment {align}")
    return min(cap, round_up(dim, align))


def check_dtype_supported(name: str, x) -> None:
    """float16 on a TPU is refused: TPUs compute in bfloat16/float32, and Mosaic's float16 support
    depends on the chip generation and is unverified here. Interpret mode (on CPU) runs float16
    fine, so the check applies on a real TPU only."""
    if on_tpu() and x.dtype == jnp.float16:
        raise TypeError(f"{name} has dtype float16, which this Pallas TPU kernel does not support "
                        "on a TPU: use bfloat16 or float32")
