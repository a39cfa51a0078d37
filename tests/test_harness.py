"""The harness itself: cases, inputs, checks, timing, memory, compile timing, records, registry."""
import collections
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import cases, check, compile as compile_mod, inputs, memory, results, timing
from harness.cases import Case
from kernels import reference, registry


# ---------------------------------------------------------------- cases
def test_flops_and_bytes_by_formula():
    mm = Case("matmul", "t", {"M": 3, "K": 5, "N": 7})
    assert cases.flops(mm) == 2 * 3 * 5 * 7
    assert cases.min_bytes(mm, "bfloat16") == 2 * (3 * 5 + 5 * 7 + 3 * 7)
    attn = dict(B=2, H=4, Hkv=2, Sq=8, Sk=8, D=16)
    full = Case("attention", "t", {**attn, "causal": False})
    causal = Case("attention", "t", {**attn, "causal": True})
    assert cases.flops(full) == 4 * 2 * 4 * 8 * 8 * 16
    assert cases.flops(causal) == cases.flops(full) / 2
    assert cases.flops(full, "bwd") == 2.5 * cases.flops(full)
    assert cases.flops(full, "fwd_bwd") == cases.flops(full) + cases.flops(full, "bwd")
    # Sq != Sk under the top-left causal mask: query i sees min(i + 1, Sk) keys
    short = Case("attention", "t", {**attn, "Sq": 3, "Sk": 8, "causal": True})
    assert cases.flops(short) == 4 * 2 * 4 * 16 * (1 + 2 + 3)


def test_conv_output_size_matches_reference():
    case = Case("conv2d", "t", {"N": 2, "H": 11, "W": 7, "C": 3, "K": 4, "KH": 3, "KW": 2,
                                "stride": (2, 1), "padding": (1, 0), "dilation": (1, 3)})
    x = inputs.make_torch(case, "float32")
    out = reference.conv2d(x["x"], x["w"], **inputs.options(case))
    assert tuple(out.shape) == (2, *cases.conv_out_hw(case.dims), 4)
    assert cases.flops(case) == 2 * 2 * out.shape[1] * out.shape[2] * 4 * 3 * 3 * 2
    assert "groups" not in inputs.options(case)  # one group: nothing extra in the call


def test_grouped_conv_shapes_flops_and_bytes():
    """Depthwise with two filters a channel: each output channel reads one input channel."""
    case = Case("conv2d", "t", {"N": 2, "H": 9, "W": 8, "C": 6, "K": 12, "KH": 3, "KW": 3,
                                "stride": 1, "padding": 1, "dilation": 1, "groups": 6})
    assert inputs.shapes(case)["w"] == (3, 3, 1, 12)
    assert inputs.options(case)["groups"] == 6
    x = inputs.make_torch(case, "float32")
    out = reference.conv2d(x["x"], x["w"], **inputs.options(case))
    assert tuple(out.shape) == (2, 9, 8, 12)
    assert cases.flops(case) == 2 * 2 * 9 * 8 * 12 * 1 * 3 * 3
    assert cases.min_bytes(case, "float32") == 4 * (2 * 9 * 8 * 6 + 3 * 3 * 12 + 2 * 9 * 8 * 12)


@pytest.mark.parametrize("dims", [
    dict(N=1, H=8, W=8, C=4, K=8, KH=1, KW=1, stride=2, padding=0, dilation=1),  # a shortcut
    dict(N=2, H=35, W=35, C=8, K=24, KH=5, KW=5, stride=3, padding=1, dilation=1),
    dict(N=1, H=17, W=17, C=8, K=8, KH=3, KW=3, stride=3, padding=2, dilation=2),
    dict(N=1, H=9, W=7, C=3, K=5, KH=3, KW=3, stride=(1, 4), padding=(0, 3), dilation=1),
    dict(N=1, H=12, W=12, C=3, K=4, KH=7, KW=7, stride=2, padding=3, dilation=1),  # reads all
])
def test_conv_bytes_count_the_input_some_output_reads(dims):
    """The input elements in the byte floor are those the output depends on: the elements whose
    gradient, through the float64 reference, is not zero (a strided 1x1 convolution skips
    rows and columns; counting them put a measured shortcut layer above the copy ceiling)."""
    case = Case("conv2d", "t", dims)
    arrays = inputs.make_torch(case, "float32")
    x = reference.as_float64(arrays["x"]).requires_grad_(True)
    w = reference.as_float64(arrays["w"]).abs() + 1  # no weight of zero hides a read
    reference.conv2d(x, w, **inputs.options(case)).sum().backward()
    read = int((x.grad != 0).sum())
    oh, ow = cases.conv_out_hw(dims)
    assert cases.min_bytes(case, "bfloat16") == 2 * (
        read + dims["KH"] * dims["KW"] * dims["C"] * dims["K"] + dims["N"] * oh * ow * dims["K"])


@pytest.mark.parametrize("sq, sk, causal", [(5, 12, True), (12, 5, True), (7, 7, True),
                                            (5, 12, False)])
@pytest.mark.parametrize("mode", cases.ATTENTION_MODES)
def test_attention_bytes_count_the_keys_some_query_reads(sq, sk, causal, mode):
    """As for conv2d, the inputs read are the elements whose gradient, through the float64
    reference, is not zero: under the causal mask keys past the last query's row are not
    (the decode case with Sk = 4096 counted 820 times the bytes it needs, and a measured SDPA
    stood at 185 % of the roofline). Outputs are written whole: o forward; dq, dk, dv backward;
    a forward and backward need not write o."""
    dims = dict(B=2, H=4, Hkv=2, Sq=sq, Sk=sk, D=8, causal=causal)
    case = Case("attention", "t", dims)
    arrays = inputs.make_torch(case, "float32")
    leaves = [reference.as_float64(t).requires_grad_(True) for t in arrays.values()]
    reference.attention(*leaves, causal=causal).sum().backward()
    q, k, v = leaves
    # q whole: a query that sees one key alone (row 0 under the mask) has no gradient, yet is read
    read = q.numel() + int((k.grad != 0).sum()) + int((v.grad != 0).sum())
    q_size, kv_size = q.numel(), k.numel()
    written = {"fwd": q_size, "bwd": q_size + 2 * kv_size, "fwd_bwd": q_size + 2 * kv_size}
    extra_reads = {"fwd": 0, "bwd": 2 * q_size, "fwd_bwd": q_size}  # o and do; do
    assert cases.min_bytes(case, "float16", mode) == 2 * (read + extra_reads[mode]
                                                         + written[mode])


@pytest.mark.parametrize("op", sorted(cases.CASES))
@pytest.mark.parametrize("tier", cases.TIERS)
def test_every_case_is_well_formed(op, tier):
    listed = cases.cases(op, tier)
    assert listed, f"{op}/{tier} has no cases"
    names = [c.name for c in listed]
    assert len(names) == len(set(names)), "case names must be unique"
    for c in listed:
        assert cases.flops(c) > 0 and cases.min_bytes(c, "float16") > 0
        assert all(min(s) >= 1 for s in inputs.shapes(c).values())


def test_every_case_name_parses_back_to_its_case():
    """SHAPES takes the tiers' own names: each one parses back to the same op and dims."""
    for op in cases.CASES:
        for tier in cases.TIERS:
            for c in cases.cases(op, tier):
                parsed = cases.parse(c.name)
                assert (parsed.op, parsed.name, parsed.dims) == (c.op, c.name, c.dims)


