"""float64 oracles for every op: they say what is right.

They take torch tensors or jax arrays (any supported dtype) and return a float64 torch tensor,
computed on the torch device given (the GPU when there is one: an 8192^3 float64 matmul takes
minutes on a CPU and milliseconds on an H100).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def as_float64(x, device: str | torch.device = "cpu") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)  # differentiable: gradient references
    # jax array: float32 holds every float16 / bfloat16 value exactly
    return torch.from_numpy(np.array(x.astype("float32"))).to(device=device,
                                                                 dtype=torch.float64)


def matmul(a, b, device="cpu") -> torch.Tensor:
    return as_float64(a, device) @ as_float64(b, device)


def attention(q, k, v, causal=False, scale=None, device="cpu") -> torch.Tensor:
    q, k, v = (as_float64(t, device) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        # top-left aligned, as torch SDPA's is_causal: query i sees keys j <= i
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def conv2d(x, w, stride=1, padding=0, dilation=1, device="cpu") -> torch.Tensor:
    x = as_float64(x, device).permute(0, 3, 1, 2)  # NHWC -> NCHW
    w = as_float64(w, device).permute(3, 2, 0, 1)  # HWIO -> OIHW
    out = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    return out.permute(0, 2, 3, 1)  # -> NHWC
