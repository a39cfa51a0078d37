"""Hand-written Pallas attention forward for Hopper through Mosaic GPU, FlashAttention style, with
the `pallas` kernels' backward.

Each block (CTA) owns 128 query rows of one (batch, q head) and runs three warpgroups: a memory
warpgroup streaming k and v tiles by TMA into swizzled shared memory, `stages` key blocks ahead,
and two compute warpgroups of 64 rows each. A compute warpgroup keeps its q tile in shared memory
and, per key block, takes the scores by wgmma (k transposed in place), an online softmax in fp32
registers (base 2: log2(e) folded into the scale), and P V by wgmma with P from registers. Under
causal masking the pipeline stops at the block's diagonal (later key blocks are never loaded), and
a key block wholly past a warpgroup's last row is skipped by it (no MMA, no softmax).
GQA: k and v of kv head h // (H // Hkv) are read in place, never repeated; without a causal mask
a group's queries are packed into one sequence of their kv head (as the `pallas` kernels do).
With fewer blocks than four per multiprocessor and no causal mask (a decode step), the key blocks
are split over a fourth grid axis (split-KV): each split writes its output in fp32 and its
logsumexp, merged as the `pallas` forward merges its splits.

Sequences are zero-padded to block multiples (padded keys masked out of the softmax) and the head
dim to a power of two >= 64 (padded columns add nothing to a dot product). The saved logsumexp
(base 2, given to the backward as its row statistics in one part) and the padding match
`kernels.pallas.attention`, whose dQ and dK/dV kernels give the gradients. float32 inputs run
the `pallas` kernels throughout: wgmma takes fp32 only as TF32.

In Mosaic GPU's interpret mode (off a GPU) the two products are jnp dots on the tiles loaded from
shared memory: the interpreter's wgmma takes neither a transposed shared-memory operand nor one in
registers. The pipeline, barriers, masking, softmax and stores run as on the GPU; the wgmma forms
are checked by lowering for CUDA (tests/test_pallas_mosaic.py).
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
from kernels.pallas import attention as pallas_attention
from kernels.pallas._common import idiv, pad_axis
from kernels.pallas_mosaic._common import (SHARED_BYTES, interpret_params, swizzled, tags,
                                           unavailable)

# wgmma's M: the query rows of one compute warpgroup; a block has two of them.
ROWS = 64
# With the keys split, a split's fp32 output leaves through a staging tile of this many columns
# per compute warpgroup, a chunk at a time: a whole fp32 row of D = 128 would not fit beside the
# pipeline's buffers (Mosaic GPU's lowering counted 232496 bytes, 48 over the limit).
SPLIT_COLS = 64
# Shared memory Mosaic GPU adds to the buffers (the pipeline's barriers, buffers aligned for the
# swizzle): 2608 bytes in its lowering at D = 256 with the keys split.
BARRIERS_AND_ALIGNMENT = 4096
MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class Blocks:
    """block_kv: keys per step; stages: key blocks in flight (shared memory: 2 x stages tiles of
    block_kv x D, plus q and the logsumexp, and with the keys split an fp32 ROWS x SPLIT_COLS
    tile per compute warpgroup staging its output)."""

    block_kv: int = 128
    stages: int = 2

    def shared_bytes(self, d: int, itemsize: int, split: bool = False) -> int:
        staging = 4 * SPLIT_COLS * 2 * ROWS if split else 0
        tiles = itemsize * d * (2 * self.stages * self.block_kv + 2 * ROWS)
        return tiles + 4 * 2 * ROWS + staging + BARRIERS_AND_ALIGNMENT


def blocks_for(d: int) -> Blocks:
    """Head dims up to 64 leave room for a third key block in flight; 256 only for 64-key blocks."""
    if d > 128:
        return Blocks(block_kv=64, stages=2)
    return Blocks(block_kv=128, stages=3 if d <= 64 else 2)


def _scores(q_smem, k_smem, wgmma: bool):
    """q k^T in fp32: by wgmma with k transposed in shared memory, or (interpret mode) a jnp dot."""
    if not wgmma:
        return lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)

    def mma(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
        return s_ref[...]
    return pl.run_scoped(mma, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]), jnp.float32))


def _p_times_v(p, v_smem, wgmma: bool):
    """p v in fp32, p (already in v's dtype) from registers."""
    if not wgmma:
        return jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem)
        return acc_ref[...]
    return pl.run_scoped(mma, plgpu.ACC((p.shape[0], v_smem.shape[1]), jnp.float32))