def test_a_parsed_case_is_canonical_and_complete():
    assert cases.parse(" 7x5x3 ").dims == {"M": 7, "K": 5, "N": 3}
    gqa = cases.parse("b2_h8kv2_q1_k300_d96_full")
    assert gqa.dims == {"B": 2, "H": 8, "Hkv": 2, "Sq": 1, "Sk": 300, "D": 96, "causal": False}
    assert cases.parse("b1_h4kv4_q3_k5_d8_causal").name == "b1_h4_q3_k5_d8_causal"
    conv = cases.parse("my_layer_n1_9x7x6_k3x2x4_s2x1_p0x1_d2_g2")
    assert conv.dims == {"N": 1, "H": 9, "W": 7, "C": 6, "K": 4, "KH": 3, "KW": 2,
                         "stride": (2, 1), "padding": (0, 1), "dilation": 2, "groups": 2}
    assert conv.name == "my_layer_n1_9x7x6_k3x2x4_s2x1_p0x1_d2_g2"
    # a pair of equal sides is the one number: one case, one name, the same inputs
    square = cases.parse("n1_5x5x2_k1x1x2_s1x1_p2x2_d3x3_g1")
    assert square == cases.parse("n1_5x5x2_k1x1x2_s1_p2_d3")
    assert square.name == "n1_5x5x2_k1x1x2_s1_p2_d3"


