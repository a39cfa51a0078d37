"""Hand-written Triton attention, FlashAttention-2 style: forward with online softmax, backward in
three kernels (delta = rowsum(dO * O), dQ over key blocks, dK/dV over query blocks; in fp32 the dQ
kernel also sums what delta leaves for the dK/dV kernel: _delta_rest), or in 16 bits two, the
dK/dV kernel adding dQ by atomics (DQ_METHODS: on a GPU the faster of the two is kept per shape).
A 16-bit forward under autograd also writes what rounding O left (_store_output_rest), so delta
takes O as computed in fp32.

Layout [B, H, S, D] with any strides. GQA/MQA read kv head h // (H // Hkv) in place; k and v are
never repeated. On a GPU each kernel's autotuner also tries configs that move q, k, v, o and dO
by TMA (Hopper and later, rows of 16-byte multiples) and keeps whichever measures faster: each
program makes [S, D] tensor descriptors of its heads in the kernel. The forward's autotuner also
tries warp-specialized TMA configs (Triton's Hopper warp specialization: a producer warpgroup
issues the TMA loads, two consumer warpgroups of 64 query rows each run the dots and the
softmax), which Triton builds only from descriptors made in the kernel. D is padded (by masks
or TMA's zero fill, not copies) to a power of two >= 16 for tl.dot. Softmax runs in base 2:
log2(e) is folded into the scale so the inner loop uses exp2, and the saved logsumexp is base 2
as well.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from kernels import TRITON_INTERPRET, contract, registry
from kernels.triton import _common
from kernels.triton._common import (DEVICE_TYPE, TAGS, autotune, autotune_bench, cdiv, check_out,
                                    dot_precision, next_pow2, note_choice, pick_configs,
                                    reset_jit, resolved,
                                    tma_device, tma_ready, to_output, upcast_dot,
                                    use_descriptor_allocator)

LOG2_E = 1 / math.log(2)
MAX_GRID_Y = 65535  # programs a CUDA grid's second axis takes (the interpreter has no such limit)


def _config(bm, bn, warps, stages, tma=None, ws=False):
    """tma: whether tiles move by TMA; None in the interpreter, which runs one config and takes
    TMA whenever the tensors allow it. ws: the forward's key loops warp-specialized (TMA only;
    `warps` is then the warps of one partition: 4 make 12 in all). bm None: BLOCK_M is the
    launcher's (the decode kernel's packed query rows)."""
    meta = ({} if bm is None else {"BLOCK_M": bm}) | {"BLOCK_N": bn}
    meta |= {} if tma is None else {"TMA": tma}
    meta |= {"WS": True} if ws else {}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# BLOCK_M tiles queries, BLOCK_N tiles keys. The kernel that owns a query block (forward, dQ) wants
# a tall BLOCK_M; the one that owns a key block (dK/dV) a wide BLOCK_N. On a GPU each kernel's
# autotuner also tries a few configs that move tiles by TMA and keeps the faster. The interpreter
# configs use unequal blocks so the CPU tests exercise the causal block bounds with
# BLOCK_M != BLOCK_N; its cost is per program and per loop step, so they are no smaller than that
# needs (32x64 runs the smoke cases 3x faster than 32x16 did).
_FWD_GPU_CONFIGS = [
    _config(128, 64, 4, 3, False), _config(128, 128, 8, 3, False), _config(64, 64, 4, 3, False),
    _config(128, 32, 4, 2, False), _config(64, 32, 4, 2, False),
    _config(128, 64, 4, 3, True), _config(128, 128, 8, 3, True), _config(128, 64, 8, 3, True),
    _config(128, 64, 4, 3, True, ws=True), _config(128, 128, 4, 2, True, ws=True)]
# float32 takes its own small tiles (none of them a 16-bit config: see _dtype_fits). Its true fp32
# dots are multiply-adds without tensor cores, each thread holding the whole head dim of its
# rows and columns: the small 16-bit tiles it took before spilled tens of KB a thread from D=80
# on (make aot, sm_90: up to 223 KB), and at D=256 the decode kernel and a dK/dV tile asked for
# more shared memory than a block may have. Of 12 tiles swept over D = 16-256, these spilled at
# most 2 KB wherever _dtype_fits lets them run (most of them nothing).
_FWD_FP32 = [(32, 32, 8, 2), (32, 16, 4, 2), (16, 16, 4, 2)]
_DQ_FP32 = [(32, 32, 8, 2), (32, 16, 4, 2), (16, 16, 2, 2)]
_DKV_FP32 = [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)]
_DECODE_FP32 = [(None, 16, 8, 2)]
_FP32_TILE_ELEMENTS = 16 * 16 * 256  # BLOCK_M x BLOCK_N x BLOCK_D of an fp32 tile, at most


def _fp32_configs(tiles):
    return [_config(bm, bn, warps, stages, False) for bm, bn, warps, stages in tiles]


_FWD_GPU_CONFIGS += _fp32_configs(_FWD_FP32)
_FWD_CONFIGS = pick_configs(_FWD_GPU_CONFIGS, [_config(32, 64, 4, 1)])
_DKV_GPU_CONFIGS = [
    _config(32, 128, 4, 3, False), _config(64, 128, 8, 3, False), _config(32, 64, 4, 3, False),
    _config(64, 64, 4, 2, False), _config(32, 32, 4, 2, False),
    _config(64, 128, 8, 3, True), _config(32, 64, 4, 3, True)]
_DKV_GPU_CONFIGS += _fp32_configs(_DKV_FP32)
_DKV_CONFIGS = pick_configs(_DKV_GPU_CONFIGS, [_config(32, 64, 4, 1)])
# The dK/dV kernel that also adds dQ (16-bit only) holds a [BLOCK_M, D] fp32 product more. Of 20
# configs compiled at D=128 for five standard cases (make aot, sm_90), each 4-warp tile on wgmma
# spilled in some case (up to 2.7 KB a thread), 64x128 on 8 warps too (up to 1.5 KB) and 128x64
# overflowed shared memory; 32x128 and 64x64 on 8 warps did not spill (64x64: 24 bytes in the
# grouped-query causal case), and at D=128 _dkv_dq_fits keeps only those.
_DKV_DQ_GPU_CONFIGS = [
    _config(64, 128, 8, 3, False), _config(64, 128, 8, 3, True), _config(32, 128, 8, 3, False),
    _config(64, 64, 8, 3, False), _config(64, 64, 8, 3, True), _config(32, 64, 4, 3, True)]
_DKV_DQ_CONFIGS = pick_configs(_DKV_DQ_GPU_CONFIGS, [_config(32, 64, 4, 1)])
_DQ_GPU_CONFIGS = [
    _config(128, 32, 4, 3, False), _config(128, 64, 8, 3, False), _config(64, 64, 4, 3, False),
    _config(64, 32, 4, 2, False), _config(32, 32, 4, 2, False),
    _config(128, 64, 8, 3, True), _config(64, 64, 4, 3, True)]
_DQ_GPU_CONFIGS += _fp32_configs(_DQ_FP32)
_DQ_CONFIGS = pick_configs(_DQ_GPU_CONFIGS, [_config(64, 32, 4, 1)])
# The decode kernel's tile of packed query rows is the launcher's (the fewest that hold a GQA
# group's queries); its configs choose only the key tile. A memory-bound stream of k and v.
_DECODE_GPU_CONFIGS = [
    _config(None, 64, 4, 3, False), _config(None, 128, 8, 3, False), _config(None, 64, 4, 4, False),
    _config(None, 128, 4, 2, False), _config(None, 64, 4, 3, True), _config(None, 128, 4, 3, True)]
_DECODE_GPU_CONFIGS += _fp32_configs(_DECODE_FP32)
_DECODE_CONFIGS = pick_configs(_DECODE_GPU_CONFIGS, [_config(None, 64, 4, 1)])
# Splits of the key range are a multiple of every config's key tile: a key block never straddles
# two splits.
_DECODE_SPLIT_ALIGN = max(c.kwargs["BLOCK_N"] for c in _DECODE_CONFIGS)
# Decode-like calls (no causal mask, and the query rows of a GQA group, Sq * H / Hkv, at most
# this many) take the decode kernels.
_DECODE_MAX_ROWS = 64
_DELTA_BLOCK_M = 64
# TMA_OK (whether the tensors allow TMA) is in the key: a TMA config chosen for tensors that allow
# it must not be reused for tensors that do not
_AUTOTUNE_KEY = ["Sq", "Sk", "GROUP", "BLOCK_D", "CAUSAL", "TMA_OK"]


def _narrow_enough(meta, args) -> bool:
    """Large head dims with large tiles spill registers (or overflow shared memory) on an H100:
    tiles of at most 128x128 elements per operand."""
    return max(meta["BLOCK_M"], meta["BLOCK_N"]) * args["BLOCK_D"] <= 128 * 128


def _per_thread(meta, values: int) -> float:
    """Values per thread of the warps that compute: warp-specialized, two consumer partitions
    of num_warps warps each share them (the producer holds no tiles in registers)."""
    return values / ((2 if meta.get("WS") else 1) * meta["num_warps"] * 32)


# Register budgets: fp32 values per thread in each kernel's accumulators and score-sized tiles,
# from ptxas on sm_90 (make aot, bf16 standard tier). Forward, BLOCK_M x (BLOCK_D + BLOCK_N):
# every config above 160 spilled (128x64 tiles, 4 warps, D=128: 144-532 bytes), none at or
# below. dQ, BLOCK_M x (BLOCK_D + 2 BLOCK_N): above 160 only 128x32/4 warps at D=128, spilling
# 208-396 bytes. dK/dV, 2 BLOCK_N x (BLOCK_D + BLOCK_M): 32x128/4 warps at D=128 (320) spilled
# 2.2-6.0 KB; the configs at 192 spill at most 128 bytes, 356 in the grouped-query causal case
# at D=128 (up to 2 KB before _dkv_blocks' flat loop over the group's heads).
def _fits(meta, args, values: int, budget: int) -> bool:
    """Within the kernel's register budget; TMA configs only where the tensors allow TMA."""
    return (_narrow_enough(meta, args) and _per_thread(meta, values) <= budget
            and (args["TMA_OK"] or not meta.get("TMA")))


