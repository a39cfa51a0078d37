"""Shared by the tests: run one implementation on one case through the harness's own
machinery (seeded inputs, NaN-poisoned output, float64 reference, stock-relative budget)."""
from __future__ import annotations

import pytest

from harness import check
from harness.bench import (References, _forward_calls, _grad_output, _jax_grad_calls,
                           _torch_grad_calls, judged)
from harness.cases import Case
from harness import inputs
from kernels import ON_CUDA, contract, registry

DEVICE = "cuda" if ON_CUDA else "cpu"
_refs = References(DEVICE, keep=4)
# The budget's scale is the stock op's own error: a broken stock op (zeros, a causal mask
# ignored) would pass its own test and loosen every other implementation's budget to about 4.
# On the tests' small shapes it must be plausible: a relative error of at most 32 u in float32
# and 4 u in 16 bits, a worst element (on its row's scale, an extreme value) of 4 times that (on
# this machine the tests' stock errors reach 5.4 u and 0.88 u, their worst elements 19 u and
# 1.4 u). Float32 done in TF32, or a wrong element, is thousands of u off.
STOCK_ERR_BOUND_U = {"float32": 32, "float16": 4, "bfloat16": 4}
STOCK_ELEMENT_BOUND_FACTOR = 4


def skip_if_no_kernel(error: NotImplementedError):
    """A pinned stock backend with no kernel for these inputs (contract.NoKernel: an SDPA
    backend, JAX's cuDNN attention) skips the test, saying why; any other NotImplementedError is
    re-raised: a failure."""
    if isinstance(error, contract.NoKernel):
        pytest.skip(str(error))
    raise error


def nan_tailed(arrays: dict) -> dict:
    """The same torch tensors, each the start of a buffer twice its size whose rest is NaN: a
    kernel that reads past an input's end (a load's bound mask left out) reads NaN and fails,
    where past the allocation it read whatever lay there and failed by chance. (JAX arrays,
    which Pallas reads through its own bounds, pass as they are.)"""
    import torch

    tailed = {}
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor):
            return arrays
        buffer = torch.full((2 * t.numel(),), float("nan"), dtype=t.dtype, device=t.device)
        tailed[name] = buffer[:t.numel()].view(t.shape).copy_(t)
    return tailed


def wrong_result(op: str, impl_name: str, case: Case, dtype: str) -> str:
    """Why the implementation's output is wrong (check.wrong), or "" when it is right."""
    impl = registry.get(op, impl_name)
    ref, stock = _refs.get(case, dtype, "fwd")
    bound = STOCK_ERR_BOUND_U[dtype] * check.UNIT_ROUNDOFF[dtype]
    assert (stock.frobenius <= bound and stock.element <= STOCK_ELEMENT_BOUND_FACTOR * bound), (
        f"the stock op's own error {stock} on {case.name} {dtype} is over {bound:.3g} (its "
        f"worst element over {STOCK_ELEMENT_BOUND_FACTOR * bound:.3g}): it cannot set the budget")
    arrays = nan_tailed(inputs.make(case, dtype, impl.framework, DEVICE))
    calls = _forward_calls(impl, case, arrays)
    output = calls.first()
    if ON_CUDA and calls.repoisoned is not None:
        # On a GPU the first call of a shape autotunes: every config tried writes the poisoned
        # output, so what the chosen one leaves unwritten would hold another's values. As the
        # benchmarks do, check a call made after it into the output poisoned anew. (The
        # interpreter tries one config.)
        output = calls.repoisoned()
    err, wrong_dtype = judged(calls, calls.checked(output), ref, "fwd", dtype, impl.framework)
    return wrong_dtype or check.wrong(err, dtype, stock)


def wrong_gradients(op: str, impl_name: str, case: Case, dtype: str) -> str:
    """As wrong_result, for the gradients of a forward and backward (the benchmarks' fwd_bwd)."""
    impl = registry.get(op, impl_name)
    refs, stock = _refs.get(case, dtype, "fwd_bwd")
    arrays = nan_tailed(inputs.make(case, dtype, impl.framework, DEVICE))
    do = _grad_output(case, dtype, impl.framework, DEVICE)
    build = _torch_grad_calls if impl.framework == "torch" else _jax_grad_calls
    calls = build(impl, case, arrays, do, "fwd_bwd")
    err, wrong_dtype = judged(calls, calls.checked(calls.first()), refs, "fwd_bwd",
                              dtype, impl.framework)
    return wrong_dtype or check.wrong(err, dtype, stock)


def outer_env() -> dict:
    """The environment for a `pytest` subprocess that runs benchmarks: this one's, less the
    variables pytest-xdist sets in its workers (with them the inner pytest would take itself for
    a worker and pytest-benchmark would switch off)."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
