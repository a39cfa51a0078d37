import pytest
import torch

# Before any test module: without a GPU, importing kernels switches Triton to its interpreter. A
# test module that imported triton first, collected before the others, left every interpreted
# kernel after it failing ("Cannot call @triton.jit'd outside of the scope of a kernel").
import kernels  # noqa: F401


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
