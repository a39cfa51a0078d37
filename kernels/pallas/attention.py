"""Hand-written Pallas attention, FlashAttention-2 style, with a custom_vjp backward.

Forward: one program per (batch, q head, query block) with an online softmax over key blocks in
fp32 (base 2: log2(e) folded into the scale), saving each row's softmax statistics (see
_probabilities). Backward: delta = rowsum(dO * O) in plain jnp (in 16 bits O plus what its
rounding left, which the forward keeps under jax.vjp: rounded_with_rest), then a dQ kernel
looping over key blocks (in fp32 it first sums what delta leaves: _delta_rest) and a dK/dV kernel
looping over query blocks. GQA/MQA: the k/v BlockSpec index_map reads kv head h // (H // Hkv),
so k and v are never repeated; dK/dV are computed per q head (fp32 when a
group has several heads) and summed over the group outside the kernel. Without a causal mask a
group's queries are instead packed into one sequence of their kv head (pack_query_groups), which
reads k and v once per group. With few query blocks (a decode step) the forward splits the keys
over a fourth grid axis (kv_splits) and merges the splits' outputs by their row maxima and sums.

Sequences are zero-padded to block multiples and the head dim to a power of two >= 16 (the GPU's
Triton lowering needs power-of-two shapes; padded head-dim columns add nothing to any dot product);
padded keys are masked out of the softmax and the outputs are sliced back.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import contract, registry
from kernels.pallas._common import (gpu_compiler_params, icdiv, interpret, multiprocessors,
                                    pad_axis, tags)

LOG2_E = 1 / math.log(2)
_SQ = getattr(pl, "squeezed", None)  # a block dim dropped from the kernel's view (None: older jax)
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) and GPU launch settings. The forward and dQ kernels own a
    query block (block_q / block_q_dq) and stream key blocks; the dK/dV kernel owns a key block
    (block_k_dkv) and streams query blocks."""

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    num_warps: int = 4
    num_warps_dkv: int = 4
    num_stages: int = 2

    @classmethod
    def default_for(cls, d: int, dtype) -> "BlockSizes":
        """The default tiles for head dimension d and the inputs' dtype (figures from make aot,
        sm_90). The dK/dV kernel keeps two [block_k_dkv, D] fp32 accumulators besides its k and
        v tiles: at D > 64 four warps spill them (255 registers, 352 bytes spilled), eight do
        not (169 registers). True fp32 dots are multiply-adds without tensor cores, each thread
        holding its rows and columns of both operands: the 16-bit tiles spilled up to 60 KB a
        thread at D = 128; 32x32 tiles on eight warps take at most 128 registers (the dK/dV
        kernel of a GQA causal case at D = 128 spills 8 bytes)."""
        if jnp.dtype(dtype) == jnp.float32:
            return cls(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32,
                       block_k_dq=32, num_warps=8, num_warps_dkv=8)
        return cls(num_warps_dkv=8 if d > 64 else 4)

    def fit(self, sq: int, sk: int) -> "BlockSizes":
        """Shrinks blocks longer than the (power-of-two rounded) sequence: Sq=1 should not pad to
        a 64-row tile. Never below 16, the smallest dot the GPU accepts."""
        def clamp(block, s):
            return min(block, max(16, pl.next_power_of_2(s)))

        return dataclasses.replace(
            self, block_q=clamp(self.block_q, sq), block_q_dkv=clamp(self.block_q_dkv, sq),
            block_q_dq=clamp(self.block_q_dq, sq), block_k=clamp(self.block_k, sk),
            block_k_dkv=clamp(self.block_k_dkv, sk), block_k_dq=clamp(self.block_k_dq, sk))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is not an array (hashable: a custom_vjp static arg)."""

    causal: bool
    scale: float
    sq: int  # true lengths, before padding
    sk: int
    groups: int  # H // Hkv
    blocks: BlockSizes
    # Forward only: the key blocks split over a fourth grid axis (split-KV, for few query blocks),
    # kv_split_blocks key blocks a split; 1 split: no fourth axis.
    kv_splits: int = 1
    kv_split_blocks: int = 0


def _dot(a, b, *, trans_b=False):
    """a @ b (or a @ b.T) accumulated in fp32; fp32 inputs get true fp32 (not TF32) products,
    like the Triton kernel under torch's default matmul precision."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(rows, keys, st: _Static):
    """Mask of the scores that exist, from broadcastable query and key indices: a real key and,
    when causal (top-left aligned like SDPA's is_causal), key j <= query i."""
    mask = keys < st.sk
    if st.causal:
        mask = mask & (keys <= rows)
    return mask