def test_the_case_listing_names_every_case_of_the_tier(capsys):
    assert cases.main(["--tier", "smoke", "--ops", "conv2d,matmul", "--dtype", "fp16"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    listed = cases.cases("conv2d", "smoke") + cases.cases("matmul", "smoke")
    assert [row.split()[:2] for row in rows] == [[c.op, c.name] for c in listed]
    mm = cases.parse(rows[-1].split()[1])  # 257x131x67: a name SHAPES takes
    assert float(rows[-1].split()[2]) == pytest.approx(cases.flops(mm) / 1e9, rel=1e-3)


@pytest.mark.parametrize("name, message", [
    ("4096x4096", "shape '4096x4096' is in none of the case formats"),
    ("b1_h2_q5_k9_d16", "is in none of the case formats"),
    ("0x3x4", "shape '0x3x4' (matmul): a must have every dimension >= 1"),
    ("b1_h6kv4_q5_k9_d16_full", "(attention): q's heads H=6 must be a multiple of k's heads Hkv=4"),
    ("n1_8x8x4_k3x3x6_s0_p1_d1", "(conv2d): stride must be >= 1, got 0"),
    ("n1_8x8x4_k3x3x6_s1_p1_d0", "(conv2d): dilation must be >= 1, got 0"),
    ("n1_8x8x4_k3x3x6_s1_p1_d1_g4", "K=6 must be a multiple of groups=4"),
    ("n1_8x8x6_k3x3x4_s1_p1_d1_g4", "groups=4 must be >= 1 and divide x's channels C=6"),
    ("n1_3x3x4_k5x5x2_s1_p0_d1", "is larger than the padded input (3, 3)"),
])
def test_a_bad_case_name_is_refused_naming_it(name, message):
    """The public contract's own checks, run on shape-only tensors."""
    with pytest.raises(ValueError) as refused:
        cases.parse(name)
    assert message in str(refused.value)


def test_bad_tier_and_dtype_names():
    with pytest.raises(ValueError, match="tier must be one of"):
        cases.cases("matmul", "huge")
    with pytest.raises(ValueError, match="dtype must be one of"):
        cases.normalize_dtype("int8")
    assert cases.normalize_dtype("bf16") == "bfloat16"


# ---------------------------------------------------------------- inputs
def test_inputs_seeded_nonzero_and_same_for_both_frameworks():
    case = cases.cases("matmul", "smoke")[-1]
    t1 = inputs.make(case, "bfloat16", "torch")
    t2 = inputs.make(case, "bfloat16", "torch")
    j = inputs.make(case, "bfloat16", "jax")
    for name in t1:
        assert torch.equal(t1[name], t2[name])
        assert (t1[name] != 0).float().mean() > 0.99
        np.testing.assert_array_equal(np.asarray(j[name].astype("float32")),
                                      t1[name].float().numpy())
    other = inputs.make(cases.cases("matmul", "smoke")[0], "bfloat16", "torch")
    assert not torch.equal(other["a"][:4, :4], t1["a"][:4, :4])


# ---------------------------------------------------------------- check
def test_errors_and_budgets():
    ref = torch.ones(4, 4, dtype=torch.float64)
    assert check.error(torch.ones(4, 4), ref) == (0, 0)
    half_off = torch.ones(4, 4)
    half_off[0] = 1.5
    assert check.error(half_off, ref) == pytest.approx((0.25, 0.5))  # sqrt(4/16)/2; 0.5/1
    poisoned = torch.ones(4, 4)
    poisoned[3, 3] = float("nan")
    assert check.error(poisoned, ref) == (math.inf, math.inf)
    assert check.wrong(check.error(poisoned, ref), "float32", None) == (
        "wrong result: output holds NaN or inf")
    # the stock error sets the scale, floored at the unit roundoff
    assert check.budgets("float16", check.Error(1e-3, 2e-3)) == pytest.approx((4e-3, 16e-3))
    assert check.budgets("float16", check.Error(0.0, 0.0)) == pytest.approx(
        (4 * 2 ** -11, 8 * 2 ** -11))
    assert check.budgets("float16", None) == check.budgets("float16", check.Error(0.0, 0.0))
    assert check.worst([check.Error(1, 5), check.Error(2, 3)]) == (2, 5)
    assert check.error(torch.ones(0, 3), torch.ones(0, 3, dtype=torch.float64)) == (0, 0)
    with pytest.raises(ValueError, match="shape"):
        check.error(torch.ones(3), ref)


def test_the_worst_element_is_held_to_its_own_budget():
    stock = check.Error(1e-3, 5e-3)  # budgets 4e-3 and 8 * 5e-3 = 0.04
    assert check.wrong(check.Error(1e-3, 0.039), "float32", stock) == ""
    assert check.wrong(check.Error(1e-3, 0.041), "float32", stock).startswith(
        "wrong result: worst element off by 0.041")


def test_a_few_wrong_elements_fail_where_the_norm_hides_them():
    """A zeroed 16x16 tile of a 2048x2048 bfloat16 output is 0.8 % of its norm, inside the
    budget of 4 u = 1.6 %; its worst element is off by about 66 % of its row's largest."""
    ref = torch.randn(2048, 2048, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stock = check.error(ref.to(torch.bfloat16), ref)
    out = ref.to(torch.bfloat16)
    out[1000:1016, 500:516] = 0
    err = check.error(out, ref)
    assert err.frobenius <= check.budgets("bfloat16", stock).frobenius
    assert check.wrong(err, "bfloat16", stock).startswith(
        "wrong result: worst element off by 0.66")
    assert check.wrong(stock, "bfloat16", stock) == ""


def test_a_wrong_block_of_small_rows_fails_on_their_own_scale():
    """Under a causal mask late queries' outputs are several times smaller than the first
    queries'. In bfloat16 the last 64 queries of 2048 leaving out their last 64 keys (a dropped
    final key block) hides in the norm and, on the whole output's scale, in the worst element;
    on their rows' scale it is far over budget."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2048, 64, dtype=torch.float64, generator=gen) for _ in "qkv")
    ref = sdpa(q, k, v, is_causal=True)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = sdpa(q, k, v, is_causal=True)
    stock = check.error(out, ref)
    seen = torch.ones(2048, 2048, dtype=torch.bool).tril()
    seen[-64:, -64:] = False
    out[..., -64:, :] = sdpa(q, k, v, attn_mask=seen)[..., -64:, :]
    err = check.error(out, ref)
    limit = check.budgets("bfloat16", stock)
    assert err.frobenius <= limit.frobenius
    def on_output_scale(x):
        return (x.double() - ref).abs().max() / ref.abs().max()

    stock_on_output_scale = on_output_scale(sdpa(q, k, v, is_causal=True))
    assert on_output_scale(out) <= check.ELEMENT_FACTOR * max(stock_on_output_scale, 2 ** -8)
    assert err.element > 3 * limit.element
    assert check.wrong(err, "bfloat16", stock).startswith("wrong result: worst element off by")


def test_the_row_scale_is_floored_where_rows_are_near_or_exactly_zero():
    """A row of zeros in the answer (keys a causal mask hides get no gradient) and a one-element
    row near zero by chance are judged on a quarter of the output's root mean square; an
    all-zero answer by the error itself."""
    ref = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64)  # rms 2.5: floor 0.625
    assert check.error(ref + torch.tensor([[0.0, 0.0], [0.0, 0.125]]), ref).element == 0.2
    assert check.error(ref + torch.tensor([[0.5, 0.0], [0.0, 0.0]]), ref).element == 0.125
    column = torch.tensor([[2.0], [1e-9], [-2.0]], dtype=torch.float64)  # rms 1.63: floor 0.408
    floor = 0.25 * (8 / 3) ** 0.5
    assert check.error(column + 0.01, column).element == pytest.approx(0.01 / floor)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    assert check.error(zeros + 0.5, zeros).element == 0.5
    assert check.error(torch.tensor(2.5), torch.tensor(2.0, dtype=torch.float64)).element == 0.25


# ---------------------------------------------------------------- timing
def test_summary_statistics():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "test")
    assert (t.median_s, t.p20_s, t.p80_s, t.reps) == (3.0, 1.8, 4.2, 5)
    assert t.spread == pytest.approx((4.2 - 1.8) / 3.0)
    assert timing.summarize([1.0, 1.0, 1.0, 1.0, 100.0], "test").median_s == 1.0  # not the mean


def test_wall_timer_repeats_until_its_budget_is_spent():
    """4 ms calls and a 200 ms budget: about 50 repetitions, more than the 5 at least unless a
    4 ms sleep takes 40 ms. (The call returns a tensor: syncing None would import jax inside
    the first sample, a second that alone spends the budget.)"""
    policy = timing.Policy(warmup_s=0.0, budget_s=0.2, min_reps=5, max_reps=100)
    t = timing.time_fn(lambda: time.sleep(0.004) or torch.zeros(1), "torch", on_cuda=False,
                       policy=policy)
    assert sum(t.samples) >= policy.budget_s or t.reps == policy.max_reps
    assert t.reps > policy.min_reps


def test_wall_timer_measures_the_call():
    """Each sample holds at least the 4 ms sleep, and together they hold no more time than
    passed around the whole measurement (bounds that hold however slow the machine is)."""
    policy = timing.Policy(warmup_s=0.0, budget_s=0.05, min_reps=5, max_reps=50)
    start = time.perf_counter()
    t = timing.time_fn(lambda: time.sleep(0.004), "torch", on_cuda=False, policy=policy)
    elapsed = time.perf_counter() - start
    assert 5 <= t.reps <= 50 and len(t.samples) == t.reps
    assert min(t.samples) >= 0.004
    assert sum(t.samples) <= elapsed
    assert t.p20_s <= t.median_s <= t.p80_s


# ---------------------------------------------------------------- memory and compile
def test_cpu_peak_memory_sees_an_allocation():
    size = 64 * 2**20

    def alloc():
        return torch.ones(size // 4, dtype=torch.float32)

    peak, method = memory.peak_bytes(alloc, "torch", False)
    assert (peak, method) == (size, "torch.profiler.cpu_allocations")


def test_cpu_peak_memory_counts_temporaries_freed_before_the_call_returns():
    """What the call held at its peak, not what it returns: SDPA's math path keeps 2 heads of
    1024x1024 fp32 scores (8 MiB) and their softmax at once; torch's own SDPA choice on a CPU
    (a fused kernel) holds O(S), little beyond its 512 KiB output, and a scratch buffer per
    thread (about 0.6 MB each here: 10 MB on 16 threads), so on two threads, as in CI."""
    q = torch.randn(1, 2, 1024, 64)
    out_bytes = q.numel() * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        math_peak, _ = memory.peak_bytes(
            lambda: registry.get("attention", "torch_math")(q, q, q), "torch", False)
        fused_peak, _ = memory.peak_bytes(
            lambda: registry.get("attention", "torch")(q, q, q), "torch", False)
    finally:
        torch.set_num_threads(threads)
    assert math_peak >= 2 * 2 * 1024 * 1024 * 4
    assert out_bytes <= fused_peak < math_peak / 4


def test_cpu_peak_memory_falls_back_to_the_resident_set(monkeypatch):
    monkeypatch.setattr(memory, "_torch_cpu", lambda fn: None)  # the profiler cannot start
    # 64 MiB, written: fresh pages (glibc maps an allocation this large anew), so the resident
    # set grows by it
    peak, method = memory.peak_bytes(lambda: torch.ones(2**24), "torch", False)
    assert method == "rss_high_water_delta" and peak >= 2**25


@pytest.mark.gpu
def test_cuda_peak_memory_holds_the_cublas_workspace_every_time():
    """torch keeps its cuBLAS workspace after the first matmul: a later matmul's figure holds it
    too (freed before the call, allocated again inside it), as XLA's holds its planned one."""
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    out_bytes = 256 * 256 * 2
    first, _ = memory.peak_bytes(lambda: a @ a, "torch", True)
    again, method = memory.peak_bytes(lambda: a @ a, "torch", True)
    assert method == "torch.cuda.max_memory_allocated"
    assert first == again > out_bytes + 2**20  # the output and a workspace of at least 1 MiB


def test_jax_peak_memory_from_memory_analysis():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 256), jnp.float32)
    peak, method = memory.peak_bytes(None, "jax", False, jax.jit(lambda a: a @ a), (x,))
    assert method == (memory.XLA_CPU_PLAN if x.devices().pop().platform == "cpu"
                      else memory.XLA_METHOD)
    assert peak >= 256 * 256 * 4  # at least the output
    on_cpu = jax.device_put(x, jax.devices("cpu")[0])  # XLA:CPU allocates beyond its plan
    assert memory.peak_bytes(None, "jax", False, jax.jit(lambda a: a @ a),
                             (on_cpu,))[1] == memory.XLA_CPU_PLAN
    with pytest.raises(TypeError, match="jitted"):
        memory.peak_bytes(None, "jax", False, lambda a: a @ a, (x,))


def test_prepared_jax_call_is_timed_as_prepared():
    """A JAX implementation with a prepare step is timed through it; its memory comes from the
    plain call, compiled on its own."""
    import jax.numpy as jnp

    from harness import bench

    prepared = []

    def prepare(a, b):
        prepared.append(True)
        return lambda: jnp.matmul(a, b)

    impl = registry.Impl("matmul", "prepared", lambda a, b: jnp.matmul(a, b), "jax", "plugin",
                         prepare=prepare)
    case = cases.cases("matmul", "smoke")[0]
    calls = bench._forward_calls(impl, case, inputs.make(case, "float32", "jax", "cpu"))
    assert prepared and calls.timed is calls.first
    timing.sync(calls.timed())
    peak, method = memory.peak_bytes(calls.timed, "jax", False, *calls.memory)
    assert method.startswith(memory.XLA_METHOD) and peak >= case.dims["M"] * case.dims["N"] * 4


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
def test_an_implementation_is_timed_in_its_own_layout(mode, tmp_path):
    """xla attention is timed as jax.nn.dot_product_attention takes it, [B, S, heads, D]: the
    timed (and memory-measured) call gets inputs and output gradient already in that layout, and
    what it returns goes back to [B, heads, S, D] for the check, which fails without that."""
    from harness import bench

    case = cases.parse("b1_h4kv2_q9_k13_d16_causal")
    impl = registry.get("attention", "xla")
    arrays = inputs.make(case, "float32", "jax", "cpu")
    do = bench._grad_output(case, "float32", "jax", "cpu")
    calls = (bench._forward_calls(impl, case, arrays) if mode == "fwd"
             else bench._jax_grad_calls(impl, case, arrays, do, mode))
    timed_on = [a.shape for a in calls.memory[1] if hasattr(a, "shape")]
    if mode != "bwd":  # takes q, k, v
        assert timed_on[:3] == [(1, 9, 4, 16), (1, 13, 2, 16), (1, 13, 2, 16)]
    if mode != "fwd":  # takes the output gradient
        assert timed_on[-1] == (1, 9, 4, 16)
    checked = calls.checked(calls.first())
    expected = [(1, 4, 9, 16)] if mode == "fwd" else [(1, 4, 9, 16), (1, 2, 13, 16), (1, 2, 13, 16)]
    assert [o.shape for o in ([checked] if mode == "fwd" else checked)] == expected

    session = bench.Session("t", str(tmp_path))
    rec, _ = session.run(bench.Bench("attention", "xla", case, "float32", mode))
    assert rec["status"] == "ok", rec["reason"]
    assert rec["timed_layout"] == "q, k, v, out [B, S, heads, D]"
    unconverted = dataclasses.replace(impl, layout=dataclasses.replace(
        impl.layout, to_contract=lambda a: a))
    get = registry.get
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "get", lambda op, name: unconverted if name == "xla"
                      else get(op, name))
        rec, _ = session.run(bench.Bench("attention", "xla", case, "float32", mode))
    assert rec["status"] == "failed" and "shape" in rec["reason"], rec["reason"]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
