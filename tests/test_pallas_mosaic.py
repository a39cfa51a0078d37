"""The Mosaic GPU (Hopper) Pallas kernels beyond the every-implementation checks (test_matmul.py,
test_ops_all_impls.py, and test_attention_kernels.py for attention's gradients): both matmul block
shapes on odd sizes with several k-steps, attention's causal block skipping, the race detector of
GPU interpret mode, and Mosaic GPU's own lowering for CUDA (layouts, wgmma operand forms, shared
memory), which runs here without a GPU; compiling to a cubin and running it needs the H100."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import check
from kernels import reference, registry
from kernels.pallas import attention as pallas_attention
from kernels.pallas_mosaic import _common
from kernels.pallas_mosaic import attention as mosaic_attention
from kernels.pallas_mosaic import matmul as mosaic_matmul

pytestmark = pytest.mark.skipif("pallas_mosaic" not in registry.impls("matmul"),
                                reason=_common.unavailable() or "not registered")


def _inputs(M, K, N, dtype, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, (M, K), dtype), jax.random.normal(kb, (K, N), dtype)


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
    assert not check.wrong(check.error(out, reference.matmul(a, b)), dtype, None)
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


@pytest.mark.skipif(_common.on_gpu(), reason="interpret mode only")
def test_interpreter_compiles_a_kernel_body_once():
    """Four programs (128x64 blocks) of three warpgroup threads each: one compile of the thread
    body, reused by all twelve and by the next call (JAX 0.10 alone compiles it twelve times a
    call), and the results as before."""
    from jax._src.pallas.mosaic.interpret import thread_map

    from kernels.pallas import _common as pallas_common

    tiles = mosaic_matmul.Tiles(m=64, n=64, stages=2, split="m")
    _common.interpret_params()  # applies the cache
    assert thread_map._run_jaxpr is pallas_common._run_thread_body
    pallas_common._THREAD_BODIES.clear()
    for seed in (0, 1):
        a, b = _inputs(2 * 128 - 3, 70, 2 * 64 - 5, "bfloat16", seed=seed)
        out = mosaic_matmul.matmul(a, b, tiles=tiles)
        assert not check.wrong(check.error(out, reference.matmul(a, b)), "bfloat16", None)
        assert len(pallas_common._THREAD_BODIES) == 1


def test_tiles_by_shape_and_shared_memory():
    assert mosaic_matmul.tiles_for(16) == mosaic_matmul.SHORT
    assert mosaic_matmul.tiles_for(4096) == mosaic_matmul.WIDE
    for tiles in (mosaic_matmul.WIDE, mosaic_matmul.SHORT):
        assert tiles.shared_bytes(2) <= _common.SHARED_BYTES
    a, b = _inputs(8, 8, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        mosaic_matmul.matmul(a, b, tiles=mosaic_matmul.Tiles(m=128, n=256, stages=4))
    with pytest.raises(ValueError, match="stages must be >= 2"):
        mosaic_matmul.matmul(a, b, tiles=mosaic_matmul.Tiles(m=64, n=64, stages=1))


def test_float32_runs_the_pallas_kernel():
    a, b = _inputs(33, 70, 17, jnp.float32)
    out = mosaic_matmul.matmul(a, b)
    expected = registry.get("matmul", "pallas")(a, b)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


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


def _attention_inputs(B, H, Hkv, Sq, Sk, D, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(kq, (B, H, Sq, D), dtype),
            jax.random.normal(kk, (B, Hkv, Sk, D), dtype),
            jax.random.normal(kv, (B, Hkv, Sk, D), dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_blocks_skipped_and_masked_without_races(causal):
    """Three blocks of 128 query rows and five key blocks of 64 (the last mostly padding), GQA:
    under causal masking the pipeline of query block i loads key blocks 0..2i+1 only (the last
    block all five), each warpgroup skips those wholly past its last row and attends to the
    others, masking the diagonal ones. One key block too few fails the error check."""
    q, k, v = _attention_inputs(1, 2, 1, 300, 270, 64)
    out = mosaic_attention.attention(q, k, v, causal,
                                     blocks=mosaic_attention.Blocks(block_kv=64, stages=2))
    wrong = check.wrong(check.error(out, reference.attention(q, k, v, causal)), "bfloat16", None)
    assert not wrong, wrong
    if not _common.on_gpu():
        assert not _common.races_found()


def _count_merges(monkeypatch) -> list:
    """The shapes of the split outputs merged (each a split-KV forward traced) from here on."""
    merged = []
    merge = pallas_attention.merge_splits

    def counted(o, m, l):
        merged.append(o.shape)
        return merge(o, m, l)
    monkeypatch.setattr(pallas_attention, "merge_splits", counted)
    jax.clear_caches()  # a cached trace would not call it
    return merged


@pytest.mark.parametrize("case", [
    # (B, H, Hkv, Sq, Sk, D), the split outputs' shape: 5 key blocks of 128 over 2 programs split
    # 2, 2 and 1 (the last block mostly padding); a GQA group of 2 packed into 2 rows, so the
    # second warpgroup holds padding only and does no work
    ((2, 2, 1, 1, 603, 128), (2, 1, 3, 2, 128)),
    # 80 packed rows: both warpgroups attend; 3 key blocks over 1 program, one each
    ((1, 2, 1, 40, 300, 64), (1, 1, 3, 80, 64)),
], ids=["decode-step", "both-warpgroups"])
def test_attention_decode_splits_the_keys(case, monkeypatch):
    """Fewer programs than four per multiprocessor (2 of them, as interpret mode counts; an
    H100's 132 would split more) and no causal mask: the keys split over a grid axis, each
    split's fp32 output leaving in 64-column chunks (two at D = 128), merged by logsumexp over
    the real rows. Forward and gradients (the backward takes the merged logsumexp) against
    float64."""
    shape, merged_shape = case
    monkeypatch.setattr(pallas_attention, "multiprocessors", lambda: 2)
    merged = _count_merges(monkeypatch)
    q, k, v = _attention_inputs(*shape, jnp.float16)
    out, vjp = jax.vjp(mosaic_attention.attention, q, k, v)
    assert set(merged) == {merged_shape}  # traced for the primal and for the vjp
    assert not check.wrong(check.error(out, reference.attention(q, k, v)), "float16", None)
    if not _common.on_gpu():
        assert not _common.races_found()
    do = jax.random.normal(jax.random.key(2), out.shape, out.dtype)
    for grad, expected in zip(vjp(do), reference.attention_grads(q, k, v, do)):
        assert not check.wrong(check.error(grad, expected), "float16", None)


def test_attention_blocks_checked():
    q, k, v = _attention_inputs(1, 1, 1, 8, 8, 128)
    for blocks in (mosaic_attention.Blocks(block_kv=96), mosaic_attention.Blocks(stages=1),
                   mosaic_attention.Blocks(block_kv=256, stages=4)):
        with pytest.raises(ValueError, match="block_kv|shared memory"):
            mosaic_attention.attention(q, k, v, blocks=blocks)
    for d in (16, 64, 128, 256):
        assert mosaic_attention.blocks_for(d).shared_bytes(d, 2) <= _common.SHARED_BYTES


def _attention_sum(q, k, v, causal):
    return mosaic_attention.attention(q, k, v, causal).astype(jnp.float32).sum()


@pytest.mark.skipif(_common.on_gpu(), reason="on a GPU the kernels compile and run for real")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("grads", [False, True], ids=["forward", "gradients"])
def test_attention_lowers_for_hopper(D, causal, grads, monkeypatch):
    """The GPU form of the kernel (wgmma on k transposed in shared memory and on P from
    registers, WGMMA-layout masks), which interpret mode replaces by jnp dots; under gradients
    also the output's rounding remainder staged through q's tile after o."""
    monkeypatch.setattr(mosaic_attention, "interpret_params", lambda: None)
    q = jax.ShapeDtypeStruct((1, 4, 300, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 200, D), jnp.bfloat16)
    if grads:
        def fn(q, k, v):
            return jax.grad(_attention_sum, argnums=(0, 1, 2))(q, k, v, causal)
    else:
        def fn(q, k, v):
            return mosaic_attention.attention(q, k, v, causal)
    jax.clear_caches()
    try:
        lowered = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",))
    finally:
        jax.clear_caches()
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.skipif(_common.on_gpu(), reason="on a GPU the kernels compile and run for real")
@pytest.mark.parametrize("D", [64, 128])
def test_attention_decode_lowers_for_hopper(D, monkeypatch):
    """The split-KV forward's GPU form: a fourth grid axis, each split's key range by its index,
    fp32 partial outputs through their own staging tile, within the shared memory a block may
    have (Mosaic GPU's lowering refused the first version of it at D = 128)."""
    monkeypatch.setattr(mosaic_attention, "interpret_params", lambda: None)
    merged = _count_merges(monkeypatch)
    q = jax.ShapeDtypeStruct((1, 8, 1, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 4096, D), jnp.bfloat16)
    try:
        lowered = jax.jit(mosaic_attention.attention).trace(q, kv, kv).lower(
            lowering_platforms=("cuda",))
    finally:
        jax.clear_caches()
    assert merged == [(1, 2, 4, 4, D)]
    assert "mosaic_gpu" in lowered.as_text()
