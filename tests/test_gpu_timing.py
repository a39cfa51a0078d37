"""On a CUDA GPU, the harness's device time must agree with an independent timer:
`triton.testing.do_bench` (CUDA events, its own L2 clear, median) within 3% for torch.matmul."""
import pytest
import torch

from harness import timing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n", [4096, 8192])
def test_harness_time_matches_triton_do_bench(n):
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(n)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)

    def fn():
        return torch.matmul(a, b)

    ours = timing.time_cuda_events(fn).median_s
    theirs = do_bench(fn, warmup=50, rep=400, return_mode="median") / 1e3
    # Timed again after do_bench: a clock that ramped during the first measurement shows up here.
    ours_again = timing.time_cuda_events(fn).median_s
    for t in (ours, ours_again):
        assert abs(t - theirs) / theirs < 0.03, (
            f"harness {ours * 1e6:.1f} / {ours_again * 1e6:.1f} us vs do_bench "
            f"{theirs * 1e6:.1f} us for a {n}^3 bf16 matmul")
