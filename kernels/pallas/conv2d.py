"""Hand-written Pallas conv2d: implicit GEMM in NHWC with an fp32 accumulator.

Each program computes one output row segment: `block_ow` output pixels of one (n, oh) row times
`block_k` output channels. For every kernel tap and channel block it reads the strided input tile
x[n, ih, iw0 : iw0 + sw*block_ow : sw, c-block] straight from the padded input and multiplies it
with the matching [block_c, block_k] weight tile, so no patch matrix is ever stored.

Grouped convolution (`groups` = G): output channel k belongs to group g = k // Kg and reads only
the group's input channels [g*Cg, (g+1)*Cg). The wrapper pads each group on its own (its Cg input
channels to a block_c multiple Cgp, its Kg output channels to a block_k multiple Kgp), so group g's
channels start at g*Cgp in the input and g*Kgp in the output. The last grid axis runs over (group,
output channel block) and each program reduces over its own group's channel blocks only.

Depthwise convolution (groups = C > 1, so Cg = 1, with Kg = m filters per channel) has no
reduction over channels worth a dot, so it has its own kernel: elementwise multiply-adds of a
[block_ow, block_k] input tile with one weight per channel, summed over the taps. Its output
channels are laid out [m, C] (filter j of channel c at column j*Cp + c), so one output block reads
one block of input channels; the wrapper transposes the result back to [C, m].

The wrapper does the padding that keeps the kernels free of masks: the conv's own zero padding,
extra zero columns on the right so the last (partial) output block reads in bounds, and channels
and output channels up to block multiples (zeros add nothing).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import contract, registry
from kernels.pallas._common import gpu_compiler_params, interpret, round_up, tags

def _fit(n: int, cap: int) -> int:
    # Power-of-two blocks for the Triton lowering, >= 16 because its dot needs every dim >= 16.
    return min(cap, max(16, pl.next_power_of_2(n)))


def _is_depthwise(d: contract.Conv2dDims) -> bool:
    # groups == 1 with C == 1 is depthwise too, but stays on the GEMM kernel as before.
    return d.groups > 1 and d.Cg == 1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Depthwise, block_k is the channels per program and block_c is unused (no reduction
    over channels)."""

    block_ow: int  # output pixels per program (one output row segment): the GEMM M tile
    block_c: int  # input channels of one group per reduction step
    block_k: int  # output channels of one group per program: the GEMM N tile
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_dims(cls, d: contract.Conv2dDims) -> BlockSizes:
        """Blocks no larger than the problem needs (less padding for small OW, Cg, Kg)."""
        block_k = _fit(d.C, 64) if _is_depthwise(d) else _fit(d.Kg, 64)
        return cls(block_ow=_fit(d.OW, 64), block_c=_fit(d.Cg, 32), block_k=block_k)


def _divmod(a, b: int):
    # Indices here are never negative, so truncating division is floor division; lax.div/rem lower
    # to single Triton ops where jnp's floor-mod emits sign fix-ups the Triton lowering rejects.
    return lax.div(a, b), lax.rem(a, b)


def _x_tile(x_ref, n, oh, ow_block, tap, c0, width: int, d: contract.Conv2dDims, b: BlockSizes):
    """The [block_ow, width] input tile that kernel tap `tap` multiplies for this output row
    segment: every sw-th column of one padded input row, channels [c0, c0 + width)."""
    (sh, sw), (dh, dw) = d.stride, d.dilation
    kh, kw = _divmod(tap, d.KW)
    iw0 = ow_block * (b.block_ow * sw) + kw * dw
    return x_ref[n, oh * sh + kh * dh, pl.ds(iw0, b.block_ow, stride=sw), pl.ds(c0, width)]


def _conv2d_kernel(x_ref, w_ref, o_ref, *, d: contract.Conv2dDims, b: BlockSizes, c_steps: int,
                   k_steps: int):
    # x_ref: the whole padded input [N, Hp, Wp, G*Cgp]; w_ref: the whole [KH*KW, G*Cgp, Kgp]
    # weight; o_ref: this program's [block_ow, block_k] output block.
    row, ow_block, gk_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, oh = _divmod(row, d.OH)
    g, k_block = _divmod(gk_block, k_steps)
    k0 = pl.multiple_of(k_block * b.block_k, b.block_k)
    group_c0 = g * (c_steps * b.block_c)  # the group's first input channel (in x and w rows)

    def step(i, acc):
        # One flat loop over (tap, channel block), as in the Triton kernel.
        tap, c_block = _divmod(i, c_steps)
        c0 = pl.multiple_of(group_c0 + c_block * b.block_c, b.block_c)
        x = _x_tile(x_ref, n, oh, ow_block, tap, c0, b.block_c, d, b)
        wt = w_ref[tap, pl.ds(c0, b.block_c), pl.ds(k0, b.block_k)]
        # HIGHEST makes fp32 dots true fp32 (not TF32) like the Triton kernel's default; it changes
        # nothing for 16-bit inputs. Products accumulate in fp32 for accuracy.
        return acc + jnp.dot(x, wt, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)

    acc = jnp.zeros((b.block_ow, b.block_k), jnp.float32)
    acc = lax.fori_loop(0, d.KH * d.KW * c_steps, step, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _depthwise_kernel(x_ref, w_ref, o_ref, *, d: contract.Conv2dDims, b: BlockSizes,
                      c_blocks: int):
    # x_ref: the whole padded input [N, Hp, Wp, Cp]; w_ref: the whole [KH*KW, m*Cp] weight, its
    # columns laid out like the output's; o_ref: this program's [block_ow, block_k] output block.
    row, ow_block, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, oh = _divmod(row, d.OH)
    k0 = pl.multiple_of(k_block * b.block_k, b.block_k)
    # Output column j*Cp + c reads input channel c, so block k_block reads channel block
    # k_block % c_blocks.
    c0 = pl.multiple_of(lax.rem(k_block, c_blocks) * b.block_k, b.block_k)

    def step(tap, acc):
        x = _x_tile(x_ref, n, oh, ow_block, tap, c0, b.block_k, d, b)
        wt = w_ref[tap, pl.ds(k0, b.block_k)]
        return acc + x.astype(jnp.float32) * wt.astype(jnp.float32)[None, :]

    acc = jnp.zeros((b.block_ow, b.block_k), jnp.float32)
    acc = lax.fori_loop(0, d.KH * d.KW, step, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _pad_input(x, d: contract.Conv2dDims, b: BlockSizes, groups: int, multiple: int):
    """x with the conv's zero padding, zero columns on the right so the last output block's last
    tap reads in bounds, and each of `groups` channel groups zero-padded to a `multiple`."""
    (ph, pw), sw, dw = d.padding, d.stride[1], d.dilation[1]
    width = (round_up(d.OW, b.block_ow) - 1) * sw + (d.KW - 1) * dw + 1
    cg = d.C // groups
    x = x.reshape(d.N, d.H, d.W, groups, cg)
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, max(pw, width - d.W - pw)), (0, 0),
                    (0, round_up(cg, multiple) - cg)))
    return x.reshape(*x.shape[:3], -1)