def test_jax_memory_reads_the_timed_executable(mode):
    """The memory step of a JAX benchmark compiles nothing: it reads the executable the timed
    call already built (a second compilation cost 0.4 s per benchmark on CPU)."""
    from jax import monitoring

    from harness import bench, cases, inputs

    case = cases.cases("attention", "smoke")[0]
    impl = registry.get("attention", "xla")
    arrays = inputs.make(case, "float32", "jax", "cpu")
    calls = (bench._forward_calls(impl, case, arrays) if mode == "fwd" else bench._jax_grad_calls(
        impl, case, arrays, bench._grad_output(case, "float32", "jax", "cpu"), mode))
    timing.sync(calls.timed())
    compiles = []

    def listen(name, _secs, **_kw):
        if "backend_compile" in name:
            compiles.append(name)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        peak, method = memory.peak_bytes(calls.timed, "jax", False, *calls.memory)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert method.startswith(memory.XLA_METHOD) and peak > 0
    assert compiles == []


def test_first_calls_cold_then_warm(tmp_path):
    resets = []
    state = {"compiled": False}

    def call():
        if not state["compiled"]:
            time.sleep(0.05)  # "compilation"
            state["compiled"] = True
        return 1

    def reset():
        resets.append(1)
        state["compiled"] = False

    fc = compile_mod.first_calls(call, reset, str(tmp_path))
    assert len(resets) == 2 and fc.output == 1
    cold, warm = fc.compile_times(median_s=0.0)
    assert cold >= 0.045 and warm >= 0.045
    no_reset = compile_mod.first_calls(lambda: 2, None, str(tmp_path))
    assert no_reset.warm_s is None


def test_first_calls_prepare_after_each_reset_and_before_each_call(tmp_path):
    """A backward's forward graph is made after each reset (a graph keeps torch.compile's
    compiled backward through any reset), untimed: the log of one cold and one warm call."""
    log = []

    def prepare():
        log.append("prepare")
        time.sleep(0.05)  # untimed: not in the call's figure

    fc = compile_mod.first_calls(lambda: log.append("call"), lambda: log.append("reset"),
                                 str(tmp_path), prepare=prepare)
    assert log == ["reset", "prepare", "call", "reset", "prepare", "call"]
    assert fc.cold_s < 0.05 and fc.warm_s < 0.05
    log.clear()
    compile_mod.first_calls(lambda: log.append("call"), lambda: log.append("reset"),
                            str(tmp_path), cold=False, prepare=lambda: log.append("prepare"))
    assert log == ["reset", "prepare", "call"]


def test_torch_compile_reset_drops_inductors_compiled_code(monkeypatch):
    """A cold call after another benchmark of the same case must compile: the reset drops
    Inductor's in-memory code caches, which outlive a fresh TORCHINDUCTOR_CACHE_DIR, as a
    fresh process has them (torch's own fresh_cache does the same)."""
    from torch._inductor import utils

    from kernels import stock_torch

    cleared = []
    name = "clear_caches" if hasattr(utils, "clear_caches") else "clear_inductor_caches"
    monkeypatch.setattr(utils, name, lambda: cleared.append(1))
    registry.get("matmul", "torch_compile").reset()
    assert cleared == [1]
    assert stock_torch._mm_compiled._wrapper is not None


def test_torch_compile_stays_compiled_over_many_shapes(monkeypatch):
    """Ten convolutions of distinct strides and paddings through the public API, each a
    recompilation: past dynamo's default limit (8) the last two would have run eagerly under
    the name torch_compile (dynamo raises here instead)."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    conv = registry.get("conv2d", "torch_compile")
    conv.reset()
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 9, 8, 3, generator=gen), torch.randn(2, 2, 3, 4, generator=gen)
    for stride in (1, 2):
        for padding in range(5):
            torch.testing.assert_close(conv(x, w, stride, padding).double(),
                                       reference.conv2d(x, w, stride, padding),
                                       rtol=1e-5, atol=1e-5)


def _bench_as_triton_matmul(fn, case_index: int, dtype: str, tmp_path, monkeypatch) -> dict:
    """The record of a benchmark of `fn` standing in for the Triton matmul on a smoke case."""
    from harness import bench
    from harness.cases import cases

    get = registry.get
    spy = dataclasses.replace(get("matmul", "triton"), fn=fn, reset=None)
    monkeypatch.setattr(registry, "get",
                        lambda op, name: spy if name == "triton" else get(op, name))
    rec, _ = bench.Session("t", str(tmp_path)).run(
        bench.Bench("matmul", "triton", cases("matmul", "smoke")[case_index], dtype))
    return rec


def test_an_autotuner_cannot_hide_unwritten_elements(tmp_path, monkeypatch):
    """An autotuner tries its configs on the real arguments: here the first call writes every
    element (a config tried while tuning) and later calls all but the last (the config chosen).
    The checked output comes from a call into a buffer poisoned anew, so the gap is a NaN and
    the record says wrong result (the first call's output had hidden it)."""
    calls = []

    def tuned_then_short(a, b, out=None):
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype) if out is None else out
        product = a @ b
        if not calls:
            out.copy_(product)
        else:
            out.view(-1)[:-1] = product.view(-1)[:-1]
        calls.append(1)
        return out

    rec = _bench_as_triton_matmul(tuned_then_short, 0, "float32", tmp_path, monkeypatch)
    assert (rec["status"], rec["reason"]) == ("failed", "wrong result: output holds NaN or inf")


@pytest.mark.parametrize("fault", ["dtype", "values", "tuple"])
def test_the_timed_call_is_judged_as_well_as_the_checked_one(tmp_path, monkeypatch, fault):
    """A kernel is checked writing into a NaN-poisoned `out=` and timed allocating its own
    output: an allocating path that returns float32 (twice the bytes written, judged on its
    extra precision), wrong values or a tuple fails the benchmark, though what it writes into
    `out=` is right."""
    def right_only_into_out(a, b, out=None):
        if out is not None:
            return out.copy_(a @ b)
        if fault == "dtype":
            return a.float() @ b.float()
        if fault == "tuple":
            return a @ b, None
        return (a @ b).flip(0)

    rec = _bench_as_triton_matmul(right_only_into_out, 1, "bfloat16", tmp_path, monkeypatch)
    assert rec["status"] == "failed"
    if fault == "values":
        assert rec["rel_err"] > 1
        assert rec["reason"] == (f"wrong result: relative error {rec['rel_err']:.3g} over "
                                 f"budget {rec['err_budget']:.3g}")
    else:
        assert rec["reason"] == {
            "dtype": "wrong result: output dtype float32, expected bfloat16 (the inputs')",
            "tuple": "wrong result: output is a tuple of 2, expected one torch.Tensor "
                     "(framework torch)"}[fault]


