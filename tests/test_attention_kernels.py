"""Correctness of the hand-written attention kernels (Triton, Pallas, Pallas Mosaic GPU) on CPU.

Every case runs the forward and the backward and compares out, dq, dk, dv with float64 autograd by
relative Frobenius error ||x - ref|| / ||ref|| and by the worst element on its row's scale
(harness.check).

Budget: a kernel passes if its Frobenius error is at most BUDGET_FACTOR (4) times the error of
torch's own F.scaled_dot_product_attention in the same dtype on the same inputs (the stock op sets
the error scale, as in the flash-attention tests), and its worst element at most
check.ELEMENT_FACTOR (8) times SDPA's, each plus a floor of 1/16 of the dtype's machine epsilon so
an (exactly) zero stock error does not demand an exactly zero kernel error.

Triton runs in its interpreter here, Pallas in interpret mode, so shapes stay small (S <= 130).
The Triton output buffer is pre-filled with NaN via out=, and Pallas interpret mode fills
unwritten outputs with NaN itself, so an element a kernel fails to write makes the error NaN.
"""
from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import aot
from harness import compile as compile_mod
from harness import check
import kernels  # switches Triton to its interpreter when there is no GPU
from kernels import reference, registry
from kernels.pallas import attention as pallas_attention
from kernels.triton import attention as triton_attention
from tests.checking import DEVICE  # the Triton kernels run where torch's GPU is

BUDGET_FACTOR = 4
DTYPES = {"float32": (torch.float32, jnp.float32), "float16": (torch.float16, jnp.float16),
          "bfloat16": (torch.bfloat16, jnp.bfloat16)}
GRAD_NAMES = ("out", "dq", "dk", "dv")

# (B, H, Hkv, Sq, Sk, D, causal, scale): decode (Sq=1), primes, Sq < Sk and Sq > Sk with causal
# (top-left aligned), GQA and MQA, D in 16/32/64/128 and an odd D=80 (padded to 128 by masks),
# a single key.
CASES = [
    pytest.param((1, 2, 2, 1, 61, 64, False, None), id="decode-Sq1-D64"),
    pytest.param((1, 4, 2, 37, 61, 32, True, None), id="gqa-causal-Sq<Sk-D32"),
    pytest.param((1, 4, 1, 130, 37, 80, True, 0.3), id="mqa-causal-Sq>Sk-D80-scale"),
    pytest.param((2, 2, 2, 64, 64, 128, True, None), id="mha-causal-square-D128"),
    pytest.param((1, 2, 1, 61, 130, 16, False, None), id="mqa-Sq<Sk-D16"),
    # one key: the softmax is constant, so dQ and dK are exactly 0 (an absolute error is judged)
    pytest.param((1, 2, 1, 5, 1, 64, True, None), id="one-key-Sk1"),
]


def make_inputs(case, dtype: torch.dtype, seed: int = 0):
    """Seeded q, k, v and the output cotangent dO, as torch tensors in `dtype`."""
    B, H, Hkv, Sq, Sk, D, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D), (B, H, Sq, D)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def reference_with_grads(q, k, v, do, causal, scale):
    """float64 out and (dq, dk, dv). reference.attention detaches its inputs, so its math is
    redone here under autograd, and the forward is checked against it."""
    q64, k64, v64 = (reference.as_float64(t).requires_grad_() for t in (q, k, v))
    groups = q64.shape[1] // k64.shape[1]
    scores = q64 @ k64.repeat_interleave(groups, 1).transpose(-1, -2)
    scores = scores * (q64.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, -1) @ v64.repeat_interleave(groups, 1)
    out.backward(reference.as_float64(do))
    out = out.detach()
    torch.testing.assert_close(out, reference.attention(q, k, v, causal, scale), rtol=1e-12,
                               atol=1e-12)
    grads = [q64.grad, k64.grad, v64.grad]
    for got, want in zip(reference.attention_grads(q, k, v, do, causal, scale), grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return [out, *grads]


def sdpa_errors(q, k, v, do, causal, scale, refs):
    """Errors of torch's own SDPA (out, dq, dk, dv) in the inputs' dtype: the error scale."""
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*x, is_causal=causal, scale=scale, enable_gqa=True)
    out.backward(do)
    return [check.error(t, r) for t, r in zip([out] + [t.grad for t in x], refs)]


def check_within_budget(errors, stock_errors, dtype: torch.dtype, what: str):
    """Each check.Error of out, dq, dk, dv within its budget: the relative Frobenius error
    within BUDGET_FACTOR times SDPA's, the worst element's within check.ELEMENT_FACTOR times."""
    floor = torch.finfo(dtype).eps / 16
    for name, err, stock in zip(GRAD_NAMES, errors, stock_errors):
        for measure, factor in (("frobenius", BUDGET_FACTOR), ("element", check.ELEMENT_FACTOR)):
            got, sdpa = getattr(err, measure), getattr(stock, measure)
            budget = factor * sdpa + floor
            assert got <= budget, (f"{what} {name}: {measure} error {got:.3g} exceeds the budget "
                                   f"{budget:.3g} ({factor} x SDPA's {sdpa:.3g} + {floor:.3g})")


