"""Kernels under test: hand-written Triton and Pallas kernels beside the stock ops.

Importing this package on a machine without a CUDA device switches Triton to its interpreter
(TRITON_INTERPRET=1, set before any kernel is decorated) so every implementation runs on CPU with
nothing extra from the caller. Pallas kernels choose interpret mode themselves (kernels.pallas).
"""
import os

# JAX would otherwise take 75% of the GPU's memory at its first use, leaving torch (in the same
# process, benchmarked beside it) a quarter of the card; allocate as needed instead. What its pool
# grows to it keeps (only XLA's slow "platform" allocator gives memory back): after a large JAX
# case, torch's benchmarks in that process have that much less of the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


ON_CUDA = _cuda_present()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