def _launch(kernel, x, w, d: contract.Conv2dDims, b: BlockSizes, channels: int, interpret: bool,
            name: str):
    """Runs `kernel` on a grid of (output row, output column block, output channel block) and
    returns its [N*OH, OW padded, channels] output."""
    ow_padded = round_up(d.OW, b.block_ow)
    params = None if interpret else gpu_compiler_params(b.num_warps, b.num_stages)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d.N * d.OH, ow_padded, channels), x.dtype),
        grid=(d.N * d.OH, ow_padded // b.block_ow, channels // b.block_k),
        # Inputs stay whole (the kernel gathers strided tiles itself); outputs are blocked.
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((pl.squeezed, b.block_ow, b.block_k), lambda r, j, k: (r, j, k)),
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(x, w)


@functools.partial(jax.jit, static_argnames=("d", "b", "interpret"))
def _conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes, interpret: bool):
    G, taps = d.groups, d.KH * d.KW
    cg_padded, kg_padded = round_up(d.Cg, b.block_c), round_up(d.Kg, b.block_k)
    x = _pad_input(x, d, b, G, b.block_c)
    # w [KH, KW, Cg, G*Kg] -> [taps, G*Cgp, Kgp]: group g's rows start at g*Cgp like its
    # channels in x, and its output channels are the Kgp columns.
    w = w.reshape(taps, d.Cg, G, d.Kg).transpose(0, 2, 1, 3)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, cg_padded - d.Cg), (0, kg_padded - d.Kg)))
    w = w.reshape(taps, G * cg_padded, kg_padded)
    kernel = functools.partial(_conv2d_kernel, d=d, b=b, c_steps=cg_padded // b.block_c,
                               k_steps=kg_padded // b.block_k)
    out = _launch(kernel, x, w, d, b, G * kg_padded, interpret, "conv2d_nhwc_implicit_gemm")
    out = out.reshape(d.N, d.OH, -1, G, kg_padded)[:, :, :d.OW, :, :d.Kg]
    return out.reshape(d.N, d.OH, d.OW, d.K)


@functools.partial(jax.jit, static_argnames=("d", "b", "interpret"))
def _depthwise_conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes, interpret: bool):
    m, taps = d.Kg, d.KH * d.KW
    c_padded = round_up(d.C, b.block_k)
    x = _pad_input(x, d, b, 1, b.block_k)
    # w [KH, KW, 1, C*m] (filter j of channel c at c*m + j) -> [taps, m*Cp] (at j*Cp + c).
    w = w.reshape(taps, d.C, m).transpose(0, 2, 1)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, c_padded - d.C))).reshape(taps, m * c_padded)
    kernel = functools.partial(_depthwise_kernel, d=d, b=b, c_blocks=c_padded // b.block_k)
    out = _launch(kernel, x, w, d, b, m * c_padded, interpret, "conv2d_nhwc_depthwise")
    out = out.reshape(d.N, d.OH, -1, m, c_padded)[:, :, :d.OW, :, :d.C]
    return out.transpose(0, 1, 2, 4, 3).reshape(d.N, d.OH, d.OW, d.K)


def conv2d(x: jax.Array, w: jax.Array, stride=1, padding=0, dilation=1, groups=1, *,
           block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C // groups, K] (HWIO) -> [N, OH, OW, K] in x's
    dtype; output channel k reads input channels of group k // (K // groups)."""
    d = contract.conv2d_args(x, w, stride, padding, dilation, "jax", groups)
    b = block_sizes or BlockSizes.for_dims(d)
    for name in ("block_ow", "block_c", "block_k"):
        size = getattr(b, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    launcher = _depthwise_conv2d if _is_depthwise(d) else _conv2d
    return launcher(x, w, d=d, b=b, interpret=interpret())


registry.register("conv2d", "pallas", framework="jax", kind="hand", backend="Pallas",
                  reset=jax.clear_caches, tags=tags())(conv2d)