def run_triton(q, k, v, do, causal, scale):
    if DEVICE == "cuda":
        # The first call of a shape autotunes, each config tried writing the output: an element
        # the chosen one leaves unwritten would hold another's value, not the poison. Check the
        # call after it, into an output poisoned anew. (The interpreter tries one config.)
        _run_triton_once(q, k, v, do, causal, scale)
    return _run_triton_once(q, k, v, do, causal, scale)


@contextlib.contextmanager
def _uninitialized_memory_is_nan():
    """torch.empty and its kin fill floating-point tensors with NaN (torch's deterministic mode,
    its nondeterministic ops only warned of): a gradient element the backward kernels never
    write then fails the check, as the poisoned forward output does, instead of keeping what
    the memory last held (an earlier call's right answer, as often as not)."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _run_triton_once(q, k, v, do, causal, scale):
    x = [t.to(DEVICE, copy=True).requires_grad_() for t in (q, k, v)]
    poisoned = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    with _uninitialized_memory_is_nan():
        out = triton_attention.attention(*x, causal, scale, out=poisoned)
        assert out.data_ptr() == poisoned.data_ptr()
        out.backward(do.to(DEVICE))
    return [out.detach()] + [t.grad for t in x]


def to_jax(t: torch.Tensor, dtype) -> jax.Array:
    return jnp.asarray(t.float().numpy(), dtype=dtype)  # float32 holds every fp16/bf16 value


def run_pallas(q, k, v, do, causal, scale, jax_dtype, block_sizes=None, impl="pallas"):
    q, k, v, do = (to_jax(t, jax_dtype) for t in (q, k, v, do))
    if impl == "pallas":
        def attention(*x):
            return pallas_attention.attention(*x, causal, scale, block_sizes=block_sizes)
    else:
        def attention(*x):
            return registry.get("attention", impl)(*x, causal, scale)
    out, vjp = jax.vjp(attention, q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    return [out, *vjp(do)]


def pointer_loads_only(monkeypatch):
    """The Triton kernels load their tiles by pointers, as where no descriptor can be made. (The
    interpreter otherwise takes TMA descriptors whenever the tensors allow; on a GPU the
    autotuners choose between the two.)"""
    monkeypatch.setattr(triton_attention, "_tma_possible", lambda *tensors: False)


def warp_specialized_forward(monkeypatch):
    """The forward in its warp-specialized form (one loop over the key blocks, every block
    masked): the interpreter runs that code as it is; on a GPU the forward's autotuner is offered
    only its warp-specialized configs. (Decode-like cases take the decode kernels instead.)"""
    kernel = triton_attention._fwd_kernel
    if kernels.TRITON_INTERPRET:
        configs = [triton_attention._config(32, 64, 4, 1, ws=True)]
    else:
        configs = [c for c in kernel.configs if c.kwargs.get("WS")]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})  # no choice made here outlives the test


def dq_by(method: str, monkeypatch):
    """The Triton backward sums dQ by `method` (triton_attention.DQ_METHODS) whatever "auto"
    would choose; float32 takes "kernel" whatever is asked."""
    monkeypatch.setattr(triton_attention, "dq_method", method)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["triton", "triton-pointer-loads", "triton-warp-specialized",
                                  "triton-dq-kernel", "triton-dq-atomics", "pallas",
                                  "pallas_mosaic"])
def test_forward_and_gradients_match_reference(impl, case, dtype, monkeypatch):
    if impl == "triton-pointer-loads":
        pointer_loads_only(monkeypatch)
        impl = "triton"
    if impl == "triton-warp-specialized":
        warp_specialized_forward(monkeypatch)
        impl = "triton"
    if impl.startswith("triton-dq-"):
        dq_by(impl.removeprefix("triton-dq-"), monkeypatch)
        impl = "triton"
    if impl not in registry.impls("attention"):
        pytest.skip(registry.disabled("attention").get(impl, f"{impl} is not registered"))
    torch_dtype, jax_dtype = DTYPES[dtype]
    causal, scale = case[6], case[7]
    q, k, v, do = make_inputs(case, torch_dtype)
    refs = reference_with_grads(q, k, v, do, causal, scale)
    stock = sdpa_errors(q, k, v, do, causal, scale, refs)
    if impl == "triton":
        results = run_triton(q, k, v, do, causal, scale)
        assert all(r.dtype == torch_dtype for r in results)
    else:
        results = run_pallas(q, k, v, do, causal, scale, jax_dtype, impl=impl)
        assert all(r.dtype == jax_dtype for r in results)
    errors = [check.error(x, r) for x, r in zip(results, refs)]
    check_within_budget(errors, stock, torch_dtype, f"{impl} {dtype}")


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU's autotuner choice; on CPU the interpreter "
                    "takes TMA whenever it can, which the other tests check")
@pytest.mark.parametrize("dq", triton_attention.DQ_METHODS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_triton_tma_kernels_on_gpu(case, dtype, dq, monkeypatch):
    """On a GPU each attention kernel's autotuner keeps the faster of its pointer and TMA
    configs; here they are offered only the TMA ones, so the TMA paths are checked whichever
    wins elsewhere, with dQ summed each way."""
    dq_by(dq, monkeypatch)
    backward = ((triton_attention._bwd_dq_kernel, triton_attention._bwd_dkv_kernel)
                if dq == "kernel" else (triton_attention._bwd_dkv_dq_kernel,))
    kernels = (triton_attention._fwd_kernel, triton_attention._decode_kernel, *backward)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "configs", [c for c in kernel.configs if c.kwargs.get("TMA")])
        monkeypatch.setattr(kernel, "best_config", None, raising=False)  # set by a launch
        kernel.cache.clear()
    try:
        test_forward_and_gradients_match_reference("triton", case, dtype, monkeypatch)
        launched = [kernel for kernel in kernels if kernel.best_config is not None]
        assert len(launched) == 1 + len(backward)  # a forward (decode-like or not), backward
        assert all(kernel.best_config.kwargs["TMA"] for kernel in launched)
    finally:
        for kernel in kernels:
            kernel.cache.clear()  # no TMA-only choice is left for the tests after this one


@pytest.mark.parametrize("case", [pytest.param((1, 4, 2, 37, 61, 32, True, None), id="causal"),
                                  pytest.param((1, 8, 2, 3, 130, 32, False, None),
                                               id="decode-kernels")])
def test_triton_non_contiguous_inputs(case):
    """[B, S, H, D] storage viewed as [B, H, S, D]: the kernels take strides, no copies."""
    causal = case[6]
    q, k, v, do = make_inputs(case, torch.float32)
    q_t, k_t, v_t, do_t = (t.to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
                           for t in (q, k, v, do))
    assert not q_t.is_contiguous()
    refs = reference_with_grads(q, k, v, do, causal, None)
    stock = sdpa_errors(q, k, v, do, causal, None, refs)
    x = [t.detach().requires_grad_() for t in (q_t, k_t, v_t)]
    out = triton_attention.attention(*x, causal=causal)
    out.backward(do_t)
    errors = [check.error(t, r) for t, r in zip([out.detach()] + [t.grad for t in x], refs)]
    check_within_budget(errors, stock, torch.float32, "triton non-contiguous")


# Many blocks per sequence: with the interpreter's tiles (32x64 forward and dK/dV, 64x32 dQ) each
# shape below has key (and, for dK/dV, query) blocks seen whole by every row, blocks on the causal
# diagonal, partial last blocks and, for Sq < Sk, key blocks no query sees, so any block-bound
# error (one block too many or too few) shows.
SPLIT_CASES = [
    pytest.param((1, 2, 1, 200, 200, 16, False, None), id="square-200"),
    pytest.param((1, 2, 1, 200, 200, 16, True, None), id="square-200-causal"),
    pytest.param((1, 1, 1, 100, 300, 32, True, None), id="causal-Sq<Sk"),
    pytest.param((1, 1, 1, 300, 100, 32, True, None), id="causal-Sq>Sk"),
]


@pytest.mark.parametrize("loads", ["tma", "pointer"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_triton_unmasked_and_masked_blocks(case, loads, monkeypatch):
    if loads == "pointer":
        pointer_loads_only(monkeypatch)
    _check_triton(case, torch.float32, "triton many blocks")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_triton_dq_atomics_over_many_key_blocks(case, dtype, monkeypatch):
    """dQ summed by atomic adds from every key block's program (float32 never takes them): up to
    five key blocks add into each query row here, causal ones on the diagonal masked."""
    dq_by("atomics", monkeypatch)
    _check_triton(case, dtype, f"triton dq by atomics {dtype}")


@pytest.mark.parametrize("dtype, shift", [(torch.float16, 2.5), (torch.bfloat16, 6.0)],
                         ids=["float16", "bfloat16"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",  # the padded keys' P,
                            "ignore:invalid value encountered:RuntimeWarning")  # then masked
def test_triton_dq_atomics_with_every_score_far_below_zero(dtype, shift, monkeypatch):
    """Every score near -25 (fp16) or -144 (bf16): P = exp2(-lse) of the keys past Sk (zero k,
    score 0) overflows fp16, or fp32. The whole query blocks of the dK/dV kernel mask no keys, so
    before the fix those keys' dS reached dQ's atomic adds as inf * 0 and dQ was all NaN; the
    dQ kernel masks its partial key block and was right."""
    dq_by("atomics", monkeypatch)
    case = (1, 1, 1, 64, 33, 16, False, None)  # whole query blocks, a partial key block
    q, k, v, do = make_inputs(case, torch.float32)
    q, k = (shift + 0.1 * q).to(dtype), (-shift + 0.1 * k).to(dtype)
    v, do = v.to(dtype), do.to(dtype)
    refs = reference_with_grads(q, k, v, do, False, None)
    errors = [check.error(x, r) for x, r in zip(run_triton(q, k, v, do, False, None), refs)]
    check_within_budget(errors, sdpa_errors(q, k, v, do, False, None, refs), dtype,
                        f"triton dq by atomics, scores far below 0, {dtype}")


def _check_triton(case, dtype: torch.dtype, what: str):
    causal, scale = case[6], case[7]
    q, k, v, do = make_inputs(case, dtype)
    refs = reference_with_grads(q, k, v, do, causal, scale)
    stock = sdpa_errors(q, k, v, do, causal, scale, refs)
    results = run_triton(q, k, v, do, causal, scale)
    errors = [check.error(x, r) for x, r in zip(results, refs)]
    check_within_budget(errors, stock, dtype, what)


# Decode-like calls (no causal mask, Sq * H / Hkv <= 64) take the Triton split-KV kernels: a GQA
# group's queries packed into one tile's rows, the keys split over programs (in the interpreter as
# if on 2 multiprocessors: 8 programs), the splits merged by a second kernel. Each case below has
# several splits (the last one partial) except where noted, and a tile of packed rows that is
# not full.
DECODE_CASES = [
    pytest.param((1, 4, 1, 1, 300, 64, False, None), id="mqa-Sq1"),
    pytest.param((2, 8, 2, 3, 250, 80, False, 0.3), id="gqa-Sq3-D80-scale"),
    pytest.param((1, 16, 1, 4, 200, 16, False, None), id="64-packed-rows"),
    pytest.param((1, 2, 2, 5, 37, 32, False, None), id="one-split"),  # two in 32-key fp32 blocks
]


# pallas in every dtype; pallas_mosaic (float32 runs pallas) in one of its two: the same kernel
@pytest.mark.parametrize("impl, dtype", [("pallas", d) for d in DTYPES]
                         + [("pallas_mosaic", "bfloat16")])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_pallas_packed_query_groups(impl, case, dtype):
    """Non-causal GQA: the Pallas kernels see a group's queries as one sequence of its kv head
    (and `pallas`, with few query blocks, splits the keys over programs)."""
    B, H, Hkv, Sq, Sk, D, causal, scale = case
    if impl not in registry.impls("attention"):
        pytest.skip(registry.disabled("attention").get(impl, f"{impl} is not registered"))
    torch_dtype, jax_dtype = DTYPES[dtype]
    q, k, v, do = make_inputs(case, torch_dtype)
    packed, unpack = pallas_attention.pack_query_groups(to_jax(q, jax_dtype), Hkv, causal)
    assert packed.shape == ((B, Hkv, H // Hkv * Sq, D) if H > Hkv else (B, H, Sq, D))
    assert unpack(packed).shape == q.shape
    causal_q = to_jax(q, jax_dtype)
    assert pallas_attention.pack_query_groups(causal_q, Hkv, True)[0] is causal_q  # rows matter
    if impl == "pallas":  # the forward splits the keys unless there is one key block
        jaxpr = str(jax.make_jaxpr(pallas_attention.attention)(
            *(to_jax(t, jax_dtype) for t in (q, k, v))))
        block_k = pallas_attention.BlockSizes.default_for(D, jax_dtype).block_k
        assert ("flash_attention_fwd_split_kv" in jaxpr) == (Sk > block_k)
    refs = reference_with_grads(q, k, v, do, causal, scale)
    stock = sdpa_errors(q, k, v, do, causal, scale, refs)
    results = run_pallas(q, k, v, do, causal, scale, jax_dtype, impl=impl)
    errors = [check.error(x, r) for x, r in zip(results, refs)]
    check_within_budget(errors, stock, torch_dtype, f"{impl} packed groups {dtype}")


@pytest.mark.parametrize("case", [
    pytest.param((1, 4, 1, 1, 4096, 64, False, None), id="decode-split-kv"),
    pytest.param((1, 4, 2, 200, 200, 80, True, None), id="gqa-causal"),
])
def test_pallas_lowers_for_gpu(case, monkeypatch):
    """Forward and backward lowered for CUDA (Pallas' Triton lowering: power-of-two blocks,
    dots of 16 and more, its supported ops), which interpret mode does not check. Nothing runs."""
    monkeypatch.setattr(pallas_attention, "interpret", lambda: False)
    B, H, Hkv, Sq, Sk, D, causal, _ = case
    q, k, v = (jnp.zeros(s, jnp.bfloat16) for s in ((B, H, Sq, D), (B, Hkv, Sk, D),
                                                    (B, Hkv, Sk, D)))

    def loss(q, k, v):
        return pallas_attention.attention(q, k, v, causal).astype(jnp.float32).sum()

    lowered = aot.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    text = lowered.as_text()
    assert "triton" in text
    assert ("flash_attention_fwd_split_kv" in text) == (not causal)


def test_pallas_kv_splits_cover_the_key_blocks(monkeypatch):
    """Splits of whole key blocks, none empty, covering every block; as many as make four
    programs a multiprocessor (2 of them here, as in interpret mode), no more."""
    monkeypatch.setattr(pallas_attention, "multiprocessors", lambda: 2)
    for programs in (1, 3, 8, 100):
        for blocks in (1, 2, 5, 64, 513):
            splits, per = pallas_attention.kv_splits(programs, blocks)
            assert (splits - 1) * per < blocks <= splits * per, (programs, blocks, splits, per)
            assert splits == 1 or programs * (splits - 1) < 4 * 2
    assert pallas_attention.kv_splits(1, 5) == (5, 1)


# TMA loads in every dtype; pointer loads (the same tiles, loaded another way) in one
@pytest.mark.parametrize("loads, dtype", [("tma", d) for d in DTYPES] + [("pointer", "float16")])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_triton_decode_kernels(case, dtype, loads, monkeypatch):
    if loads == "pointer":
        pointer_loads_only(monkeypatch)
    B, H, Hkv, Sq, Sk, D, causal, scale = case
    dims = triton_attention.contract.attention_args(*make_inputs(case, torch.float32)[:3],
                                                    causal, scale, "torch")
    assert triton_attention._decodes(dims)
    splits, _ = triton_attention._decode_splits(B * Hkv, Sk, torch.device(DEVICE))
    assert (splits == 1) == (Sk < 64), "a case meant to have several splits has one"
    torch_dtype = DTYPES[dtype][0]
    q, k, v, do = make_inputs(case, torch_dtype)
    refs = reference_with_grads(q, k, v, do, causal, scale)
    stock = sdpa_errors(q, k, v, do, causal, scale, refs)
    errors = [check.error(x, r) for x, r in zip(run_triton(q, k, v, do, causal, scale), refs)]
    check_within_budget(errors, stock, torch_dtype, f"triton decode {dtype}")


def test_decode_only_where_a_group_fits_a_tile():
    def decodes(H, Hkv, Sq, causal=False):
        q = torch.empty(1, H, Sq, 16)
        k = torch.empty(1, Hkv, 8, 16)
        return triton_attention._decodes(
            triton_attention.contract.attention_args(q, k, k, causal, None, "torch"))
    assert decodes(16, 1, 4) and not decodes(16, 1, 5)  # 64 packed rows, 80
    assert decodes(1, 1, 64) and not decodes(1, 1, 65)
    assert not decodes(4, 1, 1, causal=True)


@pytest.mark.parametrize("sms", [2, 132])
def test_decode_splits_cover_the_keys(sms, monkeypatch):
    """Splits are whole key tiles (but the last), none is empty, and they cover every key."""
    monkeypatch.setattr(triton_attention, "TRITON_INTERPRET", sms == 2)
    align = triton_attention._DECODE_SPLIT_ALIGN
    for programs in (1, 3, 64, 256, 2000):
        for Sk in (1, 63, 64, 65, 300, 4096, 32768, 100_003):
            splits, per = triton_attention._decode_splits(programs, Sk, torch.device("cpu"))
            assert per % align == 0 and 1 <= splits
            assert (splits - 1) * per < Sk <= splits * per, (programs, Sk, splits, per)
            assert splits == 1 or programs * (splits - 1) < 4 * sms


def test_pallas_small_blocks():
    """16-wide tiles: many blocks per sequence, every kernel crossing block and padding edges."""
    case = (1, 4, 2, 37, 61, 80, True, None)
    q, k, v, do = make_inputs(case, torch.float32)
    refs = reference_with_grads(q, k, v, do, True, None)
    stock = sdpa_errors(q, k, v, do, True, None, refs)
    tiles = dict.fromkeys(["block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq",
                           "block_k_dq"], 16)
    blocks = pallas_attention.BlockSizes(**tiles)
    results = run_pallas(q, k, v, do, True, None, jnp.float32, block_sizes=blocks)
    errors = [check.error(x, r) for x, r in zip(results, refs)]
    check_within_budget(errors, stock, torch.float32, "pallas 16-wide blocks")


@pytest.mark.parametrize("impl", ["triton", "pallas"])
@pytest.mark.parametrize("case, seed", [
    pytest.param((1, 1, 1, 2, 271, 32, False, 1.3), 1020, id="2-queries-scale1.3"),
    pytest.param((3, 2, 1, 3, 257, 128, False, 0.5), 1007, id="gqa-3-queries-scale0.5"),
    # 0.989 of its probability on one key
    pytest.param((1, 1, 1, 1, 37, 32, False, 1.7), 808, id="1-query-scale1.7"),
])
def test_peaked_softmax_of_few_queries(impl, case, seed):
    """A large scale peaks each row's softmax on a few keys, and with few queries (the keys split,
    as in a decode step) nothing averages P's rounding out: the backward must recompute the
    forward's scores to the bit, and the splits' weights must not pass through a rounded
    logsumexp. In fp32, without the Triton interpreter's fixed-order scores triton's dV erred 1.5
    and 1.9 times the budget here (2.4 and 2.2 also without the merge by row max and sum), and
    without that merge pallas' dV 1.02 times it in the first case. Without interpret mode's
    fixed-order scores (kernels.pallas.attention._scaled_scores) pallas' dV erred 1.6 times the
    budget in the first case on an AVX-512 machine; in 12 seeds of it, up to 2.1 times SDPA's
    with them (out, dQ, dK, dV). With one query, dS = P (dP - delta) is a small difference: with
    delta = rowsum(dO * O) triton's dQ erred 1.2e-5 against SDPA's 5.1e-7 (5.9x the budget),
    pallas' 1.1e-5; with delta in two parts, the second summed from P and dP in the dQ kernel
    (_delta_rest), 4.3e-7 and 1.3e-6."""
    errors, stock = _errors_and_sdpas(impl, case, "float32", seed)
    check_within_budget(errors, stock, torch.float32, f"{impl} peaked softmax")


def _errors_and_sdpas(impl: str, case, dtype: str, seed: int):
    """The errors of the kernel's out, dq, dk, dv, and of SDPA's, on the case's seeded inputs."""
    torch_dtype, jax_dtype = DTYPES[dtype]
    causal, scale = case[6], case[7]
    q, k, v, do = make_inputs(case, torch_dtype, seed)
    refs = reference_with_grads(q, k, v, do, causal, scale)
    stock = sdpa_errors(q, k, v, do, causal, scale, refs)
    if impl == "triton":
        results = run_triton(q, k, v, do, causal, scale)
    else:
        results = run_pallas(q, k, v, do, causal, scale, jax_dtype, impl=impl)
    return [check.error(x, r) for x, r in zip(results, refs)], stock