def _kernel(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, rest_gmem, q_smem, lse_smem, q_barrier,
            *split_smem, st: pallas_attention._Static, blocks: Blocks):
    """With the keys split (st.kv_splits > 1, never causal), grid axis "split" picks a run of
    st.kv_split_blocks key blocks, and o and lse have a split axis after the head: this
    split's output in fp32 (staged in split_smem) and its logsumexp, merged by the caller.
    rest_gmem: None, or (not split) where what rounding o left goes
    (pallas_attention.rounded_with_rest)."""
    b, h = lax.axis_index("batch"), lax.axis_index("head")
    dtype, d = q_gmem.dtype, q_gmem.shape[-1]
    bkv = blocks.block_kv
    wgmma = interpret_params() is None
    qk_scale = st.scale * pallas_attention.LOG2_E

    def layout(x, wgmma_layout):
        return plgpu.layout_cast(x, wgmma_layout) if wgmma else x

    def iota(dim):
        if wgmma:
            return plgpu.broadcasted_iota(jnp.int32, (ROWS, bkv), dim, layout=plgpu.Layout.WGMMA)
        return lax.broadcasted_iota(jnp.int32, (ROWS, bkv), dim)

    def first_row():
        return lax.axis_index("q") * (2 * ROWS) + lax.axis_index("wg") * ROWS

    kv_steps = k_gmem.shape[2] // bkv
    first_block, out_head = 0, (b, h)  # out_head: where this program's o and lse rows go
    if st.kv_splits > 1:
        split = lax.axis_index("split")
        first_block = split * st.kv_split_blocks
        kv_steps = jnp.minimum(kv_steps - first_block, st.kv_split_blocks)  # never empty
        out_head = (b, h, split)

    def step(idx, k_smem, v_smem, carry):
        (j,) = idx
        wg, row0 = lax.axis_index("wg"), first_row()

        def attend(carry):
            acc, m, l = carry
            s = _scores(q_smem.at[wg], k_smem, wgmma) * qk_scale
            keys = iota(1) + (first_block + j) * bkv
            visible = keys < st.sk
            if st.causal:  # top-left aligned: query i sees keys j <= i
                visible = visible & (keys <= iota(0) + row0)
            s = jnp.where(visible, s, -jnp.inf)
            # The first key of the range (key 0, or a split's first) is visible to every row and
            # its block is never skipped: m is finite from then.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = pallas_attention._one_key_exact(
                jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), visible, st)
            l = l * alpha + p.sum(axis=1)
            pv = _p_times_v(p.astype(dtype), v_smem, wgmma)
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        if st.causal:
            carry = lax.cond(j * bkv <= row0 + ROWS - 1, attend, lambda c: c, carry)
        elif st.kv_splits > 1:  # a warpgroup of padding rows (decode) only keeps the pipeline going
            carry = lax.cond(row0 < st.sq, attend, lambda c: c, carry)
        else:
            carry = attend(carry)
        if not wgmma:
            # The jnp dots read k and v by plain loads (the generic proxy); the memory warpgroup
            # refills this slot by TMA (the async proxy) once the step returns, which PTX orders
            # after those loads only through a proxy fence (jax 0.11's race detector checks
            # this). wgmma reads through the async proxy itself and needs none.
            plgpu.commit_smem()
        return carry

    def compute(run_pipeline):
        wg, row0 = lax.axis_index("wg"), first_row()
        rows = pl.ds(row0, ROWS)
        plgpu.copy_gmem_to_smem(q_gmem.at[b, h, rows], q_smem.at[wg], q_barrier.at[wg])
        plgpu.barrier_wait(q_barrier.at[wg])
        acc, m, l = run_pipeline((
            layout(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
            layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            layout(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))))

        def store():
            o = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            lse_smem.at[wg][...] = m + jnp.log2(l)
            o_rows = o_gmem.at[(*out_head, rows)]
            if split_smem:  # a split's o in fp32, SPLIT_COLS columns at a time
                (staging,) = split_smem
                for c in range(0, d, SPLIT_COLS):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # staging free again
                    staging.at[wg][...] = o[:, c:c + SPLIT_COLS]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(staging.at[wg], o_rows.at[:, pl.ds(c, SPLIT_COLS)])
            else:  # q's tile is done with: it stages o (and o's rest) for the TMA stores
                rounded, rest = pallas_attention.rounded_with_rest(o, dtype)
                q_smem.at[wg][...] = rounded
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_smem.at[wg], o_rows)
                if rest_gmem is not None:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the tile free again
                    q_smem.at[wg][...] = rest
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(q_smem.at[wg], rest_gmem.at[(*out_head, rows)])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[(*out_head, rows)])
            plgpu.wait_smem_to_gmem(0)

        if split_smem:
            # Split outputs are merged over the real rows only, so a warpgroup of padding rows
            # (the second one of a standard decode case) writes nothing.
            pl.when(row0 < st.sq)(store)
        else:
            store()

    kv_head = idiv(h, st.groups)[0]
    if st.causal:
        # Key blocks past the block's last query row are never loaded: the pipeline's length
        # (the same for the memory and the compute warpgroups) stops at the diagonal.
        last_row = lax.axis_index("q") * (2 * ROWS) + 2 * ROWS - 1
        kv_steps = jnp.minimum(last_row // bkv + 1, kv_steps)
    tile = plgpu.BlockSpec((bkv, d), lambda j: (first_block + j, 0),
                           transforms=swizzled(d, dtype))
    plgpu.emit_pipeline_warp_specialized(
        step, grid=(kv_steps,), memory_registers=MEMORY_REGISTERS,
        in_specs=[tile, tile], wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=blocks.stages, compute_context=compute,
    )(k_gmem.at[b, kv_head], v_gmem.at[b, kv_head])


def _forward(q, k, v, st: pallas_attention._Static, blocks: Blocks, keep_rest: bool = False):
    """o, its row statistics m and log2_l (pallas_attention._probabilities), and with keep_rest
    what rounding o left (pallas_attention.rounded_with_rest; else None)."""
    B, H, Sq, D = q.shape
    splits = st.kv_splits
    scratch = [plgpu.SMEM((2, ROWS, D), q.dtype, transforms=swizzled(D, q.dtype)),
               plgpu.SMEM((2, ROWS), jnp.float32),
               plgpu.Barrier(num_barriers=2)]
    grid, grid_names = (B, H, Sq // (2 * ROWS)), ("batch", "head", "q")
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, H, Sq), jnp.float32)]
    if splits > 1:
        scratch.append(plgpu.SMEM((2, ROWS, SPLIT_COLS), jnp.float32,
                                  transforms=swizzled(SPLIT_COLS, jnp.float32)))
        grid, grid_names = grid + (splits,), grid_names + ("split",)
        out_type = [jax.ShapeDtypeStruct((B, H, splits, Sq, D), jnp.float32),
                    jax.ShapeDtypeStruct((B, H, splits, Sq), jnp.float32)]
    elif keep_rest:  # (split outputs are fp32: their merge gives the rest)
        out_type.append(jax.ShapeDtypeStruct(q.shape, q.dtype))

    def entry(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, rest_gmem=None):
        pl.run_scoped(
            functools.partial(_kernel, q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, rest_gmem,
                              st=st, blocks=blocks),
            *scratch, collective_axes="wg")

    o, lse, *rest = plgpu.kernel(
        entry, out_type=out_type, grid=grid, grid_names=grid_names,
        num_threads=3, thread_name="wg",  # two compute warpgroups and the memory one
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(),
    )(q, k, v)
    if splits == 1:
        # The backward's row statistics (kernels.pallas.attention._probabilities): the logsumexp
        # in one part (the rounding of lse is far below a 16-bit output's).
        return o, lse, jnp.zeros_like(lse), (rest[0] if rest else None)
    # Only the real query rows are merged: a decode step's block is mostly padding rows (4 real
    # of 128 in the standard cases), whose partial outputs the merge would otherwise read. The
    # backward's tiles take the merged o and statistics padded back. Each split gives its
    # logsumexp alone, so its sum is taken as 1.
    lse = lse[:, :, :, :st.sq]
    o, m, log2_l = pallas_attention.merge_splits(o[:, :, :, :st.sq], lse, jnp.ones_like(lse))
    o, rest = pallas_attention.rounded_with_rest(o, q.dtype)
    o, m, log2_l, rest = (pad_axis(x, 2, 2 * ROWS) for x in (o, m, log2_l, rest))
    return o, m, log2_l, (rest if keep_rest else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, st: pallas_attention._Static, blocks: Blocks):
    return _forward(q, k, v, st, blocks)[0]


