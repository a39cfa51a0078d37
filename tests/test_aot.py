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

from harness import aot, cases
from kernels.triton import attention as triton_attention
from kernels.triton import conv2d as triton_conv2d
from kernels.triton import matmul as triton_matmul
from kernels.triton._common import compile_threads, prune_by
from tests.checking import outer_env

ROOT = Path(__file__).resolve().parent.parent
TRITON_KERNELS = {"_matmul_kernel", "_matmul_tma_kernel", "_conv2d_kernel", "_fwd_kernel",
                  "_bwd_delta_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_bwd_dkv_dq_kernel"}


def _aot_builds(tmp_path, *args: str, dtype: str = "bf16") -> list[dict]:
    """`python -m harness.aot` for sm_90 with these arguments, in a process of its own; the
    builds it reports."""
    out = tmp_path / "builds.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.aot", *args, "--dtypes", dtype, "--target", "cuda:90",
         "--json", str(out)],
        cwd=ROOT, env=outer_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the other tests compile every kernel for real")
def test_every_triton_config_compiles_for_hopper(tmp_path):
    builds = _aot_builds(tmp_path, "--tier", "smoke", "--max-cases", "1", "--impls",
                         "triton,triton_tma", "--modes", "fwd,bwd", "--all-configs")
    assert {b["kernel"] for b in builds} == TRITON_KERNELS
    for b in builds:
        assert b["status"] in ("ok", "spills"), b
        assert b["shared_bytes"] <= aot.SHARED_LIMIT[90], b
    for kernel in TRITON_KERNELS - {"_bwd_delta_kernel"}:  # the delta kernel has no dot
        mine = [b for b in builds if b["kernel"] == kernel]
        assert len(mine) >= 2, f"{kernel}: only {len(mine)} config(s) built"  # all autotuned
        assert any(b["mma"] == "wgmma" for b in mine), f"{kernel}: no config uses wgmma"
    for kernel, configs in (("_matmul_kernel", triton_matmul._GPU_CONFIGS),
                            ("_matmul_tma_kernel", triton_matmul._TMA_GPU_CONFIGS),
                            ("_conv2d_kernel", triton_conv2d._GPU_CONFIGS)):
        built = {b["config"] for b in builds if b["kernel"] == kernel}
        assert len(built) == len(configs), (kernel, built)
    # tensor-descriptor loads and stores became TMA copies; nothing else uses TMA
    for b in builds:
        assert b["tma"] == (b["kernel"] == "_matmul_tma_kernel" or "TMA=True" in b["config"]), b
    assert any("TMA=True" in b["config"] for b in builds)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the other tests compile every kernel for real")
def test_decode_and_depthwise_kernels_compile_for_hopper(tmp_path):
    """The kernels that the first smoke cases above do not reach: attention's split-KV decode
    kernels on the standard tier's decode cases (Sq = 1, GQA, D = 128) and conv2d's multiply-add
    kernel on a depthwise layer."""
    builds = _aot_builds(tmp_path, "--ops", "attention,conv2d", "--impls", "triton", "--tier",
                         "standard", "--cases", "_q1_|dw_c144", "--modes", "fwd")
    assert {b["kernel"] for b in builds} == {"_decode_kernel", "_decode_combine_kernel",
                                             "_grouped_direct_kernel"}
    for b in builds:
        assert b["status"] == "ok", b  # no spills either
    decode = [b for b in builds if b["kernel"] == "_decode_kernel"]
    # every config but float32's own (these cases are bf16)
    assert len(decode) == (len(triton_attention._DECODE_GPU_CONFIGS)
                           - len(triton_attention._DECODE_FP32))
    assert all(b["mma"] for b in decode)  # 16 packed rows: too few for wgmma's 64
    assert {b["tma"] for b in decode} == {True, False}
    direct = [b for b in builds if b["kernel"] == "_grouped_direct_kernel"]
    assert len(direct) == len(triton_conv2d._DIRECT_GPU_CONFIGS)
    assert not any(b["mma"] for b in direct)  # multiply-adds, no dot


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the other tests compile every kernel for real")
def test_fp32_attention_takes_tiles_that_compile_for_hopper(tmp_path):
    """float32 attention, forward and backward, at D=128 and in a decode step: every tile its
    autotuners try fits in shared memory and spills at most 2 KB a thread. (With the 16-bit
    tiles it spilled up to 193 KB a thread on these cases.)"""
    builds = _aot_builds(tmp_path, "--ops", "attention", "--impls", "triton", "--tier",
                         "standard", "--cases", "b16_h16_q1024_k1024_d128_causal|_q1_k4096_",
                         dtype="fp32")
    assert {"_fwd_kernel", "_decode_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"} <= {
        b["kernel"] for b in builds}
    for b in builds:
        assert b["status"] in ("ok", "spills") and b["spill_bytes"] <= 2048, b
        assert b["shared_bytes"] <= aot.SHARED_LIMIT[90], b