@pytest.mark.parametrize("framework, returns, reason", [
    ("torch", lambda a, b: None, "output is None, expected one torch.Tensor (framework torch)"),
    ("torch", lambda a, b: (a @ b, a),
     "output is a tuple of 2, expected one torch.Tensor (framework torch)"),
    ("torch", lambda a, b: collections.namedtuple("Pair", "out aux")(a @ b, a),
     "output is a tuple of 2, expected one torch.Tensor (framework torch)"),
    ("torch", lambda a, b: (a @ b).numpy(),
     "output is a numpy.ndarray, expected one torch.Tensor (framework torch)"),
    ("torch", lambda a, b: (a @ b)[:-1], "output has shape (15, 256), expected (16, 256)"),
    ("jax", lambda a, b: [a @ b], "output is a list of 1, expected one jax.Array (framework jax)"),
    ("jax", lambda a, b: None, "output is None, expected one jax.Array (framework jax)"),
], ids=["torch-none", "torch-tuple", "torch-namedtuple", "torch-numpy", "torch-short", "jax-list", "jax-none"])
def test_an_output_that_is_not_one_array_of_the_answers_shape_is_a_wrong_result(
        tmp_path, monkeypatch, framework, returns, reason):
    """A plugin that returns no array, several, another framework's or a shorter one gets a
    record saying so, not an AttributeError from deep in the check."""
    from harness import bench
    from harness.cases import cases

    registry.load_builtins()  # before the copy: loaded into it, they would go when it goes
    monkeypatch.setitem(registry._IMPLS, "matmul", dict(registry._IMPLS["matmul"]))
    registry.register("matmul", "mine", framework=framework)(returns)
    rec, measured = bench.Session("t", str(tmp_path)).run(
        bench.Bench("matmul", "mine", cases("matmul", "smoke")[2], "float32"))
    assert (rec["status"], rec["reason"], measured) == ("failed", f"wrong result: {reason}", None)


def test_a_benchmark_with_one_wrong_element_is_a_wrong_result(tmp_path, monkeypatch):
    """One element of a 256x256 bfloat16 product off by half the largest magnitude: its
    Frobenius error is inside the budget, the record fails on the worst element, and says both."""
    from harness.cases import cases

    def one_element_off(a, b, out=None):
        product = a @ b
        product[100, 200] += product.abs().max() / 2
        return product if out is None else out.copy_(product)

    assert cases("matmul", "smoke")[1].dims == {"M": 256, "K": 256, "N": 256}
    rec = _bench_as_triton_matmul(one_element_off, 1, "bfloat16", tmp_path, monkeypatch)
    assert rec["status"] == "failed"
    assert rec["reason"].startswith("wrong result: worst element off by ")
    # half the largest magnitude is at least half its row's largest (less bf16 rounding)
    assert rec["max_err"] >= 0.48
    assert rec["rel_err"] <= rec["err_budget"] and rec["max_err"] > rec["max_err_budget"]
    assert 0 < rec["stock_max_err"] <= check.UNIT_ROUNDOFF["bfloat16"]


def test_each_xdist_worker_is_pinned_to_a_gpu_before_cuda_starts():
    """With several GPUs, worker gwN gets GPU N mod count when the plugin loads: before
    tests/conftest.py imports kernels, which starts CUDA (reading CUDA_VISIBLE_DEVICES once). A
    fake NVML count of 3 GPUs, in a fresh interpreter as the root conftest.py loads the plugin."""
    import subprocess
    import sys

    script = ("import os, sys; import harness.env; harness.env.gpu_count = lambda: 3; "
              "import harness.plugin; "
              "print(os.environ.get('CUDA_VISIBLE_DEVICES'), 'kernels' in sys.modules, "
              "'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    root = Path(__file__).resolve().parent.parent
    for worker, expected in (("gw4", "1 False False"), (None, "None False False")):
        run_env = {**env, "PYTEST_XDIST_WORKER": worker} if worker else {
            k: v for k, v in env.items() if k != "PYTEST_XDIST_WORKER"}
        out = subprocess.run([sys.executable, "-c", script], cwd=root, env=run_env,
                             capture_output=True, text=True, check=True).stdout.split("\n")[0]
        assert out == expected, (worker, out)


def test_guards_read_the_gpu_named_by_uuid_and_say_when_nvml_fails(monkeypatch):
    """CUDA_VISIBLE_DEVICES may name the GPU by UUID (a MIG instance always is): its flags are
    read through the UUID; a GPU whose NVML cannot be read is flagged, not taken for a clean one.
    (A fake NVML reporting a power-capped GPU.)"""
    import sys
    import types

    import kernels
    from harness import guards

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, NVML_CLOCK_SM=1, nvmlClocksEventReasonSwPowerCap=4,
        nvmlDeviceGetHandleByIndex=lambda i: ("index", i),
        nvmlDeviceGetHandleByUUID=lambda u: ("uuid", u),
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 4,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [],
        nvmlDeviceGetClockInfo=lambda h, c: 1980, nvmlDeviceGetMaxClockInfo=lambda h, c: 1980)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(kernels, "ON_CUDA", True)
    for visible, handle in (("1", ("index", 1)), ("GPU-8f3c2d1a,0", ("uuid", "GPU-8f3c2d1a")),
                            ("MIG-0d1e2f3a", ("uuid", "MIG-0d1e2f3a"))):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert guards.nvml_handle()[1] == handle
        with pytest.warns(RuntimeWarning, match="throttled:power"):
            assert guards.flags() == ["throttled:power"]

    def unreadable(uuid):
        raise RuntimeError("NVML: not found")

    monkeypatch.setattr(fake, "nvmlDeviceGetHandleByUUID", unreadable)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3c2d1a")
    assert guards.flags() == ["guards_unavailable:RuntimeError"]

    def not_supported(h):  # a reading NVML refuses (as some VMs do) flags, never raises
        raise RuntimeError("NVML: Not Supported")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(fake, "nvmlDeviceGetComputeRunningProcesses", not_supported)
    assert guards.flags() == ["guards_unavailable:RuntimeError"]
    monkeypatch.setattr(kernels, "ON_CUDA", False)
    assert guards.flags() == []  # no GPU: nothing to guard


def test_telemetry_sampled_while_timed_adds_what_the_reading_after_missed(tmp_path):
    """The guards read NVML once, after the timing; a throttle that ended before that reading
    shows in the run's telemetry samples taken during the timing, and the record gets its flag
    when it is written (samples outside the timed phase, a retime's among them, do not count)."""
    from harness import guards, plugin
    from harness.timeline import Sampler

    assert guards.with_samples([], {"throttled": [0.0, 1.0]}) == ["throttled:while_timed"]
    assert guards.with_samples(["throttled:power"], {"throttled": [1.0]}) == [
        "throttled:power"]  # the reading after already says it, with its reason
    assert guards.with_samples(["low_clock:1500/1980"], {"throttled": [0.0]}) == [
        "low_clock:1500/1980"]
    assert guards.with_samples([], {}) == []

    sampler = Sampler()
    sampler.source = "nvml"
    sampler.samples = [(100, "throttled", 1.0), (100, "sm_clock_mhz", 1000.0),  # before
                       (250, "throttled", 0.0), (250, "sm_clock_mhz", 1980.0),  # timed
                       (300, "throttled", 1.0),  # timed, at its end
                       (450, "throttled", 1.0),  # the memory phase, after
                       (650, "throttled", 1.0)]  # retime
    assert sampler.during([(200, 300)]) == {"throttled": [0.0, 1.0], "sm_clock_mhz": [1980.0]}
    assert sampler.during([(200, 260), (600, 700)]) == {"throttled": [0.0, 1.0],
                                                        "sm_clock_mhz": [1980.0]}
    assert sampler.during([(700, 800)]) == {}
    state = plugin.RunState.__new__(plugin.RunState)
    state.path, state.worker, state.sampler = tmp_path / "results.jsonl", None, sampler
    phases = [{"name": "timed", "start_ns": 200, "end_ns": 260},
              {"name": "memory", "start_ns": 400, "end_ns": 500},
              {"name": "retime", "start_ns": 600, "end_ns": 700}]
    state.add({"op": "matmul", "flags": [], "phases": phases})
    state.add({"op": "matmul", "flags": [], "phases": [{**phases[0], "end_ns": 300}]})
    state.add({"op": "matmul", "status": "skipped", "phases": []})
    assert [r.get("flags") for r in results.load(state.path)] == [
        [], ["throttled:while_timed"], None]


