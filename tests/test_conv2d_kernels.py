"""Correctness of the hand-written conv2d kernels (Triton and Pallas), runnable on a CPU.

Without a GPU the Triton kernel runs in the Triton interpreter and the Pallas kernel in interpret
mode; on a GPU the same tests run the compiled kernels.

Error budget: the relative Frobenius error against the float64 reference must satisfy

    err(kernel) <= BUDGET_FACTOR * err(torch F.conv2d, same dtype, same inputs) + FLOOR[dtype]

and the worst element, on its row's scale (harness.check), the same with check.ELEMENT_FACTOR.
The stock op's own error sets the scale (it is mostly the rounding of the output to the dtype). The
factor 4 leaves room for a different summation order; the floor, a quarter of the dtype's machine
epsilon, only matters when the stock op happens to be almost exact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels.pallas.conv2d as pallas_conv2d
import kernels.triton.conv2d  # noqa: F401  (registers the Triton kernel)
from harness import aot
from harness import check
from kernels import contract, reference, registry
from kernels.triton._common import DEVICE_TYPE

jnp = pytest.importorskip("jax.numpy")

IMPLS = ("triton", "pallas")
DTYPES = ("float32", "float16", "bfloat16")
BUDGET_FACTOR = 4.0
FLOOR = {d: torch.finfo(getattr(torch, d)).eps / 4 for d in DTYPES}

# name: (x shape [N, H, W, C], w shape [KH, KW, C / groups, K], stride, padding, dilation
#        [, groups])
CASES = {
    "rgb_3x5_kernel_on_11x7": ((1, 11, 7, 3), (3, 5, 3, 4), 1, (1, 2), 1),
    "single_filter_stride2_batch3": ((3, 9, 10, 5), (3, 3, 5, 1), 2, 1, 1),
    "one_channel_dilation2": ((1, 13, 12, 1), (3, 3, 1, 6), 1, 2, 2),
    "stride3_dilation3": ((2, 17, 14, 6), (2, 3, 6, 7), 3, 1, 3),
    "stride4_kernel_5x4": ((1, 19, 21, 4), (5, 4, 4, 9), 4, (2, 1), 1),
    "pairs_everywhere": ((1, 10, 15, 33), (3, 2, 33, 18), (2, 3), (1, 0), (2, 1)),
    "deep_channels": ((1, 6, 5, 70), (3, 3, 70, 40), 1, 1, 1),  # several channel blocks
    # 9216-term sums: a kernel that accumulates in 16 bits is 1.6 times over budget in float16
    # (on 70 channels it passed)
    "deepest_channels": ((1, 8, 8, 1024), (3, 3, 1024, 32), 1, 1, 1),
    # under 16 channels Triton's direct kernel: a dilation of its own on each axis
    "few_channels_dilation_1x2": ((1, 13, 12, 3), (3, 3, 3, 8), 1, 1, (1, 2)),
    "few_channels_dilation_2x1": ((1, 13, 12, 3), (3, 3, 3, 8), 1, 1, (2, 1)),
    # 286 output pixels by 40 filters: three row tiles and two filter tiles of the interpreter's
    # 128x32 config, in grouped order with a partial group
    "many_rows": ((2, 13, 11, 5), (3, 3, 5, 40), 1, 1, 1),
    "pointwise": ((3, 5, 7, 20), (1, 1, 20, 17), 1, 0, 1),  # Triton's plain-GEMM fast path
    "pointwise_stride2": ((2, 9, 8, 6), (1, 1, 6, 33), 2, 0, 1),
    # grouped: under 16 channels a group, Triton's multiply-add kernel; from 16, its implicit
    # GEMM per group (two channel blocks and two output tiles, the second partial, per group)
    "depthwise_3x3": ((2, 9, 10, 24), (3, 3, 1, 24), 1, 1, 1, 24),
    "depthwise_multiplier2_stride2": ((1, 11, 9, 5), (3, 3, 1, 10), 2, 1, 1, 5),
    "grouped_4_channels_dilation2": ((1, 10, 7, 12), (3, 2, 4, 9), 1, (1, 0), 2, 3),
    "grouped_gemm": ((1, 7, 6, 160), (3, 3, 80, 80), 1, 1, 1, 2),
    "grouped_pointwise": ((2, 5, 6, 32), (1, 1, 16, 24), 1, 0, 1, 2),  # not the plain GEMM
    # every output column's taps in the padding: the output is all zeros (torch's CPU
    # convolution through oneDNN crashed on it in bf16)
    "columns_of_padding_only": ((3, 4, 1, 5), (2, 1, 5, 7), 2, 3, 3),
}


def _inputs(x_shape, w_shape, dtype: str, seed: int = 0):
    """Seeded torch tensors in `dtype`, scaled so outputs are O(1) whatever the reduction size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen)
    w = torch.randn(w_shape, generator=gen) / np.sqrt(np.prod(w_shape[:3]))
    return x.to(getattr(torch, dtype)), w.to(getattr(torch, dtype))


