"""What every Pallas launcher shares: interpret mode off a GPU, padding to block multiples, and
one compile per kernel body in the Mosaic (TPU and GPU) interpreters."""
from __future__ import annotations

import collections
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax


@functools.cache
def interpret() -> bool:
    """Pallas kernels compile for the GPU; anywhere else they run in interpret mode."""
    return jax.default_backend() != "gpu"


def multiprocessors() -> int:
    """The GPU's multiprocessors, by which launchers size their grids: the device's count, 132
    (an H100's) where the device does not say (lowering for CUDA on a machine without a GPU), and
    2 in interpret mode, so that small test problems are split as large ones are on a GPU."""
    if interpret():
        return 2
    return getattr(jax.devices()[0], "core_count", None) or 132


def tags() -> tuple[str, ...]:
    """Registry tags: "interpreted" where the kernels run in interpret mode."""
    return ("interpreted",) if interpret() else ()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Index arithmetic inside kernels. lax.div and lax.rem want both operands of one dtype, and with
# jax_enable_x64 on, a Python int beside an int32 grid index becomes int64 ("lax.div requires
# arguments to have the same dtypes, got int32, int64"; pl.cdiv too): the static operand takes the
# index's dtype. Indices are never negative, so truncating division is floor division, and
# lax.div/rem lower to single Triton and Mosaic ops where jnp's floor-mod adds sign fix-ups (which
# the Triton lowering rejects and Mosaic's asks which TPU generation it is on).
def idiv(a, b: int):
    """a // b and a % b for a non-negative traced index a and a static b."""
    b = jnp.asarray(b, jnp.result_type(a))
    return lax.div(a, b), lax.rem(a, b)


def icdiv(a, b: int):
    """ceil(a / b) for a non-negative traced index a and a static b."""
    return idiv(a + (b - 1), b)[0]


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` up to a multiple of `multiple` (no copy when it already is one)."""
    extra = round_up(x.shape[axis], multiple) - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


# A Pallas call has no differentiation rule of its own: jax.grad through one raised a bare
# AssertionError from inside JAX. The kernels get gradients, or a clear error, from these.
def matmul_with_gradients(call, public):
    """call(a, b, config) (a Pallas matmul kernel on a static config) as a function whose
    gradients are products by `public` (the implementation's public matmul, which picks a config
    per shape): da = dc b^T, db = a^T dc."""
    f = jax.custom_vjp(call, nondiff_argnums=(2,))
    f.defvjp(lambda a, b, config: (call(a, b, config), (a, b)),
             lambda config, res, dc: (public(dc, res[1].T), public(res[0].T, dc)))
    return f


def forward_only(name: str):
    """fn(*arrays) for a Pallas call with no backward, whose gradient raises NotImplementedError
    naming the implementation: forward_only(name)(fn, *arrays)."""
    def no_backward(fn, res, g):
        raise NotImplementedError(f"{name} has no backward: differentiate another "
                                  "implementation of the op (xla, for one)")

    f = jax.custom_vjp(lambda fn, *arrays: fn(*arrays), nondiff_argnums=(0,))
    f.defvjp(lambda fn, *arrays: (fn(*arrays), None), no_backward)
    return f


def gpu_compiler_params(num_warps: int, num_stages: int):
    """Compiler params for Pallas' GPU (Triton) lowering (callers pass None in interpret mode).
    The class was TritonCompilerParams before it became CompilerParams."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def compile_interpreted_threads_once() -> None:
    """The Mosaic TPU and GPU interpreters run each simulated core or warpgroup thread of every
    grid program as its own XLA computation, and JAX 0.10 (the CPU machines' JAX) compiles that
    computation afresh for every thread of every program: a new jit closure each time, 1-2 s per
    compile on 2 cores. A causal attention call of 8 programs x 3 threads took 13-19 s; with the
    body compiled once per (kernel body, argument shapes) it takes 1.3-1.8 s and returns the same
    bits. Only interpret mode calls this; a JAX without `thread_map._run_jaxpr` is left as it
    is. Idempotent."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        return
    if getattr(thread_map, "_run_jaxpr", None) in (None, _run_thread_body):
        return
    thread_map._run_jaxpr = _run_thread_body


_THREAD_BODIES: collections.OrderedDict = collections.OrderedDict()
_THREAD_BODIES_KEPT = 32  # a kernel in use stays; a test session's many shapes do not pile up
_THREAD_BODIES_LOCK = threading.Lock()


def _eval_thread_body(jaxpr, consts, *args):
    jax_core.eval_jaxpr(jaxpr, consts, *args)


def _run_thread_body(jaxpr, consts, *args):
    """thread_map's `_run_jaxpr`, with its compiled computation cached. The lock covers only the
    compile: the threads of a program then run together, as they must (they wait on each other's
    barriers)."""
    key = (jaxpr, tuple((np.shape(x), np.result_type(x)) for x in jax.tree.leaves((consts, args))))
    with _THREAD_BODIES_LOCK:
        compiled = _THREAD_BODIES.get(key)
        if compiled is None:
            compiled = jax.jit(_eval_thread_body, static_argnums=(0,)).trace(
                jaxpr, consts, *args).lower().compile()
            _THREAD_BODIES[key] = compiled
            if len(_THREAD_BODIES) > _THREAD_BODIES_KEPT:
                _THREAD_BODIES.popitem(last=False)
        else:
            _THREAD_BODIES.move_to_end(key)
    compiled(consts, *args)
