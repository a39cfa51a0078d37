"""Hand-written Pallas matmul: a 1-D grid of output tiles in grouped order, fp32 accumulator,
K walked inside the kernel, any M, N, K by zero-padding to block multiples."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import contract, registry
from kernels.pallas._common import (gpu_compiler_params, interpret, matmul_with_gradients,
                                    multiprocessors, pad_axis, round_up, tags)


@dataclasses.dataclass(frozen=True)
class Blocks:
    m: int = 128
    n: int = 128
    k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# A decode-sized problem (M <= 16) is a read of b: 16x128 tiles gave the 16x4096x4096 case 32
# programs for 132 multiprocessors, 16x32 tiles with 256-deep k steps give it 128 (40 registers,
# 72 KiB of shared memory for sm_90: make aot), as the Triton kernel's 16-row configs do.
SHORT = Blocks(m=16, n=32, k=256, num_stages=4)


def _blocks_for(M: int, N: int, K: int, dtype) -> Blocks:
    """Default tiles, shrunk (to powers of two >= 16, as the GPU lowering needs) for small dims so
    a 16-row problem is not padded to 128 rows. A whole 128x128 tile takes eight warps: with four,
    each thread's share of the fp32 accumulator and of the operand addresses Pallas' lowering
    keeps in registers spilled (255 registers, 304 bytes spilled for sm_90: make aot). True fp32
    dots run as multiply-adds without tensor cores: 128x128 tiles spilled 3.5 KB a thread even on
    eight warps, 64x64x32 tiles on eight take 80 registers."""
    def fit(block, dim):
        return min(block, max(16, pl.next_power_of_2(dim)))
    if jnp.dtype(dtype) == jnp.float32:
        b = Blocks(m=64, n=64, k=32, num_warps=8)
    elif M <= 16:
        b = SHORT
    else:
        b = Blocks()
    m, n = fit(b.m, M), fit(b.n, N)
    if (m, n) == (128, 128) and pl.cdiv(M, m) * pl.cdiv(N, n) < multiprocessors():
        m = 64  # 1024x1024: 64 tiles of 128x128 for 132 multiprocessors, 128 of 64x128
    return dataclasses.replace(b, m=m, n=n, k=fit(b.k, K),
                               num_warps=8 if m * n >= 128 * 128 else b.num_warps)


def _tile(pid, grid_m: int, grid_n: int, group_m: int):
    """Grouped program order: group_m consecutive programs share a column band of b (L2 reuse)."""
    per_group = group_m * grid_n
    first_m = (pid // per_group) * group_m
    rows = jnp.minimum(grid_m - first_m, group_m)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


def _kernel(a_ref, b_ref, o_ref, *, blocks: Blocks, grid_m: int, grid_n: int, steps_k: int,
            precision):
    i, j = _tile(pl.program_id(0), grid_m, grid_n, blocks.group_m)
    rows = pl.ds(pl.multiple_of(i * blocks.m, blocks.m), blocks.m)
    cols = pl.ds(pl.multiple_of(j * blocks.n, blocks.n), blocks.n)

    def step(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * blocks.k, blocks.k), blocks.k)
        return acc + jnp.dot(a_ref[rows, ks], b_ref[ks, cols], precision=precision,
                             preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps_k, step, jnp.zeros((blocks.m, blocks.n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _matmul(a: jax.Array, b: jax.Array, blocks: Blocks) -> jax.Array:
    M, N = a.shape[0], b.shape[1]
    a = pad_axis(pad_axis(a, 0, blocks.m), 1, blocks.k)
    b = pad_axis(pad_axis(b, 0, blocks.k), 1, blocks.n)
    grid_m, grid_n = a.shape[0] // blocks.m, b.shape[1] // blocks.n
    # fp32 inputs get true fp32 products, like torch's default matmul; halves use tensor cores.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, blocks=blocks, grid_m=grid_m, grid_n=grid_n,
                               steps_k=a.shape[1] // blocks.k, precision=precision)

    def out_index(pid):
        return _tile(pid, grid_m, grid_n, blocks.group_m)

    whole = pl.BlockSpec(memory_space=pl.ANY)  # tiles are sliced inside the kernel
    params = None if interpret() else gpu_compiler_params(blocks.num_warps, blocks.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype),
        grid=(grid_m * grid_n,),
        in_specs=[whole, whole],
        out_specs=pl.BlockSpec((blocks.m, blocks.n), out_index),
        compiler_params=params,
        interpret=interpret(),
        name="matmul_grouped_tiles",
    )(a, b)
    return out[:M, :N]


_differentiable = matmul_with_gradients(_matmul, lambda a, b: matmul(a, b))


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] @ b [K, N] -> [M, N] in the inputs' dtype, differentiable in a and b."""
    dims = contract.matmul_args(a, b, "jax")
    return _differentiable(a, b, _blocks_for(dims.M, dims.N, dims.K, a.dtype))


registry.register("matmul", "pallas", framework="jax", kind="hand", backend="Pallas",
                  reset=jax.clear_caches, tags=tags())(matmul)
