"""Correctness: an output's error against the float64 reference, and the budget per dtype.

Two measures, each with its budget. The relative Frobenius error judges the whole output; the
worst element, on its row's scale, catches what is wrong in a few places only:

    element = max over elements of |out - ref| / max(row max |ref|, ROW_FLOOR * rms(ref))

A row is the last axis: a product's row, a query's output vector, a pixel's channels. A zeroed
64x64 tile of an 8192x8192 bf16 product is 0.8 % of its norm, inside bfloat16's 1.6 % budget,
and puts its worst element off by 0.98 of its row's largest magnitude. The row's scale rather
than the whole output's, since rows differ in size: under a causal mask a late query averages
thousands of values and its output is a few times smaller than the first queries' (1/sqrt of
the keys it sees). In a 2048-token bf16 causal attention whose last 64 queries left out their
last 64 keys, the worst element on the whole output's scale was 0.022, within its budget of
0.031; on its row's scale it is 0.56, four times its budget (3.5 to 8 times over the other
shapes and seeds tried). The floor, a quarter of the output's root mean square, keeps a row that
is near zero by chance (one-element rows: a one-channel convolution) or exactly zero (the keys a
causal mask hides get no gradient) from dividing by nothing.

The budgets follow the flash-attention tests: a candidate passes when its error is within a
factor of the error of the stock op in the same dtype on the same inputs. The stock error is
floored at the dtype's unit roundoff u (the error of merely rounding the exact answer is about
u/2), so a stock op that happens to be exact does not make the budget impossibly tight:

    budget = FACTOR * max(stock_error, u[dtype])                FACTOR = 4
    element budget = ELEMENT_FACTOR * max(stock_element, u)     ELEMENT_FACTOR = 8
    u: float32 2**-24 ~ 6.0e-8, float16 2**-11 ~ 4.9e-4, bfloat16 2**-8 ~ 3.9e-3

A worst element is an extreme value, noisier than a norm, hence the wider factor: over the smoke
cases of every operation and implementation in every dtype (forward, and attention's gradients;
on this CPU-only machine) a candidate's worst element reached 2.6 times the stock op's (floored
at u) and its Frobenius error 1.55 times. A wrong element is off by a sizeable part of its
row's scale, far past 8 u.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch

from kernels.reference import as_float64

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
FACTOR = 4.0
ELEMENT_FACTOR = 8.0
ROW_FLOOR = 0.25


class WrongOutput(ValueError):
    """An output no error can be measured on: not one array of the implementation's framework,
    or not the answer's shape. The benchmark records it as a wrong result."""


# what an implementation of each framework returns (DESIGN.md section 3)
ARRAY_TYPE = {"torch": "torch.Tensor", "jax": "jax.Array"}


def check_array(output, framework: str) -> None:
    """Raises WrongOutput unless `output` is one array of `framework`."""
    if framework == "torch":
        ok = isinstance(output, torch.Tensor)
    else:
        import jax

        ok = isinstance(output, jax.Array)
    if not ok:
        raise WrongOutput(f"output is {_described(output)}, expected one {ARRAY_TYPE[framework]} "
                          f"(framework {framework})")


def _described(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    kind = type(value)
    return f"a {kind.__module__.split('.')[0]}.{kind.__qualname__}"


class Error(NamedTuple):
    frobenius: float  # ||out - ref||_F / ||ref||_F
    element: float  # the worst element, on its row's scale (see above)


@torch.no_grad()
def error(out, ref: torch.Tensor) -> Error:
    """Both measures in float64; NaN or inf anywhere in `out` gives inf for both."""
    out64 = as_float64(out, ref.device)
    if out64.shape != ref.shape:
        raise WrongOutput(f"output has shape {tuple(out64.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out64).all():
        return Error(math.inf, math.inf)
    diff = out64.sub_(ref) if out64 is not out else out64 - ref
    ref_norm = torch.linalg.vector_norm(ref)
    frobenius = _relative(torch.linalg.vector_norm(diff), ref_norm)
    return Error(frobenius, _worst_on_row_scale(diff, ref, ref_norm))


def _worst_on_row_scale(diff: torch.Tensor, ref: torch.Tensor, ref_norm: torch.Tensor) -> float:
    """Overwrites `diff` (a large output's float64 copies are the memory this check needs)."""
    if not ref.numel():
        return 0.0
    if ref.dim() == 0:
        diff, ref = diff.reshape(1), ref.reshape(1)
    floor = ROW_FLOOR * ref_norm.item() / math.sqrt(ref.numel())  # of the root mean square
    if floor == 0:  # an all-zero answer: the error itself
        return diff.abs().max().item()
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_(min=floor)
    return diff.abs_().div_(scale).max().item()


def _relative(num: torch.Tensor, denom: torch.Tensor) -> float:
    num, denom = num.item(), denom.item()
    return num / denom if denom > 0 else num


def rel_err(out, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64; NaN or inf anywhere in `out` gives inf."""
    return error(out, ref).frobenius


def worst(errors: Iterable[Error]) -> Error:
    """Several outputs (an attention's dq, dk and dv) judged as one: the worst of each measure."""
    errors = list(errors)
    return Error(max(e.frobenius for e in errors), max(e.element for e in errors))


def budget(dtype: str, stock_err: float | None, factor: float = FACTOR) -> float:
    floor = UNIT_ROUNDOFF[dtype]
    scale = floor if stock_err is None or not math.isfinite(stock_err) else max(stock_err, floor)
    return factor * scale


def budgets(dtype: str, stock: Error | None) -> Error:
    return Error(budget(dtype, stock and stock.frobenius),
                 budget(dtype, stock and stock.element, ELEMENT_FACTOR))


def wrong_dtype(outputs: Iterable, dtype: str) -> str:
    """Outputs have the inputs' dtype (the contract): a wider one would be judged on its extra
    precision and timed writing more bytes. Why not, or "" when every one has it."""
    for out in outputs:
        got = str(out.dtype).removeprefix("torch.")
        if got != dtype:
            return f"wrong result: output dtype {got}, expected {dtype} (the inputs')"
    return ""


def wrong(err: Error, dtype: str, stock: Error | None) -> str:
    """Why the output is wrong, or "" when both measures are within their budgets."""
    if math.isinf(err.frobenius):
        return "wrong result: output holds NaN or inf"
    limit = budgets(dtype, stock)
    if not err.frobenius <= limit.frobenius:
        return f"wrong result: relative error {err.frobenius:.3g} over budget {limit.frobenius:.3g}"
    if not err.element <= limit.element:
        return (f"wrong result: worst element off by {err.element:.3g} of its row's largest "
                f"magnitude, over budget {limit.element:.3g} (relative error "
                f"{err.frobenius:.3g} within budget {limit.frobenius:.3g})")
    return ""
