"""The Pallas TPU kernels (kernels/pallas_tpu) in TPU interpret mode, which simulates the TPU's
memory spaces on CPU: every run has the race detector on, two simulated TensorCores sharing the
"parallel" grid dims in a shuffled order, and every buffer starting as NaN, so an unwritten output
element (NaN, or a stale value of another block) or a reduction marked "parallel" fails. Each
output is judged against float64 by relative Frobenius error, within 4 x max(torch's own error in
that dtype on the same inputs, unit roundoff).

float16 runs in interpret mode (the CPU computes it); on a real TPU the kernels refuse it with a
TypeError, tested here by pretending to be on one. What needs a TPU and is not run here: Mosaic's
compilation proper (layouts, VMEM limits, the (8, 128) tiling rules), checked only as far as
lowering to a Mosaic custom call.
"""
import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from harness import check, inputs
from harness.bench import References
from harness.cases import DTYPES, Case
from kernels.pallas_tpu import _common
from kernels.pallas_tpu import attention as tpu_attention
from kernels.pallas_tpu import conv2d as tpu_conv2d
from kernels.pallas_tpu import matmul as tpu_matmul

KERNELS = {"matmul": tpu_matmul.matmul, "attention": tpu_attention.attention,
           "conv2d": tpu_conv2d.conv2d}
_refs = References("cpu", keep=2)


def _run_interpreted(fn, *args, **kwargs):
    """Runs a kernel in TPU interpret mode and fails if the race detector flagged anything."""
    params = _common.interpret_params()
    assert params is not None and params.detect_races and params.uninitialized_memory == "nan"
    out = jax.block_until_ready(fn(*args, **kwargs))
    assert not _common.races_found(), "the TPU interpreter's race detector reported a race"
    return out


def _check(case: Case, dtype: str, **kwargs):
    arrays = inputs.make(case, dtype, "jax")
    out = _run_interpreted(KERNELS[case.op], *arrays.values(), **inputs.options(case), **kwargs)
    ref, stock = _refs.get(case, dtype, "fwd")
    assert str(out.dtype) == dtype
    wrong = check.wrong(check.error(out, ref), dtype, stock)
    assert not wrong, f"{case.key} {dtype}: {wrong}"


# ---------------------------------------------------------------- matmul
def _mm(M, K, N):
    return Case("matmul", f"tpu_{M}x{K}x{N}", {"M": M, "K": K, "N": N})