def test_a_warm_only_call_counts_the_compile_cache_files_it_built(tmp_path, monkeypatch):
    """After a cold call set up the caches, a warm-only call (a later case under COLD=first)
    that compiles a kernel no earlier call had adds files to the disk cache: counted, so its
    'warm' figure is known to hold a compile."""
    def call_for(shape: str):
        def call():  # Triton-like: a kernel not on disk is compiled into the disk cache
            binary = Path(os.environ["TRITON_CACHE_DIR"]) / shape / "kernel.cubin"
            if not binary.exists():
                binary.parent.mkdir(parents=True)
                binary.write_text(shape)
            return shape
        return call

    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):  # first_calls sets them
        monkeypatch.delenv(var, raising=False)
    caches = compile_mod.fresh_caches(str(tmp_path))
    cold = compile_mod.first_calls(call_for("a"), lambda: None, caches)
    assert cold.warm_built is None  # cold and warm measured: nothing to flag
    seen = compile_mod.first_calls(call_for("a"), lambda: None, caches, cold=False)
    assert seen.warm_built == 0  # its kernel is on disk
    new = compile_mod.first_calls(call_for("b"), lambda: None, caches, cold=False)
    assert new.warm_built == 1


def test_warm_only_calls_find_their_own_implementations_disk_caches(tmp_path, monkeypatch):
    """Under COLD=first, a later case's warm-only call looks in the disk caches its own
    implementation's cold call filled. Every cold call points the caches at a fresh directory:
    the warm-only calls once looked in whichever implementation had compiled cold last, so
    every kernel of a later case was built again inside its 'warm' figure."""
    from harness import bench
    from harness.cases import cases

    def compiling(name):
        def call(a, b):  # the implementation's kernel, built into the disk cache when missing
            binary = Path(os.environ["TRITON_CACHE_DIR"]) / name / "kernel.cubin"
            if not binary.exists():
                binary.parent.mkdir(parents=True)
                binary.write_text("built")
            return a @ b
        return call

    get = registry.get
    names = ("torch_compile", "triton")  # not "torch": the stock error's call would build it
    spies = {name: dataclasses.replace(get("matmul", name), fn=compiling(name), prepare=None,
                                       reset=lambda: None, accepts_out=False, tags=())
             for name in names}
    monkeypatch.setattr(registry, "get",
                        lambda op, name: spies.get(name) if op == "matmul" and name in spies
                        else get(op, name))
    session = bench.Session("t", str(tmp_path), compile_cold="first")
    first, later = cases("matmul", "smoke")[:2]
    for name in names:  # each compiles cold on the first case
        rec, _ = session.run(bench.Bench("matmul", name, first, "float32"))
        assert rec["status"] == "ok", rec["reason"]
        assert rec["compile_warm_built"] is None
    rec, _ = session.run(bench.Bench("matmul", names[0], later, "float32"))
    assert rec["status"] == "ok", rec["reason"]
    assert "warm only: cold measured on this implementation's first case" in \
        rec["compile_method"]
    assert rec["compile_warm_built"] == 0  # before: 1, its kernel built again


# ---------------------------------------------------------------- records
def test_records_append_load_and_survive_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    results.append(path, {"op": "matmul", "impl": "a", "case": "c", "dtype": "float32"})
    results.append(path, {"op": "matmul", "impl": "b", "case": "c", "dtype": "float32"})
    with open(path, "a") as f:
        f.write('{"op": "matmul", "impl"')  # a write cut short by a kill
    loaded = results.load(path)
    assert [r["impl"] for r in loaded] == ["a", "b"]
    assert results.record_key(loaded[0]) == "matmul/a/c-float32"


def test_latest_pointer_is_replaced(tmp_path):
    a = results.start_run("run-a", tmp_path)
    b = results.start_run("run-b", tmp_path)
    assert (tmp_path / "latest").resolve() == b.resolve() != a.resolve()


# ---------------------------------------------------------------- registry
def test_public_api():
    assert registry.ops() == ["attention", "conv2d", "matmul"]
    assert {"torch", "torch_compile", "xla", "triton", "pallas"} <= set(registry.impls("matmul"))
    impl = registry.get("matmul", "triton")
    assert impl.framework == "torch" and impl.kind == "hand"
    assert registry.get("matmul", "pallas").framework == "jax"
    assert registry.import_errors() == {}
    with pytest.raises(ValueError, match="op must be one of"):
        registry.impls("softmax")
    with pytest.raises(KeyError, match="unknown matmul implementation"):
        registry.get("matmul", "nope")


def test_fp32_is_true_fp32_in_torch_once_the_implementations_load():
    """torch.matmul's default, and cuDNN's convolutions made so (torch's default lets them use
    TF32): the fp32 budget is four times the torch op's own error."""
    registry.impls("conv2d")
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_register_adds_and_disables(monkeypatch):
    registry.load_builtins()  # before the copy: loaded into it, they would go when it goes
    monkeypatch.setitem(registry._IMPLS, "matmul", dict(registry._IMPLS["matmul"]))
    monkeypatch.setattr(registry, "_DISABLED", dict(registry._DISABLED))

    @registry.register("matmul", "mine", framework="torch")
    def mine(a, b):
        return a @ b

    assert "mine" in registry.impls("matmul")
    assert registry.get("matmul", "mine").kind == "plugin"
    registry.register("matmul", "gone", framework="torch", enabled=False, reason="no GPU")(mine)
    assert "gone" not in registry.impls("matmul")
    assert registry.disabled("matmul")["gone"] == "no GPU"
    with pytest.raises(KeyError, match="no GPU"):
        registry.get("matmul", "gone")
    # a plugin under a name already taken would have its records read as the other's
    with pytest.raises(ValueError, match="matmul implementation name 'torch' is taken by the "
                                         "stock implementation; a plugin needs a name of its own"):
        registry.register("matmul", "torch", framework="torch")(mine)
    assert registry.get("matmul", "torch").kind == "stock"
    with pytest.raises(ValueError, match="'gone' is taken by an implementation disabled here"):
        registry.register("matmul", "gone", framework="torch")(mine)
    with pytest.raises(ValueError, match="framework must be"):
        registry.register("matmul", "x", framework="numpy")
    same = lambda a: a  # noqa: E731
    with pytest.raises(ValueError, match="layout is for JAX implementations"):
        registry.register("matmul", "x", framework="torch",
                          layout=registry.Layout(mine, same, same))


def test_cold_compile_once_per_implementation_when_asked(tmp_path):
    """compile_cold="first": the first case of an (op, implementation, dtype, mode) compiles cold
    and warm, later cases warm only; another dtype starts cold again. Results stay checked."""
    from harness.bench import Bench, Session
    from harness.cases import cases

    session = Session("t", str(tmp_path), compile_cold="first")
    small = cases("matmul", "smoke")[:2]
    recs = [session.run(Bench("matmul", "xla", case, dtype))[0]
            for dtype in ("float32", "bfloat16") for case in small]
    assert [r["status"] for r in recs] == ["ok"] * 4
    assert [r["compile_cold_s"] is None for r in recs] == [False, True, False, True]
    assert all(r["compile_warm_s"] is not None for r in recs)
    assert "cold measured on this implementation's first case" in recs[1]["compile_method"]