def _dtype_fits(meta, args, fp32_tiles: list) -> bool:
    """float32 takes only its own tiles (fp32_tiles), and of them those of at most
    _FP32_TILE_ELEMENTS at the call's head dim (16x16 at D=256, 32x16 at 128); the 16-bit dtypes
    never take those."""
    tile = (meta.get("BLOCK_M"), meta["BLOCK_N"], meta["num_warps"], meta["num_stages"])
    if args["Q"].element_size() != 4:
        return tile not in fp32_tiles
    return tile in fp32_tiles and (meta.get("BLOCK_M") is None or (
        meta["BLOCK_M"] * meta["BLOCK_N"] * args["BLOCK_D"] <= _FP32_TILE_ELEMENTS))


# The 16-bit forward that also stores O's rounding remainder (O_REST, when a backward follows)
# holds more: at 160 values a thread, 128x32 tiles on four warps at D = 80 to 128 spilled 16-216
# bytes with that store in each of five cases and nothing without it (make aot, sm_90). 64x64
# tiles at D=256, also 160, did not spill; the budget gives them up too, for 64x32.
_FWD_REST_BUDGET = 144


def _fwd_fits(meta, args) -> bool:
    budget = 160 if args["O_REST"] is None else _FWD_REST_BUDGET
    return (_dtype_fits(meta, args, _FWD_FP32)
            and _fits(meta, args, meta["BLOCK_M"] * (args["BLOCK_D"] + meta["BLOCK_N"]), budget))


def _dq_fits(meta, args) -> bool:
    return (_dtype_fits(meta, args, _DQ_FP32)
            and _fits(meta, args, meta["BLOCK_M"] * (args["BLOCK_D"] + 2 * meta["BLOCK_N"]), 160))


def _decode_fits(meta, args) -> bool:
    """As the forward, with the launcher's BLOCK_M (packed query rows). fp32's one tile of 16
    keys on eight warps spilled nothing at 16 rows and D up to 256, at most 1.4 KB at 64 rows
    (make aot)."""
    return (_dtype_fits(meta, args, _DECODE_FP32)
            and _fits({**meta, "BLOCK_M": args["BLOCK_M"]}, args,
                      args["BLOCK_M"] * (args["BLOCK_D"] + meta["BLOCK_N"]), 160))


def _dkv_values(meta, args) -> int:
    return 2 * meta["BLOCK_N"] * (args["BLOCK_D"] + meta["BLOCK_M"])


def _dkv_fits(meta, args) -> bool:
    return _dtype_fits(meta, args, _DKV_FP32) and _fits(meta, args, _dkv_values(meta, args), 192)


def _dkv_dq_fits(meta, args) -> bool:
    """dK/dV's values and dQ's product, BLOCK_M x BLOCK_D: of the configs above, 64x128 tiles
    at D=128 (224 a thread) spill, 32x128 ones (176) do not."""
    return _fits(meta, args, _dkv_values(meta, args) + meta["BLOCK_M"] * args["BLOCK_D"], 176)


@triton.jit
def _load(base, rows, n_rows, stride_s, cols, D, stride_d, UPCAST: tl.constexpr,
          ROW_EDGE: tl.constexpr, D_EDGE: tl.constexpr):
    """A [rows, cols] tile, zero past the sequence end (ROW_EDGE) and the head dim (D_EDGE): zeros
    add nothing to any dot product, so padded keys and the padded head dim are harmless until
    they are masked. A tile known to lie inside both needs no mask, and is loaded without one."""
    ptrs = base + rows[:, None] * stride_s + cols[None, :] * stride_d
    if ROW_EDGE and D_EDGE:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)
    elif ROW_EDGE:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif D_EDGE:
        x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _descriptor(base, n_rows, stride_s, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                TMA: tl.constexpr):
    """With TMA, a descriptor of one head's [n_rows, D] matrix starting at `base`, moving
    [ROWS, BLOCK_D] tiles: loads are zero past the sequence end and the head dim, stores are
    clipped there. Made in the kernel (a head's base is 16-byte aligned where the tensor's
    strides are multiples of 16 bytes: the launcher checks). Without TMA, `base` itself (the
    tiles are then loaded by pointers from it)."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, D], strides=[stride_s, 1],
                                         block_shape=[ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _group_descriptor(base, group, stride_h, n_rows, stride_s, D, ROWS: tl.constexpr,
                      BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """_descriptor for the `group` heads from `base` on ([group, n_rows, D], [1, ROWS, BLOCK_D]
    tiles): the query heads of a GQA group, which dK/dV loop over. One descriptor made before
    that loop: made inside it, Triton's software pipeliner fails on Hopper."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[group, n_rows, D],
                                         strides=[stride_h, stride_s, 1],
                                         block_shape=[1, ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _tile(desc, base, row0, rows, n_rows, stride_s, cols, D, stride_d,
          UPCAST: tl.constexpr, ROW_EDGE: tl.constexpr, D_EDGE: tl.constexpr, TMA: tl.constexpr,
          head=None):
    """The [rows, cols] tile (rows = row0 + arange) of one head: by TMA through the head's
    descriptor `desc` (or head `head` of a _group_descriptor), or by pointers from the head's
    start `base` (_load). Both are zero past the sequence end and the head dim."""
    if TMA:
        if head is None:
            x = desc.load([row0, 0])
        else:
            x = desc.load([head, row0, 0]).reshape(rows.shape[0], cols.shape[0])
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = _load(base, rows, n_rows, stride_s, cols, D, stride_d, UPCAST, ROW_EDGE, D_EDGE)
    return x


@triton.jit
def _store(base, x, rows, n_rows, stride_s, cols, D, stride_d, UPCAST: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    out = to_output(x, base.dtype.element_ty, UPCAST)
    tl.store(base + rows[:, None] * stride_s + cols[None, :] * stride_d, out, mask=mask)


@triton.jit
def _as_operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """An fp32 tile (P or dS) rounded to the input dtype for the next tl.dot, as FlashAttention
    does on the GPU; widened again when the interpreter cannot dot bf16."""
    x = to_output(x, dtype, UPCAST)
    if UPCAST:
        x = x.to(tl.float32)
    return x


# Under the interpreter, scores are summed over the head dim in one fixed order (see _scores).
_FIXED_ORDER_SCORES = tl.constexpr(TRITON_INTERPRET)


@triton.jit
def _scores(a, b, PRECISION: tl.constexpr):
    """a @ b^T over the head dim: the scores (a = q, b = k) or their transpose (a = k, b = q).

    The backward recomputes the forward's scores and subtracts the forward's logsumexp, so where
    the two round differently P is off by their difference, which a peaked softmax (a large
    scale, few keys with weight) does not average out. On the GPU a true fp32 dot is a chain of
    multiply-adds over the head dim in order for each element (Triton's FMA dot), whatever the
    tile shape or operand order, so the forward's, dQ's and dK/dV's scores are the same bits. The
    interpreter's tl.dot is numpy's matmul, whose order changes with the tile: q k^T and (k q^T)^T
    differed in 37 to 46% of a 16 x 64 tile's scores (D = 32 to 256). In 40 random fp32 calls of
    1 to 3 queries at scale 0.5 and 1.3, 13 were over the tests' budget, dV up to 9.6 times
    torch's error; with one order, 1. So under the interpreter, and only there, a score is an
    elementwise product summed over the head dim (numpy's pairwise sum, the same order for every
    tile: it reproduces the GPU's consistency, not its order). The GPU build is unchanged (a
    constexpr branch)."""
    if _FIXED_ORDER_SCORES:
        return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], 2)
    else:
        return tl.dot(a, tl.trans(b), input_precision=PRECISION)


