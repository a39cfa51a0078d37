"""Bad input: every implementation rejects it with a ValueError or TypeError naming the argument."""
import numpy as np
import pytest
import torch

from kernels import registry
from tests.checking import DEVICE, skip_if_no_kernel


def _arrays(framework, *shapes, dtype="float32"):
    out = []
    for shape in shapes:
        t = torch.randn(shape).to(getattr(torch, dtype))
        if framework == "jax":
            import jax.numpy as jnp
            t = jnp.asarray(t.float().numpy()).astype(dtype)
        out.append(t)
    return out


def _on_device(arrays):
    """torch tensors where the torch kernels run (the GPU when there is one)."""
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in arrays]


def _numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def _other_framework(framework, x):
    if framework == "torch":
        import jax.numpy as jnp
        return jnp.asarray(np.asarray(x.float()))
    return torch.from_numpy(np.array(x))


MATMUL = registry.impls("matmul")


@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("shapes, error, words", [
    (((4,), (4, 3)), ValueError, ["a", "rank 2"]),
    (((2, 4, 4), (4, 3)), ValueError, ["a", "rank 2"]),
    (((4, 5), (6, 3)), ValueError, ["b", "K=5"]),
    (((0, 5), (5, 3)), ValueError, ["a", ">= 1"]),
    (((4, 5), (5, 0)), ValueError, ["b", ">= 1"]),
], ids=["rank1", "rank3", "inner", "zero_m", "zero_n"])
def test_matmul_shapes(impl, shapes, error, words):
    fn = registry.get("matmul", impl)
    with pytest.raises(error) as e:
        fn(*_arrays(fn.framework, *shapes))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("impl", MATMUL)
def test_matmul_mixed_dtypes(impl):
    fn = registry.get("matmul", impl)
    a, = _arrays(fn.framework, (4, 5), dtype="float16")
    b, = _arrays(fn.framework, (5, 3), dtype="float32")
    with pytest.raises(TypeError, match="b has dtype float32 but a has dtype float16"):
        fn(a, b)


@pytest.mark.parametrize("impl", MATMUL)
def test_matmul_unsupported_dtype(impl):
    fn = registry.get("matmul", impl)
    a = torch.ones(4, 5, dtype=torch.int32)
    b = torch.ones(5, 3, dtype=torch.int32)
    if fn.framework == "jax":
        import jax.numpy as jnp
        a, b = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
    with pytest.raises(TypeError, match="a must have dtype float32, float16 or bfloat16"):
        fn(a, b)


@pytest.mark.parametrize("impl", MATMUL)
def test_matmul_other_framework(impl):
    fn = registry.get("matmul", impl)
    a, b = _arrays(fn.framework, (4, 5), (5, 3))
    expected = "torch.Tensor" if fn.framework == "torch" else "jax.Array"
    with pytest.raises(TypeError, match=f"a must be a {expected}"):
        fn(_other_framework(fn.framework, a), b)


@pytest.mark.parametrize("impl", [n for n in MATMUL
                                  if registry.get("matmul", n).framework == "torch"])
def test_matmul_non_contiguous_is_handled(impl):
    """Transposed and strided views give the right answer (the kernels take strides)."""
    fn = registry.get("matmul", impl)
    a = torch.randn(40, 30, device=DEVICE)[:, ::2]  # [40, 15], column stride 2
    b = torch.randn(9, 15, device=DEVICE).t()  # [15, 9], transposed
    out = fn(a, b)
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-4)


ATTENTION = registry.impls("attention")
CONV = registry.impls("conv2d")


@pytest.mark.parametrize("impl", ATTENTION)
@pytest.mark.parametrize("shapes, error, words", [
    (((2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), ValueError, ["q", "rank 4"]),
    (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), ValueError, ["head dimension"]),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), ValueError, ["multiple", "Hkv=2"]),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), ValueError, ["k and v", "same shape"]),
    (((2, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), ValueError, ["batch"]),
], ids=["rank", "head_dim", "groups", "kv_shapes", "batch"])
def test_attention_shapes(impl, shapes, error, words):
    fn = registry.get("attention", impl)
    with pytest.raises(error) as e:
        fn(*_arrays(fn.framework, *shapes))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("impl", ATTENTION)