@pytest.mark.parametrize("impl", ["triton", "pallas", "pallas_mosaic"])
@pytest.mark.parametrize("case, seed", [
    # the second query's largest probability 0.9999988
    pytest.param((1, 2, 2, 2, 64, 80, True, 1.3), 3903021, id="2-causal-queries-scale1.3"),
    # a decode step: the keys split (triton's decode kernels, pallas' kv splits)
    pytest.param((1, 1, 1, 1, 560, 80, False, 1.7), 714, id="1-query-scale1.7"),
])
def test_peaked_softmax_16_bit(impl, case, seed):
    """fp16, one key holding nearly all of a row's probability: dS = P (dP - delta) is then a
    small difference, and delta = rowsum(dO * O) from O rounded to fp16 swamps it. The 16-bit
    forwards keep what rounding O left for the backward's delta. Without it dQ and dK erred 4.1
    and 4.0 times SDPA's error in the first case (0.269 against 0.065; over the budget), 4.0 and
    4.2 times in the second; with it 0.007 to 0.008 and 0.84 to 0.89 times."""
    if impl not in registry.impls("attention"):
        pytest.skip(registry.disabled("attention").get(impl, f"{impl} is not registered"))
    errors, stock = _errors_and_sdpas(impl, case, "float16", seed)
    check_within_budget(errors, stock, torch.float16, f"{impl} 16-bit peaked softmax")
    # Half the budget, far from both sides: 4.0 to 4.2 times SDPA's error before, 0.007 to 0.89
    # times with the remainder (CPU).
    for name, err, sdpa in list(zip(GRAD_NAMES, errors, stock))[1:3]:  # dq, dk
        assert err.frobenius <= 2 * sdpa.frobenius, (
            f"{impl} {name}: {err.frobenius:.3g}, over twice SDPA's {sdpa.frobenius:.3g}")


