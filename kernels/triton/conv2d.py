"""Hand-written Triton conv2d: implicit GEMM in NHWC, fp32 accumulation, masked edges.

The convolution is the GEMM  y[M, K] = patches[M, R] @ w[R, K]  with M = N*OH*OW output pixels and
R = KH*KW*C, but the patch matrix is never written to memory: each program maps its output rows to
(n, oh, ow) and, per kernel tap and channel block, gathers the input tile straight from x, masking
rows that fall into the padding or past the edges. w in HWIO is already the [R, K] matrix.
With few channels (C < 16, such as an RGB stem) a channel block would be mostly padding, so the
reduction runs over R itself in blocks that span several kernel taps.

Why a pointer gather and not TMA: for stride 1 the input tile of a block of BH x BW output pixels
is one TMA box [1, BH, BW, BC] of x, the padding filled with zeros by the hardware. Compiled for
sm_90 by Triton 3.6, the box's reshape to the dot's [BH*BW, BC] operand goes through registers
(a shared-memory load, layout conversions, wgmma reading A from registers), where this kernel's
cp.async tiles feed wgmma from shared memory. (A weight box [1, BC, BN], reshaped by dropping
its unit dimension, did stay in shared memory.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import contract, registry
from kernels.triton._common import (DEVICE_TYPE, TAGS, autotune, cdiv, check_out,
                                    dot_precision, grouped_tile, next_pow2, pick_configs,
                                    reset_jit, resolved, small_tile_if_fp32, to_output,
                                    upcast_dot)
from kernels.triton.matmul import _matmul_kernel, launch as launch_matmul


def _config(bm, bn, group, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# A few Hopper configs: wide output-pixel tiles (M is large for every real conv), narrower K tiles
# for layers with few output channels. The channel block is chosen by the launcher from C, not
# tuned.
_GPU_CONFIGS = [
    _config(128, 128, 8, 3, 8),
    _config(128, 64, 8, 4, 4),
    _config(64, 128, 8, 4, 4),
    _config(64, 64, 8, 4, 4),
    _config(128, 32, 8, 4, 4),
    _config(128, 16, 8, 4, 4),  # K = 1..16: a depthwise-like head or a single-filter output
]


def _channels_fit(meta, args) -> bool:
    """Output-channel tiles no wider than the output channels (a wider one is masked work), and
    the 16-wide tile only for layers of at most 16 channels. fp32: tiles of at most 64x64."""
    k = next_pow2(args["K"])
    return (meta["BLOCK_N"] <= max(16, k) and (meta["BLOCK_N"] > 16 or k <= 16)
            and small_tile_if_fp32(meta, args["IN_DTYPE"] == str(torch.float32), 64 * 64))


# The interpreter's cost is per program and loop step: 128-pixel tiles halve the CPU benches' time
# against 64, and tests/test_conv2d_kernels.py has cases crossing several of them.
_INTERPRET_CONFIGS = [_config(128, 32, 4, 1, 4)]


@triton.jit
def _accumulate(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _output_pixels(rm, OH, OW, SH, SW, PH, PW):
    """Output rows (flat pixel indices) -> (n, oh, ow) and the top-left input pixel (ih0, iw0)
    of each one's receptive field (negative inside the padding)."""
    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    return n, oh, ow, oh * SH - PH, ow * SW - PW


@autotune(pick_configs(_GPU_CONFIGS, _INTERPRET_CONFIGS),
          ["M", "H", "W", "C", "K", "KH", "KW", "SH", "SW", "DH", "DW", "GROUPS", "IN_DTYPE"],
          _channels_fit)
