"""Seeded inputs: fresh random values (never zeros), the same values for torch and jax."""
from __future__ import annotations

import zlib

import numpy as np
import torch

from harness.cases import Case, conv_group_channels, conv_groups

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def seed_for(case: Case, dtype: str, salt: int = 0) -> int:
    return zlib.crc32(f"{case.key}/{dtype}/{salt}".encode())


def shapes(case: Case) -> dict[str, tuple[int, ...]]:
    d = case.dims
    if case.op == "matmul":
        return {"a": (d["M"], d["K"]), "b": (d["K"], d["N"])}
    if case.op == "attention":
        return {"q": (d["B"], d["H"], d["Sq"], d["D"]), "k": (d["B"], d["Hkv"], d["Sk"], d["D"]),
                "v": (d["B"], d["Hkv"], d["Sk"], d["D"])}
    if case.op == "conv2d":
        return {"x": (d["N"], d["H"], d["W"], d["C"]),
                "w": (d["KH"], d["KW"], conv_group_channels(d), d["K"])}
    raise ValueError(f"unknown op {case.op!r}")


def options(case: Case) -> dict:
    """Keyword arguments of the op call beyond the arrays."""
    d = case.dims
    if case.op == "attention":
        return {"causal": d["causal"]}
    if case.op == "conv2d":  # groups only where there are several (not every plugin takes it)
        groups = {"groups": conv_groups(d)} if conv_groups(d) != 1 else {}
        return {k: d[k] for k in ("stride", "padding", "dilation")} | groups
    return {}


def _scale(case: Case, name: str, shape) -> float:
    """Keeps outputs near unit size: conv weights by 1/sqrt(fan-in) so fp16 does not overflow on
    deep reductions; everything else standard normal."""
    if case.op == "conv2d" and name == "w":
        return 1.0 / np.sqrt(shape[0] * shape[1] * shape[2])
    return 1.0


def make_torch(case: Case, dtype: str, device: str = "cpu", salt: int = 0) -> dict:
    """Named torch tensors for the case, generated on `device` from a seed fixed by the case."""
    gen = torch.Generator(device=device).manual_seed(seed_for(case, dtype, salt))
    out = {}
    for name, shape in shapes(case).items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        out[name] = (t * _scale(case, name, shape)).to(TORCH_DTYPES[dtype])
    return out


def to_jax(tensors: dict) -> dict:
    """The same values as jax arrays on jax's default device (zero-copy through DLPack on a GPU)."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, t in tensors.items():
        if t.is_cuda:
            out[name] = jax.dlpack.from_dlpack(t.contiguous())
        else:
            # numpy has no bfloat16: go through float32, which holds every value exactly
            arr = jnp.asarray(t.float().numpy()).astype(str(t.dtype).removeprefix("torch."))
            out[name] = jax.device_put(arr)
    return out


def make(case: Case, dtype: str, framework: str, device: str = "cpu", salt: int = 0) -> dict:
    tensors = make_torch(case, dtype, device, salt)
    return tensors if framework == "torch" else to_jax(tensors)
