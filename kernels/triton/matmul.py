"""Hand-written Triton matmul: tiled, grouped program order, fp32 accumulation, masked edges.

Two kernels: `triton`, one program per output tile with pointer loads (any GPU, any strides), and
`triton_tma`, for Hopper-class GPUs: persistent (one program per SM walking the tiles), with
operands and output moved by the Tensor Memory Accelerator through tensor descriptors that each
program makes. Its autotuner also tries warp-specialized configs (Triton's Hopper warp
specialization: a producer warpgroup issues the TMA loads, two consumer warpgroups each
accumulate half of a 128-row tile by wgmma), which Triton builds only from descriptors made in
the kernel and a tile loop that is not flattened.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import ON_CUDA, contract, registry
from kernels.triton._common import (DEVICE_TYPE, SM90_TAG, TAGS, autotune, cdiv, check_out,
                                    dot_precision, grouped_tile, next_pow2, pick_configs,
                                    reset_jit, resolved, small_tile_if_fp32, tma_device,
                                    tma_ready, to_output, upcast_dot, use_descriptor_allocator)


def _config(bm, bn, bk, group, stages, warps, ws=False):
    """ws (TMA kernel only): warp-specialized, `warps` being those of one partition (4 make 12
    in all)."""
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}
    return triton.Config(meta | ({"WS": True} if ws else {}), num_stages=stages, num_warps=warps)


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
    """Skinny problems (M <= 32) get tiles of at most 64 rows; the 16-row tiles are only for them.
    fp32: tiles of at most 64x64."""
    if not small_tile_if_fp32(meta, args["IN_DTYPE"] == str(torch.float32), 64 * 64):
        return False
    if args["M_KEY"] <= 32:
        return meta["BLOCK_M"] <= 64
    return meta["BLOCK_M"] > 16


# The interpreter's cost is per program and per op, not per element: 64x64 tiles run a 256^3
# matmul 4x faster than 32x32 ones, and the test shapes (65, 129, 515, 1031) still cross tiles.
_INTERPRET_CONFIGS = [_config(64, 64, 32, 4, 1, 4)]

# Both kernels tune per (M, N, K rounded up to powers of two, input dtype).
_MATMUL_KEY = ["M_KEY", "N_KEY", "K_KEY", "IN_DTYPE"]


@autotune(pick_configs(_GPU_CONFIGS, _INTERPRET_CONFIGS), _MATMUL_KEY, _rows_fit)
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


# ---------------------------------------------------------------- persistent, TMA (Hopper)
# The TMA engine fills rows past M with zeros without reading memory, so decode-sized M takes
# 64-row tiles (the smallest warpgroup MMA) with a deep K step; the rest as the pointer kernel's,
# and warp-specialized 128-row tiles (two consumer warpgroups of 64 rows).
_TMA_GPU_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8),
    _config(128, 128, 64, 8, 4, 8),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 64, 64, 8, 4, 4),
    _config(64, 64, 128, 1, 4, 4),
    _config(64, 32, 128, 1, 4, 4),
    _config(128, 256, 64, 8, 3, 4, ws=True),
    _config(128, 128, 64, 8, 4, 4, ws=True),
]
_TMA_INTERPRET_CONFIGS = [_config(64, 64, 32, 4, 1, 4)]


_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may have on Hopper


def _tma_fits(meta, args) -> bool:
    """Decode-sized problems (M <= 64) get the 64-row tiles, and only they do; and the staged
    operand tiles plus the output tile must fit in shared memory (fp32 tiles are twice the size
    of bf16 ones: `make aot` showed three of these configs over the limit in fp32)."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    elem = 4 if args["IN_DTYPE"] == str(torch.float32) else 2
    shared = ((bm * bk + bk * bn) * meta["num_stages"] + bm * bn) * elem
    return (bm == 64) == (args["M_KEY"] <= 64) and shared <= _SHARED_LIMIT


@autotune(pick_configs(_TMA_GPU_CONFIGS, _TMA_INTERPRET_CONFIGS), _MATMUL_KEY, _tma_fits)
@triton.jit
def _matmul_tma_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                       M_KEY, N_KEY, K_KEY,  # autotune key only
                       IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr = False):
    """Row-major a, b and c (unit column strides: the launcher checks) through descriptors made
    here, once per program."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    # Each program walks every NUM_PROGRAMS-th tile. Without warp specialization the two loops
    # are flattened, so the compiler pipelines the next tile's loads under this tile's last
    # steps and store; with it (which needs them apart) the producer runs ahead by itself.
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, flatten=not WS,
                         warp_specialize=WS):
        pid_m, pid_n = grouped_tile(tile, grid_m, grid_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation for accuracy
        for step in range(k_steps):
            # Out-of-bounds parts of a tile load as zeros (no masks): partial tiles add nothing.
            a = a_desc.load([row, step * BLOCK_K])
            b = b_desc.load([step * BLOCK_K, col])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # the store writes only the part of the tile inside the output
        c_desc.store([row, col], to_output(acc, c_ptr.dtype.element_ty, UPCAST))


@functools.cache
def _num_programs(device_index: int | None) -> int:
    """One program per SM on a GPU; under the interpreter a few, so each walks several tiles."""
    if not ON_CUDA:
        return 3
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_tma(a, b, out, dims: contract.MatmulDims) -> None:
    programs = _num_programs(out.device.index)
    use_descriptor_allocator()

    def grid(meta):
        tiles = cdiv(dims.M, meta["BLOCK_M"]) * cdiv(dims.N, meta["BLOCK_N"])
        return (min(programs, tiles),)

    _matmul_tma_kernel[grid](a, b, out, dims.M, dims.N, dims.K, a.stride(0), b.stride(0),
                             out.stride(0), *_tuning_keys(dims), **_dtype_flags(a.dtype),
                             NUM_PROGRAMS=programs)


# ---------------------------------------------------------------- launchers
def _tuning_keys(dims: contract.MatmulDims) -> tuple[int, ...]:
    """M, N, K rounded up to powers of two: both kernels' autotune keys (M_KEY, N_KEY, K_KEY)."""
    return tuple(next_pow2(n) for n in (dims.M, dims.N, dims.K))


