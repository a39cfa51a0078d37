"""Hand-written Triton matmul: tiled, grouped program order, fp32 accumulation, masked edges."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import contract, registry
from kernels.triton._common import (DEVICE_TYPE, TAGS, autotune_bench, dot_precision,
                                    grouped_tile, pick_configs, prune_by, reset_jit, to_output,
                                    upcast_dot)


def _config(bm, bn, bk, group, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# A small bounded set for Hopper-class GPUs: large tiles for big square problems, narrow tiles for
# skinny ones. Autotuning runs once per key (M, N, K rounded up to powers of two, and the dtype),
# so odd sizes near a tuned one reuse its choice; it counts as compile time.
_GPU_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8),
    _config(256, 128, 64, 8, 3, 8),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 64, 64, 8, 4, 4),
    _config(64, 128, 64, 8, 4, 4),
    _config(64, 64, 64, 8, 5, 4),
    # Decode-like M (a few rows): the time is reading b once, which takes many SMs at once; at
    # M=16, N=4096 a 128-wide tile gives 32 programs for 132 SMs, a 32-wide one 128.
    _config(16, 128, 128, 1, 4, 4),
    _config(16, 64, 128, 1, 4, 4),
    _config(16, 32, 256, 1, 4, 4),
]


def _rows_fit(meta, args) -> bool:
    """Skinny problems (M <= 32) get tiles of at most 64 rows; the 16-row tiles are only for them."""
    if args["M_KEY"] <= 32:
        return meta["BLOCK_M"] <= 64
    return meta["BLOCK_M"] > 16


# The interpreter's cost is per program and per op, not per element: 64x64 tiles run a 256^3
# matmul 4x faster than 32x32 ones, and the test shapes (65, 129, 515, 1031) still cross tiles.
_INTERPRET_CONFIGS = [_config(64, 64, 32, 4, 1, 4)]


@triton.autotune(configs=pick_configs(_GPU_CONFIGS, _INTERPRET_CONFIGS),
                 key=["M_KEY", "N_KEY", "K_KEY", "IN_DTYPE"], prune_configs_by=prune_by(_rows_fit),
                 do_bench=autotune_bench)
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   M_KEY, N_KEY, K_KEY,  # autotune key only
                   IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation for accuracy
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        # Masked loads fill with 0 past the edges, so partial tiles add nothing.
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
    tl.store(c_ptrs, out, mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in the inputs' dtype. Any strides; `out` may be given."""
    dims = contract.matmul_args(a, b, "torch")
    contract.check_device("a", a, DEVICE_TYPE)
    contract.check_device("b", b, DEVICE_TYPE)
    if out is None:
        out = torch.empty((dims.M, dims.N), dtype=a.dtype, device=a.device)
    elif out.shape != (dims.M, dims.N) or out.dtype != a.dtype:
        raise ValueError(f"out must be a {a.dtype} tensor of shape {[dims.M, dims.N]}, "
                         f"got {out.dtype} {list(out.shape)}")

    def grid(meta):
        return (triton.cdiv(dims.M, meta["BLOCK_M"]) * triton.cdiv(dims.N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](a, b, out, dims.M, dims.N, dims.K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1),
                         *(triton.next_power_of_2(n) for n in (dims.M, dims.N, dims.K)),
                         IN_DTYPE=str(a.dtype), PRECISION=dot_precision(a.dtype),
                         UPCAST=upcast_dot(a.dtype))
    return out


registry.register("matmul", "triton", framework="torch", kind="hand", backend="Triton",
                  accepts_out=True, tags=TAGS, reset=lambda: reset_jit(_matmul_kernel))(matmul)