def test_attention_dtypes_and_framework(impl):
    fn = registry.get("attention", impl)
    q, k = _arrays(fn.framework, (1, 2, 8, 16), (1, 2, 8, 16))
    v, = _arrays(fn.framework, (1, 2, 8, 16), dtype="float16")
    with pytest.raises(TypeError, match="v has dtype float16 but q has dtype float32"):
        fn(q, k, v)
    with pytest.raises(TypeError, match="q must be a"):
        fn(_other_framework(fn.framework, q), k, k)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fn(q, k, k, causal="yes")
    with pytest.raises(TypeError, match="scale must be a positive number"):
        fn(q, k, k, scale="0.5")
    # inf: infinite scores, NaN out; 10**400: an int past float's range
    for scale in (0.0, -1.0, float("nan"), float("inf"), 10**400, -10**400):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            fn(q, k, k, scale=scale)


@pytest.mark.parametrize("impl", ATTENTION)
def test_attention_takes_numpy_scalars(impl):
    """A numpy bool (from a comparison) and a numpy float scale are a bool and a number: the
    same output as with Python's (float16, which the GPU's fused backends take; close, not
    equal, as a GPU kernel need not repeat its rounding exactly). The scale is not the
    default 1/sqrt(16) and causal changes the output, so a value dropped on the way shows."""
    fn = registry.get("attention", impl)
    q, k, v = _on_device(_arrays(fn.framework, (1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16),
                                 dtype="float16"))
    try:
        want = _numpy(fn(q, k, v, causal=True, scale=0.5))
    except NotImplementedError as e:
        skip_if_no_kernel(e)
    got = _numpy(fn(q, k, v, causal=np.bool_(True), scale=np.float32(0.5)))
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert not np.allclose(_numpy(fn(q, k, v, causal=False, scale=0.5)), want, atol=1e-2)


@pytest.mark.parametrize("impl", CONV)
@pytest.mark.parametrize("shapes, kwargs, error, words", [
    (((8, 8, 3), (3, 3, 3, 4)), {}, ValueError, ["x", "rank 4"]),
    (((1, 8, 8, 3), (3, 3, 2, 4)), {}, ValueError, ["w", "C=3"]),
    (((1, 4, 4, 3), (7, 7, 3, 4)), {"padding": 1}, ValueError, ["larger than the padded input"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"stride": 0}, ValueError, ["stride", ">= 1"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"stride": (1, -2)}, ValueError, ["stride", ">= 1"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"dilation": 1.5}, TypeError, ["dilation", "int"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"padding": -1}, ValueError, ["padding", ">= 0"]),
    (((1, 8, 8, 6), (3, 3, 2, 6)), {"groups": 4}, ValueError, ["groups=4", "C=6"]),
    (((1, 8, 8, 6), (3, 3, 6, 6)), {"groups": 2}, ValueError, ["w", "C / groups = 3"]),
    (((1, 8, 8, 6), (3, 3, 2, 4)), {"groups": 3}, ValueError, ["K=4", "groups=3"]),
    (((1, 8, 8, 6), (3, 3, 6, 6)), {"groups": 0}, ValueError, ["groups=0", ">= 1"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"stride": 2**31}, ValueError, ["stride", "<= 2147483647"]),
    (((1, 8, 8, 3), (3, 3, 3, 4)), {"padding": (0, 10**20)}, ValueError, ["padding", "<="]),
], ids=["rank", "channels", "too_large", "stride0", "stride_neg", "dilation_float", "pad_neg",
        "groups_C", "groups_w", "groups_K", "groups0", "stride_huge", "pad_huge"])
