"""Hand-written Pallas TPU attention, forward only: FlashAttention-style online softmax.

Grid (B, H, Sq/bq, Sk/bk) with the key axis last and "arbitrary": the running max m, the running
sum l and the fp32 output accumulator live in VMEM scratch across the key steps of one query block;
they are reset at the first key step and the normalised output is written at the last. m and l are
kept lane-replicated as [bq, 128] tiles, the layout a row vector has on the TPU's vector unit.

Causal masking is top-left aligned (query i sees keys j <= i, as SDPA's is_causal). A key block
wholly above the diagonal is skipped with pl.when, and its index_map repeats the last needed block,
so the pipeline fetches nothing for it either. GQA/MQA: the k/v index_map reads kv head
h // (H // Hkv), so k and v are never repeated. Sequences are zero-padded to block multiples (padded
keys are masked out of the softmax, padded query rows sliced off) and the head dim to a multiple of
128 lanes (zero columns add nothing to either dot product).

There is no backward kernel: jax.grad through this implementation raises NotImplementedError.
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
from kernels.pallas_tpu._common import (LANES, check_dtype_supported, compiler_params,
                                        fit_block, idiv, interpret_params, pad_axis, round_up,
                                        sublanes)

# Masked scores: finite, so exp(mask - m) is 0 without inf - inf; every row sees key 0 in the first
# key block, so m is finite from the first step on.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile caps: bq query rows (a sublane dim) by bk keys (the lane dim of the score tile)."""

    block_q: int = 256
    block_k: int = 256

    def fit(self, sq: int, sk: int, dtype) -> "BlockSizes":
        return BlockSizes(block_q=fit_block(sq, self.block_q, sublanes(dtype)),
                          block_k=fit_block(sk, self.block_k, LANES))


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    sq: int  # true lengths, before padding
    sk: int
    groups: int  # H // Hkv
    blocks: BlockSizes


def _dot(a, b, dims):
    """Accumulates in fp32; fp32 inputs get true fp32 products (HIGHEST), not one bf16 pass."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _last_key_block(i, st: _Static):
    """The last key block query block i needs (causal: the one holding its last row's diagonal)."""
    bq, bk = st.blocks.block_q, st.blocks.block_k
    last = pl.cdiv(st.sk, bk) - 1
    if st.causal:
        return jnp.minimum(last, idiv((i + 1) * bq - 1, bk)[0])
    return last


def _kernel(q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, st: _Static):
    bq, bk = st.blocks.block_q, st.blocks.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j <= _last_key_block(i, st))
    def _step():
        s = _dot(q_ref[...], k_ref[...], ((1,), (1,))) * st.scale  # q k^T: [bq, bk]
        if st.causal or st.sk % bk:
            keys = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            visible = keys < st.sk
            if st.causal:
                visible &= keys <= i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            s = jnp.where(visible, s, _MASK_VALUE)
        m_prev = m_ref[...]  # [bq, 128], every lane holds the row's value
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, :1])
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, ((1,), (0,)))

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        o_ref[...] = (acc_ref[...] / l_ref[:, :1]).astype(o_ref.dtype)


def _forward(q, k, v, st: _Static):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    bq, bk = st.blocks.block_q, st.blocks.block_k
    g = st.groups

    def kv_index(b, h, i, j):
        # Causal: a skipped block maps to the last needed one, which is already in VMEM.
        return b, idiv(h, g)[0], jnp.minimum(j, _last_key_block(i, st)), 0

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, H, Sq // bq, Sk // bk),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params(),
        name="flash_attention_fwd_tpu",
    )(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, st: _Static):
    return _forward(q, k, v, st)


def _flash_fwd(q, k, v, st: _Static):
    return _forward(q, k, v, st), None


def _flash_bwd(st, residuals, do):
    raise NotImplementedError("the pallas_tpu attention kernel has no backward pass; "
                              "differentiate the 'pallas' or 'xla' implementation instead")


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks"))
def _attention(q, k, v, *, causal: bool, scale: float, blocks: BlockSizes):
    _, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    blocks = blocks.fit(Sq, Sk, q.dtype)
    st = _Static(causal, scale, Sq, Sk, H // Hkv, blocks)
    d_padded = round_up(D, LANES)
    q = pad_axis(pad_axis(q, 2, blocks.block_q), 3, d_padded)
    k = pad_axis(pad_axis(k, 2, blocks.block_k), 3, d_padded)
    v = pad_axis(pad_axis(v, 2, blocks.block_k), 3, d_padded)
    return _flash(q, k, v, st)[:, :, :Sq, :D]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
              scale: float | None = None, *, block_sizes: BlockSizes | None = None) -> jax.Array:
    """softmax(q k^T * scale) v: q [B, H, Sq, D], k and v [B, Hkv, Sk, D] -> [B, H, Sq, D].

    Forward only (jax.grad raises NotImplementedError). `block_sizes` overrides the tile caps.
    """
    dims = contract.attention_args(q, k, v, causal, scale, "jax")
    check_dtype_supported("q", q)
    return _attention(q, k, v, causal=dims.causal, scale=dims.scale,
                      blocks=block_sizes or BlockSizes())


registry.register("attention", "pallas_tpu", framework="jax", kind="hand",
                  backend="Pallas TPU (Mosaic)", reset=jax.clear_caches,
                  tags=("tpu",))(attention)
