"""Matmul plugins that fail in every way a kernel can, beside one that works: the fault-isolation
tests load this file through KERNELS_PLUGINS and check that every other record survives."""
import os
import signal
import time

import torch

from kernels import registry


def _plugin(name):
    return registry.register("matmul", name, framework="torch")


@_plugin("good")
def good(a, b):
    return a @ b


@_plugin("fault_raise")
def raises(a, b):
    raise RuntimeError("kernel launch failed: invalid configuration argument")


@_plugin("fault_hang")
def hangs(a, b):
    time.sleep(3600)


@_plugin("fault_wrong")
def wrong(a, b):
    return a @ b + 1


@_plugin("fault_tuple")
def returns_a_tuple(a, b):
    return a @ b, None


@_plugin("fault_nan")
def nan(a, b):
    out = a @ b
    out[0, 0] = float("nan")
    return out


@_plugin("fault_kill")
def kills_its_process(a, b):
    os.kill(os.getpid(), signal.SIGKILL)


@_plugin("fault_oom")
def out_of_memory(a, b):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


LOST_CONTEXT = "CUDA error: an illegal memory access was encountered (simulated)"


@_plugin("fault_lost_context")
def loses_the_cuda_context(a, b):
    """As an illegal memory access on a GPU: it raises, and from then on this process cannot run
    GPU work (the harness's probe, here made to answer as on such a GPU, says so)."""
    from harness import guards

    guards.cuda_context_error = lambda: f"AcceleratorError: {LOST_CONTEXT}"
    raise RuntimeError(LOST_CONTEXT)