# 1x1x1, primes, every dim past its block cap (256, 256, 512) and not a multiple of it, K=1
MATMUL = [_mm(1, 1, 1), _mm(17, 31, 13), _mm(300, 700, 290), _mm(5, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MATMUL, ids=lambda c: c.name)
def test_matmul(case, dtype):
    _check(case, dtype)


# ---------------------------------------------------------------- attention
def _attn(B, H, Hkv, Sq, Sk, D, causal):
    return Case("attention", f"tpu_b{B}h{H}kv{Hkv}_q{Sq}k{Sk}d{D}{'_causal' if causal else ''}",
                dict(B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, causal=causal))


ATTENTION = [
    _attn(1, 1, 1, 1, 1, 16, False),  # one query, one key
    _attn(1, 4, 1, 1, 67, 64, False),  # decode step, multi-query
    _attn(2, 4, 2, 37, 61, 32, True),  # GQA, causal, Sq < Sk, primes
    _attn(1, 2, 1, 300, 270, 80, True),  # two q and two k blocks, a skipped block, Sq > Sk, D=80
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_attention(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [(256, 128), (48, 128)], ids=lambda b: f"q{b[0]}k{b[1]}")
def test_attention_with_query_blocks_across_key_blocks(blocks, dtype):
    """`block_sizes` other than the caps: a query block spanning two key blocks, or crossing
    a key block's edge, under the causal mask (with the caps bq = bk wherever there are several
    query blocks, so only this reaches the last key block a query block needs)."""
    block_q, block_k = blocks
    _check(_attn(1, 2, 1, 300, 300, 64, True), dtype,
           block_sizes=tpu_attention.BlockSizes(block_q=block_q, block_k=block_k))


def test_attention_has_no_backward():
    q = jnp.ones((1, 1, 8, 16), jnp.float32)
    with pytest.raises(NotImplementedError, match="no backward"):
        jax.grad(lambda q: tpu_attention.attention(q, q, q).sum())(q)


# ---------------------------------------------------------------- conv2d
def _conv(N, H, W, C, K, KH, KW, stride=1, padding=0, dilation=1):
    return Case("conv2d", f"tpu_{N}_{H}x{W}x{C}_{KH}x{KW}x{K}_s{stride}_p{padding}_d{dilation}",
                dict(N=N, H=H, W=W, C=C, K=K, KH=KH, KW=KW, stride=stride, padding=padding,
                     dilation=dilation))


CONV = [
    _conv(1, 1, 1, 1, 1, 1, 1),
    _conv(2, 11, 7, 3, 1, 3, 5, 1, (1, 2)),  # C=3, K=1, non-square kernel and padding
    _conv(1, 13, 12, 5, 7, 3, 3, 2, 1, 2),  # stride 2, dilation 2
    _conv(1, 17, 19, 16, 24, 3, 3, (3, 2), 1, (1, 3)),  # stride 3x2, dilation 1x3
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV, ids=lambda c: c.name)
def test_conv2d(case, dtype):
    _check(case, dtype)


def test_conv2d_several_channel_blocks():
    """C and K past their 256 caps: two reduction steps per tap row and two output blocks."""
    _check(_conv(1, 6, 5, 300, 260, 2, 3, 1, 1), "float32")


# ---------------------------------------------------------------- the interpreter's checks work
def test_race_detector_is_live():
    """Two grid points marked "parallel" writing one output block: a race the detector must
    report, so the races_found() checks above are not vacuous."""
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    spec = pl.BlockSpec((8, 128), lambda i: (0, 0))
    racy = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          grid=(2,), in_specs=[spec], out_specs=spec,
                          compiler_params=_common.compiler_params(("parallel",)),
                          interpret=_common.interpret_params())
    jax.block_until_ready(racy(jnp.ones((8, 128), jnp.float32)))
    assert _common.races_found()


def test_unwritten_output_is_nan():
    """An output block left unwritten reads back as NaN (the first block: its VMEM buffer was never
    filled) or as a stale copy of an earlier block (the same buffer is reused), and either fails
    the comparison with the reference."""
    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
    half = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
                          grid=(2,), in_specs=[spec], out_specs=spec,
                          interpret=_common.interpret_params())
    out = half(jnp.ones((16, 128), jnp.float32))
    assert bool(jnp.all(jnp.isnan(out[:8]))) and bool(jnp.all(out[8:] == 1))


# ---------------------------------------------------------------- what a TPU would see
def _small_inputs(op, dtype):
    if op == "matmul":
        return (jnp.ones((37, 300), dtype), jnp.ones((300, 129), dtype)), {}
    if op == "attention":
        return (jnp.ones((1, 4, 61, 80), dtype), jnp.ones((1, 2, 300, 80), dtype),
                jnp.ones((1, 2, 300, 80), dtype)), {"causal": True}
    return (jnp.ones((2, 17, 19, 5), dtype), jnp.ones((3, 3, 5, 7), dtype)), \
        {"stride": (2, 3), "padding": 1, "dilation": (2, 1)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", sorted(KERNELS))
def test_lowers_to_mosaic(op, dtype, monkeypatch):
    """Lowering for a TPU (interpret off) runs Pallas' Mosaic lowering of the kernel body and the
    index maps on this CPU, catching ops Mosaic cannot express; Mosaic's own compilation needs
    libtpu and is not run."""
    module = {"matmul": tpu_matmul, "attention": tpu_attention, "conv2d": tpu_conv2d}[op]
    monkeypatch.setattr(module, "interpret_params", lambda: None)
    args, kwargs = _small_inputs(op, dtype)
    jax.clear_caches()  # the jitted launchers must retrace with interpret off, and later tests
    try:  # must not find that trace
        lowered = jax.jit(lambda *a: KERNELS[op](*a, **kwargs)).trace(*args).lower(
            lowering_platforms=("tpu",))
    finally:
        jax.clear_caches()
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("op", sorted(KERNELS))
def test_float16_refused_on_tpu(op, monkeypatch):
    monkeypatch.setattr(_common, "on_tpu", lambda: True)
    args, kwargs = _small_inputs(op, "float16")
    with pytest.raises(TypeError, match="float16"):
        KERNELS[op](*args, **kwargs)