def _fp32_run(impl: str, case):
    """The case's fp32 inputs (q, k, v, dO) and the kernel's out, dq, dk, dv as float64."""
    q, k, v, do = make_inputs(case, torch.float32)
    causal, scale = case[6], case[7]
    if impl not in registry.impls("attention"):
        pytest.skip(registry.disabled("attention").get(impl, f"{impl} is not registered"))
    if impl == "triton":
        results = run_triton(q, k, v, do, causal, scale)
    else:
        results = run_pallas(q, k, v, do, causal, scale, jnp.float32, impl=impl)
    return (q, k, v, do), [reference.as_float64(t) for t in results]


@pytest.mark.parametrize("impl", ["triton", "pallas", "pallas_mosaic"])
@pytest.mark.parametrize("causal", [False, True])
def test_single_key_returns_v_and_no_score_gradient(impl, causal):
    """Sk = 1: every query sees only key 0, so the output is v, exactly (its probability is 1:
    computed as 2^(s * scale - max), a multiply-add left 1 + 1 ulp, and Pallas returned v within
    one rounding of it), and the softmax is constant, so dQ and dK are exactly 0 (both kernels
    left fp32 rounding noise there, up to 1e-6, before they said so) while dV sums dO over the
    queries."""
    (q, k, v, do), (out, dq, dk, dv) = _fp32_run(impl, (2, 2, 1, 5, 1, 16, causal, None))
    assert torch.equal(out, reference.as_float64(v).expand(2, 2, 5, 16))
    assert not dq.any() and not dk.any()
    expected_dv = reference.as_float64(do).sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(dv, expected_dv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "pallas", "pallas_mosaic"])