@triton.jit
def _visible(rows, keys, Sk, CAUSAL: tl.constexpr):
    """Mask of the scores that exist, from broadcastable query and key indices: a real key and,
    when causal (top-left aligned like SDPA's is_causal), key j <= query i."""
    mask = keys < Sk
    if CAUSAL:
        mask = mask & (keys <= rows)
    return mask


@triton.jit
def _first_query_alone(p, rows, visible, CAUSAL: tl.constexpr, DTYPE: tl.constexpr):
    """P (a masked block's, [queries, keys] or transposed; `rows`: the queries' broadcastable
    indices) with query 0's probabilities exact under the causal mask in fp32: it sees key 0
    alone (contract.one_visible_key, for one row), whose probability is 1, where 2^(s * scale -
    m) is off by the rounding of the multiply-add. Query 0 is always in a masked
    block (the diagonal's first). 16-bit inputs need none of it (P is rounded to their dtype, and
    their error is far larger), and their builds stay as they were."""
    if CAUSAL:
        if DTYPE == tl.float32:
            p = tl.where((rows == 0) & visible, 1.0, p)
    return p


@triton.jit
def _first_query_no_score_grad(ds, rows, CAUSAL: tl.constexpr, DTYPE: tl.constexpr):
    """dS with query 0's row (or column) exactly 0 under the causal mask in fp32, its softmax
    being constant (_first_query_alone), where dP - delta leaves rounding noise."""
    if CAUSAL:
        if DTYPE == tl.float32:
            ds = tl.where(rows == 0, 0.0, ds)
    return ds


@triton.jit
def _score_grads(p, dp, delta, delta_rest, DTYPE: tl.constexpr):
    """dS = P * (dP - delta), the softmax's backward (delta and delta_rest broadcastable to dp):
    in fp32 delta in two parts, subtracted one after the other (_delta_rest)."""
    if DTYPE == tl.float32:
        return p * ((dp - delta) - delta_rest)
    return p * (dp - delta)


@triton.jit
def _heads(pid_bh, H, GROUP):
    """(batch, q head, kv head) of the program's [B * H] grid index, as int64 so that base
    offsets of large tensors cannot overflow int32."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return b, h, h // GROUP


@triton.jit
def _query_block(pid, CAUSAL: tl.constexpr):
    """The query block of a program owning one: under causal the last blocks see the most keys,
    so they are scheduled first (reversed order) and the short ones fill in at the end."""
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    return pid


@triton.jit
def _key_ranges(row0, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows row0 .. row0 + BLOCK_M: key blocks before `whole_end` are visible in full
    to every row (no mask needed); blocks from there to `end` need the mask (the sequence end, the
    causal diagonal); keys from `end` on are seen by no row and skipped."""
    end = Sk
    whole_end = Sk
    if CAUSAL:
        end = min(Sk, row0 + BLOCK_M)
        whole_end = min(Sk, row0 + 1)  # key j is seen by every row of the block iff j <= row0
    return whole_end // BLOCK_N * BLOCK_N, end


@triton.jit
def _store_logsumexp(LSE, LSE_REST, offsets, m, l, mask):
    """The softmax's logsumexp m + log2 l (base 2, of the scaled scores) as its fp32 rounding,
    and the remainder that rounding left (an exact two-sum; see _probabilities)."""
    log2_l = tl.log2(l)
    lse = m + log2_l
    m_part = lse - log2_l
    l_part = lse - m_part
    tl.store(LSE + offsets, lse, mask=mask)
    tl.store(LSE_REST + offsets, (m - m_part) + (log2_l - l_part), mask=mask)


@triton.jit
def _store_output_rest(base, o, rows, Sq, cols, D, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """What rounding the fp32 output o to DTYPE leaves, in DTYPE, contiguous [Sq, D] from
    `base`, for the backward's delta = rowsum(dO * O) (_bwd_delta_kernel): with O rounded to 16
    bits alone, delta is off by up to half an ulp of O times dO, and where one key holds nearly
    all of a row's probability dS = P (dP - delta) is a small difference that this swamps."""
    rest = o - to_output(o, DTYPE, UPCAST).to(tl.float32)
    _store(base, rest, rows, Sq, D, cols, D, 1, UPCAST)


@triton.jit
def _load_logsumexp(LSE, LSE_REST, offsets, mask, MASKED: tl.constexpr, DTYPE: tl.constexpr):
    """The logsumexp and, in fp32 only, its remainder (zeros otherwise, never read). Padded rows
    (MASKED) read 0."""
    if MASKED:
        lse = tl.load(LSE + offsets, mask=mask, other=0.0)
    else:
        lse = tl.load(LSE + offsets)
    rest = tl.zeros_like(lse)
    if DTYPE == tl.float32:
        if MASKED:
            rest = tl.load(LSE_REST + offsets, mask=mask, other=0.0)
        else:
            rest = tl.load(LSE_REST + offsets)
    return lse, rest


@triton.jit
def _probabilities(s, qk_scale, lse, lse_rest, DTYPE: tl.constexpr):
    """The backward's P = 2^(s * scale - lse) (lse and lse_rest broadcastable to s). In fp32 the
    logsumexp's remainder is subtracted after it: rounded to one fp32 number at the scores'
    magnitude (tens of base-2 units with a large scale; half an ulp is 3.8e-6 from 64 to 128), the
    logsumexp moves every P of its row by up to 2.6e-6, which a peaked softmax of few queries does
    not average out in dV. 16-bit P, rounded to its dtype before its dots, is far coarser: it
    takes the rounded logsumexp alone, one multiply-add per score, as it always did."""
    if DTYPE == tl.float32:
        return tl.exp2((s * qk_scale - lse) - lse_rest)
    return tl.exp2(s * qk_scale - lse)


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, rows, start_n, Sk, stride_ks, stride_kd,
              stride_vs, stride_vd, cols, D, qk_scale, CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_EDGE: tl.constexpr,
              TMA: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              ONE_KEY: tl.constexpr):
    """One key block of the online softmax; the scale is applied inside the exponent's
    multiply-add, after the row max (a positive scale does not change which score is largest).
    ONE_KEY: every query sees one key (contract.one_visible_key; the block is then masked).
    Under the causal mask query 0 always does (in fp32: _first_query_alone)."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _tile(Kd, K, start_n, keys, Sk, stride_ks, cols, D, stride_kd, UPCAST, MASKED, D_EDGE,
              TMA)
    v = _tile(Vd, V, start_n, keys, Sk, stride_vs, cols, D, stride_vd, UPCAST, MASKED, D_EDGE,
              TMA)
    s = _scores(q, k, PRECISION)
    if MASKED:
        visible = _visible(rows[:, None], keys[None, :], Sk, CAUSAL)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    if ONE_KEY:
        # The key's probability is exactly 1. The multiply-add leaves the rounding of the scaled
        # row max in the exponent (s * scale - round(max(s) * scale)), so p came out 1 + 1 ulp
        # and v * p / p missed v by an ulp where torch returns v itself.
        p = tl.where(s == float("-inf"), 0.0, 1.0)
    if MASKED:
        p = _first_query_alone(p, rows[:, None], visible, CAUSAL, V.dtype.element_ty)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = _as_operand(p, V.dtype.element_ty, UPCAST)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@autotune(_FWD_CONFIGS, _AUTOTUNE_KEY, _fwd_fits)
@triton.jit
def _fwd_kernel(Q, K, V, O, TMA_OK, LSE, LSE_REST, O_REST, qk_scale, Sq, Sk, H, GROUP, D,
                stride_qb, stride_qh, stride_qs, stride_qd,
                stride_kb, stride_kh, stride_ks, stride_kd,
                stride_vb, stride_vh, stride_vs, stride_vd,
                stride_ob, stride_oh, stride_os, stride_od,
                CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D_EDGE: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                ONE_KEY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                WS: tl.constexpr = False):
    """Q, K, V, O by pointer, or (TMA) through descriptors of the program's heads (TMA_OK:
    whether the tensors allow that; an autotune key, unused in the kernel). WS: the key loops
    warp-specialized. O_REST: None, or where o's rounding remainder goes (_store_output_rest)."""
    pid_m = _query_block(tl.program_id(0), CAUSAL)
    pid_bh = tl.program_id(1)
    b, h, hkv = _heads(pid_bh, H, GROUP)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    O += b * stride_ob + h * stride_oh
    Qd = _descriptor(Q, Sq, stride_qs, D, BLOCK_M, BLOCK_D, TMA)
    Kd = _descriptor(K, Sk, stride_ks, D, BLOCK_N, BLOCK_D, TMA)
    Vd = _descriptor(V, Sk, stride_vs, D, BLOCK_N, BLOCK_D, TMA)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _tile(Qd, Q, pid_m * BLOCK_M, rows, Sq, stride_qs, cols, D, stride_qd, UPCAST, True,
              D_EDGE, TMA)

    # Online softmax state in fp32. Key 0 is visible to every row (also padded rows) and is in
    # the first block either loop runs, so every m_i is finite from then on and no -inf - -inf
    # ever occurs.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    whole_end, end = _key_ranges(pid_m * BLOCK_M, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    if WS:
        # Triton's Hopper warp specialization takes a single loop without branches (a second
        # loop, or an `if` on the block, and it fails or quietly does not specialize): every
        # block is masked, a compare and a select per score.
        for start_n in tl.range(0, end, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, rows, start_n, Sk,
                                      stride_ks, stride_kd, stride_vs, stride_vd, cols, D,
                                      qk_scale, CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N,
                                      True, ONE_KEY)
    else:
        for start_n in range(0, whole_end, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, rows, start_n, Sk,
                                      stride_ks, stride_kd, stride_vs, stride_vd, cols, D,
                                      qk_scale, CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N,
                                      False, ONE_KEY)
        for start_n in range(whole_end, end, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, rows, start_n, Sk,
                                      stride_ks, stride_kd, stride_vs, stride_vd, cols, D,
                                      qk_scale, CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N,
                                      True, ONE_KEY)

    acc = acc / l_i[:, None]
    _store_logsumexp(LSE, LSE_REST, pid_bh.to(tl.int64) * Sq + rows, m_i, l_i, rows < Sq)
    if O_REST is not None:
        _store_output_rest(O_REST + pid_bh.to(tl.int64) * Sq * D, acc, rows, Sq, cols, D,
                           O.dtype.element_ty, UPCAST)
    if TMA:  # the store writes only the rows and head dims inside o
        Od = _descriptor(O, Sq, stride_os, D, BLOCK_M, BLOCK_D, TMA)
        Od.store([pid_m * BLOCK_M, 0], to_output(acc, O.dtype.element_ty, UPCAST))
    else:
        _store(O, acc, rows, Sq, stride_os, cols, D, stride_od, UPCAST)