def test_conv2d_bad_shapes_and_options(impl, shapes, kwargs, error, words):
    fn = registry.get("conv2d", impl)
    with pytest.raises(error) as e:
        fn(*_arrays(fn.framework, *shapes), **kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("impl", CONV)
def test_conv2d_takes_numpy_integers(impl):
    """stride, padding, dilation and groups as numpy integers (from a config array) are ints."""
    fn = registry.get("conv2d", impl)
    x, w = _on_device(_arrays(fn.framework, (1, 9, 8, 4), (3, 3, 2, 4)))
    want = _numpy(fn(x, w, stride=2, padding=(1, 0), dilation=1, groups=2))
    got = fn(x, w, stride=np.int64(2), padding=(np.int32(1), 0), dilation=np.int64(1),
             groups=np.int64(2))
    np.testing.assert_allclose(_numpy(got), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", CONV)
def test_conv2d_dtypes_and_framework(impl):
    fn = registry.get("conv2d", impl)
    x, = _arrays(fn.framework, (1, 8, 8, 3))
    w, = _arrays(fn.framework, (3, 3, 3, 4), dtype="bfloat16")
    with pytest.raises(TypeError, match="w has dtype bfloat16 but x has dtype float32"):
        fn(x, w)
    w32, = _arrays(fn.framework, (3, 3, 3, 4))
    with pytest.raises(TypeError, match="w must be a"):
        fn(x, _other_framework(fn.framework, w32))


TORCH_IMPLS = [(op, n) for op in ("matmul", "attention", "conv2d") for n in registry.impls(op)
               if registry.get(op, n).framework == "torch"]
SHAPES = {"matmul": [(4, 5), (5, 3)], "attention": [(1, 2, 8, 16)] * 3,
          "conv2d": [(1, 6, 6, 3), (3, 3, 3, 4)]}


@pytest.mark.parametrize("op, impl", TORCH_IMPLS)
def test_torch_inputs_on_two_devices(op, impl):
    """One input on the meta device: a clear error (torch's own conv gave arbitrary values for a
    CPU input and a meta weight)."""
    arrays = _on_device(_arrays("torch", *SHAPES[op]))
    arrays[-1] = arrays[-1].to("meta")
    with pytest.raises(ValueError, match="is on meta but .* all inputs must be on one device"):
        registry.get(op, impl)(*arrays)


@pytest.mark.parametrize("op, impl", TORCH_IMPLS)
def test_sparse_torch_input(op, impl):
    arrays = _on_device(_arrays("torch", *SHAPES[op]))
    arrays[0] = arrays[0].to_sparse()
    with pytest.raises(TypeError, match="must be a dense \\(strided\\) torch.Tensor"):
        registry.get(op, impl)(*arrays)


@pytest.mark.parametrize("op, impl", [(op, n) for op, n in TORCH_IMPLS
                                      if registry.get(op, n).kind == "hand"
                                      or n == "torch_compile"])
def test_lazily_negated_view_is_read_negated(op, impl):
    """x.conj().imag is a view whose negation is a flag (is_neg), not in memory: kernels that
    read memory must see the negated values (Triton's and Inductor's read them unnegated)."""
    arrays = _on_device(_arrays("torch", *SHAPES[op]))
    negated = torch.complex(torch.zeros_like(arrays[0]), -arrays[0]).conj().imag
    assert negated.is_neg() and torch.equal(negated, arrays[0])
    want = _numpy(registry.get(op, "torch")(*arrays))
    got = _numpy(registry.get(op, impl)(negated, *arrays[1:]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["matmul", "attention", "conv2d"])
def test_triton_out_must_be_a_tensor_of_the_result(op):
    fn = registry.get(op, "triton")
    arrays = _on_device(_arrays("torch", *SHAPES[op]))
    shape = fn(*arrays).shape
    for out in ([0.0], torch.empty(1, device=DEVICE), torch.empty(*shape, device="meta")):
        with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
            fn(*arrays, out=out)


@pytest.mark.parametrize("op, impl", [("conv2d", n) for n in CONV
                                      if registry.get("conv2d", n).kind == "hand"])
def test_forward_only_kernel_says_so_when_differentiated(op, impl):
    """A hand-written conv2d has no backward: asked for gradients it says so (the Triton one
    returned an output that did not require grad, the Pallas ones raised a bare AssertionError
    from inside JAX), and it still runs where nothing is differentiated."""
    fn = registry.get(op, impl)
    x, w = _on_device(_arrays(fn.framework, *SHAPES[op]))
    if fn.framework == "torch":
        with pytest.raises(NotImplementedError, match=f"the {impl} conv2d has no backward"):
            fn(x.requires_grad_(), w)
        with torch.no_grad():
            assert fn(x, w).shape == (1, 4, 4, 4)
    else:
        import jax

        with pytest.raises(NotImplementedError, match=f"the {impl} conv2d has no backward"):
            jax.grad(lambda x: fn(x, w).sum())(x)
        assert jax.jit(fn)(x, w).shape == (1, 4, 4, 4)


def test_pinned_sdpa_backend_without_a_kernel_is_a_skip_not_a_failure():
    """A pinned SDPA backend that cannot take the inputs (here: the CUDA-only efficient kernel on
    CPU tensors; on a GPU, flash with fp32) raises NotImplementedError, which the harness records
    as skipped, with torch's reasons in the message."""
    from torch.nn.attention import SDPBackend

    from kernels import contract, stock_torch

    attend = stock_torch._pinned_sdpa(SDPBackend.EFFICIENT_ATTENTION)
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(contract.NoKernel, match="SDPA EFFICIENT_ATTENTION has no kernel"):
        attend(q, q, q, False, None)
