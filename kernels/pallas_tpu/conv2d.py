"""Hand-written Pallas TPU conv2d: implicit GEMM in NHWC with an fp32 accumulator in VMEM.

One program owns one output row (n, oh): all OW pixels (padded to a sublane multiple) by a block of
bko output channels. The grid is (N*OH, K/bko, KH*C/bc) with the reduction last and "arbitrary":
step t reads input row ih = oh*sh + (t // (C/bc))*dh, channel block t % (C/bc), through the x
BlockSpec's index_map (a one-row block, so its block index is the row index), and the matching
[KW, bc, bko] weight block; the KW taps of that row are static slices of the VMEM tile.

The stride along W is taken out of the kernel by a phase split in the wrapper,
x[n, h, q*sw + phase, c] -> xs[n, h, phase, q, c], so tap kw reads the contiguous run
xs[..., (kw*dw) % sw, (kw*dw) // sw + ow, :] for ow in [0, OW): no strided vector loads and no
patch matrix, and the input is rearranged once (a plain reshape when sw == 1). The wrapper also
applies the conv's zero padding and pads C and K to block multiples (zero channels add nothing).
Channels are padded to 128 lanes, so a layer with few input channels (an RGB stem, C=3) does
mostly zero work in the MXU; folding its taps into the channel dim would be the fix.

Grouped convolution (`groups` = G; output channel k reads the Cg = C/G input channels of group
k // Kg): each group's Cg input and Kg output channels are padded to block multiples on their own,
and the output channel grid axis runs over (group, output block), so the index maps send group g's
programs to its own channel blocks; nothing changes in the kernel. A group of few channels pads to
128 lanes like the RGB stem. Depthwise convolution (G = C > 1, Kg = m filters per channel) would
pad every single channel to 128 lanes, so it takes another route: output channels are laid out
[m, C] (filter j of channel c at column j*Cp + c) so that each output block reads one block of
input channels, the grid's reduction runs over the KH rows only, and the kernel multiplies the
input tile by one weight per lane on the VPU instead of a dot.
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
from kernels.pallas._common import forward_only
from kernels.pallas_tpu._common import (LANES, check_dtype_supported, compiler_params,
                                        fit_block, idiv, interpret_params, round_up,
                                        sublanes)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Caps for the channel blocks: bc input channels of one group per reduction step, bko output
    channels of one group per program (both lane dims, multiples of 128). Depthwise, bko is the
    channels per program and bc is unused."""

    block_c: int = 256
    block_k: int = 256

    def fit(self, C: int, K: int) -> "BlockSizes":
        return BlockSizes(block_c=fit_block(C, self.block_c, LANES),
                          block_k=fit_block(K, self.block_k, LANES))


def _is_depthwise(d: contract.Conv2dDims) -> bool:
    # groups == 1 with C == 1 is depthwise too, but stays on the MXU path as before.
    return d.groups > 1 and d.Cg == 1


def _kernel(x_ref, w_ref, o_ref, acc_ref, *, d: contract.Conv2dDims, ow: int, depthwise: bool):
    # x_ref: [sw, Q, bc] one padded input row, phase-split; w_ref: [KW, bc, bko] ([KW, 1, bko]
    # depthwise); o_ref and acc_ref: [ow, bko] one output row segment.
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    sw, dw = d.stride[1], d.dilation[1]
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    acc = acc_ref[...]
    for kw in range(d.KW):  # static: every slice start is a compile-time constant
        phase, start = (kw * dw) % sw, (kw * dw) // sw
        x = x_ref[phase, pl.ds(start, ow), :]
        if depthwise:  # one weight per channel (lane), broadcast over the pixels
            acc += x.astype(jnp.float32) * w_ref[kw].astype(jnp.float32)
        else:
            acc += jnp.dot(x, w_ref[kw], precision=precision, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(t == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _row_sizes(d: contract.Conv2dDims, dtype) -> tuple[int, int]:
    """Output pixels per program and input columns per phase, both padded to a sublane multiple."""
    ow = round_up(d.OW, sublanes(dtype))
    return ow, round_up(ow + ((d.KW - 1) * d.dilation[1]) // d.stride[1], sublanes(dtype))


def _phase_split_input(x, d: contract.Conv2dDims, groups: int, multiple: int):
    """[N, Hp, sw, q, groups * Cgp]: x with the conv's own padding, zeros on the right up to q*sw
    columns (the last output block's taps read up to there), each of `groups` channel groups
    padded to a `multiple`, then split into the sw phases of its columns."""
    (ph, pw), sw = d.padding, d.stride[1]
    q = _row_sizes(d, x.dtype)[1]
    cg = d.C // groups
    x = x.reshape(d.N, d.H, d.W, groups, cg)
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, max(q * sw - d.W - pw, 0)), (0, 0),
                    (0, round_up(cg, multiple) - cg)))[:, :, :q * sw]
    x = x.reshape(d.N, x.shape[1], q, sw, -1)
    return x.transpose(0, 1, 3, 2, 4)


