"""Hand-written Pallas conv2d: implicit GEMM in NHWC with an fp32 accumulator.

Each program computes a patch of output pixels, `block_oh` rows of `block_ow` columns of one
image (the GEMM's M tile, 64 pixels by default whatever the layer's width), times `block_k` output
channels. For every kernel tap and channel block it reads the strided input tile
x[n, ih0 : ih0 + sh*block_oh : sh, iw0 : iw0 + sw*block_ow : sw, c-block] straight from the
padded input and multiplies it with the matching [block_c, block_k] weight tile, so no patch
matrix is ever stored.

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
extra zero rows below and columns on the right so the last (partial) output patch reads in
bounds, and channels and output channels up to block multiples (zeros add nothing).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import contract, registry
from kernels.pallas._common import (forward_only, gpu_compiler_params, idiv, interpret,
                                    round_up, tags)

def _fit(n: int, cap: int) -> int:
    # Power-of-two blocks for the Triton lowering, >= 16 because its dot needs every dim >= 16.
    return min(cap, max(16, pl.next_power_of_2(n)))


# Output pixels per program. A row of a late ResNet layer is 7 or 14 pixels wide: one row per
# program gave 16-pixel tiles, which Hopper's warpgroup MMA (64 rows at least) cannot take.
PATCH_PIXELS = 64


def _is_depthwise(d: contract.Conv2dDims) -> bool:
    # groups == 1 with C == 1 is depthwise too, but stays on the GEMM kernel as before.
    return d.groups > 1 and d.Cg == 1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Depthwise, block_k is the channels per program and block_c is unused (no reduction
    over channels)."""

    block_ow: int  # output columns per program
    block_c: int  # input channels of one group per reduction step
    block_k: int  # output channels of one group per program: the GEMM N tile
    num_warps: int = 4
    num_stages: int = 2
    block_oh: int = 1  # output rows per program; block_oh x block_ow pixels: the GEMM M tile

    @classmethod
    def for_dims(cls, d: contract.Conv2dDims) -> BlockSizes:
        """PATCH_PIXELS output pixels a program, as many whole rows of the layer's (power-of-two
        rounded) width as fit; channel blocks no larger than the problem needs."""
        block_ow = min(PATCH_PIXELS, pl.next_power_of_2(d.OW))
        block_oh = min(PATCH_PIXELS // block_ow, pl.next_power_of_2(d.OH))
        block_ow = max(block_ow, 16 // block_oh)  # the dot's M tile, 16 at least
        block_k = _fit(d.C, 64) if _is_depthwise(d) else _fit(d.Kg, 64)
        return cls(block_ow=block_ow, block_c=_fit(d.Cg, 32), block_k=block_k,
                   block_oh=block_oh)


def _patch(row_block, d: contract.Conv2dDims, b: BlockSizes):
    """(image, first output row) of the patch that grid row `row_block` computes."""
    n, oh_block = idiv(row_block, pl.cdiv(d.OH, b.block_oh))
    return n, oh_block * b.block_oh


def _x_tile(x_ref, n, oh0, ow_block, tap, c0, width: int, d: contract.Conv2dDims, b: BlockSizes):
    """The [block_oh * block_ow, width] input tile that kernel tap `tap` multiplies for the output
    patch whose first row is oh0, pixels in row-major order: every sh-th row and sw-th column of
    the padded input, channels [c0, c0 + width)."""
    (sh, sw), (dh, dw) = d.stride, d.dilation
    kh, kw = idiv(tap, d.KW)
    ih0 = oh0 * sh + kh * dh
    cols = pl.ds(ow_block * (b.block_ow * sw) + kw * dw, b.block_ow, stride=sw)
    if b.block_oh == 1:
        # A 2-D load, which Triton's pipeliner stages through shared memory straight into the
        # dot; a 3-D one reshaped gets one buffer and a second trip through shared memory.
        return x_ref[n, ih0, cols, pl.ds(c0, width)]
    tile = x_ref[n, pl.ds(ih0, b.block_oh, stride=sh), cols, pl.ds(c0, width)]
    return tile.reshape(b.block_oh * b.block_ow, width)


def _conv2d_kernel(x_ref, w_ref, o_ref, *, d: contract.Conv2dDims, b: BlockSizes, c_steps: int,
                   k_steps: int):
    # x_ref: the whole padded input [N, Hp, Wp, G*Cgp]; w_ref: the whole [KH*KW, G*Cgp, Kgp]
    # weight; o_ref: this program's [block_oh, block_ow, block_k] output block.
    row_block, ow_block, gk_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, oh0 = _patch(row_block, d, b)
    g, k_block = idiv(gk_block, k_steps)
    k0 = pl.multiple_of(k_block * b.block_k, b.block_k)
    group_c0 = g * (c_steps * b.block_c)  # the group's first input channel (in x and w rows)

    def step(i, acc):
        # One flat loop over (tap, channel block), as in the Triton kernel.
        tap, c_block = idiv(i, c_steps)
        c0 = pl.multiple_of(group_c0 + c_block * b.block_c, b.block_c)
        x = _x_tile(x_ref, n, oh0, ow_block, tap, c0, b.block_c, d, b)
        wt = w_ref[tap, pl.ds(c0, b.block_c), pl.ds(k0, b.block_k)]
        # HIGHEST makes fp32 dots true fp32 (not TF32) like the Triton kernel's default; it changes
        # nothing for 16-bit inputs. Products accumulate in fp32 for accuracy.
        return acc + jnp.dot(x, wt, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)

    acc = jnp.zeros((b.block_oh * b.block_ow, b.block_k), jnp.float32)
    acc = lax.fori_loop(0, d.KH * d.KW * c_steps, step, acc)
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _depthwise_kernel(x_ref, w_ref, o_ref, *, d: contract.Conv2dDims, b: BlockSizes,
                      c_blocks: int):
    # x_ref: the whole padded input [N, Hp, Wp, Cp]; w_ref: the whole [KH*KW, m*Cp] weight, its
    # columns laid out like the output's; o_ref: this program's [block_oh, block_ow, block_k]
    # output block.
    row_block, ow_block, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, oh0 = _patch(row_block, d, b)
    k0 = pl.multiple_of(k_block * b.block_k, b.block_k)
    # Output column j*Cp + c reads input channel c, so block k_block reads channel block
    # k_block % c_blocks.
    c0 = pl.multiple_of(idiv(k_block, c_blocks)[1] * b.block_k, b.block_k)

    def step(tap, acc):
        x = _x_tile(x_ref, n, oh0, ow_block, tap, c0, b.block_k, d, b)
        wt = w_ref[tap, pl.ds(k0, b.block_k)]
        return acc + x.astype(jnp.float32) * wt.astype(jnp.float32)[None, :]

    acc = jnp.zeros((b.block_oh * b.block_ow, b.block_k), jnp.float32)
    acc = lax.fori_loop(0, d.KH * d.KW, step, acc)
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _pad_input(x, d: contract.Conv2dDims, b: BlockSizes, groups: int, multiple: int):
    """x with the conv's zero padding, zero rows below and columns on the right so the last
    output patch's last tap reads in bounds, and each of `groups` channel groups zero-padded to
    a `multiple`."""
    (ph, pw), (sh, sw), (dh, dw) = d.padding, d.stride, d.dilation
    height = (round_up(d.OH, b.block_oh) - 1) * sh + (d.KH - 1) * dh + 1
    width = (round_up(d.OW, b.block_ow) - 1) * sw + (d.KW - 1) * dw + 1
    cg = d.C // groups
    x = x.reshape(d.N, d.H, d.W, groups, cg)
    x = jnp.pad(x, ((0, 0), (ph, max(ph, height - d.H - ph)), (pw, max(pw, width - d.W - pw)),
                    (0, 0), (0, round_up(cg, multiple) - cg)))
    return x.reshape(*x.shape[:3], -1)


def _launch(kernel, x, w, d: contract.Conv2dDims, b: BlockSizes, channels: int, interpret: bool,
            name: str):
    """Runs `kernel` on a grid of (image and output row block, output column block, output
    channel block) and returns its [N, OH padded, OW padded, channels] output."""
    oh_padded, ow_padded = round_up(d.OH, b.block_oh), round_up(d.OW, b.block_ow)
    row_blocks = oh_padded // b.block_oh
    params = None if interpret else gpu_compiler_params(b.num_warps, b.num_stages)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d.N, oh_padded, ow_padded, channels), x.dtype),
        grid=(d.N * row_blocks, ow_padded // b.block_ow, channels // b.block_k),
        # Inputs stay whole (the kernel gathers strided tiles itself); outputs are blocked.
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((pl.squeezed, b.block_oh, b.block_ow, b.block_k),
                               lambda r, j, k: (r // row_blocks, r % row_blocks, j, k)),
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
    out = out.reshape(*out.shape[:3], G, kg_padded)[:, :d.OH, :d.OW, :, :d.Kg]
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
    out = out.reshape(*out.shape[:3], m, c_padded)[:, :d.OH, :d.OW, :, :d.C]
    return out.transpose(0, 1, 2, 4, 3).reshape(d.N, d.OH, d.OW, d.K)


def conv2d(x: jax.Array, w: jax.Array, stride=1, padding=0, dilation=1, groups=1, *,
           block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C // groups, K] (HWIO) -> [N, OH, OW, K] in x's
    dtype; output channel k reads input channels of group k // (K // groups)."""
    d = contract.conv2d_args(x, w, stride, padding, dilation, "jax", groups)
    b = block_sizes or BlockSizes.for_dims(d)
    for name in ("block_oh", "block_ow", "block_c", "block_k"):
        size, least = getattr(b, name), 1 if name in ("block_oh", "block_ow") else 16
        if size < least or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= {least}")
    if b.block_oh * b.block_ow < 16:
        raise ValueError(f"block_oh * block_ow = {b.block_oh * b.block_ow} output pixels must "
                         "be >= 16")
    launcher = _depthwise_conv2d if _is_depthwise(d) else _conv2d
    return _forward_only(functools.partial(launcher, d=d, b=b, interpret=interpret()), x, w)


_forward_only = forward_only("the pallas conv2d")


registry.register("conv2d", "pallas", framework="jax", kind="hand", backend="Pallas",
                  reset=jax.clear_caches, tags=tags())(conv2d)
