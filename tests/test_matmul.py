"""matmul: every registered implementation against float64, on odd shapes, in every dtype."""
import pytest
import torch

from harness import aot
from harness.cases import DTYPES, Case
from kernels import registry
from tests.checking import DEVICE, wrong_result

# 1x1x1, primes, K=1, non-multiples of every block size (16..256), tall-skinny, wide-short
SHAPES = [(1, 1, 1), (2, 3, 5), (17, 31, 13), (64, 64, 64), (65, 129, 33), (200, 1, 3),
          (1031, 16, 8), (3, 17, 515), (1, 300, 1)]


def _case(M, K, N):
    return Case("matmul", f"test_{M}x{K}x{N}", {"M": M, "K": K, "N": N})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", registry.impls("matmul"))
def test_matches_float64(impl, shape, dtype):
    wrong = wrong_result("matmul", impl, _case(*shape), dtype)
    assert not wrong, f"{impl} {shape} {dtype}: {wrong}"


@pytest.mark.parametrize("impl", registry.impls("matmul"))
def test_output_dtype_and_shape(impl):
    from harness import inputs

    fn = registry.get("matmul", impl)
    for dtype in DTYPES:
        arrays = inputs.make(_case(5, 7, 3), dtype, fn.framework, DEVICE)
        out = fn(arrays["a"], arrays["b"])
        assert tuple(out.shape) == (5, 3)
        assert str(out.dtype).removeprefix("torch.") == dtype


HAND = [n for n in registry.impls("matmul") if registry.get("matmul", n).kind == "hand"]


def _grads(impl, a, b, do):
    """(da, db) of sum(impl(a, b) * do) in float64 (numpy)."""
    fn = registry.get("matmul", impl)
    if fn.framework == "torch":
        a, b = (t.detach().clone().requires_grad_() for t in (a, b))
        return [g.double().cpu().numpy() for g in torch.autograd.grad(fn(a, b), (a, b), do)]
    import jax
    import numpy as np

    _, vjp = jax.vjp(fn, a, b)
    return [np.asarray(g, np.float64) for g in vjp(do)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 29, 45), (1, 70, 3)], ids=["37x29x45", "1x70x3"])
@pytest.mark.parametrize("impl", HAND)
def test_hand_written_gradients_match_float64(impl, shape, dtype):
    """da = do b^T and db = a^T do, by the kernel itself, within the budget the stock op's own
    gradients in the dtype set (torch's autograd of torch.matmul)."""
    import numpy as np

    from harness import check, inputs

    arrays = inputs.make(_case(*shape), dtype, "torch", DEVICE)
    arrays["do"] = inputs.make(_case(shape[0], shape[2], 1), dtype, "torch", DEVICE, salt=1)["a"]
    a64, b64, do64 = (t.double().cpu().numpy() for t in arrays.values())
    want = [do64 @ b64.T, a64.T @ do64]
    stock_err = max(np.linalg.norm(g - w) / np.linalg.norm(w)
                    for g, w in zip(_grads("torch", *arrays.values()), want))
    if registry.get("matmul", impl).framework == "jax":
        arrays = inputs.to_jax(arrays)
    for name, got, w in zip(("da", "db"), _grads(impl, *arrays.values()), want):
        err = np.linalg.norm(got - w) / np.linalg.norm(w)
        assert err <= check.budget(dtype, stock_err), f"{impl} {name}: {err:.3g}"