def test_a_compilers_process_start_up_is_paid_once_outside_every_cold_figure(tmp_path,
                                                                              monkeypatch):
    """A compiler's once-per-process start-up (torch.compile on this machine: 10 s the first
    time, for its C++ instruction-set probes) is paid before the process's first cold call of
    it and recorded apart; no case's cold figure holds it, so the first case is not the only
    one to carry it."""
    from harness import bench
    from harness import compile as compile_mod
    from harness.cases import cases

    started = []

    def slow_start():
        started.append(1)
        time.sleep(0.5)

    monkeypatch.setattr(compile_mod, "_STARTUP_S", {})
    monkeypatch.setitem(compile_mod._STARTERS, "jax", slow_start)
    session = bench.Session("t", str(tmp_path), policy=timing.Policy(0.0, 0.0, 2, 2),
                            compile_cold="each")
    recs = [session.run(bench.Bench("matmul", "xla", case, "float32"))[0]
            for case in cases("matmul", "smoke")[:2]]
    assert len(started) == 1 and [r["status"] for r in recs] == ["ok", "ok"]
    assert [r["compile_startup_s"] for r in recs] == [pytest.approx(0.5, abs=0.2)] * 2
    assert all(r["compile_cold_s"] < 0.5 for r in recs)
    assert ["compiler_start_up" in [p["name"] for p in r["phases"]] for r in recs] == [True,
                                                                                      False]
    eager = session.run(bench.Bench("matmul", "torch", cases("matmul", "smoke")[0],
                                    "float32"))[0]
    assert eager["compile_startup_s"] is None  # nothing to compile


def test_a_first_case_failing_before_its_record_holds_cold_leaves_the_next_case_cold(
        tmp_path, monkeypatch):
    """Under compile_cold="first" a later case is warm only because its implementation's first
    case holds the cold figure: when that case fails after compiling (here its timing), the
    next one compiles cold instead of pointing at a figure no record holds."""
    from harness import bench
    from harness.cases import cases

    real, calls = timing.time_fn, []

    def fails_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.timing, "time_fn", fails_first)
    session = bench.Session("t", str(tmp_path), compile_cold="first")
    recs = [session.run(bench.Bench("matmul", "xla", case, "float32"))[0]
            for case in cases("matmul", "smoke")[:3]]
    assert [r["status"] for r in recs] == ["failed", "ok", "ok"]
    assert [r["compile_cold_s"] is None for r in recs] == [True, False, True]
    assert "warm only" not in recs[1]["compile_method"]
    assert "cold measured on this implementation's first case" in recs[2]["compile_method"]


def test_torch_compile_backward_reruns_after_a_fwd_bwd_benchmark(tmp_path):
    """A bwd benchmark reruns one backward (retain_graph). Once a fwd_bwd benchmark of
    torch_compile had run in the process, the backward of a grouped-query case came compiled
    with donated buffers and refused every rerun; then fwd_bwd runs again with them."""
    from harness.bench import Bench, Session

    session = Session("t", str(tmp_path), policy=timing.Policy(0.0, 0.0, 2, 2),
                      compile_cold="first")
    order = [("b1_h2_q8_k8_d16_causal", "fwd_bwd"), ("b1_h2kv1_q1_k16_d16_full", "bwd"),
             ("b1_h2_q8_k8_d16_causal", "fwd_bwd")]
    recs = [session.run(Bench("attention", "torch_compile", cases.parse(name), "bfloat16",
                              mode))[0] for name, mode in order]
    assert [(r["status"], r["reason"]) for r in recs] == [("ok", "")] * 3


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_mosaic"])
def test_device_kernels_are_benchmarked_on_their_device_only(impl, tmp_path, monkeypatch):
    """Off a TPU (Hopper GPU) the bench records a TPU (Mosaic GPU) kernel as skipped, with the
    reason, and never calls it; the kernel itself is checked in its interpreter by
    tests/test_pallas_tpu.py (test_pallas_mosaic.py)."""
    from harness import bench, env
    from harness.cases import cases

    if impl not in registry.impls("matmul"):
        pytest.skip(registry.disabled("matmul").get(impl, f"{impl} is not registered"))
    on_device = (env.jax_device().startswith("tpu") if impl == "pallas_tpu"
                 else "interpreted" not in registry.get("matmul", impl).tags)
    if on_device:
        pytest.skip(f"{impl} is benchmarked here")
    calls = []
    spy = dataclasses.replace(registry.get("matmul", impl), fn=lambda *a, **k: calls.append(a))
    monkeypatch.setattr(bench.registry, "get", lambda op, name: spy)
    session = bench.Session("t", str(tmp_path))
    rec, timed = session.run(bench.Bench("matmul", impl, cases("matmul", "smoke")[0], "float32"))
    reason = bench.TPU_ONLY if impl == "pallas_tpu" else bench.HOPPER_ONLY
    assert (rec["status"], rec["reason"], timed, calls) == ("skipped", reason, None, [])
    assert rec["median_s"] is None and rec["framework"] == "jax"


def test_a_failed_benchmark_keeps_the_phases_it_ran(tmp_path, monkeypatch):
    """The record of an implementation that raises still says where its time went."""
    from harness import bench
    from harness.cases import cases

    def broken(a, b):
        raise RuntimeError("kernel exploded")

    get = registry.get
    spy = dataclasses.replace(get("matmul", "xla"), fn=broken)
    monkeypatch.setattr(registry, "get", lambda op, name: spy if name == "xla" else get(op, name))
    session = bench.Session("t", str(tmp_path))
    rec, timed = session.run(bench.Bench("matmul", "xla", cases("matmul", "smoke")[0],
                                         "float32"))
    assert rec["status"] == "failed" and "kernel exploded" in rec["reason"] and timed is None
    # (and the compiler's start-up, where this process had not paid it yet)
    assert [p["name"] for p in rec["phases"] if p["name"] != "compiler_start_up"] == ["setup"]
    assert rec["phases"][0]["end_ns"] >= rec["phases"][0]["start_ns"]


def test_stock_torch_ops_are_timed_without_the_suites_checks(monkeypatch):
    """A stock torch op's prepared call (what the benchmarks time) is the library call alone: the
    contract is checked once, when prepared, as a JAX implementation's checks run once, at trace
    time. The public call still checks every time."""
    from kernels import contract

    checks = []
    for name in ("matmul_args", "attention_args"):
        def counted(*args, _check=getattr(contract, name), **kwargs):
            checks.append(_check.__name__)
            return _check(*args, **kwargs)
        monkeypatch.setattr(contract, name, counted)
    a, b, q = torch.randn(3, 4), torch.randn(4, 5), torch.randn(1, 2, 5, 8)
    prepared = [registry.get("matmul", "torch").bind(a, b)]
    for impl in ("torch", "torch_math"):
        prepared.append(registry.get("attention", impl).bind(q, q, q, causal=True))
    for call in prepared:
        call(), call()
    assert checks == ["matmul_args", "attention_args", "attention_args"]
    registry.get("matmul", "torch")(a, b)
    assert checks[-1] == "matmul_args" and len(checks) == 4
    with pytest.raises(ValueError, match="b must have shape"):
        registry.get("matmul", "torch").bind(a, a)


@pytest.mark.parametrize("op, mode", [("conv2d", "fwd"), ("attention", "fwd"),
                                      ("attention", "bwd")])