@triton.jit
def _packed_rows(pid, Sq, H, GROUP, stride_b, stride_h, stride_s, BLOCK_M: tl.constexpr):
    """The rows of decode program `pid` (= b * Hkv + hkv): query i of head g of kv head hkv's
    group is packed row g * Sq + i, the order of [B, H, Sq] (whose offset is b * H * Sq +
    hkv * GROUP * Sq + packed row). Returns b and hkv (int64, as _heads), the packed rows, their
    offsets in a [B, H, Sq, D] tensor of the given strides, and which rows exist."""
    b = (pid // (H // GROUP)).to(tl.int64)
    hkv = (pid % (H // GROUP)).to(tl.int64)
    packed = tl.arange(0, BLOCK_M)
    head = hkv * GROUP + packed // Sq
    offsets = b * stride_b + head * stride_h + (packed % Sq) * stride_s
    return b, hkv, packed, offsets, packed < GROUP * Sq


@autotune(_DECODE_CONFIGS, ["Sk", "BLOCK_M", "BLOCK_D", "keys_per_split", "TMA_OK"],
          _decode_fits)
@triton.jit
def _decode_kernel(Q, K, V, TMA_OK, PART_O, PART_M, PART_L, qk_scale, Sq, Sk, H, GROUP, D,
                   keys_per_split,
                   stride_qb, stride_qh, stride_qs, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   BLOCK_D: tl.constexpr, D_EDGE: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, TMA: tl.constexpr, ONE_KEY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-KV forward for few queries (flash-decoding): program (split, b * Hkv + hkv) runs
    the online softmax of every query of kv head hkv's GQA group (packed into the rows of one
    tile, so k and v are read once for the whole group) over one split of the keys, and writes
    its normalised output, row max and sum for _decode_combine_kernel."""
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b, hkv, packed, q_offsets, row_ok = _packed_rows(pid, Sq, H, GROUP, stride_qb, stride_qh,
                                                     stride_qs, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q_offsets[:, None] + cols[None, :] * stride_qd,
                mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    Kd = _descriptor(K, Sk, stride_ks, D, BLOCK_N, BLOCK_D, TMA)
    Vd = _descriptor(V, Sk, stride_vs, D, BLOCK_N, BLOCK_D, TMA)

    # Every split holds at least one key, visible to every row: m_i is finite after its first
    # block. A split ends at a multiple of BLOCK_N or at Sk, so only the last one has a
    # partial block.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = split * keys_per_split
    stop = min(start + keys_per_split, Sk)
    whole_end = stop // BLOCK_N * BLOCK_N
    for start_n in range(start, whole_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, packed, start_n, Sk,
                                  stride_ks, stride_kd, stride_vs, stride_vd, cols, D, qk_scale,
                                  False, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, False,
                                  ONE_KEY)
    for start_n in range(whole_end, stop, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Kd, Vd, packed, start_n, Sk,
                                  stride_ks, stride_kd, stride_vs, stride_vd, cols, D, qk_scale,
                                  False, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, True,
                                  ONE_KEY)

    # Partials [B * Hkv, splits, BLOCK_M (, BLOCK_D)], fp32, every row (padded rows are finite).
    part = (pid.to(tl.int64) * tl.num_programs(0) + split) * BLOCK_M + packed
    tl.store(PART_M + part, m_i)
    tl.store(PART_L + part, l_i)
    tl.store(PART_O + part[:, None] * BLOCK_D + cols[None, :], acc / l_i[:, None])


@triton.jit
def _decode_combine_kernel(PART_O, PART_M, PART_L, O, LSE, LSE_REST, O_REST, splits, Sq, H,
                           GROUP, D,
                           stride_ob, stride_oh, stride_os, stride_od,
                           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """Program b * Hkv + hkv merges its splits' partial outputs, each weighted by its share of
    the softmax's total, l_split 2^(m_split - m), and writes o and the logsumexp of every packed
    query row (as the forward kernel does, for the backward). The splits' maxima and sums come
    apart, not as logsumexps m + log2(l): rounded to fp32 at the scores' magnitude (tens to
    hundreds of base-2 units with a large scale; half an ulp is 3.8e-6 from 64 to 128), that sum
    moved a split's weight by up to 2.6e-6."""
    pid = tl.program_id(0)
    _, _, packed, o_offsets, row_ok = _packed_rows(pid, Sq, H, GROUP, stride_ob, stride_oh,
                                                   stride_os, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    first = pid.to(tl.int64) * splits * BLOCK_M + packed
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for s in range(splits):
        m = tl.maximum(m, tl.load(PART_M + first + s * BLOCK_M))
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(splits):
        weight = tl.load(PART_L + first + s * BLOCK_M) * tl.exp2(
            tl.load(PART_M + first + s * BLOCK_M) - m)
        part = tl.load(PART_O + (first + s * BLOCK_M)[:, None] * BLOCK_D + cols[None, :])
        total += weight
        acc += weight[:, None] * part
    o = acc / total[:, None]
    tl.store(O + o_offsets[:, None] + cols[None, :] * stride_od,
             to_output(o, O.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (cols[None, :] < D))
    _store_logsumexp(LSE, LSE_REST, pid.to(tl.int64) * GROUP * Sq + packed, m, total, row_ok)
    if O_REST is not None:  # packed rows are the [B, H, Sq] order's, contiguous from the group's
        _store_output_rest(O_REST + pid.to(tl.int64) * GROUP * Sq * D, o, packed, GROUP * Sq,
                           cols, D, O.dtype.element_ty, UPCAST)


@triton.jit
def _bwd_delta_kernel(O, O_REST, DO, DELTA, Sq, H, D,
                      stride_ob, stride_oh, stride_os, stride_od,
                      stride_db, stride_dh, stride_ds, stride_dd,
                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, _ = _heads(pid_bh, H, 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = _load(O + b * stride_ob + h * stride_oh, rows, Sq, stride_os, cols, D, stride_od, True,
              True, True)
    if O_REST is not None:  # o as the forward computed it, in fp32 (_store_output_rest)
        o += _load(O_REST + pid_bh.to(tl.int64) * Sq * D, rows, Sq, D, cols, D, 1, True, True,
                   True)
    do = _load(DO + b * stride_db + h * stride_dh, rows, Sq, stride_ds, cols, D, stride_dd, True,
               True, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + rows, tl.sum(o * do, 1), mask=rows < Sq)


@triton.jit
def _dkv_step(dk, dv, k, v, Qh, DOh, Qd, DOd, g, LSE, LSE_REST, DELTA, DELTA_REST, DQ, row0,
              keys, start_m, Sq, Sk, stride_qs, stride_qd, stride_ds, stride_dd, cols, D,
              qk_scale, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, D_EDGE: tl.constexpr, TMA: tl.constexpr,
              BLOCK_M: tl.constexpr, MASKED: tl.constexpr, ONE_KEY: tl.constexpr,
              DQ_ATOMIC: tl.constexpr):
    """One query block's contribution to a key block's dK and dV (Qd, DOd: the group's
    descriptors; g: the head in the group), and with DQ_ATOMIC the key block's to the query
    block's dQ, added into the fp32 DQ (rows as LSE's) by atomics. ONE_KEY: as in _fwd_step."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _tile(Qd, Qh, start_m, rows, Sq, stride_qs, cols, D, stride_qd, UPCAST, MASKED, D_EDGE,
              TMA, g)
    do = _tile(DOd, DOh, start_m, rows, Sq, stride_ds, cols, D, stride_dd, UPCAST, MASKED,
               D_EDGE, TMA, g)
    lse, lse_rest = _load_logsumexp(LSE, LSE_REST, row0 + rows, rows < Sq, MASKED,
                                    Qh.dtype.element_ty)
    if MASKED:
        delta = tl.load(DELTA + row0 + rows, mask=rows < Sq, other=0.0)
    else:
        delta = tl.load(DELTA + row0 + rows)
    # Transposed scores [keys, queries], so P^T and dS^T feed the dots directly.
    s_t = _scores(k, q, PRECISION)
    p_t = _probabilities(s_t, qk_scale, lse[None, :], lse_rest[None, :], Qh.dtype.element_ty)
    if ONE_KEY:  # exactly 1 where visible, as in the forward; padded keys' rows are not stored
        p_t = tl.full(p_t.shape, 1.0, tl.float32)
    if MASKED:
        # Padded query rows (zero q, dO, lse, delta) would add nothing anyway; masking them
        # keeps exp2 of garbage out of the sums.
        visible = _visible(rows[None, :], keys[:, None], Sk, CAUSAL) & (rows[None, :] < Sq)
        p_t = _first_query_alone(tl.where(visible, p_t, 0.0), rows[None, :], visible, CAUSAL,
                                 DOh.dtype.element_ty)
    dv = tl.dot(_as_operand(p_t, DOh.dtype.element_ty, UPCAST), do, dv, input_precision=PRECISION)
    dp_t = _scores(v, do, PRECISION)  # the same products in the same order as the dQ kernel's
    delta_rest = delta  # 16-bit: unread (_score_grads)
    if Qh.dtype.element_ty == tl.float32:
        # delta's second part (_delta_rest), loaded apart from the first: 16-bit builds are as
        # they were without it (both loaded through one function like _load_logsumexp, ptxas
        # allotted their registers differently: make aot, sm_90, -30..+36, spills up to 468 B).
        if MASKED:
            delta_rest = tl.load(DELTA_REST + row0 + rows, mask=rows < Sq, other=0.0)
        else:
            delta_rest = tl.load(DELTA_REST + row0 + rows)
    ds_t = _score_grads(p_t, dp_t, delta[None, :], delta_rest[None, :], Qh.dtype.element_ty)
    if ONE_KEY:  # exactly 0, as in _dq_step
        ds_t = tl.zeros_like(ds_t)
    if MASKED:
        ds_t = _first_query_no_score_grad(ds_t, rows[None, :], CAUSAL, Qh.dtype.element_ty)
    elif DQ_ATOMIC:
        # Keys past Sk (zero k, score 0) are not masked here: their P = exp2(-lse) overflows
        # where a row's every score is far below 0, and dS^T K would add inf * 0 = NaN into dQ.
        ds_t = tl.where(keys[:, None] < Sk, ds_t, 0.0)
    ds_t = _as_operand(ds_t, Qh.dtype.element_ty, UPCAST)
    dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    if DQ_ATOMIC:
        # relaxed: nothing else is ordered by these adds; the launch's end publishes them
        dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * scale
        tl.atomic_add(DQ + (row0 + rows).to(tl.int64)[:, None] * D + cols[None, :], dq,
                      mask=(rows[:, None] < Sq) & (cols[None, :] < D), sem="relaxed")
    return dk, dv


@triton.jit
def _dkv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, stride_qh, stride_dh, LSE, LSE_REST, DELTA,
                DELTA_REST, DQ, lse0, keys, lo, hi, GROUP, Sq, Sk, stride_qs, stride_qd,
                stride_ds, stride_dd, cols, D, qk_scale, scale, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_EDGE: tl.constexpr,
                TMA: tl.constexpr, BLOCK_M: tl.constexpr, GROUPED: tl.constexpr,
                MASKED: tl.constexpr, ONE_KEY: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Query blocks lo .. hi of every query head of the group (GROUPED: more than one; lse0: the
    group's first row in LSE, LSE_REST, DELTA and DELTA_REST). Grouped, one flat loop runs a
    head's blocks one after another: as a loop over heads around a loop over blocks, most dK/dV
    configs spilled registers in grouped-query cases (make aot, sm_90: up to 2 KB a thread),
    while the flat loop's index arithmetic made several spill with a single head, which keeps the
    plain loop."""
    if GROUPED:
        blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
        for i in range(0, GROUP * blocks):
            g = i // blocks
            start_m = lo + (i - g * blocks) * BLOCK_M
            dk, dv = _dkv_step(dk, dv, k, v, Q + g * stride_qh, DO + g * stride_dh, Qd, DOd, g, LSE,
                               LSE_REST, DELTA, DELTA_REST, DQ, lse0 + g * Sq, keys, start_m, Sq,
                               Sk, stride_qs, stride_qd, stride_ds, stride_dd, cols, D, qk_scale,
                               scale, CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_M, MASKED,
                               ONE_KEY, DQ_ATOMIC)
    else:
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkv_step(dk, dv, k, v, Q, DO, Qd, DOd, 0, LSE, LSE_REST, DELTA, DELTA_REST,
                               DQ, lse0, keys, start_m, Sq, Sk, stride_qs, stride_qd, stride_ds,
                               stride_dd, cols, D, qk_scale, scale, CAUSAL, PRECISION, UPCAST,
                               D_EDGE, TMA, BLOCK_M, MASKED, ONE_KEY, DQ_ATOMIC)
    return dk, dv


@autotune(_DKV_CONFIGS, _AUTOTUNE_KEY, _dkv_fits)
@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, TMA_OK, LSE, LSE_REST, DELTA, DELTA_REST, DK, DV, DQ, qk_scale,
                    scale, Sq, Sk, H, GROUP, D,
                    stride_qb, stride_qh, stride_qs, stride_qd,
                    stride_kb, stride_kh, stride_ks, stride_kd,
                    stride_vb, stride_vh, stride_vs, stride_vd,
                    stride_db, stride_dh, stride_ds, stride_dd,
                    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D_EDGE: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                    GROUPED: tl.constexpr, ONE_KEY: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DQ_ATOMIC: tl.constexpr = False):
    """One key block of one kv head; loops over the GROUP query heads that share it, so dK/dV of
    a GQA group accumulate in fp32 registers with no atomics and no per-q-head copies. With
    DQ_ATOMIC (launched as _bwd_dkv_dq_kernel) each query block's dQ = dS K is added into the
    fp32 DQ as well; without it DQ is not read.

    Query blocks in three ranges: from `lo` to `whole` the causal diagonal crosses them (masked;
    queries before `lo` see none of the block), from `whole` to `full` every row sees every key
    (no mask; keys past Sk are zero and their dK/dV rows are never stored), and the last partial
    block of queries (masked)."""
    pid_n = tl.program_id(0)
    pid_bhkv = tl.program_id(1)
    Hkv = H // GROUP
    b, hkv, _ = _heads(pid_bhkv, Hkv, 1)
    key0 = pid_n * BLOCK_N
    keys = key0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    k = _tile(_descriptor(K, Sk, stride_ks, D, BLOCK_N, BLOCK_D, TMA), K, key0, keys, Sk,
              stride_ks, cols, D, stride_kd, UPCAST, True, D_EDGE, TMA)
    v = _tile(_descriptor(V, Sk, stride_vs, D, BLOCK_N, BLOCK_D, TMA), V, key0, keys, Sk,
              stride_vs, cols, D, stride_vd, UPCAST, True, D_EDGE, TMA)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    full = Sq // BLOCK_M * BLOCK_M
    lo = 0
    whole = 0
    if CAUSAL:
        lo = key0 // BLOCK_M * BLOCK_M
        # the first query block whose first row sees the block's last key
        whole = min(tl.cdiv(key0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, Sq)
    Q += b * stride_qb + hkv * GROUP * stride_qh
    DO += b * stride_db + hkv * GROUP * stride_dh
    Qd = _group_descriptor(Q, GROUP, stride_qh, Sq, stride_qs, D, BLOCK_M, BLOCK_D, TMA)
    DOd = _group_descriptor(DO, GROUP, stride_dh, Sq, stride_ds, D, BLOCK_M, BLOCK_D, TMA)
    lse0 = (b * H + hkv * GROUP) * Sq
    dk, dv = _dkv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, stride_qh, stride_dh, LSE, LSE_REST, DELTA,
                         DELTA_REST, DQ, lse0, keys, lo, whole, GROUP, Sq, Sk, stride_qs,
                         stride_qd, stride_ds, stride_dd, cols, D, qk_scale, scale, CAUSAL,
                         PRECISION, UPCAST, D_EDGE, TMA, BLOCK_M, GROUPED, True, ONE_KEY,
                         DQ_ATOMIC)
    dk, dv = _dkv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, stride_qh, stride_dh, LSE, LSE_REST, DELTA,
                         DELTA_REST, DQ, lse0, keys, whole, full, GROUP, Sq, Sk, stride_qs,
                         stride_qd, stride_ds, stride_dd, cols, D, qk_scale, scale, CAUSAL,
                         PRECISION, UPCAST, D_EDGE, TMA, BLOCK_M, GROUPED, False, ONE_KEY,
                         DQ_ATOMIC)
    dk, dv = _dkv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, stride_qh, stride_dh, LSE, LSE_REST, DELTA,
                         DELTA_REST, DQ, lse0, keys, max(whole, full), Sq, GROUP, Sq, Sk,
                         stride_qs, stride_qd, stride_ds, stride_dd, cols, D, qk_scale, scale,
                         CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_M, GROUPED, True, ONE_KEY,
                         DQ_ATOMIC)
    # dK/dV are written contiguous [B, Hkv, Sk, D].
    base = (b * Hkv + hkv) * Sk * D
    _store(DK + base, dk * scale, keys, Sk, D, cols, D, 1, UPCAST)
    _store(DV + base, dv, keys, Sk, D, cols, D, 1, UPCAST)


_dkv_program = _bwd_dkv_kernel.fn  # the kernel's body, for _bwd_dkv_dq_kernel to call


@autotune(_DKV_DQ_CONFIGS, _AUTOTUNE_KEY, _dkv_dq_fits, reset_to_zero=["DQ"])
@triton.jit
def _bwd_dkv_dq_kernel(Q, K, V, DO, TMA_OK, LSE, LSE_REST, DELTA, DELTA_REST, DK, DV, DQ,
                       qk_scale, scale, Sq, Sk, H, GROUP, D,
                       stride_qb, stride_qh, stride_qs, stride_qd,
                       stride_kb, stride_kh, stride_ks, stride_kd,
                       stride_vb, stride_vh, stride_vs, stride_vd,
                       stride_db, stride_dh, stride_ds, stride_dd,
                       CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D_EDGE: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                       GROUPED: tl.constexpr, ONE_KEY: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """_bwd_dkv_kernel with DQ_ATOMIC: dK, dV and dQ in one pass over the scores, five matmuls
    where _bwd_dq_kernel and _bwd_dkv_kernel take seven. A kernel of its own name (in records
    and make aot) and autotuner, which zeroes DQ before each config it times."""
    _dkv_program(Q, K, V, DO, TMA_OK, LSE, LSE_REST, DELTA, DELTA_REST, DK, DV, DQ, qk_scale,
                 scale, Sq, Sk, H, GROUP, D,
                 stride_qb, stride_qh, stride_qs, stride_qd,
                 stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_vb, stride_vh, stride_vs, stride_vd,
                 stride_db, stride_dh, stride_ds, stride_dd,
                 CAUSAL, BLOCK_D, D_EDGE, PRECISION, UPCAST, TMA, GROUPED, ONE_KEY, BLOCK_M,
                 BLOCK_N, True)


@triton.jit
def _dq_tiles(q, do, lse, lse_rest, K, V, Kd, Vd, rows, start_n, Sk, stride_ks, stride_kd,
              stride_vs, stride_vd, cols, D, qk_scale, CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_EDGE: tl.constexpr,
              TMA: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """A key block's k, P and dP for a query block."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _tile(Kd, K, start_n, keys, Sk, stride_ks, cols, D, stride_kd, UPCAST, MASKED, D_EDGE,
              TMA)
    v = _tile(Vd, V, start_n, keys, Sk, stride_vs, cols, D, stride_vd, UPCAST, MASKED, D_EDGE,
              TMA)
    s = _scores(q, k, PRECISION)
    p = _probabilities(s, qk_scale, lse[:, None], lse_rest[:, None], K.dtype.element_ty)
    if MASKED:
        visible = _visible(rows[:, None], keys[None, :], Sk, CAUSAL)
        p = _first_query_alone(tl.where(visible, p, 0.0), rows[:, None], visible, CAUSAL,
                               K.dtype.element_ty)
    return k, p, _scores(do, v, PRECISION)


@triton.jit
def _dq_step(dq, q, do, lse, lse_rest, delta, delta_rest, K, V, Kd, Vd, rows, start_n, Sk,
             stride_ks, stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_EDGE: tl.constexpr,
             TMA: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             ONE_KEY: tl.constexpr):
    """One key block's contribution to a query block's dQ. ONE_KEY: as in _fwd_step."""
    k, p, dp = _dq_tiles(q, do, lse, lse_rest, K, V, Kd, Vd, rows, start_n, Sk, stride_ks,
                         stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL, PRECISION,
                         UPCAST, D_EDGE, TMA, BLOCK_N, MASKED)
    ds = _score_grads(p, dp, delta[:, None], delta_rest[:, None], K.dtype.element_ty)
    if ONE_KEY:
        # The softmax is constant, so dS is exactly 0, where dP - delta (two fp32 sums of the
        # same products in different orders) left up to 1e-6 with one key and 8e-6 for one
        # causal query at D=256.
        ds = tl.zeros_like(ds)
    if MASKED:
        ds = _first_query_no_score_grad(ds, rows[:, None], CAUSAL, K.dtype.element_ty)
    return tl.dot(_as_operand(ds, K.dtype.element_ty, UPCAST), k, dq, input_precision=PRECISION)


@triton.jit
def _delta_rest(q, do, lse, lse_rest, delta, K, V, Kd, Vd, rows, Sk, stride_ks, stride_kd,
                stride_vs, stride_vd, cols, D, qk_scale, whole_end, end, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_EDGE: tl.constexpr,
                TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What fp32 backwards subtract after delta = rowsum(dO * O): rowsum(P * (dP - delta)) /
    rowsum(P) over every key the query block sees, from the very P and dP that dS is taken from
    (here and in the dK/dV kernel, dP's products summed in one order).

    Where one key holds most of a row's probability, dS = P (dP - delta) is a small difference
    that a rounding of delta's size swamps, and the sum of the computed P is 1 only to a few
    ulps: a P off by a factor 1 + e moves dS by e * P * delta, which dQ and dK sum to e * delta
    times a key. With delta = rowsum(dO * O) a single query over 37 keys at D = 32 and scale 1.7
    (largest probability 0.989) erred 1.2e-5 in dQ against SDPA's 5.1e-7; with rowsum(P * dP),
    in one of 40 fp32 calls of 1 to 3 queries at scale 2.5, dQ and dK were 5.2 and 5.6 times
    SDPA's error (0.02 times now). In two parts, dP - delta is exact for the keys that carry the
    weight, and the rest (a few ulps of delta) takes the sum of P as computed."""
    weighted = tl.zeros((BLOCK_M,), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, whole_end, BLOCK_N):
        _, p, dp = _dq_tiles(q, do, lse, lse_rest, K, V, Kd, Vd, rows, start_n, Sk, stride_ks,
                             stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL,
                             PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, False)
        weighted += tl.sum(p * (dp - delta[:, None]), 1)
        total += tl.sum(p, 1)
    for start_n in range(whole_end, end, BLOCK_N):
        _, p, dp = _dq_tiles(q, do, lse, lse_rest, K, V, Kd, Vd, rows, start_n, Sk, stride_ks,
                             stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL,
                             PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, True)
        weighted += tl.sum(p * (dp - delta[:, None]), 1)
        total += tl.sum(p, 1)
    return weighted / total


@autotune(_DQ_CONFIGS, _AUTOTUNE_KEY, _dq_fits)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, TMA_OK, LSE, LSE_REST, DELTA, DELTA_REST, DQ, qk_scale, scale,
                   Sq, Sk, H, GROUP, D,
                   stride_qb, stride_qh, stride_qs, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_db, stride_dh, stride_ds, stride_dd,
                   CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D_EDGE: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                   ONE_KEY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = _query_block(tl.program_id(0), CAUSAL)
    pid_bh = tl.program_id(1)
    b, h, hkv = _heads(pid_bh, H, GROUP)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    Kd = _descriptor(K, Sk, stride_ks, D, BLOCK_N, BLOCK_D, TMA)
    Vd = _descriptor(V, Sk, stride_vs, D, BLOCK_N, BLOCK_D, TMA)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_db + h * stride_dh
    q = _tile(_descriptor(Q, Sq, stride_qs, D, BLOCK_M, BLOCK_D, TMA), Q, pid_m * BLOCK_M, rows,
              Sq, stride_qs, cols, D, stride_qd, UPCAST, True, D_EDGE, TMA)
    do = _tile(_descriptor(DO, Sq, stride_ds, D, BLOCK_M, BLOCK_D, TMA), DO, pid_m * BLOCK_M,
               rows, Sq, stride_ds, cols, D, stride_dd, UPCAST, True, D_EDGE, TMA)
    lse, lse_rest = _load_logsumexp(LSE, LSE_REST, pid_bh.to(tl.int64) * Sq + rows, rows < Sq,
                                    True, Q.dtype.element_ty)
    whole_end, end = _key_ranges(pid_m * BLOCK_M, Sk, CAUSAL, BLOCK_M, BLOCK_N)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=0.0)
    delta_rest = tl.zeros_like(delta)
    if Q.dtype.element_ty == tl.float32:  # summed here first, for this and the dK/dV kernel
        delta_rest = _delta_rest(q, do, lse, lse_rest, delta, K, V, Kd, Vd, rows, Sk, stride_ks,
                                 stride_kd, stride_vs, stride_vd, cols, D, qk_scale, whole_end,
                                 end, CAUSAL, PRECISION, UPCAST, D_EDGE, TMA, BLOCK_M, BLOCK_N)
        tl.store(DELTA_REST + pid_bh.to(tl.int64) * Sq + rows, delta_rest, mask=rows < Sq)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, whole_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, lse_rest, delta, delta_rest, K, V, Kd, Vd, rows, start_n, Sk,
                      stride_ks, stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL,
                      PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, False, ONE_KEY)
    for start_n in range(whole_end, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, lse_rest, delta, delta_rest, K, V, Kd, Vd, rows, start_n, Sk,
                      stride_ks, stride_kd, stride_vs, stride_vd, cols, D, qk_scale, CAUSAL,
                      PRECISION, UPCAST, D_EDGE, TMA, BLOCK_N, True, ONE_KEY)
    # dQ is written contiguous [B, H, Sq, D].
    _store(DQ + pid_bh.to(tl.int64) * Sq * D, dq * scale, rows, Sq, D, cols, D, 1, UPCAST)


def _block_d(D: int) -> int:
    return max(16, next_pow2(D))


def _tma_possible(*tensors) -> bool:
    """Whether the kernels may move these [B, heads, S, D] tensors (q, k, v and o or dO) by TMA:
    a Hopper-class GPU (or the interpreter), and tensors whose heads descriptors can take."""
    return tma_device(tensors[0].device) and all(tma_ready(t) for t in tensors)


def _tma_args(*tensors) -> tuple[int, dict]:
    """The TMA_OK argument, and the TMA meta-parameter where the launcher chooses it: the
    interpreter runs its one config, and there takes TMA whenever it can."""
    ok = _tma_possible(*tensors)
    if ok:
        use_descriptor_allocator()
    return int(ok), ({"TMA": ok} if TRITON_INTERPRET else {})


def _decodes(dims) -> bool:
    """Whether the call is decode-like: no causal mask (under one, few queries see few keys and
    the forward kernel stops at them) and a GQA group's queries fit one tile of packed rows."""
    return not dims.causal and dims.Sq * (dims.H // dims.Hkv) <= _DECODE_MAX_ROWS


def _decode_splits(programs: int, Sk: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) of the key range: enough programs for four per multiprocessor
    (a memory-bound stream wants many loads in flight), splits a multiple of the key tiles, none
    empty. Without a GPU, as if on 132 multiprocessors (an H100: what harness.aot compiles
    for) or, in the interpreter, on 2 (a few splits, which the CPU tests need)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2 if TRITON_INTERPRET else 132
    splits, blocks = contract.key_splits(programs, cdiv(Sk, _DECODE_SPLIT_ALIGN), sms)
    return splits, blocks * _DECODE_SPLIT_ALIGN


def _decode_forward(q, k, v, dims, out, stats, o_rest, one_key: bool):
    group = dims.H // dims.Hkv
    block_d = _block_d(dims.D)
    block_m = max(16, next_pow2(dims.Sq * group))  # tl.dot's smallest M
    programs = dims.B * dims.Hkv
    splits, keys_per_split = _decode_splits(programs, dims.Sk, q.device)
    # one allocation for both (a decode step takes microseconds)
    part_m, part_l = torch.empty((2, programs, splits, block_m), dtype=torch.float32,
                                 device=q.device)
    part_o = torch.empty((programs, splits, block_m, block_d), dtype=torch.float32,
                         device=q.device)
    tma_ok, tma = _tma_args(k, v)
    upcast = upcast_dot(q.dtype)
    _decode_kernel[(splits, programs)](
        q, k, v, tma_ok, part_o, part_m, part_l, dims.scale * LOG2_E, dims.Sq, dims.Sk, dims.H,
        group, dims.D, keys_per_split, *q.stride(), *k.stride(), *v.stride(),
        BLOCK_D=block_d, D_EDGE=dims.D != block_d, PRECISION=dot_precision(q.dtype),
        UPCAST=upcast, ONE_KEY=one_key, BLOCK_M=block_m, **tma)
    _decode_combine_kernel[(programs,)](
        part_o, part_m, part_l, out, *stats, o_rest, splits, dims.Sq, dims.H, group, dims.D,
        *out.stride(),
        BLOCK_D=block_d, BLOCK_M=block_m, UPCAST=upcast)


def _forward(q, k, v, dims, out, o_rest=None):
    """Writes softmax(q k^T * scale) v into `out`; returns the softmax's logsumexp for the
    backward and the remainder of its rounding. o_rest: None, or a contiguous [B, H, Sq, D]
    tensor of out's dtype for what rounding o to it left (_store_output_rest)."""
    stats = torch.empty((2, dims.B, dims.H, dims.Sq), dtype=torch.float32, device=q.device)
    one_key = contract.one_visible_key(dims.Sq, dims.Sk, dims.causal)
    if _decodes(dims):
        _decode_forward(q, k, v, dims, out, stats, o_rest, one_key)
        return stats
    block_d = _block_d(dims.D)
    tma_ok, tma = _tma_args(q, k, v, out)

    def grid(meta):
        return (cdiv(dims.Sq, meta["BLOCK_M"]), dims.B * dims.H)

    _fwd_kernel[grid](q, k, v, out, tma_ok, *stats, o_rest, dims.scale * LOG2_E, dims.Sq,
                      dims.Sk, dims.H, dims.H // dims.Hkv, dims.D,
                      *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                      CAUSAL=dims.causal, BLOCK_D=block_d, D_EDGE=dims.D != block_d,
                      PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
                      ONE_KEY=one_key, **tma)
    return stats


# How a 16-bit backward sums dQ; the environment variable KERNELS_ATTENTION_DQ, or this module's
# dq_method, chooses:
#   "kernel"   _bwd_dq_kernel, a pass over the key blocks of each query block that takes S and dP
#              again: seven matmuls in all (the FLOP count assumes five), no atomics.
#   "atomics"  _bwd_dkv_dq_kernel: the dK/dV pass adds each query block's dS K into an fp32 dQ
#              by atomic adds, five matmuls, the adds contended by the key blocks, then a cast.
#   "auto"     on a GPU, the first call of a shape (the autotune key with B and H) times both,
#              each already tuned, and keeps the faster: compile time, like the autotuners. In
#              the interpreter "kernel"; under harness.aot (launches captured) both are built.
#              A method that fails there leaves the other (_time_dq_methods).
# float32 takes "kernel" whatever is asked: its dQ kernel sums what delta leaves (_delta_rest);
# so do head dims over 128, where no _DKV_DQ_GPU_CONFIGS tile fits (the smallest, which the
# autotuner would fall back to, spilled 10 KB a thread at D=256: make aot, sm_90).
DQ_METHODS = ("kernel", "atomics")
_DQ_ATOMICS_MAX_D = 128
dq_method = os.environ.get("KERNELS_ATTENTION_DQ", "auto")
_dq_chosen: dict[tuple, tuple[str, str]] = {}  # "auto"'s choice per shape, and its times


def _dq_runner(runs: dict, key: tuple, alone: str = ""):
    """Which of `runs` (method -> a call that runs the dQ and dK/dV kernels and returns dQ) to
    call, as dq_method says; `alone`: why `runs` holds one method. The choice and why go to the
    records (note_choice)."""
    if dq_method not in ("auto", *DQ_METHODS):
        raise ValueError(f"KERNELS_ATTENTION_DQ / dq_method={dq_method!r}: expected auto, "
                         f"{' or '.join(DQ_METHODS)}")
    if len(runs) == 1:
        method, why = next(iter(runs)), alone
    elif dq_method != "auto":
        method, why = dq_method, "asked for"
    elif _common.launches_captured:  # harness.aot: nothing runs, so nothing is timed
        return lambda: [run() for run in runs.values()][-1]
    elif TRITON_INTERPRET:
        method, why = "kernel", "the interpreter's"
    else:
        if key not in _dq_chosen:
            _dq_chosen[key] = _time_dq_methods(runs)
        method, why = _dq_chosen[key]
    note_choice("dq_method", f"{method} ({why})")
    return runs[method]


def _time_dq_methods(runs: dict) -> tuple[str, str]:
    """"auto" on a GPU: runs each method (its kernels' autotuners tune), times those that ran
    and returns the faster and why. A method that fails (a build the GPU refuses, say) leaves
    the other, with a warning and the failure in the record; if every method fails, the first
    failure is raised. A timeout is never caught: the benchmark's limit ends the call."""
    failed = {}
    for method, run in runs.items():
        try:
            run()
        except TimeoutError:
            raise
        except Exception as e:
            failed[method] = e
    ran = {m: run for m, run in runs.items() if m not in failed}
    if not ran:
        raise next(iter(failed.values()))
    times = {m: autotune_bench(run, quantiles=(0.5,)) for m, run in ran.items()}
    why = "timed: " + ", ".join(f"{m} {t * 1e3:.0f} us" for m, t in times.items())
    for m, e in failed.items():
        warnings.warn(f"triton attention backward: dQ by {m} failed ({type(e).__name__}: {e}); "
                      f"running {', '.join(ran)}")
        why += f"; {m} failed: {type(e).__name__}: {str(e)[:120]}"
    return min(times, key=times.get), why


def _backward(q, k, v, o, o_rest, stats, do, dims):
    block_d = _block_d(dims.D)
    # delta and, in fp32, its remainder, which the dQ kernel sums (_delta_rest) and so runs
    # before the dK/dV kernel. 16-bit kernels take None for the second (never read), so their
    # builds stay as they were without it.
    fp32 = q.dtype == torch.float32
    delta_parts = [torch.empty_like(stats[0]), torch.empty_like(stats[0]) if fp32 else None]
    _bwd_delta_kernel[(cdiv(dims.Sq, _DELTA_BLOCK_M), dims.B * dims.H)](
        o, o_rest, do, delta_parts[0], dims.Sq, dims.H, dims.D, *o.stride(), *do.stride(),
        BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M)

    dq_shape = (dims.B, dims.H, dims.Sq, dims.D)
    dk = torch.empty((dims.B, dims.Hkv, dims.Sk, dims.D), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    args = (dims.scale * LOG2_E, dims.scale, dims.Sq, dims.Sk, dims.H, dims.H // dims.Hkv, dims.D,
            *q.stride(), *k.stride(), *v.stride(), *do.stride())
    tma_ok, tma = _tma_args(q, k, v, do)
    meta = dict(CAUSAL=dims.causal, BLOCK_D=block_d, D_EDGE=dims.D != block_d,
                PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
                ONE_KEY=contract.one_visible_key(dims.Sq, dims.Sk, dims.causal), **tma)
    grouped = dims.H != dims.Hkv
    kernel_inputs = (q, k, v, do, tma_ok, *stats, *delta_parts)

    def dkv_grid(m):
        return (cdiv(dims.Sk, m["BLOCK_N"]), dims.B * dims.Hkv)

    def dq_grid(m):
        return (cdiv(dims.Sq, m["BLOCK_M"]), dims.B * dims.H)

    def by_kernel():
        dq = torch.empty(dq_shape, dtype=q.dtype, device=q.device)
        _bwd_dq_kernel[dq_grid](*kernel_inputs, dq, *args, **meta)
        # DQ is not read without DQ_ATOMIC; dk stands in for it
        _bwd_dkv_kernel[dkv_grid](*kernel_inputs, dk, dv, dk, *args, **meta, GROUPED=grouped)
        return dq

    def by_atomics():
        dq = torch.zeros(dq_shape, dtype=torch.float32, device=q.device)
        _bwd_dkv_dq_kernel[dkv_grid](*kernel_inputs, dk, dv, dq, *args, **meta, GROUPED=grouped)
        return dq.to(q.dtype)

    alone = ("float32" if fp32 else f"D > {_DQ_ATOMICS_MAX_D}" if dims.D > _DQ_ATOMICS_MAX_D
             else "")
    runs = {"kernel": by_kernel} | ({} if alone else {"atomics": by_atomics})
    key = (dims.B, dims.H, dims.Hkv, dims.Sq, dims.Sk, dims.D, dims.causal, q.dtype, tma_ok,
           q.device)
    return _dq_runner(runs, key, alone)(), dk, dv


def _new_output(q, dims) -> torch.Tensor:
    return torch.empty((dims.B, dims.H, dims.Sq, dims.D), dtype=q.dtype, device=q.device)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dims, out):
        if out is None:
            out = _new_output(q, dims)
        else:
            ctx.mark_dirty(out)  # written in place: autograd must know the buffer changed
        # 16 bits: delta = rowsum(dO * O) takes O before its rounding (_store_output_rest)
        o_rest = None if q.dtype == torch.float32 else torch.empty(
            (dims.B, dims.H, dims.Sq, dims.D), dtype=q.dtype, device=q.device)
        stats = _forward(q, k, v, dims, out, o_rest)
        ctx.save_for_backward(q, k, v, out, o_rest, stats)
        ctx.dims = dims
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, o_rest, stats = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, o_rest, stats, do, ctx.dims)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: q [B, H, Sq, D], k and v [B, Hkv, Sk, D] -> [B, H, Sq, D].

    Differentiable in q, k, v. Any strides; `out` may be given (any strides, written in place).
    """
    dims = contract.attention_args(q, k, v, causal, scale, "torch")
    for name, x in (("q", q), ("k", k), ("v", v)):
        contract.check_device(name, x, DEVICE_TYPE)
    if dims.D > 256:
        raise ValueError(f"q's head dimension D={dims.D} must be <= 256 for this kernel")
    if dims.B * dims.H > MAX_GRID_Y:  # the kernels' programs take (batch, head) on grid axis 1
        raise ValueError(f"q's batch x heads = {dims.B} x {dims.H} must be <= {MAX_GRID_Y} for "
                         "this kernel (a GPU grid's second axis)")
    if out is not None:
        check_out(out, (dims.B, dims.H, dims.Sq, dims.D), q)
    q, k, v = resolved(q, k, v)
    tensors = (q, k, v) if out is None else (q, k, v, out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Attention.apply(q, k, v, dims, out)
    # Nothing to differentiate: the forward alone, without autograd's bookkeeping per call.
    out = _new_output(q, dims) if out is None else out
    _forward(q, k, v, dims, out)
    return out


registry.register("attention", "triton", framework="torch", kind="hand", backend="Triton",
                  accepts_out=True, tags=TAGS,
                  reset=lambda: (_dq_chosen.clear(),
                                 reset_jit(_fwd_kernel, _decode_kernel, _decode_combine_kernel,
                                           _bwd_delta_kernel, _bwd_dkv_kernel, _bwd_dkv_dq_kernel,
                                           _bwd_dq_kernel)))(attention)