# One case of each Pallas kernel in the standard tier: the large square matmul and the 16-row one,
# attention at D = 128 (forward and backward) and a decode step (split-KV forward), ResNet 3x3
# convs 56 and 7 pixels wide (one row and 8 rows a program) and a depthwise one.
PALLAS_CASES = ("8192x8192x8192|16x4096x4096|b4_h16_q4096_k4096_d128_causal|b8_h32kv8_q1_k4096_"
                "|c64_3x3_n32|c512_3x3_n32|dw_c144")
PALLAS_KERNELS = {"matmul_grouped_tiles", "flash_attention_fwd", "flash_attention_fwd_split_kv",
                  "flash_attention_dq", "flash_attention_dkv", "conv2d_nhwc_implicit_gemm",
                  "conv2d_nhwc_depthwise"}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the other tests compile every kernel for real")
def test_pallas_kernels_compile_for_hopper(tmp_path):
    """Pallas' GPU lowering of each kernel, compiled by Triton for sm_90 (on the GPU, XLA's copy
    of Triton compiles the same modules)."""
    builds = _aot_builds(tmp_path, "--impls", "pallas", "--tier", "standard", "--cases",
                         PALLAS_CASES, "--modes", "fwd,bwd")
    assert {b["kernel"] for b in builds} == PALLAS_KERNELS
    for b in builds:
        assert b["status"] == "ok" and b["registers"], b  # no spills either
        assert b["shared_bytes"] <= aot.SHARED_LIMIT[90], b
    dkv = [b for b in builds if b["kernel"] == "flash_attention_dkv"]
    assert all(b["config"].endswith("warps=8, stages=2") for b in dkv)  # four spill at D = 128
    for b in builds:
        # tiles of 64 rows or more become warpgroup MMAs; those of the 16-row matmul and of the
        # decode step's queries (4 a kv head) mma.sync; the depthwise kernel has no dot
        rows_under_64 = b["cases"][0].startswith("16x4096") or (
            b["cases"][0].startswith("b8_h32kv8_q1_") and b["kernel"] != "flash_attention_dkv")
        expected = ("" if b["kernel"] == "conv2d_nhwc_depthwise"
                    else "mma" if rows_under_64 else "wgmma")
        assert b["mma"] == expected, b


def test_impls_that_aot_cannot_compile_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        aot.main(["--ops", "matmul", "--impls", "pallas,pallas_mosaic"])
    assert stop.value.code == 2
    assert ("--impls: pallas_mosaic is not a Triton or Pallas implementation of matmul; "
            "those are pallas, triton, triton_tma") in capsys.readouterr().err


@pytest.mark.parametrize("target", ["rocm:90", "cuda:sm90", "cuda"])
def test_targets_that_are_not_cuda_capabilities_are_refused(target, capsys):
    with pytest.raises(SystemExit) as stop:
        aot.main(["--ops", "matmul", "--target", target])
    assert stop.value.code == 2
    assert f"--target: cuda:<capability>, e.g. cuda:90, not {target!r}" in capsys.readouterr().err


