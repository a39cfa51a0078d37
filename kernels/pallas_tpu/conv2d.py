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
                                        fit_block, idiv, interpret_params, round_up,
                                        sublanes)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Caps for the channel blocks: bc input channels per reduction step, bko output channels per
    program (both lane dims, multiples of 128)."""

    block_c: int = 256
    block_k: int = 256

    def fit(self, C: int, K: int) -> "BlockSizes":
        return BlockSizes(block_c=fit_block(C, self.block_c, LANES),
                          block_k=fit_block(K, self.block_k, LANES))


def _kernel(x_ref, w_ref, o_ref, acc_ref, *, d: contract.Conv2dDims, ow: int):
    # x_ref: [sw, Q, bc] one padded input row, phase-split; w_ref: [KW, bc, bko];
    # o_ref and acc_ref: [ow, bko] one output row segment.
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
        acc += jnp.dot(x, w_ref[kw], precision=precision, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(t == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("d", "b"))
def _conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes):
    (sh, sw), (ph, pw), (dh, dw) = d.stride, d.padding, d.dilation
    ow = round_up(d.OW, sublanes(x.dtype))  # output pixels per program, padded
    q = round_up(ow + ((d.KW - 1) * dw) // sw, sublanes(x.dtype))  # input columns per phase
    cp, kp = round_up(d.C, b.block_c), round_up(d.K, b.block_k)
    # The conv's own padding, then zeros on the right up to q*sw columns (the last output block's
    # taps read up to there), then channels up to a block multiple.
    right = q * sw - d.W - pw
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, max(right, 0)), (0, cp - d.C)))[:, :, :q * sw]
    hp = x.shape[1]
    x = x.reshape(d.N, hp, q, sw, cp).transpose(0, 1, 3, 2, 4)  # [N, Hp, sw, q, Cp]
    w = jnp.pad(w, ((0, 0), (0, 0), (0, cp - d.C), (0, kp - d.K)))
    c_steps = cp // b.block_c

    def x_index(r, kb, t):
        (n, oh), (kh, cb) = idiv(r, d.OH), idiv(t, c_steps)
        return n, oh * sh + kh * dh, 0, 0, cb

    def w_index(r, kb, t):
        kh, cb = idiv(t, c_steps)
        return kh, 0, cb, kb

    out = pl.pallas_call(
        functools.partial(_kernel, d=d, ow=ow),
        out_shape=jax.ShapeDtypeStruct((d.N * d.OH, ow, kp), x.dtype),
        grid=(d.N * d.OH, kp // b.block_k, d.KH * c_steps),
        in_specs=[pl.BlockSpec((None, None, sw, q, b.block_c), x_index),
                  pl.BlockSpec((None, d.KW, b.block_c, b.block_k), w_index)],
        out_specs=pl.BlockSpec((None, ow, b.block_k), lambda r, kb, t: (r, 0, kb)),
        scratch_shapes=[pltpu.VMEM((ow, b.block_k), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(),
        name="conv2d_nhwc_implicit_gemm_tpu",
    )(x, w)
    return out.reshape(d.N, d.OH, ow, kp)[:, :, :d.OW, :d.K]


def conv2d(x: jax.Array, w: jax.Array, stride=1, padding=0, dilation=1, *,
           block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C, K] (HWIO) -> [N, OH, OW, K] in x's dtype."""
    d = contract.conv2d_args(x, w, stride, padding, dilation, "jax")
    check_dtype_supported("x", x)
    return _conv2d(x, w, d=d, b=(block_sizes or BlockSizes()).fit(d.C, d.K))


registry.register("conv2d", "pallas_tpu", framework="jax", kind="hand",
                  backend="Pallas TPU (Mosaic)", reset=jax.clear_caches,
                  tags=("tpu",))(conv2d)