def _to_jax(t: torch.Tensor):
    # float32 holds every float16 / bfloat16 value exactly, so the jax array has the same values.
    return jnp.asarray(t.float().numpy(), dtype=str(t.dtype).removeprefix("torch."))


def _torch_error(x, w, stride, padding, dilation, groups, ref) -> check.Error:
    """The stock op's error in the same dtype: the scale of the budget. The registry's `torch`
    (F.conv2d on channels_last), which steers clear of a oneDNN crash on CPU."""
    y = registry.get("conv2d", "torch")(x, w, stride, padding, dilation, groups=groups)
    return check.error(y, ref)


def _run(impl_name: str, x: torch.Tensor, w: torch.Tensor, *args, **kwargs):
    impl = registry.get("conv2d", impl_name)
    if impl.framework == "jax":
        return impl(_to_jax(x), _to_jax(w), *args, **kwargs)
    return impl(x.to(DEVICE_TYPE), w.to(DEVICE_TYPE), *args, **kwargs)


def _check(y, x, w, stride, padding, dilation, dtype, groups=1):
    ref = reference.conv2d(x, w, stride, padding, dilation, groups)
    assert tuple(y.shape) == tuple(ref.shape)
    assert str(y.dtype).removeprefix("torch.") == dtype
    err = check.error(y, ref)
    stock = _torch_error(x, w, stride, padding, dilation, groups, ref)
    budget = BUDGET_FACTOR * stock.frobenius + FLOOR[dtype]
    assert err.frobenius <= budget, f"relative error {err.frobenius:.3e} over budget {budget:.3e}"
    budget = check.ELEMENT_FACTOR * stock.element + FLOOR[dtype]
    assert err.element <= budget, f"worst element off by {err.element:.3e}, budget {budget:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl_name", IMPLS)
def test_matches_reference(impl_name, case, dtype):
    x_shape, w_shape, stride, padding, dilation, *groups = CASES[case]
    groups = groups[0] if groups else 1
    x, w = _inputs(x_shape, w_shape, dtype)
    kwargs = {"groups": groups}
    if registry.get("conv2d", impl_name).accepts_out:
        # Poison the output: an element the kernel fails to write stays NaN and fails the check.
        # (Pallas interpret mode fills unwritten outputs with NaN itself.)
        shape = reference.conv2d(x, w, stride, padding, dilation, groups).shape
        kwargs["out"] = torch.full(shape, float("nan"), dtype=x.dtype, device=DEVICE_TYPE)
    y = _run(impl_name, x, w, stride, padding, dilation, **kwargs)
    if "out" in kwargs:
        assert y is kwargs["out"]
    _check(y, x, w, stride, padding, dilation, dtype, groups)


def test_stock_torch_leaves_onednn_only_where_it_crashes():
    """The stock torch convolutions go around oneDNN only for bf16 on a CPU whose output along
    an axis reads padding only: every case of every tier keeps oneDNN (the CPU benchmarks time
    torch's usual path), the case that crashed does not, in bf16 alone."""
    from harness import cases
    from kernels import stock_torch

    def padding_only(d):
        (sh, sw), (ph, pw), (dh, dw) = (cases.pair(d[k]) for k in ("stride", "padding",
                                                                     "dilation"))
        oh, ow = cases.conv_out_hw(d)
        return (stock_torch._sees_only_padding(d["H"], oh, d["KH"], sh, ph, dh)
                or stock_torch._sees_only_padding(d["W"], ow, d["KW"], sw, pw, dw))

    tiers = [c.dims for tier in ("smoke", "standard", "full") for c in cases.cases("conv2d", tier)]
    assert tiers and not any(padding_only(d) for d in tiers)
    x_shape, w_shape, stride, padding, dilation = CASES["columns_of_padding_only"]
    for dtype, goes_around in (("bfloat16", True), ("float16", False), ("float32", False)):
        x, w = _inputs(x_shape, w_shape, dtype)
        dims = contract.conv2d_args(x, w, stride, padding, dilation, "torch")
        assert stock_torch._onednn_crashes(x, dims) is goes_around
    # one more input column, and output column 2 reads it
    x, w = _inputs((3, 4, 2, 5), w_shape, "bfloat16")
    assert not stock_torch._onednn_crashes(x, contract.conv2d_args(x, w, stride, padding,
                                                                   dilation, "torch"))