def test_a_capability_pallas_cannot_lower_for_builds_triton_alone(capsys, monkeypatch):
    """JAX names no GPU of compute capability 7.5 here, so Pallas cannot lower for it; the Triton
    kernels still compile for it."""
    with pytest.raises(SystemExit) as stop:
        aot.main(["--ops", "matmul", "--target", "cuda:75"])
    assert stop.value.code == 2
    assert ("--target: pallas lower here for a capability of 80, 86, 89, 90, 100, not "
            "'cuda:75'") in capsys.readouterr().err
    with pytest.raises(ValueError, match="capability=75: Pallas lowers here for one of"):
        aot.lower_for_cuda(lambda x: x, 1.0, capability=75)
    targets = []
    monkeypatch.setattr(aot, "compile_all", lambda launches, target, prune: targets.append(target)
                        or [aot.Build("k", "c", ["case"])])
    assert aot.main(["--ops", "matmul", "--impls", "triton", "--target", "cuda:75",
                     "--max-cases", "1"]) == 0
    assert targets == ["cuda:75"]


def test_a_target_whose_shared_memory_limit_is_unknown_is_refused(capsys):
    """Its builds could not be checked against the limit: on cuda:100 (then unknown) and
    cuda:120 a block asking for 256 KiB was "spills", not over the limit, and the run exited 0."""
    with pytest.raises(SystemExit) as stop:
        aot.main(["--ops", "matmul", "--impls", "triton", "--target", "cuda:120"])
    assert stop.value.code == 2
    assert "--target: no shared-memory limit is known here for 'cuda:120'" in (
        capsys.readouterr().err)
    assert aot.SHARED_LIMIT[100] == aot.SHARED_LIMIT[90]  # Blackwell's, as Hopper's: 227 KiB


@pytest.mark.parametrize("args, message", [
    (["--ops", "matmu"], "--ops: matmu is not an op; those are attention, conv2d, matmul"),
    (["--dtypes", "fp8"], "--dtypes: dtype must be one of ['float32', 'float16', 'bfloat16']")])
