"""Hand-written Pallas TPU matmul: a (M/bm, N/bn, K/bk) grid with the reduction last, an fp32
accumulator in VMEM scratch, any M, N, K by zero-padding to block multiples.

The BlockSpecs make Mosaic's pipeline double-buffer the a and b tiles from HBM into VMEM while the
MXU works on the previous pair; the output tile stays resident in VMEM across the K steps (its block
index does not change along k) and is written back once.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import contract, registry
from kernels.pallas._common import matmul_with_gradients
from kernels.pallas_tpu._common import (LANES, check_dtype_supported, compiler_params,
                                        fit_block, interpret_params, pad_axis, sublanes)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile caps. At the caps a step holds 2 x (256x512 + 512x256) 16-bit input tiles
    (double-buffered), a 256x256 output tile and a 256x256 fp32 accumulator: ~1.6 MiB of VMEM,
    well inside the default scoped limit of every TPU generation."""

    m: int = 256
    n: int = 256
    k: int = 512

    def fit(self, M: int, N: int, K: int, dtype) -> "Blocks":
        # m is a sublane dim of a; k is a lane dim of a and a sublane dim of b; n a lane dim.
        return Blocks(m=fit_block(M, self.m, sublanes(dtype)), n=fit_block(N, self.n, LANES),
                      k=fit_block(K, self.k, LANES))


def _kernel(a_ref, b_ref, o_ref, acc_ref, *, precision):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Products accumulate in fp32 for accuracy, whatever the input dtype.
    acc_ref[...] += jnp.dot(a_ref[...], b_ref[...], precision=precision,
                            preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _matmul(a: jax.Array, b: jax.Array, blocks: Blocks) -> jax.Array:
    M, N = a.shape[0], b.shape[1]
    a = pad_axis(pad_axis(a, 0, blocks.m), 1, blocks.k)  # zero K columns add nothing
    b = pad_axis(pad_axis(b, 0, blocks.k), 1, blocks.n)
    grid = (a.shape[0] // blocks.m, b.shape[1] // blocks.n, a.shape[1] // blocks.k)
    # fp32 inputs get true fp32 products (the MXU's default for fp32 is a single bf16 pass),
    # like torch's default matmul; 16-bit inputs are exact on the MXU anyway.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    out = pl.pallas_call(
        functools.partial(_kernel, precision=precision),
        out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype),
        grid=grid,
        in_specs=[pl.BlockSpec((blocks.m, blocks.k), lambda i, j, k: (i, k)),
                  pl.BlockSpec((blocks.k, blocks.n), lambda i, j, k: (k, j))],
        out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((blocks.m, blocks.n), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(),
        name="matmul_tpu",
    )(a, b)
    return out[:M, :N]


_differentiable = matmul_with_gradients(_matmul, lambda a, b: matmul(a, b))


def matmul(a: jax.Array, b: jax.Array, *, blocks: Blocks | None = None) -> jax.Array:
    """a [M, K] @ b [K, N] -> [M, N] in the inputs' dtype, differentiable in a and b. `blocks`
    overrides the tile caps (of the forward; the gradients' products take the default)."""
    dims = contract.matmul_args(a, b, "jax")
    check_dtype_supported("a", a)
    return _differentiable(a, b, (blocks or Blocks()).fit(dims.M, dims.N, dims.K, a.dtype))


registry.register("matmul", "pallas_tpu", framework="jax", kind="hand",
                  backend="Pallas TPU (Mosaic)", reset=jax.clear_caches,
                  tags=("tpu",))(matmul)