def _launch(x, w, w_block, w_index, channel_block, *, d: contract.Conv2dDims, block_x: int,
            block_k: int, channels: int, steps: int, depthwise: bool):
    """Runs the kernel on a grid of (output row, output channel block, reduction step) and returns
    its [N*OH, ow, channels] output. channel_block(k, t) gives the kernel row kh and the input
    channel block (of width block_x) that step t of output channel block k reads."""
    sh, dh = d.stride[0], d.dilation[0]
    sw, q = x.shape[2], x.shape[3]
    ow = _row_sizes(d, x.dtype)[0]

    def x_index(r, k, t):
        (n, oh), (kh, c) = idiv(r, d.OH), channel_block(k, t)
        return n, oh * sh + kh * dh, 0, 0, c

    return pl.pallas_call(
        functools.partial(_kernel, d=d, ow=ow, depthwise=depthwise),
        out_shape=jax.ShapeDtypeStruct((d.N * d.OH, ow, channels), x.dtype),
        grid=(d.N * d.OH, channels // block_k, steps),
        in_specs=[pl.BlockSpec((None, None, sw, q, block_x), x_index),
                  pl.BlockSpec(w_block, w_index)],
        out_specs=pl.BlockSpec((None, ow, block_k), lambda r, k, t: (r, 0, k)),
        scratch_shapes=[pltpu.VMEM((ow, block_k), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(),
        name="conv2d_nhwc_depthwise_tpu" if depthwise else "conv2d_nhwc_implicit_gemm_tpu",
    )(x, w)


@functools.partial(jax.jit, static_argnames=("d", "b"))
def _conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes):
    G = d.groups
    cgp, kgp = round_up(d.Cg, b.block_c), round_up(d.Kg, b.block_k)
    c_steps, k_steps = cgp // b.block_c, kgp // b.block_k
    x = _phase_split_input(x, d, G, b.block_c)
    # w [KH, KW, Cg, G*Kg] -> [KH, KW, G*Cgp, Kgp]: group g's rows start at g*Cgp like its
    # channels in x, and its output channels are the Kgp columns.
    w = w.reshape(d.KH, d.KW, d.Cg, G, d.Kg).transpose(0, 1, 3, 2, 4)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, cgp - d.Cg), (0, kgp - d.Kg)))
    w = w.reshape(d.KH, d.KW, G * cgp, kgp)

    def channel_block(gk, t):  # output block gk of group gk // k_steps
        (g, _), (kh, cb) = idiv(gk, k_steps), idiv(t, c_steps)
        return kh, g * c_steps + cb

    def w_index(r, gk, t):
        kh, c = channel_block(gk, t)
        return kh, 0, c, idiv(gk, k_steps)[1]

    out = _launch(x, w, (None, d.KW, b.block_c, b.block_k), w_index, channel_block, d=d,
                  block_x=b.block_c, block_k=b.block_k, channels=G * kgp,
                  steps=d.KH * c_steps, depthwise=False)
    out = out.reshape(d.N, d.OH, -1, G, kgp)[:, :, :d.OW, :, :d.Kg]
    return out.reshape(d.N, d.OH, d.OW, d.K)


@functools.partial(jax.jit, static_argnames=("d", "b"))
def _depthwise_conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes):
    m, bk = d.Kg, b.block_k
    cp = round_up(d.C, bk)
    x = _phase_split_input(x, d, 1, bk)
    # w [KH, KW, 1, C*m] (filter j of channel c at c*m + j) -> [KH, KW, 1, m*Cp] (at j*Cp + c).
    w = w.reshape(d.KH, d.KW, d.C, m).transpose(0, 1, 3, 2)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, cp - d.C))).reshape(d.KH, d.KW, 1, m * cp)

    def channel_block(k, t):  # output column j*Cp + c reads input channel c
        return t, idiv(k, cp // bk)[1]

    out = _launch(x, w, (None, d.KW, 1, bk), lambda r, k, t: (t, 0, 0, k), channel_block, d=d,
                  block_x=bk, block_k=bk, channels=m * cp, steps=d.KH, depthwise=True)
    out = out.reshape(d.N, d.OH, -1, m, cp)[:, :, :d.OW, :, :d.C]
    return out.transpose(0, 1, 2, 4, 3).reshape(d.N, d.OH, d.OW, d.K)


def conv2d(x: jax.Array, w: jax.Array, stride=1, padding=0, dilation=1, groups=1, *,
           block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C // groups, K] (HWIO) -> [N, OH, OW, K] in x's
    dtype; output channel k reads input channels of group k // (K // groups)."""
    d = contract.conv2d_args(x, w, stride, padding, dilation, "jax", groups)
    check_dtype_supported("x", x)
    caps = block_sizes or BlockSizes()
    if _is_depthwise(d):
        call = functools.partial(_depthwise_conv2d, d=d, b=caps.fit(d.C, d.C))
    else:
        call = functools.partial(_conv2d, d=d, b=caps.fit(d.Cg, d.Kg))
    return _forward_only(call, x, w)


_forward_only = forward_only("the pallas_tpu conv2d")


registry.register("conv2d", "pallas_tpu", framework="jax", kind="hand",
                  backend="Pallas TPU (Mosaic)", reset=jax.clear_caches,
                  tags=("tpu",))(conv2d)