def test_one_causal_query_sees_key_0_alone(impl):
    """Sq = 1 under the causal mask (top-left aligned): the query sees key 0 alone among 70, so
    the output is v's first row, dQ and dK are exactly 0 (at D=256 the Triton kernels had left
    8e-6 of fp32 noise in dQ, 6 times torch's), and only dV's first row is not 0: dO summed
    over the query heads."""
    (q, k, v, do), (out, dq, dk, dv) = _fp32_run(impl, (1, 3, 1, 1, 70, 256, True, None))
    assert torch.equal(out, reference.as_float64(v[:, :, :1]).expand(1, 3, 1, 256))
    assert not dq.any() and not dk.any()
    torch.testing.assert_close(dv[:, :, :1], reference.as_float64(do).sum(1, keepdim=True),
                               rtol=1e-6, atol=1e-6)
    assert not dv[:, :, 1:].any()


@pytest.mark.parametrize("impl", ["triton", "pallas"])
def test_first_causal_query_sees_key_0_alone(impl):
    """Under the causal mask query 0 sees key 0 alone whatever the other queries see: in fp32
    its output is v's first row and its dQ is 0, exactly, as torch's are (before, both kernels
    left rounding noise in that dQ row: up to 6.5e-6 for triton and 3.0e-6 for pallas here,
    where the largest dQ is 16)."""
    (q, k, v, do), (out, dq, dk, dv) = _fp32_run(impl, (2, 4, 2, 7, 40, 64, True, 1.3))
    assert torch.equal(out[:, :, 0], reference.as_float64(v[:, :, 0]).repeat_interleave(2, 1))
    assert not dq[:, :, 0].any()
    assert dq[:, :, 1:].any()  # the other queries' are not


