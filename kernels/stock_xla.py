"""Stock JAX ops under jax.jit: jnp.matmul, jax.nn.dot_product_attention (XLA and cuDNN),
lax.conv_general_dilated. Inputs arrive in the suite's layouts; fp32 inputs use HIGHEST precision
(true fp32, like torch's default) and every op accumulates in fp32."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import contract, registry

_ON_GPU = jax.default_backend() == "gpu"


def _precision(x):
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


@jax.jit
def _matmul(a, b):
    out = jnp.matmul(a, b, precision=_precision(a), preferred_element_type=jnp.float32)
    return out.astype(a.dtype)


@registry.register("matmul", "xla", framework="jax", kind="stock", backend="XLA",
                   reset=jax.clear_caches)
def matmul(a, b):
    contract.matmul_args(a, b, "jax")
    return _matmul(a, b)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "implementation"))
def _attention(q, k, v, causal, scale, implementation):
    # jax.nn.dot_product_attention takes [B, S, heads, D]; the suite's layout is [B, heads, S, D].
    def bsnd(t):
        # XLA:CPU has no fp16 x fp16 -> fp32 dot_general, which jax.nn.dot_product_attention asks
        # for, and its bf16 one fails where the dot degenerates ("Algorithm not supported by the
        # ElementalIrEmitter: ALG_DOT_BF16_BF16_F32" at B = H = Sq = Sk = 1, and at some shapes
        # with a head dim of 1): on CPU only, 16-bit inputs are widened to fp32 (exactly) and the
        # output rounded back.
        if t.dtype in (jnp.float16, jnp.bfloat16) and not _ON_GPU:
            t = t.astype(jnp.float32)
        return jnp.swapaxes(t, 1, 2)
    # fp32 in true fp32, like the other stock ops (on a GPU, XLA's default for fp32 dots is TF32)
    precision = (jax.default_matmul_precision("highest") if q.dtype == jnp.float32
                 else contextlib.nullcontext())
    with precision:
        out = jax.nn.dot_product_attention(bsnd(q), bsnd(k), bsnd(v), scale=scale,
                                           is_causal=causal, implementation=implementation)
    return bsnd(out).astype(q.dtype)


def _attention_impl(implementation):
    def run(q, k, v, causal=False, scale=None):
        dims = contract.attention_args(q, k, v, causal, scale, "jax")
        return _attention(q, k, v, dims.causal, dims.scale, implementation)
    return run


registry.register("attention", "xla", framework="jax", kind="stock", backend="XLA",
                  reset=jax.clear_caches)(_attention_impl("xla"))
registry.register("attention", "xla_cudnn", framework="jax", kind="stock", backend="cuDNN (JAX)",
                  reset=jax.clear_caches, enabled=_ON_GPU,
                  reason="needs a CUDA GPU")(_attention_impl("cudnn"))


@functools.partial(jax.jit, static_argnames=("stride", "padding", "dilation", "groups"))
def _conv2d(x, w, stride, padding, dilation, groups):
    out = lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding], rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=_precision(x), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


@registry.register("conv2d", "xla", framework="jax", kind="stock", backend="XLA",
                   reset=jax.clear_caches)
def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1):
    dims = contract.conv2d_args(x, w, stride, padding, dilation, "jax", groups)
    return _conv2d(x, w, dims.stride, dims.padding, dims.dilation, dims.groups)
