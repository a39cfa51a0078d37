"""attention and conv2d: every registered implementation (stock ones included) against float64 on
odd shapes in every dtype, through the harness's own checking path. The hand-written kernels have
deeper tests of their own (gradients, poisoned outputs, strides) in test_<op>_kernels.py."""
import jax
import pytest

from harness.cases import DTYPES, Case
from kernels import registry
from tests.checking import skip_if_no_kernel, wrong_gradients, wrong_result


def _attn(B, H, Hkv, Sq, Sk, D, causal):
    return Case("attention", f"t_b{B}h{H}kv{Hkv}_q{Sq}k{Sk}d{D}{'c' if causal else ''}",
                dict(B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, causal=causal))


ATTENTION = [_attn(1, 2, 2, 1, 1, 16, False), _attn(2, 4, 2, 37, 61, 32, True),
             _attn(1, 3, 1, 61, 23, 64, True), _attn(1, 2, 2, 130, 130, 128, True),
             _attn(1, 2, 1, 17, 70, 80, False),
             # one query, one key, one head dim: XLA:CPU's bf16 attention failed here
             _attn(1, 1, 1, 1, 1, 1, True)]


def _conv(N, H, W, C, K, KH, KW, stride, padding, dilation, groups=1):
    return Case("conv2d", f"t_{N}_{H}x{W}x{C}_{KH}x{KW}x{K}_s{stride}_p{padding}_d{dilation}"
                f"_g{groups}", dict(N=N, H=H, W=W, C=C, K=K, KH=KH, KW=KW, stride=stride,
                                    padding=padding, dilation=dilation, groups=groups))


CONV = [_conv(1, 1, 1, 1, 1, 1, 1, 1, 0, 1), _conv(2, 11, 7, 3, 5, 3, 5, 1, (1, 2), 1),
        _conv(3, 13, 13, 5, 1, 3, 3, 2, 1, 2), _conv(1, 17, 19, 16, 24, 3, 3, (3, 4), 1, (3, 1)),
        _conv(2, 9, 9, 33, 17, 1, 1, 2, 0, 1),
        # grouped: depthwise (groups = C) with 3 filters per channel, stride 2 and a 5x3
        # kernel; 3 groups of 4 -> 2 channels, dilation 2 (the hand-written kernels' own tests
        # have more)
        _conv(1, 15, 16, 6, 18, 5, 3, 2, (2, 1), 1, groups=6),
        _conv(1, 13, 9, 12, 6, 3, 3, 1, 2, 2, groups=3),
        # every output column reads padding only (all zeros): in bf16 torch's CPU convolution
        # through oneDNN killed the process here, torch.compile's too
        _conv(3, 4, 1, 5, 7, 2, 1, 2, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", registry.impls("attention"))
def test_attention_matches_float64(impl, case, dtype):
    try:
        wrong = wrong_result("attention", impl, case, dtype)
    except NotImplementedError as e:
        skip_if_no_kernel(e)
    assert not wrong, f"{impl} {case.name} {dtype}: {wrong}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", registry.impls("conv2d"))
def test_conv2d_matches_float64(impl, case, dtype):
    wrong = wrong_result("conv2d", impl, case, dtype)
    assert not wrong, f"{impl} {case.name} {dtype}: {wrong}"


JAX_IMPLS = [(op, name) for op in registry.ops() for name in registry.impls(op)
             if registry.get(op, name).framework == "jax"]


@pytest.mark.parametrize("op, impl", JAX_IMPLS, ids=lambda x: x)
def test_jax_implementations_with_64_bit_mode_on(op, impl):
    """Under jax_enable_x64 a Python int beside an int32 grid index becomes int64, and lax.div
    refuses the pair: pallas attention (causal) and conv2d raised TypeError on float32 inputs,
    as did pallas_tpu's. Float32 inputs work as with the mode off, and attention's gradients."""
    case = {"attention": ATTENTION[1], "conv2d": CONV[1],
            "matmul": Case("matmul", "t_17x31x13", dict(M=17, K=31, N=13))}[op]
    with jax.enable_x64(True):
        try:
            wrong = wrong_result(op, impl, case, "float32")
        except NotImplementedError as e:  # xla_cudnn: 16-bit only
            skip_if_no_kernel(e)
        if op == "attention" and not wrong:
            try:
                wrong = wrong_gradients(op, impl, case, "float32")
            except NotImplementedError as e:  # a forward-only kernel (pallas_tpu) says so
                assert "no backward" in str(e)
    assert not wrong, f"{impl} {case.name} with jax_enable_x64: {wrong}"


def test_jax_cudnn_attention_refuses_float32_as_a_missing_kernel():
    """cuDNN's fused attention has 16-bit kernels only: xla_cudnn (a GPU's) says so, as a pinned
    SDPA backend does, and the tests skip it there; the XLA one takes every dtype."""
    import jax.numpy as jnp

    from kernels import contract, stock_xla

    with pytest.raises(contract.NoKernel, match=r"^cuDNN attention \(JAX\) has no kernel for "
                                                  r"float32: float16 and bfloat16 only"):
        stock_xla.has_kernel("cudnn", jnp.dtype("float32"))
    for dtype in ("float16", "bfloat16"):
        stock_xla.has_kernel("cudnn", jnp.dtype(dtype))
    stock_xla.has_kernel("xla", jnp.dtype("float32"))


def test_jax_cudnn_attention_refuses_a_shape_as_a_missing_kernel(monkeypatch):
    """JAX's cuDNN attention refuses a head dim that is not a multiple of 8 (the D=1 case here)
    with a NotImplementedError while tracing, which a GPU only shows: xla_cudnn's call and its
    timed native-layout call (registered on a GPU only: built here as the GPU builds them, the
    refusal simulated) name it a missing kernel, skipped, as float32 is; the XLA one's
    NotImplementedError stays a failure."""
    import jax.numpy as jnp

    from kernels import contract, stock_xla

    built = {}

    def capture(op, name, **extra):
        return lambda run: built.setdefault(name, (run, extra["layout"].fn))

    def refuses(*args):
        raise NotImplementedError("The head dim must be <= 256 and a multiple of 8, but got 1.")

    monkeypatch.setattr(stock_xla.registry, "register", capture)
    monkeypatch.setattr(stock_xla, "_attention", refuses)
    monkeypatch.setattr(stock_xla, "_attention_bsnd", refuses)
    stock_xla._register_attention("probe_cudnn", "cudnn")
    stock_xla._register_attention("probe_xla", "xla")
    q = jnp.ones((1, 1, 1, 1), jnp.float16)
    for call in built["probe_cudnn"]:
        with pytest.raises(contract.NoKernel, match=r"^cuDNN attention \(JAX\) has no kernel "
                                                      r"for these inputs: The head dim must be"):
            call(q, q, q)
    for call in built["probe_xla"]:
        with pytest.raises(NotImplementedError) as raised:
            call(q, q, q)
        assert not isinstance(raised.value, contract.NoKernel)