def _products(a, b):
    """a b^T over the head dim in fp32, the same bits whichever operand comes first and whatever
    the tiles: the scores q k^T (k q^T in the dK/dV kernel), which the backward recomputes and
    must get to the bit (P is off by any difference, which a peaked softmax of few queries does
    not average out), and dP = dO v^T (v dO^T), from which dS subtracts rowsum(P * dP).

    On the GPU a true fp32 dot is a chain of multiply-adds over the head dim in order for each
    element (Triton's FMA dot), whatever the tile or operand order. XLA's CPU dot, which
    interpret mode runs, sums in an order that changes with the key tile's width and the
    operands' order: q k^T and (k q^T)^T differed in 72% of a 16 x 32 tile's scores (D = 32),
    and the two-query fp32 call at scale 1.3 of the tests had dV at 6.5 times SDPA's error. So
    in interpret mode, and only there, fp32 products are summed over the head dim pairwise (one
    order for every tile); the GPU build is unchanged."""
    if interpret() and a.dtype == jnp.float32:
        s = a[:, None, :] * b[None, :, :]
        while s.shape[2] > 1:  # the head dim is padded to a power of two
            half = s.shape[2] // 2
            s = s[:, :, :half] + s[:, :, half:]
        return s[:, :, 0]
    return _dot(a, b, trans_b=True)


def _scaled_scores(a, b, visible, st: _Static):
    """_products(a, b) times the scale and log2(e), -inf where not visible: the forward's scores.
    The select between the product and any later subtraction keeps XLA (interpret mode) from
    fusing the two into a multiply-add whose unrounded product would differ from the forward's
    rounded one."""
    return jnp.where(visible, _products(a, b) * (st.scale * LOG2_E), -jnp.inf)


def _probabilities(s, m, log2_l):
    """P = 2^(s - m - log2 l) from the forward's scores s (_scaled_scores), row max m and log2
    of the row's sum of 2^(s - m), all broadcast alike. Not 2^(s - lse) with lse = m + log2 l in
    one fp32: at the scores' magnitude (tens of base-2 units with a large scale) that sum rounds
    by up to 1.9e-6, an error every P of the row shares; s - m is exact for the largest scores.
    In 12 seeded fp32 calls of two queries at scale 1.3 (D = 32, Sk = 271), dV erred 0.91 times
    SDPA's on average through the one-number logsumexp, 0.43 times with the two parts."""
    return jnp.exp2((s - m) - log2_l)


def _one_key_exact(p, visible, st: _Static):
    """P, except where every query sees one key (contract.one_visible_key): there that key's
    probability is exactly 1, as torch's is. 2^(s - m) came out 1 + 1 ulp instead (XLA fuses the
    score's scaling and the subtraction of the row max, rounded on its own, into one
    multiply-add), so v * p / p missed v by an ulp: fp32 outputs at Sk = 1 erred 1.4e-8 to 2e-8
    where torch's are exact, and dV of one causal query at scale 0.5 to 1.3 erred 2.7 to 34
    times torch's."""
    if contract.one_visible_key(st.sq, st.sk, st.causal):
        return jnp.where(visible, jnp.float32(1), jnp.float32(0))
    return p


def _num_key_blocks(q_block, block_q, block_k, st: _Static):
    """Key blocks a query block must visit; causal skips those past its last row."""
    n = pl.cdiv(st.sk, block_k)
    if st.causal:
        n = jnp.minimum(n, icdiv((q_block + 1) * block_q, block_k))
    return n


