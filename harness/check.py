"""Correctness: an output's error against the float64 reference, and the budget per dtype.

Two measures, each with its budget. The relative Frobenius error judges the whole output; the
worst element's error, on the output's scale (max |out - ref| / max |ref|), catches what is wrong
in a few places only: a zeroed 64x64 tile of an 8192x8192 bf16 product is 0.8 % of its norm,
inside bfloat16's 1.6 % budget, and puts the worst element off by about 40 % of the largest.

The budgets follow the flash-attention tests: a candidate passes when its error is within a
factor of the error of the stock op in the same dtype on the same inputs. The stock error is
floored at the dtype's unit roundoff u (the error of merely rounding the exact answer is about
u/2), so a stock op that happens to be exact does not make the budget impossibly tight:

    budget = FACTOR * max(stock_error, u[dtype])                FACTOR = 4
    element budget = ELEMENT_FACTOR * max(stock_element, u)     ELEMENT_FACTOR = 8
    u: float32 2**-24 ~ 6.0e-8, float16 2**-11 ~ 4.9e-4, bfloat16 2**-8 ~ 3.9e-3

A worst element is an extreme value, noisier than a norm, hence the wider factor: over the smoke
cases of every operation and implementation in every dtype (forward, and attention's gradients)
a candidate's worst element reached 3.2 times the stock op's (floored at u) and its Frobenius
error 1.55 times. A wrong element is off by a sizeable part of the output's scale, far past 8 u.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch

from kernels.reference import as_float64

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
FACTOR = 4.0
ELEMENT_FACTOR = 8.0


class Error(NamedTuple):
    frobenius: float  # ||out - ref||_F / ||ref||_F
    element: float  # max |out - ref| / max |ref|: the worst element, on the output's scale


def error(out, ref: torch.Tensor) -> Error:
    """Both measures in float64; NaN or inf anywhere in `out` gives inf for both."""
    out64 = as_float64(out, ref.device)
    if out64.shape != ref.shape:
        raise ValueError(f"output has shape {tuple(out64.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out64).all():
        return Error(math.inf, math.inf)
    diff = out64 - ref
    return Error(_relative(torch.linalg.vector_norm(diff), torch.linalg.vector_norm(ref)),
                 _relative(diff.abs().max(), ref.abs().max()) if ref.numel() else 0.0)


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


def wrong(err: Error, dtype: str, stock: Error | None) -> str:
    """Why the output is wrong, or "" when both measures are within their budgets."""
    if math.isinf(err.frobenius):
        return "wrong result: output holds NaN or inf"
    limit = budgets(dtype, stock)
    if not err.frobenius <= limit.frobenius:
        return f"wrong result: relative error {err.frobenius:.3g} over budget {limit.frobenius:.3g}"
    if not err.element <= limit.element:
        return (f"wrong result: worst element off by {err.element:.3g} of the largest magnitude, "
                f"over budget {limit.element:.3g} (relative error {err.frobenius:.3g} within "
                f"budget {limit.frobenius:.3g})")
    return ""