def _flash_fwd(q, k, v, st, blocks):
    o, m, log2_l, o_rest = _forward(q, k, v, st, blocks, keep_rest=True)
    return o, (q, k, v, o, o_rest, m, log2_l)


def _flash_bwd(st, blocks, residuals, do):
    return pallas_attention._backward(st, residuals, do)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks"))
def _attention(q, k, v, *, causal: bool, scale: float, blocks: Blocks):
    q, unpack = pallas_attention.pack_query_groups(q, k.shape[1], causal)
    _, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    d_padded = max(64, pl.next_power_of_2(D))
    # Decode-like calls (few blocks of queries; never causal) split the keys, where the fp32
    # staging of a split's output fits in shared memory beside the pipeline.
    programs = q.shape[0] * H * pl.cdiv(Sq, 2 * ROWS)
    splits = (1, 0)
    if not causal and blocks.shared_bytes(d_padded, q.dtype.itemsize, split=True) <= SHARED_BYTES:
        splits = pallas_attention.kv_splits(programs, pl.cdiv(Sk, blocks.block_kv))
    # The backward's tiles (powers of two <= 64) divide both paddings.
    backward_blocks = pallas_attention.BlockSizes.default_for(D, q.dtype).fit(Sq, Sk)
    st = pallas_attention._Static(causal, scale, Sq, Sk, H // Hkv, backward_blocks, *splits)
    q = pad_axis(pad_axis(q, 2, 2 * ROWS), 3, d_padded)
    k = pad_axis(pad_axis(k, 2, blocks.block_kv), 3, d_padded)
    v = pad_axis(pad_axis(v, 2, blocks.block_kv), 3, d_padded)
    return unpack(_flash(q, k, v, st, blocks)[:, :, :Sq, :D])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
              scale: float | None = None, *, blocks: Blocks | None = None) -> jax.Array:
    """softmax(q k^T * scale) v: q [B, H, Sq, D], k and v [B, Hkv, Sk, D] -> [B, H, Sq, D].

    Differentiable (jax.grad) in q, k, v. `blocks` overrides the choice by head dim.
    """
    dims = contract.attention_args(q, k, v, causal, scale, "jax")
    if q.dtype == jnp.float32:
        return pallas_attention.attention(q, k, v, causal=dims.causal, scale=dims.scale)
    if dims.D > pallas_attention.MAX_HEAD_DIM:
        raise ValueError(f"q's head dimension D={dims.D} must be <= "
                         f"{pallas_attention.MAX_HEAD_DIM} for this kernel")
    d_padded = max(64, pl.next_power_of_2(dims.D))
    blocks = blocks or blocks_for(d_padded)
    if blocks.block_kv % 64 or blocks.stages < 2:
        raise ValueError(f"{blocks=}: block_kv must be a multiple of 64 and stages >= 2")
    if blocks.shared_bytes(d_padded, q.dtype.itemsize) > SHARED_BYTES:
        raise ValueError(f"{blocks=} at head dim {d_padded} needs more than the {SHARED_BYTES} "
                         "bytes of shared memory a block may have")
    return _attention(q, k, v, causal=dims.causal, scale=dims.scale, blocks=blocks)


registry.register("attention", "pallas_mosaic", framework="jax", kind="hand",
                  backend="Pallas Mosaic GPU (float32 and the backward: Pallas' Triton lowering)",
                  enabled=not unavailable(), reason=unavailable(),
                  reset=jax.clear_caches, tags=tags())(attention)