@pytest.mark.parametrize("kernel_hw, padding, groups", [((3, 2), 1, 1), ((1, 1), 0, 1),
                                                        ((3, 3), 1, 5)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_non_contiguous_inputs_and_output(dtype, kernel_hw, padding, groups):
    """x and w made by permuting NCHW / OIHW tensors, the output a strided view. The 1x1 case
    takes the general kernel: the plain-GEMM fast path needs a contiguous output. groups=5:
    depthwise, two filters a channel (the multiply-add kernel)."""
    x, w = _inputs((2, 6, 9, 5), (*kernel_hw, 5 // groups, 10), dtype)
    x_strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    w_strided = w.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0)
    assert not x_strided.is_contiguous() and not w_strided.is_contiguous()
    n, oh, ow, k = reference.conv2d(x, w, 1, padding, 1, groups).shape
    poisoned = torch.full((n, oh, ow, 2 * k), float("nan"), dtype=x.dtype, device=DEVICE_TYPE)
    out = poisoned[..., ::2]  # every other channel
    y = _run("triton", x_strided, w_strided, 1, padding, groups=groups, out=out)
    _check(y, x, w, 1, padding, 1, dtype, groups)
    assert torch.isnan(poisoned[..., 1::2]).all(), "wrote outside the output view"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_oh", [1, 4], ids=["rows", "patches"])
def test_pallas_several_blocks_on_every_axis(block_oh, dtype):
    """Small blocks force several output-row, output-column, channel and output-channel blocks
    per problem; patches of 4 rows leave the second all but one row past the 5 output rows,
    under a stride of 2 in both directions."""
    x, w = _inputs((2, 12, 37, 40), (3, 3, 40, 20), dtype)
    blocks = pallas_conv2d.BlockSizes(block_ow=64 // block_oh // 4, block_c=16, block_k=16,
                                      block_oh=block_oh)
    y = pallas_conv2d.conv2d(_to_jax(x), _to_jax(w), 2, (1, 2), (1, 2), block_sizes=blocks)
    _check(y, x, w, 2, (1, 2), (1, 2), dtype)


@pytest.mark.parametrize("image, patch", [
    ((56, 56), (1, 64)), ((28, 28), (2, 32)), ((14, 14), (4, 16)), ((7, 7), (8, 8)),
    ((100, 3), (16, 4)), ((1, 1), (1, 16)), ((2, 2), (2, 8))])
def test_pallas_patches_of_64_output_pixels(image, patch):
    """Whole rows of the power-of-two rounded width, 64 pixels (Hopper's smallest warpgroup MMA)
    where the image has them, never fewer than the dot's 16."""
    oh, ow = image
    d = contract.Conv2dDims(N=1, H=oh, W=ow, C=8, KH=1, KW=1, K=8, stride=(1, 1),
                            padding=(0, 0), dilation=(1, 1), OH=oh, OW=ow)
    b = pallas_conv2d.BlockSizes.for_dims(d)
    assert (b.block_oh, b.block_ow) == patch


def test_pallas_rejects_bad_block_sizes():
    x, w = _inputs((1, 5, 5, 2), (3, 3, 2, 2), "float32")
    with pytest.raises(ValueError, match="block_c"):
        pallas_conv2d.conv2d(_to_jax(x), _to_jax(w),
                             block_sizes=pallas_conv2d.BlockSizes(16, 24, 16))
    with pytest.raises(ValueError, match="block_oh"):
        pallas_conv2d.conv2d(_to_jax(x), _to_jax(w),
                             block_sizes=pallas_conv2d.BlockSizes(16, 16, 16, block_oh=3))
    with pytest.raises(ValueError, match="output pixels must be >= 16"):
        pallas_conv2d.conv2d(_to_jax(x), _to_jax(w),
                             block_sizes=pallas_conv2d.BlockSizes(4, 16, 16, block_oh=2))


def test_triton_rejects_wrong_out():
    x, w = _inputs((1, 5, 5, 2), (3, 3, 2, 2), "float32")
    out = torch.empty((1, 3, 3, 3), device=DEVICE_TYPE)
    with pytest.raises(ValueError, match="out must be"):
        _run("triton", x, w, out=out)


# Bad input: (x shape, w shape, kwargs, dtype of w, expected error, words the message must hold)
BAD_INPUTS = {
    "x_rank_3": ((5, 5, 2), (3, 3, 2, 4), {}, None, ValueError, "x must have rank 4"),
    "channel_mismatch": ((1, 5, 5, 2), (3, 3, 3, 4), {}, None, ValueError, "w must have shape"),
    "kernel_larger_than_padded_input": ((1, 4, 4, 2), (3, 3, 2, 4), {"dilation": 2}, None,
                                        ValueError, "larger than the padded input"),
    "zero_stride": ((1, 5, 5, 2), (3, 3, 2, 4), {"stride": 0}, None, ValueError, "stride"),
    "negative_stride_pair": ((1, 5, 5, 2), (3, 3, 2, 4), {"stride": (1, -1)}, None, ValueError,
                             "stride"),
    "negative_padding": ((1, 5, 5, 2), (3, 3, 2, 4), {"padding": -1}, None, ValueError, "padding"),
    "float_stride": ((1, 5, 5, 2), (3, 3, 2, 4), {"stride": 1.5}, None, TypeError, "stride"),
    "mixed_dtypes": ((1, 5, 5, 2), (3, 3, 2, 4), {}, "float16", TypeError, "dtype"),
    "groups_not_dividing_C": ((1, 5, 5, 6), (3, 3, 2, 4), {"groups": 4}, None, ValueError,
                              "groups=4 must be >= 1 and divide"),
    "w_channels_not_C_over_groups": ((1, 5, 5, 6), (3, 3, 6, 6), {"groups": 3}, None,
                                     ValueError, "C / groups = 2"),
    "K_not_a_multiple_of_groups": ((1, 5, 5, 6), (3, 3, 2, 4), {"groups": 3}, None, ValueError,
                                   "K=4 must be a multiple of groups=3"),
    "float_groups": ((1, 5, 5, 6), (3, 3, 2, 4), {"groups": 3.0}, None, TypeError, "groups"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("impl_name", IMPLS)
def test_rejects_bad_input(impl_name, bad):
    x_shape, w_shape, kwargs, w_dtype, error, words = BAD_INPUTS[bad]
    x, w = _inputs(x_shape, w_shape, "float32")
    if w_dtype is not None:
        w = w.to(getattr(torch, w_dtype))
    with pytest.raises(error, match=words):
        _run(impl_name, x, w, **kwargs)


def test_rejects_other_frameworks_arrays():
    x, w = _inputs((1, 5, 5, 2), (3, 3, 2, 4), "float32")
    with pytest.raises(TypeError, match="torch.Tensor"):
        registry.get("conv2d", "triton")(_to_jax(x), _to_jax(w))
    with pytest.raises(TypeError, match="jax.Array"):
        registry.get("conv2d", "pallas")(x, w)
    with pytest.raises(TypeError, match="jax.Array"):
        registry.get("conv2d", "pallas")(x.numpy(), w.numpy())


def test_registered_as_hand_written_kernels():
    triton_impl = registry.get("conv2d", "triton")
    pallas_impl = registry.get("conv2d", "pallas")
    assert (triton_impl.framework, triton_impl.kind, triton_impl.accepts_out) == ("torch", "hand",
                                                                                 True)
    assert (pallas_impl.framework, pallas_impl.kind) == ("jax", "hand")
    triton_impl.reset()  # must not raise; the next call compiles (and tunes) again


@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_lowers_for_gpu(dtype, monkeypatch):
    """The GPU (Triton) lowering has rules interpret mode does not check (power-of-two arrays, dots
    with every dim >= 16, supported integer ops): lowering for CUDA catches their breakage on a
    machine without a GPU. Nothing is compiled or run."""
    monkeypatch.setattr(pallas_conv2d, "interpret", lambda: False)
    x, w = _inputs((2, 11, 7, 3), (3, 5, 3, 5), dtype)
    lowered = aot.lower_for_cuda(lambda x, w: pallas_conv2d.conv2d(x, w, (2, 1), (1, 2), (1, 2)),
                                 _to_jax(x), _to_jax(w))
    assert "triton" in lowered.as_text()