def _key_block_range(q_block, st: _Static):
    """Key blocks [first, last) a forward program visits: all it must see, or with the keys
    split (never under causal) its split's share, which is never empty."""
    n = _num_key_blocks(q_block, st.blocks.block_q, st.blocks.block_k, st)
    if st.kv_splits == 1:
        return 0, n
    first = pl.program_id(3) * st.kv_split_blocks
    return first, jnp.minimum(first + st.kv_split_blocks, n)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *stat_refs, st: _Static):
    """stat_refs: the rows' max scaled score m and log2 of their sum of 2^(s - m) (the
    logsumexp in two parts, _probabilities), or with the keys split m and the sum itself, for
    merge_splits; then, where given, the out for o's rounding remainder (rounded_with_rest)."""
    block_q, block_k = st.blocks.block_q, st.blocks.block_k
    i = pl.program_id(2)
    q = q_ref[...]
    rows = i * block_q + jnp.arange(block_q)

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        visible = _visible(rows[:, None], start + jnp.arange(block_k)[None, :], st)
        s = _scaled_scores(q, k, visible, st)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = _one_key_exact(jnp.exp2(s - m_new[:, None]), visible, st)
        p = _first_query_alone(p, rows[:, None], visible, q.dtype, st)
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    # The first key of the range is visible to every row, padded rows too (key 0, or without a
    # causal mask a split's first key), so the first block makes m finite.
    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(*_key_block_range(i, st), body, init)
    o, rest = rounded_with_rest(acc / l[:, None], o_ref.dtype)
    o_ref[...] = o
    m_ref, l_ref, *rest_ref = stat_refs
    m_ref[...], l_ref[...] = m, (l if st.kv_splits > 1 else jnp.log2(l))
    if rest_ref:
        rest_ref[0][...] = rest


def rounded_with_rest(o, dtype):
    """The fp32 output o rounded to `dtype`, and what that rounding left, in `dtype`. The
    backward's delta = rowsum(dO * O) takes their sum: from the 16-bit O alone delta is off by up
    to half an ulp of O times dO, and where one key holds nearly all of a row's probability
    dS = P (dP - delta) is a small difference that this swamps (docs/accuracy.md)."""
    rounded = o.astype(dtype)
    return rounded, (o - rounded.astype(jnp.float32)).astype(dtype)


def _first_query_alone(p, rows, visible, dtype, st: _Static):
    """P ([queries, keys] or transposed; `rows`: the queries' broadcastable indices) with query
    0's probabilities exact under the causal mask in fp32: it sees key 0 alone
    (contract.one_visible_key, for one row), whose probability is 1, where 2^(s - lse) was off
    by the roundings of the scaled score and of lse (fp32 dV of a causal 2-query call at scale 1.3
    erred 5.6 times the tests' budget, 1.8 with this: the rest is the second query's). 16-bit
    inputs need none of it (P is rounded to their dtype, and their error is far larger)."""
    if st.causal and dtype == jnp.float32:
        return jnp.where((rows == 0) & visible, jnp.float32(1), p)
    return p


def _first_query_no_score_grad(ds, rows, dtype, st: _Static):
    """dS with query 0's row (or column) exactly 0 under the causal mask in fp32, its softmax
    being constant (_first_query_alone), where dP - delta leaves rounding noise."""
    if st.causal and dtype == jnp.float32:
        return jnp.where(rows == 0, jnp.float32(0), ds)
    return ds


def _score_grads(p, dp, deltas, st: _Static):
    """dS = P * (dP - delta), the softmax's backward (delta: rowsum(P * dP), rowsum(dO * O) in
    exact arithmetic), delta given as one part or, in fp32, two subtracted one after the other
    (_delta_rest), each broadcast like dp. Where every query sees one key dS is exactly 0
    (contract.one_visible_key), which dP - delta would leave as rounding noise: in fp32, dQ and
    dK of Sk = 1 came out near 2e-6 where they are 0 (torch's, on CPU: about 2.5e-7)."""
    if contract.one_visible_key(st.sq, st.sk, st.causal):
        return jnp.zeros_like(p)
    for part in deltas:
        dp = dp - part
    return p * dp


