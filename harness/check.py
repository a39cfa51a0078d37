"""Correctness: relative Frobenius error against the float64 reference, and the budget per dtype.

The budget follows the flash-attention tests: a candidate passes when its error is within
FACTOR times the error of the stock op in the same dtype on the same inputs. The stock error is
floored at the dtype's unit roundoff u (the error of merely rounding the exact answer is about u/2),
so a stock op that happens to be exact does not make the budget impossibly tight:

    budget = FACTOR * max(stock_error, u[dtype])       FACTOR = 4
    u: float32 2**-24 ~ 6.0e-8, float16 2**-11 ~ 4.9e-4, bfloat16 2**-8 ~ 3.9e-3
"""
from __future__ import annotations

import math

import torch

from kernels.reference import as_float64

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
FACTOR = 4.0


def rel_err(out, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64; NaN or inf anywhere in `out` gives inf."""
    out64 = as_float64(out, ref.device)
    if out64.shape != ref.shape:
        raise ValueError(f"output has shape {tuple(out64.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    denom = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(out64 - ref).item()
    return num / denom if denom > 0 else num


def budget(dtype: str, stock_err: float | None) -> float:
    floor = UNIT_ROUNDOFF[dtype]
    scale = floor if stock_err is None or not math.isfinite(stock_err) else max(stock_err, floor)
    return FACTOR * scale


def passes(err: float, dtype: str, stock_err: float | None) -> bool:
    return err <= budget(dtype, stock_err)  # False for NaN as well
