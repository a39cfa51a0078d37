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


# float64 scores held at once: 1 GiB. The standard tier's 16k-token attention would need 64 GiB
# for its whole score matrix, so the oracles below go through the queries a block of rows at a time.
CHUNK_ELEMENTS = 2**27


def _attention_inputs(q, k, v, scale, device):
    q, k, v = (as_float64(t, device) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, Sq, _ = q.shape
    rows = max(1, CHUNK_ELEMENTS // (B * H * k.shape[2]))
    return q, k, v, scale, groups, range(0, Sq, rows), rows


def _probs(q_rows, k, row0: int, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) for the query rows row0 .. row0 + len(q_rows)."""
    scores = (q_rows @ k.transpose(-1, -2)) * scale
    if causal:  # top-left aligned, as torch SDPA's is_causal: query i sees keys j <= i
        i = torch.arange(row0, row0 + q_rows.shape[2], device=q_rows.device)[:, None]
        j = torch.arange(k.shape[2], device=q_rows.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention(q, k, v, causal=False, scale=None, device="cpu") -> torch.Tensor:
    q, k, v, scale, _, starts, rows = _attention_inputs(q, k, v, scale, device)
    return torch.cat([_probs(q[:, :, r:r + rows], k, r, causal, scale) @ v for r in starts], dim=2)


def attention_grads(q, k, v, do, causal=False, scale=None, device="cpu"):
    """(dq, dk, dv) of sum(attention(q, k, v) * do) in float64, a block of query rows at a time
    (autograd through `attention` would keep every block's probabilities alive at once)."""
    q, k, v, scale, groups, starts, rows = _attention_inputs(q, k, v, scale, device)
    do = as_float64(do, device)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r in starts:
        q_rows, do_rows = q[:, :, r:r + rows], do[:, :, r:r + rows]
        p = _probs(q_rows, k, r, causal, scale)
        dv += p.transpose(-1, -2) @ do_rows
        dp = do_rows @ v.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax's backward
        dq[:, :, r:r + rows] = (ds @ k) * scale
        dk += (ds.transpose(-1, -2) @ q_rows) * scale
    B, H, Sk, D = k.shape
    # a shared key/value head collects the gradients of every query head that reads it
    return (dq, dk.view(B, H // groups, groups, Sk, D).sum(2),
            dv.view(B, H // groups, groups, Sk, D).sum(2))


def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1, device="cpu") -> torch.Tensor:
    x = as_float64(x, device).permute(0, 3, 1, 2)  # NHWC -> NCHW
    w = as_float64(w, device).permute(3, 2, 0, 1)  # HWIO -> OIHW ([K, C / groups, KH, KW])
    out = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return out.permute(0, 2, 3, 1)  # -> NHWC