def test_unknown_ops_and_dtypes_are_refused(args, message, capsys):
    """make aot OPS=matmu ended in a ValueError traceback from the registry, DTYPES=fp8 in a
    KeyError from the launches."""
    with pytest.raises(SystemExit) as stop:
        aot.main([*args, "--impls", "triton", "--shapes", "33x17x9"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_dtype_named_twice_is_built_once(capsys, monkeypatch):
    """--dtypes fp32,float32 launched every case twice: each build counted two cases for one."""
    found = []
    monkeypatch.setattr(aot, "compile_all", lambda launches, target, prune: found.extend(launches)
                        or [aot.Build("k", "c", ["case"])])
    assert aot.main(["--ops", "matmul", "--impls", "triton", "--shapes", "33x17x9", "--dtypes",
                     "fp32,float32"]) == 0
    assert [launch.case for launch in found] == ["33x17x9 float32"]


def test_a_selection_with_no_kernel_fails(capsys):
    """A --cases pattern that finds no case printed "0 kernel builds" and exited 0."""
    assert aot.main(["--ops", "matmul", "--impls", "triton", "--cases", "no_such_case"]) == 1
    assert "no kernel builds" in capsys.readouterr().err


def test_launches_are_those_of_the_target_gpu():
    """Off a GPU the launchers took TMA for any target: for cuda:80 (an A100, no TMA) the
    captured attention forward loaded through descriptors and triton_tma was built, neither of
    which an A100 runs."""
    def kernels_launched(capability):
        found = aot.launches(["matmul", "attention"], "smoke", ["bfloat16"], ["fwd"],
                             max_cases=1, capability=capability,
                             impls=["triton", "triton_tma"])
        # TMA_OK: whether the launcher lets the kernel load by TMA (an argument on every
        # platform; the interpreter also fixes the config's TMA, a GPU's autotuner prunes by it)
        return [(getattr(launch.kernel, "fn", launch.kernel).__name__,
                 dict(zip(launch.kernel.arg_names, launch.args)).get("TMA_OK"))
                for launch in found]

    hopper, ampere = kernels_launched(90), kernels_launched(80)
    assert "_matmul_tma_kernel" in [name for name, _ in hopper]
    assert "_matmul_tma_kernel" not in [name for name, _ in ampere]
    assert [tma for name, tma in hopper if name == "_fwd_kernel"] == [True]
    assert [tma for name, tma in ampere if name == "_fwd_kernel"] == [False]


def test_user_shapes_replace_the_tier(capsys):
    """--shapes (make aot SHAPES=): the launches of those cases only; a bad name is refused."""
    shapes = [cases.parse("33x17x9"), cases.parse("b1_h2_q5_k9_d16_full")]
    found = aot.launches(["matmul"], "standard", ["float16"], ["fwd"], impls=["triton"],
                         shapes=shapes)
    assert [launch.case for launch in found] == ["33x17x9 float16"]
    with pytest.raises(SystemExit) as stop:
        aot.main(["--ops", "matmul", "--shapes", "33x17x9,b1_h2_q5_k9_d16_full"])
    assert stop.value.code == 2
    assert ("--shapes: b1_h2_q5_k9_d16_full not of the selected ops matmul"
            in capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU Pallas compiles for real")
def test_pallas_capture_leaves_interpret_mode_as_it_was():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.pallas import matmul as pallas_matmul

    sink = []
    with aot.captured_pallas_modules(sink, "m"):
        aot.lower_for_cuda(pallas_matmul.matmul, jax.ShapeDtypeStruct((20, 30), jnp.bfloat16),
                           jax.ShapeDtypeStruct((30, 40), jnp.bfloat16))
    assert [(m.name, m.case, m.num_warps, m.num_stages) for m in sink] == [
        ("matmul_grouped_tiles", "m", 4, 3)]
    assert "tt.dot" in sink[0].ir
    a = jnp.ones((20, 30), jnp.float32)
    assert pallas_matmul.interpret()
    np.testing.assert_array_equal(pallas_matmul.matmul(a, a.T), np.full((20, 20), 30.0))


def _square_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


# The three builds of _square_dot below, in a process of their own: after Triton's code
# generator has run in a process, its interpreter fails there ("Cannot call @triton.jit'd outside
# of the scope of a kernel"), and this process runs interpreted kernels.
SQUARE_DOT_BUILDS = """
import json, sys
import torch
from triton.runtime.jit import JITFunction
from harness import aot
from tests.test_aot import _square_dot

builds = []
for block, dtype in ((16, torch.bfloat16), (8, torch.bfloat16), (256, torch.bfloat16)):
    a = torch.empty(block, block, dtype=dtype)
    launch = aot.Launch(JITFunction(_square_dot), (a, a, a), {"BLOCK": block}, f"square{block}")
    builds += aot.compile_all([launch], "cuda:90")
json.dump([b.__dict__ for b in builds], sys.stdout)
"""


def test_builds_that_cannot_run_on_the_gpu_are_found():
    proc = subprocess.run([sys.executable, "-c", SQUARE_DOT_BUILDS], cwd=ROOT,
                          env={**outer_env(), "TRITON_INTERPRET": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fine, narrow, wide = json.loads(proc.stdout)
    assert fine["status"] == "ok" and fine["registers"] and fine["mma"]
    # a GPU's tl.dot needs every dimension >= 16 (the interpreter runs it)
    assert narrow["status"] == "error" and "CompilationError" in narrow["error"]
    # two 128 KiB operands in shared memory at once, over the 227 KiB a block may have
    assert wide["status"] == "over_shared" and wide["shared_bytes"] > aot.SHARED_LIMIT[90]


def _kept(fits, configs, **args) -> set:
    prune = prune_by(fits)["early_config_prune"]
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(configs, args)}


def test_the_gpu_autotuners_try_only_tiles_that_fit_the_problem():
    """What the GPU autotuners compile and time (the interpreter has one config, never pruned)."""
    bf16, fp32 = str(torch.bfloat16), str(torch.float32)
    decode = _kept(triton_matmul._rows_fit, triton_matmul._GPU_CONFIGS, M_KEY=16, IN_DTYPE=bf16)
    assert {bm for bm, _ in decode} == {16, 64} and (16, 32) in decode
    square = _kept(triton_matmul._rows_fit, triton_matmul._GPU_CONFIGS, M_KEY=4096,
                   IN_DTYPE=bf16)
    assert min(bm for bm, _ in square) == 64 and (128, 256) in square
    # fp32 is checked, not raced: small tiles only
    assert _kept(triton_matmul._rows_fit, triton_matmul._GPU_CONFIGS, M_KEY=4096,
                 IN_DTYPE=fp32) == {(64, 64)}

    def widths(k, dtype=bf16):
        return {bn for _, bn in _kept(triton_conv2d._channels_fit, triton_conv2d._GPU_CONFIGS,
                                      K=k, IN_DTYPE=dtype)}
    assert widths(1) == widths(16) == {16}
    assert widths(64) == {32, 64}
    assert widths(512) == {32, 64, 128}
    assert widths(512, fp32) == {32, 64}
    # nothing fits: one config, a smallest tile, is kept, so the autotuner always has a config
    [(rows, _)] = _kept(lambda meta, args: False, triton_matmul._GPU_CONFIGS)
    assert rows == 16


def _q(dtype) -> torch.Tensor:
    return torch.empty((1, 1, 1, 16), dtype=dtype)


def test_autotuners_prune_by_tma_registers_and_dtype():
    """The attention kernels' TMA configs only where the tensors allow TMA (and that is in their
    autotune key, so a TMA choice is never reused for tensors that do not); no attention configs
    whose tiles spill at D=128; fp32 only its own tiles, smaller as the head dim grows, and the
    16-bit dtypes never those; the forward's warp-specialized configs counted by their two
    consumer partitions; no TMA matmul tiles over shared memory in fp32."""
    def kept(fits, configs, tma_ok, block_d, dtype=torch.bfloat16, o_rest=None):
        prune = prune_by(fits)["early_config_prune"]
        args = {"TMA_OK": tma_ok, "BLOCK_D": block_d, "Q": _q(dtype), "O_REST": o_rest}
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["TMA"],
                 c.kwargs.get("WS", False)) for c in prune(configs, args)]

    def fwd(tma_ok, block_d, dtype=torch.bfloat16, o_rest=None):
        return kept(triton_attention._fwd_fits, triton_attention._FWD_GPU_CONFIGS, tma_ok,
                    block_d, dtype, o_rest)

    assert (128, 64, 8, True, False) in fwd(True, 128)
    # storing O's rounding remainder (a backward follows): 128x32 tiles in 4 warps spill at D=128
    with_rest = fwd(True, 128, o_rest=_q(torch.bfloat16))
    assert (128, 32, 4, False, False) in fwd(True, 128)
    assert set(with_rest) == set(fwd(True, 128)) - {(128, 32, 4, False, False)}
    assert fwd(True, 64, o_rest=_q(torch.bfloat16)) == fwd(True, 64)
    # 128x64 tiles in 4 warps spill at D=128; warp-specialized, two partitions of 4 share them
    assert (128, 64, 4, True, False) not in fwd(True, 128)
    assert (128, 64, 4, False, False) not in fwd(True, 128)
    assert {(128, 64, 4, True, True), (128, 128, 4, True, True)} <= set(fwd(True, 128))
    assert (128, 64, 4, True, False) in fwd(True, 64)
    assert not any(ws for *_, ws in fwd(False, 64))  # warp specialization needs TMA
    # fp32: its own tiles of at most 16 x 16 x 256 elements (BLOCK_M x BLOCK_N x BLOCK_D)
    assert fwd(True, 64, torch.float32) == [(32, 32, 8, False, False), (32, 16, 4, False, False),
                                            (16, 16, 4, False, False)]
    assert fwd(True, 128, torch.float32) == [(32, 16, 4, False, False), (16, 16, 4, False, False)]
    assert fwd(True, 256, torch.float32) == [(16, 16, 4, False, False)]
    # the backward's spilling configs at D=128 (and only there)
    for fits, configs, fp32_tiles, spiller in (
            (triton_attention._dq_fits, triton_attention._DQ_GPU_CONFIGS,
             triton_attention._DQ_FP32, (128, 32, 4, False, False)),
            (triton_attention._dkv_fits, triton_attention._DKV_GPU_CONFIGS,
             triton_attention._DKV_FP32, (32, 128, 4, False, False))):
        assert spiller not in kept(fits, configs, True, 128)
        assert spiller in kept(fits, configs, True, 64)
        assert len(kept(fits, configs, True, 128)) == len(configs) - len(fp32_tiles) - 1
        for block_d in (16, 64, 128, 256):
            fp32 = kept(fits, configs, True, block_d, torch.float32)
            assert fp32 and {(m, n, w) for m, n, w, *_ in fp32} <= {t[:3] for t in fp32_tiles}
            assert all(m * n * block_d <= 16 * 16 * 256 for m, n, *_ in fp32)
            assert not {(m, n, w) for m, n, w, *_ in kept(fits, configs, True, block_d)} & {
                t[:3] for t in fp32_tiles}, "a 16-bit call would time an fp32 tile"
    # the dK/dV kernel that adds dQ too: 64x128 tiles (and 4 warps) spill at D=128
    dkv_dq = triton_attention._dkv_dq_fits, triton_attention._DKV_DQ_GPU_CONFIGS
    assert kept(*dkv_dq, True, 64) == [(64, 128, 8, False, False), (64, 128, 8, True, False),
                                       (32, 128, 8, False, False), (64, 64, 8, False, False),
                                       (64, 64, 8, True, False), (32, 64, 4, True, False)]
    assert kept(*dkv_dq, True, 128) == [(32, 128, 8, False, False), (64, 64, 8, False, False),
                                        (64, 64, 8, True, False)]
    # none fits past D=128, where the backward sums dQ in its own kernel instead
    at_256 = {"TMA_OK": True, "BLOCK_D": 256, "Q": _q(torch.bfloat16)}
    assert not any(triton_attention._dkv_dq_fits(
        {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, at_256)
        for c in triton_attention._DKV_DQ_GPU_CONFIGS)
    assert triton_attention._DQ_ATOMICS_MAX_D == 128
    for fits, configs, kernel in (
            (triton_attention._fwd_fits, triton_attention._FWD_GPU_CONFIGS, "_fwd_kernel"),
            (triton_attention._dq_fits, triton_attention._DQ_GPU_CONFIGS, "_bwd_dq_kernel"),
            (triton_attention._dkv_fits, triton_attention._DKV_GPU_CONFIGS, "_bwd_dkv_kernel"),
            (*dkv_dq, "_bwd_dkv_dq_kernel")):
        assert any(tma for *_, tma, _ in kept(fits, configs, True, 128)), kernel
        assert not any(tma for *_, tma, _ in kept(fits, configs, False, 128)), kernel
        assert "TMA_OK" in getattr(triton_attention, kernel).keys

    def matmul_tiles(dtype):
        kept = prune_by(triton_matmul._tma_fits)["early_config_prune"](
            triton_matmul._TMA_GPU_CONFIGS, {"M_KEY": 4096, "IN_DTYPE": str(dtype)})
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}

    assert (128, 256) in matmul_tiles(torch.bfloat16)
    assert matmul_tiles(torch.float32) == {(128, 64)}


# An autotuner's first launch for a new key on a Hopper GPU, played on this CPU: a stand-in
# driver makes Triton's launch path compile for sm_90 (nothing is launched), in a process of its
# own with TRITON_INTERPRET=0. For each autotuned kernel of the matmul and attention launchers it
# records the threads that compiled while the autotuner chose its configs, and whether the
# launches the autotuner then times find their binaries already in memory.
PARALLEL_COMPILE = """
import json, sys, threading
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from harness import aot


class Hopper:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(Hopper())
report = []
for launch in aot.launches(["matmul", "attention"], "smoke", ["bfloat16"], ["fwd"], max_cases=1):
    tuner, kwargs = launch.kernel, launch.kwargs
    if not isinstance(tuner, Autotuner):
        continue
    fn = tuner.fn
    cache = fn.device_caches[0][0]
    compiled_by, compile = [], fn.compile

    def counted(*args, **options):
        compiled_by.append(threading.current_thread().name)
        return compile(*args, **options)

    fn.compile = counted
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    configs = tuner.prune_configs({**kwargs, "grid": (1,), "warmup": False})
    while_pruning = list(compiled_by)
    found = []
    for config in configs:  # as the autotuner launches each config to time it
        if config.pre_hook is not None:
            config.pre_hook({**tuner.nargs, **kwargs, **config.all_kwargs()})
        kernel = fn.run(*launch.args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
        found.append(any(kernel is k for k in cache.values()))
    report.append({"kernel": fn.__name__, "configs": len(configs), "binaries": len(cache),
                   "while_pruning": while_pruning, "later": compiled_by[len(while_pruning):],
                   "found": found, "tma": sum(c.kwargs.get("TMA", False) for c in configs),
                   "ws": sum(c.kwargs.get("WS", False) for c in configs)})

# a config that does not compile (a dot 8 wide) is left to its timed launch; the others are built
import torch, triton
from kernels.triton._common import autotune
from tests.test_aot import _square_dot
square = autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 8})], [])(
    JITFunction(_square_dot))
a = torch.empty(16, 16, dtype=torch.bfloat16)
square.nargs = {"a_ptr": a, "b_ptr": a, "c_ptr": a}
report.append({"kernel": "square", "configs": len(square.prune_configs({})),
               "binaries": len(square.fn.device_caches[0][0])})
json.dump(report, sys.stdout)
"""


def test_autotuners_compile_their_configs_in_parallel_before_timing_them():
    proc = subprocess.run([sys.executable, "-c", PARALLEL_COMPILE], cwd=ROOT,
                          env={**outer_env(), "TRITON_INTERPRET": "0",
                               "KERNELS_COMPILE_THREADS": "2"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {r["kernel"]: r for r in json.loads(proc.stdout)}
    assert report.pop("square") == {"kernel": "square", "configs": 2, "binaries": 1}
    assert {"_matmul_kernel", "_matmul_tma_kernel", "_fwd_kernel"} <= set(report)
    for kernel, r in report.items():
        assert r["configs"] >= 2, r
        # one binary per config, every one built by the pool while the configs were chosen ...
        assert r["binaries"] == r["configs"] == len(r["while_pruning"]), r
        assert all(name.startswith("triton-compile") for name in r["while_pruning"]), r
        # ... and the launches that time them compile nothing more
        assert r["later"] == [] and all(r["found"]), r
    # among them TMA and warp-specialized configs
    assert report["_matmul_tma_kernel"]["ws"] >= 1
    assert report["_fwd_kernel"]["tma"] >= 1 and report["_fwd_kernel"]["ws"] >= 1


def test_compile_threads_setting(monkeypatch):
    monkeypatch.setenv("KERNELS_COMPILE_THREADS", "3")
    assert compile_threads() == 3
    monkeypatch.delenv("KERNELS_COMPILE_THREADS")
    assert compile_threads() >= 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KERNELS_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="KERNELS_COMPILE_THREADS"):
            compile_threads()