def test_triton_forward_without_autograd():
    """With nothing to differentiate (no input requiring grad, or grad disabled) the forward runs
    without autograd.Function: the same output, bit for bit, and no graph. An `out` that requires
    grad still goes through autograd, which refuses an in-place write to such a leaf."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 37, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 37, 32, generator=gen).to(DEVICE) for _ in range(2))
    plain = triton_attention.attention(q, k, v, True)
    assert plain.grad_fn is None
    tracked = triton_attention.attention(*(t.clone().requires_grad_() for t in (q, k, v)), True)
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
    with torch.no_grad():
        untracked = triton_attention.attention(q.clone().requires_grad_(), k, v, True)
    assert untracked.grad_fn is None and torch.equal(untracked, plain)
    leaf = torch.zeros_like(plain, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        triton_attention.attention(q, k, v, True, out=leaf)


def test_registered():
    triton_impl = registry.get("attention", "triton")
    assert triton_impl.fn is triton_attention.attention
    assert (triton_impl.framework, triton_impl.kind, triton_impl.accepts_out) == ("torch", "hand",
                                                                                  True)
    triton_impl.reset()
    pallas_impl = registry.get("attention", "pallas")
    assert pallas_impl.fn is pallas_attention.attention
    assert (pallas_impl.framework, pallas_impl.kind) == ("jax", "hand")


def _torch_array(shape, dtype="float32"):
    return torch.zeros(shape, dtype=getattr(torch, dtype), device=DEVICE)


def _jax_array(shape, dtype="float32"):
    return jnp.zeros(shape, dtype=dtype)


GOOD = {"q": (1, 4, 8, 16), "k": (1, 2, 8, 16), "v": (1, 2, 8, 16)}
# (what is wrong, argument overrides as (shape, dtype), extra kwargs, error, message fragment)
BAD_INPUTS = [
    ("rank", {"q": ((4, 8, 16), "float32")}, {}, ValueError, "q must have rank 4"),
    ("head dims differ", {"k": ((1, 2, 8, 32), "float32"), "v": ((1, 2, 8, 32), "float32")}, {},
     ValueError, "head dimension"),
    ("H not a multiple of Hkv", {"q": ((1, 3, 8, 16), "float32")}, {}, ValueError, "multiple"),
    ("k and v shapes differ", {"v": ((1, 2, 9, 16), "float32")}, {}, ValueError, "same shape"),
    ("dtypes differ", {"v": ((1, 2, 8, 16), "float16")}, {}, TypeError, "dtype"),
    # every input int32: with q alone, the mixed-dtype error also matched
    ("unsupported dtype", {"q": ((1, 4, 8, 16), "int32"), "k": ((1, 2, 8, 16), "int32"),
                           "v": ((1, 2, 8, 16), "int32")}, {}, TypeError,
     "q must have dtype float32, float16 or bfloat16"),
    ("causal not a bool", {}, {"causal": 1}, TypeError, "causal"),
    ("negative scale", {}, {"scale": -1.0}, ValueError, "scale"),
    ("head dim over 256", {"q": ((1, 4, 8, 512), "float32"), "k": ((1, 2, 8, 512), "float32"),
                           "v": ((1, 2, 8, 512), "float32")}, {}, ValueError, "D=512"),
]


@pytest.mark.parametrize("impl", ["triton", "pallas"])
@pytest.mark.parametrize("what, overrides, kwargs, error, match",
                         BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(impl, what, overrides, kwargs, error, match):
    make = _torch_array if impl == "triton" else _jax_array
    fn = registry.get("attention", impl)
    args = {n: make(*overrides.get(n, (GOOD[n], "float32"))) for n in ("q", "k", "v")}
    with pytest.raises(error, match=match):
        fn(args["q"], args["k"], args["v"], **kwargs)


def test_triton_refuses_more_batch_heads_than_a_grid_axis_takes():
    """Its kernels' programs take (batch, head) on the grid's second axis, which a GPU caps at
    65535: a clear error, not CUDA's invalid-argument launch failure."""
    q = _torch_array((256, 257, 1, 16))
    with pytest.raises(ValueError, match="batch x heads = 256 x 257 must be <= 65535"):
        registry.get("attention", "triton")(q, q, q)


