"""Hand-written Pallas matmul for Hopper through Mosaic GPU: warp-specialized, with operand tiles
moved by TMA into swizzled shared memory and multiplied by warpgroup MMA (wgmma).

Each block (CTA) owns one output tile and runs three warpgroups: a memory warpgroup that keeps
k-steps of a and b tiles in flight (TMA copies, barriers), and two compute warpgroups that
each accumulate half of the tile in fp32 registers and then write it out through shared memory
(TMA stores, `EPILOGUE_COLS` columns at a time). Blocks walk the tiles in grouped order, so blocks
running together share tiles of b in L2. Any M, N, K by zero-padding to tile multiples (no copy
when the shape is already a multiple).

float32 inputs run the `pallas` kernel instead: wgmma takes 32-bit operands only as TF32, about
1e-3 relative error against the float32 budget of ~4e-7, and float32 here is checked, not raced.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import contract, registry
from kernels.pallas._common import matmul_with_gradients, pad_axis
from kernels.pallas.matmul import _tile as grouped_tile
from kernels.pallas.matmul import matmul as pallas_matmul
from kernels.pallas_mosaic._common import (SHARED_BYTES, interpret_params, swizzled, tags,
                                           unavailable)

# Output columns written per TMA store: the staging buffer is (rows, EPILOGUE_COLS) per compute
# warpgroup, so the output tile does not take shared memory the operand stages need.
EPILOGUE_COLS = 64
# Registers left to the memory warpgroup, which only issues copies; the rest go to the compute ones.
MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class Tiles:
    """m x n: each compute warpgroup's accumulator; the block's tile is two of them side by side
    along `split` ("m": 2m x n, "n": m x 2n). k: the reduction step. stages: k-step buffers (one
    of them held by the wgmma in flight, the others filled ahead by TMA); at least 2."""

    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 4
    split: str = "m"
    group_m: int = 8

    @property
    def block(self) -> tuple[int, int]:
        return (2 * self.m, self.n) if self.split == "m" else (self.m, 2 * self.n)

    def shared_bytes(self, itemsize: int) -> int:
        bm, bn = self.block
        return itemsize * (self.stages * self.k * (bm + bn) + 2 * self.m * EPILOGUE_COLS)


# Blocks of 256x128 where there are rows for them; 64x128 for short problems (decode-like M <= 64),
# where 256 rows would be mostly padding. wgmma's M is 64 per warpgroup. A short problem's time
# is reading b once, which takes many SMs at once: at M=16, N=4096, 64x256 blocks were 16 for
# 132 SMs, 64x128 ones are 32. (Narrower ones, 64x64 and 64x32, fail Mosaic GPU's layout
# inference when lowered for CUDA.)
WIDE = Tiles(m=128, n=128, split="m")
SHORT = Tiles(m=64, n=64, split="n")


def tiles_for(M: int) -> Tiles:
    return SHORT if M <= 64 else WIDE


def _kernel(a_gmem, b_gmem, o_gmem, *, tiles: Tiles, grid_m: int, grid_n: int):
    dtype = a_gmem.dtype
    bm, bn = tiles.block
    i, j = grouped_tile(lax.axis_index("tile"), grid_m, grid_n, tiles.group_m)
    block_rows, block_cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def scoped(staging):
        wg = lax.axis_index("wg")  # compute warpgroup 0 or 1: its half of the block's tile
        if tiles.split == "m":
            rows, cols = pl.ds(wg * tiles.m, tiles.m), slice(None)
        else:
            rows, cols = slice(None), pl.ds(wg * tiles.n, tiles.n)

        def step(_, a_smem, b_smem, acc):
            plgpu.wgmma(acc, a_smem.at[rows], b_smem.at[:, cols])
            # One wgmma stays in flight, still reading this step's tiles: the pipeline frees a
            # step's tiles one step later (delay_release=1), once the next wait has retired it.
            plgpu.wgmma_wait(1)
            return acc

        def with_accumulator(run_pipeline):
            def body(acc):
                # Reading the accumulator waits for the last wgmma; fp32, rounded once.
                out = run_pipeline(acc)[...].astype(dtype)
                dest = o_gmem.at[block_rows, block_cols].at[rows, cols]
                for c in range(0, tiles.n, EPILOGUE_COLS):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # staging free again
                    staging.at[wg][...] = out[:, c:c + EPILOGUE_COLS]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(staging.at[wg],
                                            dest.at[:, pl.ds(c, EPILOGUE_COLS)])
                plgpu.wait_smem_to_gmem(0)
            pl.run_scoped(body, plgpu.ACC((tiles.m, tiles.n), jnp.float32))

        operand = swizzled(tiles.k, dtype)
        plgpu.emit_pipeline_warp_specialized(
            step, grid=(a_gmem.shape[1] // tiles.k,), memory_registers=MEMORY_REGISTERS,
            in_specs=[plgpu.BlockSpec((bm, tiles.k), lambda k: (0, k), transforms=operand,
                                      delay_release=1),
                      plgpu.BlockSpec((tiles.k, bn), lambda k: (k, 0), transforms=operand,
                                      delay_release=1)],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=tiles.stages,
            compute_context=with_accumulator,
        )(a_gmem.at[block_rows], b_gmem.at[:, block_cols])

    pl.run_scoped(scoped, plgpu.SMEM((2, tiles.m, EPILOGUE_COLS), dtype,
                                     transforms=swizzled(EPILOGUE_COLS, dtype)),
                  collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("tiles",))
def _matmul(a: jax.Array, b: jax.Array, tiles: Tiles) -> jax.Array:
    M, N = a.shape[0], b.shape[1]
    bm, bn = tiles.block
    a = pad_axis(pad_axis(a, 0, bm), 1, tiles.k)  # zero k columns add nothing
    b = pad_axis(pad_axis(b, 0, tiles.k), 1, bn)
    grid_m, grid_n = a.shape[0] // bm, b.shape[1] // bn
    out = plgpu.kernel(
        functools.partial(_kernel, tiles=tiles, grid_m=grid_m, grid_n=grid_n),
        out_type=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype),
        grid=(grid_m * grid_n,), grid_names=("tile",),
        num_threads=3, thread_name="wg",  # two compute warpgroups and the memory one
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(),
    )(a, b)
    return out[:M, :N]


_differentiable = matmul_with_gradients(_matmul, lambda a, b: matmul(a, b))


def matmul(a: jax.Array, b: jax.Array, *, tiles: Tiles | None = None) -> jax.Array:
    """a [M, K] @ b [K, N] -> [M, N] in the inputs' dtype, differentiable in a and b. `tiles`
    overrides the choice by shape (of the forward; the gradients' products take the default)."""
    dims = contract.matmul_args(a, b, "jax")
    if a.dtype == jnp.float32:
        return pallas_matmul(a, b)
    tiles = tiles or tiles_for(dims.M)
    if tiles.stages < 2:
        raise ValueError(f"{tiles=}: stages must be >= 2 (one buffer is held by the wgmma in "
                         "flight)")
    if tiles.shared_bytes(a.dtype.itemsize) > SHARED_BYTES:
        raise ValueError(f"{tiles=} needs {tiles.shared_bytes(a.dtype.itemsize)} bytes of shared "
                         f"memory, more than the {SHARED_BYTES} a block may have")
    return _differentiable(a, b, tiles)


registry.register("matmul", "pallas_mosaic", framework="jax", kind="hand",
                  backend="Pallas Mosaic GPU (float32: Pallas' Triton lowering)",
                  enabled=not unavailable(), reason=unavailable(),
                  reset=jax.clear_caches, tags=tags())(matmul)
