"""Shared by the tests: run one implementation on one case through the harness's own
machinery (seeded inputs, NaN-poisoned output, float64 reference, stock-relative budget)."""
from __future__ import annotations

from harness import check
from harness.bench import References, _forward_calls
from harness.cases import Case
from harness import inputs
from kernels import ON_CUDA, registry

DEVICE = "cuda" if ON_CUDA else "cpu"
_refs = References(DEVICE, keep=4)


def error_and_budget(op: str, impl_name: str, case: Case, dtype: str) -> tuple[float, float]:
    impl = registry.get(op, impl_name)
    ref, stock_err = _refs.get(case, dtype, "fwd")
    arrays = inputs.make(case, dtype, impl.framework, DEVICE)
    calls = _forward_calls(impl, case, arrays)
    output = calls.first()
    if ON_CUDA and calls.repoisoned is not None:
        # On a GPU the first call of a shape autotunes: every config tried writes the poisoned
        # output, so what the chosen one leaves unwritten would hold another's values. As the
        # benchmarks do, check a call made after it into the output poisoned anew. (The
        # interpreter tries one config.)
        output = calls.repoisoned()
    return check.rel_err(calls.checked(output), ref), check.budget(dtype, stock_err)


def outer_env() -> dict:
    """The environment for a `pytest` subprocess that runs benchmarks: this one's, less the
    variables pytest-xdist sets in its workers (with them the inner pytest would take itself for
    a worker and pytest-benchmark would switch off)."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