@pytest.mark.parametrize("impl", ["triton", "pallas"])
def test_wrong_framework_array_raises(impl):
    """A torch kernel given jax arrays (and the reverse), or numpy arrays, is a TypeError."""
    fn = registry.get("attention", impl)
    other = _jax_array if impl == "triton" else _torch_array
    for make in (other, np.zeros):
        with pytest.raises(TypeError, match="must be a"):
            fn(*(make(GOOD[n]) for n in ("q", "k", "v")))


def test_pallas_rejects_bad_block_sizes():
    q = _jax_array(GOOD["q"])
    k = _jax_array(GOOD["k"])
    with pytest.raises(ValueError, match="block_q=48"):
        pallas_attention.attention(q, k, k, block_sizes=pallas_attention.BlockSizes(block_q=48))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_blocks_of_query_rows_match_the_whole(causal, monkeypatch):
    """The float64 oracles go through the queries in blocks (a 16k-token score matrix is 64 GiB);
    blocks of 3 rows, cut across the causal diagonal and the GQA groups, give the same answer."""
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(s, generator=g) for s in
                   ((2, 4, 11, 16), (2, 2, 7, 16), (2, 2, 7, 16), (2, 4, 11, 16)))
    whole = [reference.attention(q, k, v, causal), *reference.attention_grads(q, k, v, do, causal)]
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 2 * 4 * 7)
    blocks = [reference.attention(q, k, v, causal),
              *reference.attention_grads(q, k, v, do, causal)]
    for got, want in zip(blocks, whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def _fake_dq_runs(calls: list) -> dict:
    """Stand-ins for _backward's runs: each records its method when called and returns it."""
    return {m: (lambda m=m: calls.append(m) or m) for m in triton_attention.DQ_METHODS}


def test_dq_auto_times_each_method_once_per_shape(monkeypatch):
    """"auto" on a GPU: a shape's first call runs each method (their autotuners tune), times
    both and keeps the faster for that shape; its later calls run that one alone. The timer is
    faked here, so the GPU branch runs on any machine."""
    monkeypatch.setattr(triton_attention, "TRITON_INTERPRET", False)
    monkeypatch.setattr(triton_attention, "dq_method", "auto")
    monkeypatch.setattr(triton_attention, "_dq_chosen", {})
    times = {"short": {"kernel": 2.0, "atomics": 1.0}, "long": {"kernel": 1.0, "atomics": 3.0}}
    shape = "short"
    monkeypatch.setattr(triton_attention, "autotune_bench",
                        lambda run, quantiles: times[shape][run()])
    calls = []
    runs = _fake_dq_runs(calls)
    assert triton_attention._dq_runner(runs, shape)() == "atomics"
    assert calls == ["kernel", "atomics"] * 2 + ["atomics"]  # tuned, timed, run
    calls.clear()
    assert triton_attention._dq_runner(runs, shape)() == "atomics" and calls == ["atomics"]
    shape = "long"
    noted = {}
    with compile_mod.autotune_choices(noted):  # what a benchmark's record gets
        assert triton_attention._dq_runner(runs, shape)() == "kernel"
    assert noted == {"dq_method": "kernel (timed: kernel 1000 us, atomics 3000 us)"}
    assert [m for m, _ in triton_attention._dq_chosen.values()] == ["atomics", "kernel"]


def test_dq_auto_runs_the_method_left_when_one_fails(monkeypatch):
    """"auto" on a GPU: a method that fails on its first call (a build the GPU refuses) leaves
    the other, named with the failure in the record and a warning; every method failing raises
    the first failure, and a timeout is never taken for a failure."""
    monkeypatch.setattr(triton_attention, "TRITON_INTERPRET", False)
    monkeypatch.setattr(triton_attention, "dq_method", "auto")
    monkeypatch.setattr(triton_attention, "_dq_chosen", {})
    monkeypatch.setattr(triton_attention, "autotune_bench", lambda run, quantiles: 1.0)
    calls = []
    runs = _fake_dq_runs(calls)

    def refused():
        raise RuntimeError("out of resources: shared memory")

    noted = {}
    with pytest.warns(UserWarning, match="dQ by atomics failed.*running kernel"), \
            compile_mod.autotune_choices(noted):
        assert triton_attention._dq_runner(runs | {"atomics": refused}, "one")() == "kernel"
    assert noted == {"dq_method": "kernel (timed: kernel 1000 us; atomics failed: RuntimeError: "
                                  "out of resources: shared memory)"}

    def broken():
        raise ValueError("kernel broke")

    with pytest.raises(ValueError, match="kernel broke"):
        triton_attention._dq_runner({"kernel": broken, "atomics": refused}, "two")

    def timed_out():
        raise TimeoutError("timeout: no result after 1 s")

    calls.clear()
    with pytest.raises(TimeoutError):
        triton_attention._dq_runner(runs | {"kernel": timed_out}, "three")
    assert calls == []  # the timeout ended the call: atomics never ran
    assert "two" not in triton_attention._dq_chosen and "three" not in triton_attention._dq_chosen


def test_dq_methods_asked_for(monkeypatch):
    """A method asked for is the one run; "auto" in the interpreter runs "kernel" (on a GPU it
    times both: test_dq_auto_times_each_method_once_per_shape), and under make aot's capture
    both; a backward with one method (float32, D > 128) runs it whatever is asked; an unknown
    name is refused."""
    calls = []
    runs = _fake_dq_runs(calls)
    interpreted = [("auto", "kernel", "the interpreter's")] if kernels.TRITON_INTERPRET else []
    for asked, ran, why in interpreted + [("kernel", "kernel", "asked for"),
                                          ("atomics", "atomics", "asked for")]:
        monkeypatch.setattr(triton_attention, "dq_method", asked)
        noted = {}
        with compile_mod.autotune_choices(noted):
            assert triton_attention._dq_runner(runs, "any")() == ran
        assert noted == {"dq_method": f"{ran} ({why})"}
        with compile_mod.autotune_choices(noted):
            assert triton_attention._dq_runner({"kernel": runs["kernel"]}, "any",
                                               "float32")() == "kernel"
        assert noted == {"dq_method": "kernel (float32)"}
    monkeypatch.setattr(triton_attention, "dq_method", "auto")
    calls.clear()
    with aot.captured_launches([], "any"):  # make aot: both are launched, so both are built
        assert triton_attention._dq_runner(runs, "any")() == "atomics"
    assert calls == ["kernel", "atomics"]
    monkeypatch.setattr(triton_attention, "dq_method", "fastest")
    with pytest.raises(ValueError, match="KERNELS_ATTENTION_DQ.*'fastest'.*auto, kernel or "
                                         "atomics"):
        triton_attention._dq_runner(runs, "any")