def test_pallas_tiles_by_shape(monkeypatch):
    """On an H100 (132 multiprocessors): 128x128 tiles, or 64x128 where those are fewer than
    the multiprocessors; 16-row problems 16x32 tiles 256 deep; float32 64x64."""
    from kernels.pallas import matmul as pallas_matmul

    monkeypatch.setattr(pallas_matmul, "multiprocessors", lambda: 132)

    def tiles(M, N, K, dtype="bfloat16"):
        b = pallas_matmul._blocks_for(M, N, K, dtype)
        return b.m, b.n, b.k, b.num_warps

    assert tiles(2048, 2048, 2048) == (128, 128, 64, 8)  # 256 tiles
    assert tiles(1024, 1024, 1024) == (64, 128, 64, 4)  # 64 tiles of 128x128
    assert tiles(16, 4096, 4096) == (16, 32, 256, 4)
    assert tiles(8192, 8192, 8192, "float32") == (64, 64, 32, 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_lowers_for_gpu(dtype, monkeypatch):
    """The GPU (Triton) lowering checks what interpret mode does not (power-of-two blocks, dot
    sizes, supported ops): lowering for CUDA here catches that breakage without a GPU."""
    import jax.numpy as jnp

    from kernels.pallas import matmul as pallas_matmul

    monkeypatch.setattr(pallas_matmul, "interpret", lambda: False)
    a = jnp.ones((37, 300), dtype)
    b = jnp.ones((300, 129), dtype)
    lowered = aot.lower_for_cuda(pallas_matmul.matmul, a, b)
    assert "triton" in lowered.as_text()


# K and N multiples of 8 (16-byte rows in every dtype), none a multiple of a tile; M anything.
TMA_SHAPES = [(67, 200, 136), (1, 8, 8), (130, 64, 72), (200, 24, 1000)]


@pytest.mark.parametrize("warp_specialized", [False, True], ids=["", "warp-specialized"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_kernel_where_descriptors_fit(shape, dtype, warp_specialized, monkeypatch):
    """triton_tma runs its persistent TMA kernel on these (the interpreter's three programs walk
    several tiles each), and it is right; also in its warp-specialized form (the tile loop not
    flattened: the interpreter runs that code as it is, a GPU's autotuner is offered only its
    warp-specialized configs)."""
    import kernels
    from harness import compile as compile_mod
    from kernels.triton import matmul as triton_matmul

    if "triton_tma" not in registry.impls("matmul"):
        pytest.skip("triton_tma needs a GPU of compute capability 9.0 or later")
    if warp_specialized:
        kernel = triton_matmul._matmul_tma_kernel
        if kernels.TRITON_INTERPRET:
            configs = [triton_matmul._config(64, 64, 32, 4, 1, 4, ws=True)]
        else:
            configs = [c for c in kernel.configs if c.kwargs.get("WS")]
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})  # no choice made here outlives the test
    ran: dict[str, str] = {}
    with compile_mod.autotune_choices(ran):
        wrong = wrong_result("matmul", "triton_tma", _case(*shape), dtype)
    assert list(ran) == ["_matmul_tma_kernel"]
    assert not wrong, f"{shape} {dtype}: {wrong}"


def test_tuned_key_launches_without_tritons_run(monkeypatch):
    """With several configs, a launch whose key is tuned runs the config Triton's run chose for
    that key without Triton's run (kernels.triton._common looks the key up itself, for less host
    time), with the same result, and autotune_choices still records the config; a new key goes
    to Triton's run, which tunes it."""
    import torch
    from triton.runtime.autotuner import Autotuner

    from harness import compile as compile_mod
    from kernels.triton import matmul as triton_matmul

    kernel = triton_matmul._matmul_kernel
    configs = [triton_matmul._config(64, 64, 32, 4, 1, 4),
               triton_matmul._config(32, 32, 32, 4, 1, 4)]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})  # no choice made here outlives the test
    # the second config "measures" faster: the choice is not merely the first config
    monkeypatch.setattr(kernel, "_bench",
                        lambda *args, config, **kw: [2.0 if config is configs[0] else 1.0] * 3)
    tritons_runs = []
    original = Autotuner.run

    def counted(self, *args, **kwargs):
        tritons_runs.append(self.base_fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(100, 70, generator=gen).to(DEVICE)
    b = torch.randn(70, 50, generator=gen).to(DEVICE)
    matmul = registry.get("matmul", "triton")
    first = matmul(a, b)
    assert tritons_runs == ["_matmul_kernel"] and list(kernel.cache.values()) == [configs[1]]
    ran: dict[str, str] = {}
    with compile_mod.autotune_choices(ran):
        second = matmul(a, b)
    assert tritons_runs == ["_matmul_kernel"]  # the tuned key, looked up without Triton's run
    assert ran == {"_matmul_kernel": compile_mod.config_text(configs[1])}
    assert torch.equal(first, second)
    expected = a.cpu().double() @ b.cpu().double()
    assert torch.allclose(second.cpu().double(), expected, rtol=1e-4, atol=1e-4)
    matmul(a.half(), b.half())  # a new key: the dtype is part of it
    assert tritons_runs == ["_matmul_kernel"] * 2 and len(kernel.cache) == 2


def test_tma_falls_back_to_pointer_kernel():
    """Rows a descriptor cannot take (K = 129: 258-byte rows in bf16; a transposed view; a
    broadcast view, stride 0) go to the pointer kernel, with the same result as `triton`."""
    import torch

    from harness import compile as compile_mod

    if "triton_tma" not in registry.impls("matmul"):
        pytest.skip("triton_tma needs a GPU of compute capability 9.0 or later")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(65, 129, generator=gen).to(DEVICE, torch.bfloat16)
    b = torch.randn(129, 40, generator=gen).to(DEVICE, torch.bfloat16)
    bt = torch.randn(128, 40, generator=gen).to(DEVICE, torch.bfloat16).t()  # strides (1, 40)
    a2 = torch.randn(65, 40, generator=gen).to(DEVICE, torch.bfloat16)
    bcast = torch.randn(1, 128, generator=gen).to(DEVICE, torch.bfloat16).expand(40, 128)
    for x, y in ((a, b), (a2, bt), (a2, bcast)):  # bt, bcast: [40, 128]
        ran: dict[str, str] = {}
        with compile_mod.autotune_choices(ran):
            out = registry.get("matmul", "triton_tma")(x, y)
        assert list(ran) == ["_matmul_kernel"]
        assert torch.equal(out, registry.get("matmul", "triton")(x, y))


def test_tma_device_asks_cuda_once_per_gpu(monkeypatch):
    """The capability is looked up per GPU (the tensors' device, else the current one) and kept:
    the launchers ask at every call. Simulated GPUs: capability 9.0 on index 0, 8.0 on index 1."""
    from kernels.triton import _common

    asked = []

    def capability(index):
        asked.append(index)
        return (9, 0) if index == 0 else (8, 0)

    monkeypatch.setattr(_common, "ON_CUDA", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    _common._capability.cache_clear()
    try:
        results = [_common.tma_device(torch.device("cuda", 0)), _common.tma_device(),
                   _common.tma_device(torch.device("cuda", 0)), _common.tma_device(),
                   _common.tma_device(torch.device("cuda"))]
    finally:
        _common._capability.cache_clear()
    assert results == [True, False, True, False, False]
    assert asked == [0, 1]