@triton.jit
def _conv2d_kernel(x_ptr, w_ptr, y_ptr, M, H, W, C, OH, OW, K, KH, KW, SH, SW, PH, PW, DH, DW,
                   sxn, sxh, sxw, sxc, swh, sww, swc, swk, syn, syh, syw, syk, GROUPS,
                   IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   FLAT: tl.constexpr, GROUPED: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C and K are the channels of one group; with GROUPED, program_id(1) is the group, whose
    input channels start at g * C and output channels at g * K. (Without, the kernel is as it was
    before groups: the offsets' registers made an RGB-stem config spill, 0 -> 8 bytes.)"""
    # Grouped order: programs sharing a band of output channels re-read weight tiles from L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    if GROUPED:
        group = tl.program_id(1)
        x_ptr += group * C * sxc
        w_ptr += group * K * swk
        y_ptr += group * K * syk

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_C)
    m_ok = rm < M
    n, oh, ow, ih0, iw0 = _output_pixels(rm, OH, OW, SH, SW, PH, PW)
    x_rows = x_ptr + n.to(tl.int64) * sxn  # int64: a batch of large images passes 2**31 elements
    n_ok = rn < K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation for accuracy
    if FLAT:
        # Reduction index r = (kh * KW + kw) * C + c, BLOCK_C of them per step across taps.
        R = KH * KW * C
        for r0 in range(0, R, BLOCK_C):
            r = r0 + rc
            tap = r // C
            c = r - tap * C
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * DH)[None, :]
            iw = iw0[:, None] + (kw * DW)[None, :]
            r_ok = r < R
            # Zero padding is a mask: taps whose input pixel lies outside x load 0.
            ok = m_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=ok,
                        other=0.0)
            b = tl.load(w_ptr + (kh * swh + kw * sww + c * swc)[:, None] + rn[None, :] * swk,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _accumulate(acc, a, b, PRECISION, UPCAST)
    else:
        # One flat loop over (tap, channel block) rather than three nested ones: the compiler
        # software-pipelines the innermost loop only, and with C <= BLOCK_C that loop would be
        # one step.
        c_steps = tl.cdiv(C, BLOCK_C)
        for step in range(0, KH * KW * c_steps):
            tap = step // c_steps
            c = (step - tap * c_steps) * BLOCK_C + rc
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * DH
            iw = iw0 + kw * DW
            # Zero padding is a mask: rows whose input pixel lies outside x load 0.
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = c < C
            a = tl.load(x_rows[:, None] + ih[:, None] * sxh + iw[:, None] * sxw
                        + c[None, :] * sxc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + kh * swh + kw * sww + c[:, None] * swc + rn[None, :] * swk,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _accumulate(acc, a, b, PRECISION, UPCAST)

    y_ptrs = (y_ptr + n.to(tl.int64)[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw
              + rn[None, :] * syk)
    tl.store(y_ptrs, to_output(acc, y_ptr.dtype.element_ty, UPCAST),
             mask=m_ok[:, None] & n_ok[None, :])


FLAT_BELOW_C = 16  # the smallest dot dimension on a GPU: fewer channels would be padding


def _direct_config(bm, bk, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=2, num_warps=warps)


# Tiles of output pixels x output channels; channels are the contiguous NHWC axis.
_DIRECT_GPU_CONFIGS = [_direct_config(64, 64, 4), _direct_config(128, 32, 4),
                       _direct_config(64, 32, 4),
                       _direct_config(32, 128, 4), _direct_config(128, 64, 8),
                       _direct_config(64, 128, 8)]
_DIRECT_INTERPRET_CONFIGS = [_direct_config(64, 32, 4)]


def _channels_fit_direct(meta, args) -> bool:
    """Output-channel tiles no wider than the output channels."""
    return meta["BLOCK_K"] <= max(32, next_pow2(args["K"]))


@autotune(pick_configs(_DIRECT_GPU_CONFIGS, _DIRECT_INTERPRET_CONFIGS),
          ["M", "H", "W", "K", "KH", "KW", "SH", "SW", "DH", "DW", "CG", "KG", "IN_DTYPE"],
          _channels_fit_direct)
@triton.jit
def _grouped_direct_kernel(x_ptr, w_ptr, y_ptr, M, H, W, OH, OW, K, KH, KW, SH, SW, PH, PW,
                           DH, DW, CG, KG, sxn, sxh, sxw, sxc, swh, sww, swc, swk,
                           syn, syh, syw, syk, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grouped conv with few channels per group (CG < 16; depthwise: CG = 1) by multiply-adds
    on a [pixels, output channels] tile: a dot over CG channels would be mostly padding.
    Output channel k reads input channels (k // KG) * CG .. + CG, KG output channels a group."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    n, oh, ow, ih0, iw0 = _output_pixels(rm, OH, OW, SH, SW, PH, PW)
    x_rows = x_ptr + n.to(tl.int64) * sxn
    first_c = (rk // KG) * CG
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        # Zero padding is a mask: rows whose input pixel lies outside x load 0.
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tap = x_rows + ih * sxh + iw * sxw
        for c in range(0, CG):
            x = tl.load(x_tap[:, None] + (first_c + c)[None, :] * sxc,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + kh * swh + kw * sww + c * swc + rk * swk, mask=k_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]  # fp32 products and sums
    y_ptrs = (y_ptr + n.to(tl.int64)[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw
              + rk[None, :] * syk)
    tl.store(y_ptrs, to_output(acc, y_ptr.dtype.element_ty, UPCAST),
             mask=m_ok[:, None] & k_ok[None, :])


def _reduction_block(C: int, R: int) -> int:
    """The reduction tile: a channel block, or with C < 16 a block of R = KH*KW*C. tl.dot needs
    every dimension >= 16 on a GPU; above 64 channels the tile only costs registers and shared
    memory without saving loop steps that matter. A block of R is gathered with an address per
    element: 64 of them spilled registers in every stem config for sm_90 (make aot), 32 in one."""
    if C >= FLAT_BELOW_C:
        return min(64, next_pow2(C))
    return min(32, max(16, next_pow2(R)))


def conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups=1, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C // groups, K] (HWIO) -> [N, OH, OW, K] in x's
    dtype; `groups` channel groups (depthwise: groups = C).

    Any strides for x, w and `out` (a preallocated NHWC output, e.g. poisoned with NaN by a test).
    """
    d = contract.conv2d_args(x, w, stride, padding, dilation, "torch", groups)
    contract.check_device("x", x, DEVICE_TYPE)
    contract.check_device("w", w, DEVICE_TYPE)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        raise NotImplementedError("the triton conv2d has no backward: call it on tensors that "
                                  "do not require grad (or under torch.no_grad())")
    x, w = resolved(x, w)
    shape = (d.N, d.OH, d.OW, d.K)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out(out, shape, x)

    pointwise = (d.KH, d.KW, d.stride, d.padding, d.groups) == (1, 1, (1, 1), (0, 0), 1)
    if pointwise and out.is_contiguous():
        # A 1x1 stride-1 conv is exactly the GEMM [N*H*W, C] @ [C, K]: no gather, no masks.
        # Launched directly: matmul() would check again what conv2d_args has checked.
        launch_matmul(x.reshape(-1, d.C), w.reshape(d.C, d.K), out.view(-1, d.K),
                      contract.MatmulDims(d.N * d.H * d.W, d.C, d.K))
        return out

    M = d.N * d.OH * d.OW
    geometry = (d.KH, d.KW, *d.stride, *d.padding, *d.dilation)
    strides = (*x.stride(), *w.stride(), *out.stride())
    if d.groups > 1 and d.Cg < FLAT_BELOW_C:
        def direct_grid(meta):
            return (cdiv(M, meta["BLOCK_M"]), cdiv(d.K, meta["BLOCK_K"]))

        _grouped_direct_kernel[direct_grid](x, w, out, M, d.H, d.W, d.OH, d.OW, d.K, *geometry,
                                            d.Cg, d.Kg, *strides, IN_DTYPE=str(x.dtype),
                                            UPCAST=upcast_dot(x.dtype))
        return out

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(d.Kg, meta["BLOCK_N"]), d.groups)

    # One implicit GEMM per group (the grid's second axis), each of its C / groups channels.
    _conv2d_kernel[grid](x, w, out, M, d.H, d.W, d.Cg, d.OH, d.OW, d.Kg, *geometry, *strides,
                         d.groups, IN_DTYPE=str(x.dtype), PRECISION=dot_precision(x.dtype),
                         UPCAST=upcast_dot(x.dtype), FLAT=d.Cg < FLAT_BELOW_C,
                         GROUPED=d.groups > 1,
                         BLOCK_C=_reduction_block(d.Cg, d.KH * d.KW * d.Cg))
    return out


registry.register("conv2d", "triton", framework="torch", kind="hand", backend="Triton",
                  accepts_out=True, tags=TAGS,
                  reset=lambda: reset_jit(_conv2d_kernel, _grouped_direct_kernel,
                                          _matmul_kernel))(conv2d)
