"""Every Triton kernel config compiled ahead of time for Hopper (sm_90) on this CPU machine.

The Triton interpreter runs what a GPU would reject: dots under 16 wide, tiles whose shared memory
exceeds what a block may have, layouts ptxas refuses. Compiling each autotune config of each
kernel for the GPU target finds those here, before GPU time is spent (harness/aot.py).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from harness import aot
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
TRITON_KERNELS = {"_matmul_kernel", "_conv2d_kernel", "_fwd_kernel", "_bwd_delta_kernel",
                  "_bwd_dkv_kernel", "_bwd_dq_kernel"}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the other tests compile every kernel for real")
def test_every_triton_config_compiles_for_hopper(tmp_path):
    out = tmp_path / "builds.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.aot", "--tier", "smoke", "--max-cases", "1",
         "--dtypes", "bf16", "--modes", "fwd,bwd", "--target", "cuda:90", "--json", str(out)],
        cwd=ROOT, env=outer_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    builds = json.loads(out.read_text())
    assert {b["kernel"] for b in builds} == TRITON_KERNELS
    for b in builds:
        assert b["status"] in ("ok", "spills"), b
        assert b["shared_bytes"] <= aot.SHARED_LIMIT[90], b
    for kernel in TRITON_KERNELS - {"_bwd_delta_kernel"}:  # the delta kernel has no dot
        mine = [b for b in builds if b["kernel"] == kernel]
        assert len(mine) >= 2, f"{kernel}: only {len(mine)} config(s) built"  # all autotuned
        assert any(b["mma"] == "wgmma" for b in mine), f"{kernel}: no config uses wgmma"


def _square_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


@pytest.mark.parametrize("block, dtype, status", [
    (16, torch.bfloat16, "ok"),
    (8, torch.bfloat16, "error"),  # a GPU's tl.dot needs every dimension >= 16
    (256, torch.bfloat16, "over_shared"),  # two 128 KiB operands in shared memory at once
])
def test_builds_that_cannot_run_on_the_gpu_are_found(block, dtype, status):
    kernel = JITFunction(_square_dot)  # compiled, not interpreted, whatever TRITON_INTERPRET says
    a = torch.empty(block, block, dtype=dtype)
    launch = aot.Launch(kernel, (a, a, a), {"BLOCK": block}, "square")
    [build] = aot.compile_all([launch], "cuda:90")
    assert build.status == status, build
    if status == "error":
        assert "CompilationError" in build.error
    else:
        assert build.registers and build.shared_bytes is not None