def _dtype_flags(dtype: torch.dtype) -> dict:
    return dict(IN_DTYPE=str(dtype), PRECISION=dot_precision(dtype), UPCAST=upcast_dot(dtype))


def launch(a, b, out, dims: contract.MatmulDims) -> None:
    """The pointer kernel on arguments already checked (`dims` from contract.matmul_args, or
    a 1x1 conv's GEMM view): no checks here, as they cost host time on every call."""
    def grid(meta):
        return (cdiv(dims.M, meta["BLOCK_M"]) * cdiv(dims.N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](a, b, out, dims.M, dims.N, dims.K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), *_tuning_keys(dims),
                         **_dtype_flags(a.dtype))


def _checked(a, b, out) -> contract.MatmulDims:
    dims = contract.matmul_args(a, b, "torch")
    contract.check_device("a", a, DEVICE_TYPE)
    contract.check_device("b", b, DEVICE_TYPE)
    if out is not None:
        check_out(out, (dims.M, dims.N), a)
    return dims


def _launch_tma_where_ready(a, b, out, dims: contract.MatmulDims) -> None:
    """The TMA kernel where the GPU has TMA and a descriptor can take every tensor, else the
    pointer kernel."""
    if tma_device(a.device) and all(tma_ready(t) for t in (a, b, out)):
        _launch_tma(a, b, out, dims)
    else:
        launch(a, b, out, dims)


def _run(a, b, dims: contract.MatmulDims, out, launcher) -> torch.Tensor:
    if out is None:
        out = torch.empty((dims.M, dims.N), dtype=a.dtype, device=a.device)
    launcher(a, b, out, dims)
    return out


class _Matmul(torch.autograd.Function):
    """c = a @ b, its gradients by the same kernel: da = dc b^T, db = a^T dc."""

    @staticmethod
    def forward(ctx, a, b, dims, launcher):
        ctx.save_for_backward(a, b)
        ctx.dims, ctx.launcher = dims, launcher
        return _run(a, b, dims, None, launcher)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        (dc,), (M, K, N) = resolved(dc), (ctx.dims.M, ctx.dims.K, ctx.dims.N)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = _run(dc, b.mT, contract.MatmulDims(M, N, K), None, ctx.launcher)
        if ctx.needs_input_grad[1]:
            db = _run(a.mT, dc, contract.MatmulDims(K, M, N), None, ctx.launcher)
        return da, db, None, None


def _matmul(a, b, out, launcher) -> torch.Tensor:
    dims = _checked(a, b, out)
    a, b = resolved(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        if out is not None:
            raise ValueError("out cannot be given when a or b requires grad")
        return _Matmul.apply(a, b, dims, launcher)
    return _run(a, b, dims, out, launcher)


def matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in the inputs' dtype, differentiable in a and b. Any
    strides; `out` may be given."""
    return _matmul(a, b, out, launch)


def matmul_tma(a: torch.Tensor, b: torch.Tensor, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """As `matmul`, through the persistent TMA kernel. Tensors a descriptor cannot take (a row
    stride that is not a multiple of 16 bytes: K or N not a multiple of 8 in 16-bit dtypes, of
    4 in fp32; transposed or broadcast views; see _common.tma_ready) go to the pointer kernel
    instead: the record's `autotuned` field names the kernel that ran."""
    return _matmul(a, b, out, _launch_tma_where_ready)


registry.register("matmul", "triton", framework="torch", kind="hand", backend="Triton",
                  accepts_out=True, tags=TAGS, reset=lambda: reset_jit(_matmul_kernel))(matmul)
registry.register("matmul", "triton_tma", framework="torch", kind="hand",
                  backend="Triton (TMA, persistent)", accepts_out=True, tags=TAGS + (SM90_TAG,),
                  reset=lambda: reset_jit(_matmul_kernel, _matmul_tma_kernel),
                  enabled=tma_device(),
                  reason="needs a GPU of compute capability 9.0 or later (TMA)")(matmul_tma)