def test_the_stock_error_is_measured_outside_cudnns_plan_caches(op, mode, monkeypatch):
    """The budget's stock call runs before any benchmark's first call: with cuDNN enabled it
    would run cuDNN's algorithm search (conv) or build its attention graph, which the `torch`
    implementation's cold compile is to hold. It runs with cuDNN off and cuDNN attention
    excluded, and both are restored after it."""
    from harness import bench
    from harness.cases import cases

    seen = []
    stock = registry.get(op, "torch")

    def recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.enabled, torch.backends.cuda.cudnn_sdp_enabled()))
        return stock(*args, **kwargs)

    spy = dataclasses.replace(stock, fn=recording)
    get = registry.get
    monkeypatch.setattr(registry, "get", lambda o, name: spy if name == "torch" else get(o, name))
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    before_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    ref, stock = bench.References("cpu").get(cases(op, "smoke")[0], "float32", mode)
    assert seen == [(False, False)]
    assert 0 < stock.frobenius < 1e-4 and 0 < stock.element < 1e-4
    assert torch.backends.cudnn.enabled and torch.backends.cuda.cudnn_sdp_enabled() == before_sdp


def test_compile_times_are_first_calls_less_the_steady_median():
    from harness.compile import FirstCalls

    assert FirstCalls(1.0, 0.3, None, []).compile_times(0.1) == pytest.approx((0.9, 0.2))
    assert FirstCalls(0.05, 0.05, None, []).compile_times(0.1) == (0.0, 0.0)
    assert FirstCalls(None, 0.3, None, []).compile_times(0.1) == pytest.approx((None, 0.2))


def test_a_cold_compile_of_no_time_is_still_called_cold(tmp_path, monkeypatch):
    """An implementation with a compile step whose first calls were no slower than the rest: its
    cold compile time is 0 and its record says it was measured here (it once said "warm only",
    taking the 0 for "not measured")."""
    from harness import bench
    from harness.cases import cases

    case = cases("matmul", "smoke")[0]
    # Computed here, so the cold and warm calls do no first-time work (a fresh process's first
    # matmul once took longer than a timed call's sleep on a loaded CI machine).
    arrays = inputs.make(case, "float32", "torch")
    product = arrays["a"] @ arrays["b"]
    calls = []

    def first_calls_fast(a, b):
        calls.append(1)
        if len(calls) <= 2:  # the cold and warm calls return at once, the timed ones do not
            return product.clone()
        time.sleep(0.1)
        return a @ b

    get = registry.get
    spy = dataclasses.replace(get("matmul", "torch"), fn=first_calls_fast, prepare=None,
                              reset=lambda: None)
    monkeypatch.setattr(registry, "get", lambda op, name: spy if name == "torch" else get(op, name))
    # On CPU inputs, timed by the host clock also where there is a GPU: its device timers
    # would not see the timed calls' sleep.
    monkeypatch.setattr(bench, "ON_CUDA", False)
    session = bench.Session("t", str(tmp_path), device="cpu")
    rec, _ = session.run(bench.Bench("matmul", "torch", case, "float32"))
    assert rec["status"] == "ok", rec["reason"]
    assert rec["compile_cold_s"] == 0.0
    assert "; warm after in-memory reset;" in rec["compile_method"]


def test_a_lost_cuda_context_is_recorded_and_stops_that_process(tmp_path, monkeypatch):
    """A benchmark after which the process can run no CUDA work: its record says so, and the
    runner will not run the benchmarks that would share that process (harness.runner)."""
    from harness import bench, guards
    from harness.cases import cases
    from harness.runner import Runner

    def poisons(a, b):
        monkeypatch.setattr(guards, "cuda_context_error", lambda: "AcceleratorError: simulated")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    get = registry.get
    spy = dataclasses.replace(get("matmul", "xla"), fn=poisons)
    monkeypatch.setattr(registry, "get", lambda op, name: spy if name == "xla" else get(op, name))
    runner = Runner(bench.Session("t", str(tmp_path)), "none")
    case = cases("matmul", "smoke")[0]
    later = bench.Bench("matmul", "torch", case, "float32")
    assert runner.cannot_run(later) is None
    rec, timed = runner.run(bench.Bench("matmul", "xla", case, "float32"))
    assert rec["status"] == "failed" and timed is None
    assert rec["context_lost"] == "AcceleratorError: simulated"
    assert rec["reason"].endswith("; CUDA context lost after it (AcceleratorError: simulated)")
    assert "matmul/128x128x128-float32/xla left this process's CUDA context unusable" in \
        runner.cannot_run(later)


def test_an_in_process_timeout_keeps_the_time_it_took(tmp_path, monkeypatch):
    """A call that hangs in-process until the limit's alarm: its first calls return no phases,
    so the record's last recorded phase is the setup, and the rest, up to the limit, is its
    failed step (the run's time breakdown lost it before)."""
    from harness import bench
    from harness.cases import cases
    from harness.runner import Runner

    def hangs(a, b):
        time.sleep(30)

    get = registry.get
    spy = dataclasses.replace(get("matmul", "xla"), fn=hangs)
    monkeypatch.setattr(registry, "get", lambda op, name: spy if name == "xla" else get(op, name))
    runner = Runner(bench.Session("t", str(tmp_path)), "none", timeout_s=1.0)
    rec, _ = runner.run(bench.Bench("matmul", "xla", cases("matmul", "smoke")[0], "float32"))
    assert rec["status"] == "failed" and "timeout: no result after 1 s" in rec["reason"]
    # where the call was when the limit struck, not the alarm's handler (runner.py)
    assert rec["reason"].endswith(f"(at test_harness.py:{hangs.__code__.co_firstlineno + 1})")
    names = [p["name"] for p in rec["phases"]]  # the compiler's start-up, once a process
    assert names in (["setup", timing.FAILED_STEP],
                     ["setup", "compiler_start_up", timing.FAILED_STEP]), names
    total_s = (rec["phases"][-1]["end_ns"] - rec["phases"][0]["start_ns"]) / 1e9
    assert 1.0 <= total_s < 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels are compiled on a GPU")
def test_interpreted_kernels_have_no_memory_figure(tmp_path):
    """Off a GPU the hand-written Triton and Pallas kernels run in interpreters: their records
    say so (`interpreted`, which the reports show and keep out of the kernels' geomeans) instead
    of giving the interpreter's memory as the kernel's; stock ops are measured."""
    from harness import bench
    from harness.cases import cases

    case = cases("matmul", "smoke")[0]
    session = bench.Session("t", str(tmp_path))
    for name in ("triton", "pallas"):
        assert "interpreted" in registry.get("matmul", name).tags
        rec, _ = session.run(bench.Bench("matmul", name, case, "float32"))
        assert rec["status"] == "ok", rec["reason"]
        assert (rec["peak_bytes"], rec["peak_method"]) == (None, memory.INTERPRETED)
        assert "memory" not in {p["name"] for p in rec["phases"]}
        assert rec["interpreted"] is True
    rec, _ = session.run(bench.Bench("matmul", "xla", case, "float32"))
    assert "interpreted" not in registry.get("matmul", "xla").tags
    assert rec["interpreted"] is False
    assert rec["peak_bytes"] > 0 and rec["peak_method"].startswith(memory.XLA_METHOD)


def test_triton_records_say_which_config_ran(tmp_path):
    """A Triton kernel's record names the autotune config it ran with; other records have none,
    and the autotuner is left as it was."""
    from triton.runtime.autotuner import Autotuner

    from harness import bench
    from harness.cases import cases

    run = Autotuner.run
    case = cases("matmul", "smoke")[0]
    session = bench.Session("t", str(tmp_path))
    rec, _ = session.run(bench.Bench("matmul", "triton", case, "float32"))
    assert rec["status"] == "ok", rec["reason"]
    assert list(rec["autotuned"]) == ["_matmul_kernel"]
    assert "BLOCK_M=" in rec["autotuned"]["_matmul_kernel"]
    assert "warps=" in rec["autotuned"]["_matmul_kernel"]
    rec, _ = session.run(bench.Bench("matmul", "xla", case, "float32"))
    assert rec["status"] == "ok" and "autotuned" not in rec
    assert Autotuner.run is run
