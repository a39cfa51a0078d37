"""The Mosaic GPU (Hopper) Pallas kernels beyond the every-implementation checks of test_matmul.py:
both block shapes on odd sizes with several k-steps, the race detector of GPU interpret mode, and
Mosaic GPU's own lowering for CUDA (layouts, wgmma operand shapes, shared memory), which runs here
without a GPU; compiling it to a cubin and running it needs the H100."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import registry
from kernels.pallas_mosaic import _common
from kernels.pallas_mosaic import matmul as mosaic_matmul

pytestmark = pytest.mark.skipif("pallas_mosaic" not in registry.impls("matmul"),
                                reason=_common.unavailable() or "not registered")


def _inputs(M, K, N, dtype, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, (M, K), dtype), jax.random.normal(kb, (K, N), dtype)


def _rel_err(out, a, b) -> float:
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tiles", [mosaic_matmul.Tiles(m=64, n=64, stages=2, split="m"),
                                   mosaic_matmul.Tiles(m=64, n=128, stages=3, split="n")],
                         ids=["split_m", "split_n"])
def test_blocks_on_odd_shapes_without_races(tiles, dtype):
    """Two blocks each way, four k-steps of which the last is mostly padding, two epilogue
    stores per warpgroup where n = 128: against float64, and no race found."""
    bm, bn = tiles.block
    a, b = _inputs(bm + 37, 3 * tiles.k + 5, bn + 11, dtype)
    out = mosaic_matmul.matmul(a, b, tiles=tiles)
    assert out.shape == (a.shape[0], b.shape[1]) and out.dtype == a.dtype
    budget = 4 * {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[dtype]
    assert _rel_err(out, a, b) <= budget
    if not _common.on_gpu():
        assert not _common.races_found()


@pytest.mark.skipif(_common.on_gpu(), reason="the race detector is part of interpret mode")
def test_race_detector_finds_a_race():
    """Two warpgroups writing one shared-memory tile with no barrier between: the detector that
    the test above relies on does flag it (the state is reset by the next kernel run)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_gmem, o_gmem, smem):
        wg = lax.axis_index("wg")
        smem[...] = x_gmem[...] + wg.astype(jnp.float32)
        plgpu.commit_smem()

        @pl.when(wg == 0)
        def _store():
            plgpu.copy_smem_to_gmem(smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)

    racy = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                        scratch_types=[plgpu.SMEM((64, 64), jnp.float32)], grid=(1,),
                        grid_names=("g",), num_threads=2, thread_name="wg",
                        interpret=_common.interpret_params())
    racy(jnp.ones((64, 64), jnp.float32)).block_until_ready()
    assert _common.races_found()


def test_tiles_by_shape_and_shared_memory():
    assert mosaic_matmul.tiles_for(16) == mosaic_matmul.SHORT
    assert mosaic_matmul.tiles_for(4096) == mosaic_matmul.WIDE
    for tiles in (mosaic_matmul.WIDE, mosaic_matmul.SHORT):
        assert tiles.shared_bytes(2) <= _common.SHARED_BYTES
    a, b = _inputs(8, 8, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        mosaic_matmul.matmul(a, b, tiles=mosaic_matmul.Tiles(m=128, n=256, stages=4))


def test_float32_runs_the_pallas_kernel():
    a, b = _inputs(33, 70, 17, jnp.float32)
    out = mosaic_matmul.matmul(a, b)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(registry.get("matmul", "pallas")(a, b)))


@pytest.mark.skipif(_common.on_gpu(), reason="on a GPU the kernels compile and run for real")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("M", [16, 300])
def test_lowers_for_hopper(M, dtype, monkeypatch):
    monkeypatch.setattr(mosaic_matmul, "interpret_params", lambda: None)
    a = jax.ShapeDtypeStruct((M, 520), dtype)
    b = jax.ShapeDtypeStruct((520, 200), dtype)
    jax.clear_caches()  # the jitted launcher must retrace with interpret off, and later tests
    try:  # must not find that trace
        lowered = jax.jit(mosaic_matmul.matmul).trace(a, b).lower(lowering_platforms=("cuda",))
    finally:
        jax.clear_caches()
    assert "mosaic_gpu" in lowered.as_text()
