"""Stock JAX ops under jax.jit: jnp.matmul, jax.nn.dot_product_attention (XLA and cuDNN),
lax.conv_general_dilated. Inputs arrive in the suite's layouts; fp32 inputs use HIGHEST precision
(true fp32, like torch's default).

16-bit matmuls and convolutions are written as a JAX user writes them, with a 16-bit result, and
XLA accumulates them in fp32 on its own (on CPU the error against float64 is the same as with an
fp32 result, measured at reductions of 64 to 8192; on a GPU the correctness tests check it). An
fp32 result converted afterwards (`preferred_element_type`) cost a pass torch.matmul and F.conv2d
do not make: in the 2026-11-23 H100 run XLA's memory analysis read 3x the bf16 output's bytes
(an fp32 array beside it) for the three largest matmuls, and for the conv layers the output plus
fp32 copies of output, input and weights, as if the convolution had run in fp32."""
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
    return jnp.matmul(a, b, precision=_precision(a))


@registry.register("matmul", "xla", framework="jax", kind="stock", backend="XLA",
                   reset=jax.clear_caches)
def matmul(a, b):
    contract.matmul_args(a, b, "jax")
    return _matmul(a, b)


def _bsnd(t):
    """[B, heads, S, D] (the suite's layout) <-> [B, S, heads, D] (dot_product_attention's)."""
    return jnp.swapaxes(t, 1, 2)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "implementation"))
def _attention_bsnd(q, k, v, causal, scale, implementation):
    """jax.nn.dot_product_attention in its own layout, [B, S, heads, D] in and out."""
    def widened(t):
        # XLA:CPU has no fp16 x fp16 -> fp32 dot_general, which jax.nn.dot_product_attention asks
        # for, and its bf16 one fails where the dot degenerates ("Algorithm not supported by the
        # ElementalIrEmitter: ALG_DOT_BF16_BF16_F32" at B = H = Sq = Sk = 1, and at some shapes
        # with a head dim of 1): on CPU only, 16-bit inputs are widened to fp32 (exactly) and the
        # output rounded back.
        if t.dtype in (jnp.float16, jnp.bfloat16) and not _ON_GPU:
            return t.astype(jnp.float32)
        return t
    # fp32 in true fp32, like the other stock ops (on a GPU, XLA's default for fp32 dots is TF32)
    precision = (jax.default_matmul_precision("highest") if q.dtype == jnp.float32
                 else contextlib.nullcontext())
    with precision:
        out = jax.nn.dot_product_attention(widened(q), widened(k), widened(v), scale=scale,
                                           is_causal=causal, implementation=implementation)
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "implementation"))
def _attention(q, k, v, causal, scale, implementation):
    """The same in the suite's layout, the transposes inside the one jitted function."""
    return _bsnd(_attention_bsnd(_bsnd(q), _bsnd(k), _bsnd(v), causal, scale, implementation))


CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def has_kernel(implementation: str, dtype) -> None:
    """cuDNN's fused attention takes 16-bit inputs only: float32 is refused as a pinned SDPA
    backend refuses what it has no kernel for (contract.NoKernel, which the benchmarks record as
    skipped), not with the error of whichever JAX layer meets it first."""
    if implementation == "cudnn" and dtype not in CUDNN_DTYPES:
        raise contract.NoKernel(f"cuDNN attention (JAX) has no kernel for {dtype}: float16 and "
                                f"bfloat16 only")


@contextlib.contextmanager
def cudnn_limits(implementation: str):
    """JAX's cuDNN attention refuses the shapes it has no kernel for (a head dim over 256 or not
    a multiple of 8, among others) with a NotImplementedError while tracing: the same limit as
    has_kernel's, a NoKernel."""
    try:
        yield
    except contract.NoKernel:
        raise
    except NotImplementedError as e:
        if implementation != "cudnn":
            raise
        raise contract.NoKernel(f"cuDNN attention (JAX) has no kernel for these inputs: {e}") \
            from e


def _register_attention(name, implementation, **extra):
    """The public call takes and returns the suite's layout, converting around the op; the bench
    times the op in its own layout, converted outside the timed call (registry.Layout), as a JAX
    model keeps its activations in [B, S, heads, D] and never pays these transposes."""
    def run(q, k, v, causal=False, scale=None):
        dims = contract.attention_args(q, k, v, causal, scale, "jax")
        has_kernel(implementation, q.dtype)
        with cudnn_limits(implementation):
            return _attention(q, k, v, dims.causal, dims.scale, implementation)

    def native(q, k, v, causal=False, scale=None):
        # the contract's checks on the suite's view of the arrays (shapes only, under jit)
        dims = contract.attention_args(_bsnd(q), _bsnd(k), _bsnd(v), causal, scale, "jax")
        has_kernel(implementation, q.dtype)
        with cudnn_limits(implementation):
            return _attention_bsnd(q, k, v, dims.causal, dims.scale, implementation)

    registry.register("attention", name, framework="jax", kind="stock", reset=jax.clear_caches,
                      layout=registry.Layout(native, _bsnd, _bsnd, "q, k, v, out [B, S, heads, D]"),
                      **extra)(run)


_register_attention("xla", "xla", backend="XLA")
_register_attention("xla_cudnn", "cudnn", backend="cuDNN (JAX)", enabled=_ON_GPU,
                    reason="needs a CUDA GPU")


@functools.partial(jax.jit, static_argnames=("stride", "padding", "dilation", "groups"))
def _conv2d(x, w, stride, padding, dilation, groups):
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding], rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=_precision(x))


@registry.register("conv2d", "xla", framework="jax", kind="stock", backend="XLA",
                   reset=jax.clear_caches)
def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1):
    dims = contract.conv2d_args(x, w, stride, padding, dilation, "jax", groups)
    return _conv2d(x, w, dims.stride, dims.padding, dims.dilation, dims.groups)