def _dq_tiles(j, q, do, m, log2_l, rows, k_ref, v_ref, st: _Static):
    """Key block j's k, P and dP for the dQ kernel's query block."""
    block_k = st.blocks.block_k_dq
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    visible = _visible(rows[:, None], start + jnp.arange(block_k)[None, :], st)
    p = _probabilities(_scaled_scores(q, k, visible, st), m[:, None], log2_l[:, None])
    p = _one_key_exact(p, visible, st)
    p = _first_query_alone(p, rows[:, None], visible, q.dtype, st)
    return k, p, _products(do, v)


def _delta_rest(tiles, delta, key_blocks, block_q):
    """What fp32 backwards subtract after delta = rowsum(dO * O): rowsum(P * (dP - delta)) /
    rowsum(P) over the key blocks a query block sees, from the very P and dP that dS is taken
    from (here and in the dK/dV kernel).

    Where one key holds most of a row's probability, dS = P (dP - delta) is a small difference
    that a rounding of delta's size swamps, and the sum of the computed P is 1 only to a few
    ulps: a P off by a factor 1 + e moves dS by e * P * delta, which dQ and dK sum to e * delta
    times a key. A single query over 37 keys at D = 32 and scale 1.7 (largest probability 0.989,
    rowsum(P) - 1 = 1.1e-7) erred 1.1e-5 in dQ against SDPA's 5.1e-7 with rowsum(dO * O), 5.4e-6
    with rowsum(P * dP). In two parts, dP - delta is exact for the keys that carry the weight,
    and the rest (a few ulps of delta) takes the sum of P as computed; dQ erred 1.3e-6 there,
    much of it the fp32 scores' own rounding (1.0e-6 with everything after P and dP exact)."""
    def body(j, sums):
        _, p, dp = tiles(j)
        weighted, total = sums
        return weighted + (p * (dp - delta[:, None])).sum(axis=1), total + p.sum(axis=1)

    zeros = jnp.zeros((block_q,), jnp.float32)
    weighted, total = lax.fori_loop(0, key_blocks, body, (zeros, zeros))
    return weighted / total


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, m_ref, log2_l_ref, delta_ref, dq_ref, *rest_ref,
               st: _Static):
    """rest_ref: in fp32, the out for the remainder of delta (_delta_rest), summed here first."""
    block_q = st.blocks.block_q_dq
    i = pl.program_id(2)
    q, do, delta = q_ref[...], do_ref[...], delta_ref[...]
    rows = i * block_q + jnp.arange(block_q)
    tiles = functools.partial(_dq_tiles, q=q, do=do, m=m_ref[...], log2_l=log2_l_ref[...],
                              rows=rows, k_ref=k_ref, v_ref=v_ref, st=st)
    key_blocks = _num_key_blocks(i, block_q, st.blocks.block_k_dq, st)
    deltas = (delta[:, None],)
    if rest_ref:
        rest = _delta_rest(tiles, delta, key_blocks, block_q)
        rest_ref[0][...] = rest
        deltas += (rest[:, None],)

    def body(j, dq):
        k, p, dp = tiles(j)
        ds = _score_grads(p, dp, deltas, st)
        ds = _first_query_no_score_grad(ds, rows[:, None], q.dtype, st)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, key_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, m_ref, log2_l_ref, *refs, st: _Static):
    """refs: delta and, in fp32, its remainder (_delta_rest); then the dK and dV outs."""
    *delta_refs, dk_ref, dv_ref = refs
    block_q, block_k = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    keys = j * block_k + jnp.arange(block_k)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        m, log2_l = m_ref[pl.ds(start, block_q)], log2_l_ref[pl.ds(start, block_q)]
        deltas = [ref[pl.ds(start, block_q)][None, :] for ref in delta_refs]
        rows = start + jnp.arange(block_q)
        # Transposed scores [keys, queries], so P^T and dS^T feed the dots directly. Padded query
        # rows are masked too: their statistics are not a real row's.
        visible = _visible(rows[None, :], keys[:, None], st) & (rows[None, :] < st.sq)
        p_t = _probabilities(_scaled_scores(k, q, visible, st), m[None, :], log2_l[None, :])
        p_t = _one_key_exact(p_t, visible, st)
        p_t = _first_query_alone(p_t, rows[None, :], visible, q.dtype, st)
        dv = dv + _dot(p_t.astype(do.dtype), do)
        ds_t = _score_grads(p_t, _products(v, do), deltas, st)
        ds_t = _first_query_no_score_grad(ds_t, rows[None, :], q.dtype, st)
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    # Causal: query blocks that end before this key block's first key see none of it.
    first = (j * block_k) // block_q if st.causal else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, pl.cdiv(st.sq, block_q), body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, st: _Static, grid, in_specs, out_specs, out_shape, name, num_warps=None):
    # The Triton-lowering params also pick Pallas' Triton backend on a GPU (not Mosaic GPU).
    params = gpu_compiler_params(num_warps or st.blocks.num_warps, st.blocks.num_stages)
    return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, compiler_params=params,
                          interpret=interpret(), name=name)


