"""Hand-written Pallas conv2d: implicit GEMM in NHWC with an fp32 accumulator.

Each program computes one output row segment: `block_ow` output pixels of one (n, oh) row times
`block_k` output channels. For every kernel tap and channel block it reads the strided input tile
x[n, ih, iw0 : iw0 + sw*block_ow : sw, c-block] straight from the padded input and multiplies it
with the matching [block_c, block_k] weight tile, so no patch matrix is ever stored.

The wrapper does the padding that keeps the kernel free of masks: the conv's own zero padding,
extra zero columns on the right so the last (partial) output block reads in bounds, and channels
and output channels up to block multiples (zeros add nothing to the dot).
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_ow: int  # output pixels per program (one output row segment): the GEMM M tile
    block_c: int  # input channels per reduction step
    block_k: int  # output channels per program: the GEMM N tile
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_dims(cls, d: contract.Conv2dDims) -> BlockSizes:
        """Blocks no larger than the problem needs (less padding for small OW, C, K)."""
        return cls(block_ow=_fit(d.OW, 64), block_c=_fit(d.C, 32), block_k=_fit(d.K, 64))


def _divmod(a, b: int):
    # Indices here are never negative, so truncating division is floor division; lax.div/rem lower
    # to single Triton ops where jnp's floor-mod emits sign fix-ups the Triton lowering rejects.
    return lax.div(a, b), lax.rem(a, b)


def _conv2d_kernel(x_ref, w_ref, o_ref, *, d: contract.Conv2dDims, b: BlockSizes, c_steps: int):
    # x_ref: the whole padded input [N, Hp, Wp, Cp]; w_ref: the whole [KH*KW, Cp, Kp] weight;
    # o_ref: this program's [block_ow, block_k] output block.
    row, ow_block, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, oh = _divmod(row, d.OH)
    (sh, sw), (dh, dw) = d.stride, d.dilation
    k0 = pl.multiple_of(k_block * b.block_k, b.block_k)

    def step(i, acc):
        # One flat loop over (tap, channel block), as in the Triton kernel.
        tap, c_block = _divmod(i, c_steps)
        kh, kw = _divmod(tap, d.KW)
        c0 = pl.multiple_of(c_block * b.block_c, b.block_c)
        iw0 = ow_block * (b.block_ow * sw) + kw * dw
        x = x_ref[n, oh * sh + kh * dh, pl.ds(iw0, b.block_ow, stride=sw), pl.ds(c0, b.block_c)]
        wt = w_ref[tap, pl.ds(c0, b.block_c), pl.ds(k0, b.block_k)]
        # HIGHEST makes fp32 dots true fp32 (not TF32) like the Triton kernel's default; it changes
        # nothing for 16-bit inputs. Products accumulate in fp32 for accuracy.
        return acc + jnp.dot(x, wt, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)

    acc = jnp.zeros((b.block_ow, b.block_k), jnp.float32)
    acc = lax.fori_loop(0, d.KH * d.KW * c_steps, step, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("d", "b", "interpret"))
def _conv2d(x, w, *, d: contract.Conv2dDims, b: BlockSizes, interpret: bool):
    (sh, sw), (ph, pw), (dh, dw) = d.stride, d.padding, d.dilation
    ow_padded = round_up(d.OW, b.block_ow)
    c_padded, k_padded = round_up(d.C, b.block_c), round_up(d.K, b.block_k)
    # Input columns read by the last output block's last tap; the right edge is padded to cover it.
    width = (ow_padded - 1) * sw + (d.KW - 1) * dw + 1
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, max(pw, width - d.W - pw)), (0, c_padded - d.C)))
    w = jnp.pad(w, ((0, 0), (0, 0), (0, c_padded - d.C), (0, k_padded - d.K)))
    w = w.reshape(d.KH * d.KW, c_padded, k_padded)

    kernel = functools.partial(_conv2d_kernel, d=d, b=b, c_steps=c_padded // b.block_c)
    params = None if interpret else gpu_compiler_params(b.num_warps, b.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d.N * d.OH, ow_padded, k_padded), x.dtype),
        grid=(d.N * d.OH, ow_padded // b.block_ow, k_padded // b.block_k),
        # Inputs stay whole (the kernel gathers strided tiles itself); outputs are blocked.
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((pl.squeezed, b.block_ow, b.block_k), lambda r, j, k: (r, j, k)),
        compiler_params=params,
        interpret=interpret,
        name="conv2d_nhwc_implicit_gemm",
    )(x, w)
    return out.reshape(d.N, d.OH, ow_padded, k_padded)[:, :, :d.OW, :d.K]


def conv2d(x: jax.Array, w: jax.Array, stride=1, padding=0, dilation=1, *,
           block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [N, H, W, C] (NHWC) conv w [KH, KW, C, K] (HWIO) -> [N, OH, OW, K] in x's dtype."""
    d = contract.conv2d_args(x, w, stride, padding, dilation, "jax")
    b = block_sizes or BlockSizes.for_dims(d)
    for name in ("block_ow", "block_c", "block_k"):
        size = getattr(b, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    return _conv2d(x, w, d=d, b=b, interpret=interpret())


registry.register("conv2d", "pallas", framework="jax", kind="hand", backend="Pallas",
                  reset=jax.clear_caches, tags=tags())(conv2d)