# BlockSpecs over [B, heads, S, D] (and [B, heads, S] for the row statistics and delta); batch
# and head are squeezed.
# kv_groups maps a q head h to its kv head h // kv_groups, so GQA reads the shared k/v in place.
def _rows_spec(block, d, kv_groups=1):
    return pl.BlockSpec((_SQ, _SQ, block, d), lambda b, h, i: (b, h // kv_groups, i, 0))


def _whole_spec(s, d, kv_groups=1):
    return pl.BlockSpec((_SQ, _SQ, s, d), lambda b, h, i: (b, h // kv_groups, 0, 0))


def _vec_spec(block):
    return pl.BlockSpec((_SQ, _SQ, block), lambda b, h, i: (b, h, i))


def _split_forward(q, k, v, st: _Static, keep_rest: bool):
    """The forward with the keys split over a fourth grid axis: each split's normalised output,
    row max and sum in fp32, then merge_splits."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    bq, g, splits = st.blocks.block_q, st.groups, st.kv_splits
    vec = pl.BlockSpec((_SQ, _SQ, _SQ, bq), lambda b, h, i, j: (b, h, j, i))
    stat = jax.ShapeDtypeStruct((B, H, splits, Sq), jnp.float32)
    o, m, l = _call(
        _fwd_kernel, st, (B, H, Sq // bq, splits),
        in_specs=[pl.BlockSpec((_SQ, _SQ, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                  pl.BlockSpec((_SQ, _SQ, Sk, D), lambda b, h, i, j: (b, h // g, 0, 0)),
                  pl.BlockSpec((_SQ, _SQ, Sk, D), lambda b, h, i, j: (b, h // g, 0, 0))],
        out_specs=[pl.BlockSpec((_SQ, _SQ, _SQ, bq, D), lambda b, h, i, j: (b, h, j, i, 0)),
                   vec, vec],
        out_shape=[jax.ShapeDtypeStruct((B, H, splits, Sq, D), jnp.float32), stat, stat],
        name="flash_attention_fwd_split_kv")(q, k, v)
    o, m, log2_l = merge_splits(o, m, l)
    o, rest = rounded_with_rest(o, q.dtype)
    return o, m, log2_l, rest if keep_rest else None


def merge_splits(o, m, l):
    """The output (fp32) and softmax statistics (row max and log2 of the sum, _probabilities) of
    attention over all keys from those of the key splits
    (o [B, H, splits, Sq, D] normalised per split; m and l [B, H, splits, Sq], each split's row
    max of the scaled scores and sum of 2^(s - m); all fp32): each split weighted by its share of
    the softmax's total, l 2^(m - max m).

    m and l come apart, not as a logsumexp m + log2(l): rounded to fp32 at the scores' magnitude
    (tens to hundreds of base-2 units with a large scale; half an ulp is 3.8e-6 from 64 to 128),
    that sum moved a split's weight by up to 2.6e-6, an error that reached the output and,
    through rowsum(dO * O), the gradients."""
    m_all = m.max(axis=2)
    weights = l * jnp.exp2(m - m_all[:, :, None])
    total = weights.sum(axis=2)
    out = (weights[..., None] * o).sum(axis=2) / total[..., None]
    return out, m_all, jnp.log2(total)


def _forward(q, k, v, st: _Static, keep_rest: bool = False):
    """o, its row statistics m and log2_l (_probabilities), and with keep_rest in 16 bits what
    rounding o left (rounded_with_rest; else None)."""
    keep_rest = keep_rest and q.dtype != jnp.float32
    if st.kv_splits > 1:
        return _split_forward(q, k, v, st, keep_rest)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    bq = st.blocks.block_q
    outs = 4 if keep_rest else 3
    o, m, log2_l, *rest = _call(
        _fwd_kernel, st, (B, H, Sq // bq),
        in_specs=[_rows_spec(bq, D), _whole_spec(Sk, D, st.groups), _whole_spec(Sk, D, st.groups)],
        out_specs=[_rows_spec(bq, D), _vec_spec(bq), _vec_spec(bq), _rows_spec(bq, D)][:outs],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   *[jax.ShapeDtypeStruct((B, H, Sq), jnp.float32)] * 2,
                   jax.ShapeDtypeStruct(q.shape, q.dtype)][:outs],
        name="flash_attention_fwd")(q, k, v)
    return o, m, log2_l, (rest[0] if rest else None)


def _backward(st: _Static, residuals, do):
    """residuals: q, k, v, o, o_rest (o's rounding remainder, rounded_with_rest, or None), and
    o's row statistics m and log2_l."""
    q, k, v, o, o_rest, m, log2_l = residuals
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = st.groups
    o = o.astype(jnp.float32) if o_rest is None else o.astype(jnp.float32) + o_rest
    delta = jnp.sum(o * do.astype(jnp.float32), axis=-1)
    deltas = [delta]

    bq = st.blocks.block_q_dq
    dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    out_specs, out_shape = [_rows_spec(bq, D)], [dq_shape]
    if q.dtype == jnp.float32:  # the dQ kernel also gives delta's remainder (_delta_rest)
        out_specs.append(_vec_spec(bq))
        out_shape.append(jax.ShapeDtypeStruct((B, H, Sq), jnp.float32))
    dq, *rest = _call(
        _dq_kernel, st, (B, H, Sq // bq),
        in_specs=[_rows_spec(bq, D), _whole_spec(Sk, D, g), _whole_spec(Sk, D, g),
                  _rows_spec(bq, D), _vec_spec(bq), _vec_spec(bq), _vec_spec(bq)],
        out_specs=out_specs, out_shape=out_shape,
        name="flash_attention_dq")(q, k, v, do, m, log2_l, delta)
    deltas += rest

    # One program per (q head, key block); a group's heads are summed below in fp32.
    bk = st.blocks.block_k_dkv
    per_head = jax.ShapeDtypeStruct((B, H, Sk, D), jnp.float32 if g > 1 else k.dtype)
    whole_vec = pl.BlockSpec((_SQ, _SQ, Sq), lambda b, h, j: (b, h, 0))
    dk, dv = _call(
        _dkv_kernel, st, (B, H, Sk // bk),
        in_specs=[_whole_spec(Sq, D), _rows_spec(bk, D, g), _rows_spec(bk, D, g),
                  _whole_spec(Sq, D), whole_vec, whole_vec] + [whole_vec] * len(deltas),
        out_specs=[_rows_spec(bk, D), _rows_spec(bk, D)], out_shape=[per_head, per_head],
        name="flash_attention_dkv", num_warps=st.blocks.num_warps_dkv)(
            q, k, v, do, m, log2_l, *deltas)
    if g > 1:
        dk = dk.reshape(B, Hkv, g, Sk, D).sum(axis=2).astype(k.dtype)
        dv = dv.reshape(B, Hkv, g, Sk, D).sum(axis=2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, st: _Static):
    return _forward(q, k, v, st)[0]


def _flash_fwd(q, k, v, st: _Static):
    o, m, log2_l, o_rest = _forward(q, k, v, st, keep_rest=True)
    return o, (q, k, v, o, o_rest, m, log2_l)


_flash.defvjp(_flash_fwd, _backward)


def pack_query_groups(q, hkv: int, causal: bool):
    """Without a causal mask no query row depends on its index, so the queries of the H // Hkv
    heads that share a kv head can be one longer sequence of that kv head: q [B, H, Sq, D] as
    [B, Hkv, H // Hkv * Sq, D], a reshape. k and v are then streamed once per kv head, not once
    per q head (a decode step: Sq = 1 and 4-8 heads a group, each padded to a 16-row tile
    alone), and dK/dV need no sum over the group. Returns that q and the function that gives an
    output of its shape the shape of q."""
    B, H, Sq, D = q.shape
    if causal or H == hkv:
        return q, lambda o: o
    return q.reshape(B, hkv, H // hkv * Sq, D), lambda o: o.reshape(B, H, Sq, D)


def kv_splits(programs: int, key_blocks: int) -> tuple[int, int]:
    """(splits, key blocks a split) of the forward's keys: with fewer programs than four a GPU
    multiprocessor (decode: one query block per head), the keys are split until there are that
    many, none empty."""
    return contract.key_splits(programs, key_blocks, multiprocessors())


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks"))
def _attention(q, k, v, *, causal: bool, scale: float, blocks: BlockSizes):
    q, unpack = pack_query_groups(q, k.shape[1], causal)
    _, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    blocks = blocks.fit(Sq, Sk)
    programs = q.shape[0] * H * pl.cdiv(Sq, blocks.block_q)
    splits, split_blocks = (1, 0) if causal else kv_splits(programs, pl.cdiv(Sk, blocks.block_k))
    st = _Static(causal, scale, Sq, Sk, H // Hkv, blocks, splits, split_blocks)
    # Block sizes are powers of two, so the largest is a multiple of the others: one padding
    # serves every kernel.
    q_multiple = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    k_multiple = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    d_padded = max(16, pl.next_power_of_2(D))
    q = pad_axis(pad_axis(q, 2, q_multiple), 3, d_padded)
    k = pad_axis(pad_axis(k, 2, k_multiple), 3, d_padded)
    v = pad_axis(pad_axis(v, 2, k_multiple), 3, d_padded)
    return unpack(_flash(q, k, v, st)[:, :, :Sq, :D])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
              scale: float | None = None, *, block_sizes: BlockSizes | None = None) -> jax.Array:
    """softmax(q k^T * scale) v: q [B, H, Sq, D], k and v [B, Hkv, Sk, D] -> [B, H, Sq, D].

    Differentiable (jax.grad) in q, k, v. `block_sizes` overrides the default tiles.
    """
    dims = contract.attention_args(q, k, v, causal, scale, "jax")
    if dims.D > MAX_HEAD_DIM:
        raise ValueError(f"q's head dimension D={dims.D} must be <= {MAX_HEAD_DIM} "
                         "for this kernel")
    blocks = block_sizes or BlockSizes.default_for(dims.D, q.dtype)
    for name, value in vars(blocks).items():  # (dataclasses.asdict deep-copies: 10 us a call)
        if name.startswith("block") and (value < 16 or value & (value - 1)):
            raise ValueError(f"block_sizes.{name}={value} must be a power of two >= 16")
    return _attention(q, k, v, causal=dims.causal, scale=dims.scale, blocks=blocks)


registry.register("attention", "pallas", framework="jax", kind="hand", backend="Pallas",
                  reset=jax.clear_caches, tags=tags())(attention)
