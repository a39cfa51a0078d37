"""Compile time, cold and warm, measured in-process around the first calls of a benchmark.

cold: every compile cache is empty. In-memory caches are dropped (the implementation's reset:
      Triton binaries and autotune choices, dynamo's graphs, jax's jit caches) and the on-disk
      caches point at a fresh directory (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR; jax runs with
      no persistent cache).
warm: in-memory caches dropped again, on-disk caches kept from the cold call: what a second
      process on the same machine pays beyond its start-up. Under COLD=first a later case has a
      warm call only, in the disk caches its implementation's cold call filled (with what its
      benchmarks since built; `warm_built` counts the files it added).
Both are reported as (first call) - (median steady-state call); autotuning and cuDNN's algorithm
search count as compile time. Neither holds a compiler's once-per-process start-up (torch.compile's
imports, source hashing and pattern setup; Triton's driver helpers; JAX's first jit): start_up pays
it on a trivial function before a process's first cold call of that compiler and records it apart
(`compile_startup_s`), since otherwise the first benchmark of each process carried it and the rest
did not (torch.compile on CPU: 0.79 s for the first case in a process, 0.09-0.12 s for the next).
An implementation with no reset hook (eager torch) has nothing to recompile: its cold figure is
its first-call overhead in this process and warm is not measured. What no reset reaches stays
for the rest of the process: cuDNN's searched plans and attention graphs (the first torch
implementation to run a shape and layout pays for them; later ones, such as `torch_compile`'s
conv after `torch`'s, find them built) and XLA's GPU autotuning results, which jax.clear_caches
keeps, so a JAX warm call, and a cold one of fusions an earlier benchmark autotuned, hold no
autotuning.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from harness.timing import span, sync

_CACHE_ENV = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


@dataclass
class FirstCalls:
    cold_s: float | None  # None: not measured here (cold once per implementation, see Session)
    warm_s: float | None
    output: Any  # the cold call's output, checked for correctness
    phases: list[dict]  # cold_compile and warm_compile spans
    # files a warm-only call (a later case under COLD=first) added to the disk caches: kernels
    # no earlier call had built, compiled inside its "warm" time; None: not a warm-only call
    warm_built: int | None = None

    def compile_times(self, median_s: float) -> tuple[float | None, float | None]:
        cold = None if self.cold_s is None else max(self.cold_s - median_s, 0.0)
        warm = None if self.warm_s is None else max(self.warm_s - median_s, 0.0)
        return cold, warm


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = sync(call())
    return time.perf_counter() - t0, out


def first_calls(call: Callable[[], Any], reset: Callable[[], None] | None,
                cache_dir: str, cold: bool = True,
                prepare: Callable[[], None] | None = None) -> FirstCalls:
    """Runs the cold call and, where the implementation can be reset, the warm one, with the
    on-disk compile caches in `cache_dir`: for a cold call a new, empty directory (fresh_caches).
    cold=False, for an implementation that can be reset: only the warm call, its output the one
    checked; `cache_dir` is then the one this implementation's cold call filled, so the warm call
    finds the kernels earlier benchmarks of it built. `prepare`, untimed, after each reset
    and before each call: what the call needs that must be made after the reset (a backward's
    forward graph, which keeps its compiled backward through any reset)."""
    prepare = prepare or (lambda: None)
    _use_caches(cache_dir)
    if not cold and reset is not None:
        before = _cache_files()
        reset()
        prepare()
        t0 = time.time_ns()
        warm_s, out = _timed(call)
        phases = [span("warm_compile", t0)]
        return FirstCalls(None, warm_s, out, phases, _cache_files() - before)
    if reset is not None:
        reset()
    prepare()
    t0 = time.time_ns()
    cold_s, out = _timed(call)
    phases = [span("cold_compile", t0)]
    warm_s = None
    if reset is not None:
        reset()
        prepare()
        t0 = time.time_ns()
        warm_s, _ = _timed(call)
        phases.append(span("warm_compile", t0))
    return FirstCalls(cold_s, warm_s, out, phases)


_STARTUP_S: dict[str, float] = {}  # compiler -> its start-up in this process, seconds


def _start_torch_compile():
    import torch

    from kernels import ON_CUDA

    # a matmul and a fused elementwise kernel: Inductor's matmul lowering and its code
    # generation (on a CPU, C++ with its instruction-set probes: 10 s here) start up once each
    step = torch.compile(lambda x: (x @ x) * 2 + 1)
    sync(step(torch.ones(8, 8, device="cuda" if ON_CUDA else "cpu")))
    torch._dynamo.reset()


def _start_triton():
    from kernels import ON_CUDA

    if not ON_CUDA:  # the interpreter compiles nothing
        return
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1)

    x = torch.zeros(1, device="cuda")
    _add_one[(1,)](x)
    sync(x)


def _start_jax():
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)).block_until_ready()
    jax.clear_caches()


_STARTERS = {"torch.compile": _start_torch_compile, "triton": _start_triton, "jax": _start_jax}


def compilers(framework: str, backend: str) -> tuple[str, ...]:
    """The compilers an implementation's first call runs, by its framework and backend (Inductor
    writes Triton kernels on a GPU)."""
    if framework == "jax":
        return ("jax",)
    if backend.startswith("torch.compile"):
        return ("torch.compile", "triton")
    return ("triton",) if backend.startswith("Triton") else ()


def start_up(names: tuple[str, ...], cache_root: str, phases: list[dict]) -> float:
    """Pays each compiler's once-per-process start-up on a trivial function, in a fresh cache
    directory under cache_root, the first time it is asked for in this process (a
    "compiler_start_up" span into `phases` when one ran); returns the seconds the named
    compilers' start-ups took in this process (0 for none)."""
    t0 = time.time_ns()
    started = [name for name in names if name not in _STARTUP_S]
    for name in started:  # the cold call that follows points the caches at its own directory
        _use_caches(fresh_caches(cache_root))
        start = time.perf_counter()
        _STARTERS[name]()
        _STARTUP_S[name] = time.perf_counter() - start
    if started:
        phases.append(span("compiler_start_up", t0))
    return sum(_STARTUP_S[name] for name in names)


def _use_caches(cache_dir: str) -> None:
    """Points the on-disk compile caches (Triton's, Inductor's) at cache_dir."""
    for var in _CACHE_ENV:
        os.environ[var] = os.path.join(cache_dir, var.lower())


def fresh_caches(cache_root: str) -> str:
    """A new, empty directory under cache_root for a cold call's compile caches."""
    return tempfile.mkdtemp(prefix="compile-", dir=cache_root)


def _cache_files() -> int:
    """Files in the on-disk compile caches the environment points at (none set: 0)."""
    return sum(len(files) for var in _CACHE_ENV if os.environ.get(var)
               for _, _, files in os.walk(os.environ[var]))


def config_text(config) -> str:
    """A Triton config as its meta-parameters, warps and stages."""
    meta = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta}, warps={config.num_warps}, stages={config.num_stages}"


def autotuner_runs(autotuner_class) -> dict:
    """{class: its run} for Triton's Autotuner and each subclass with a run of its own (the
    suite's looks a tuned key up without Triton's run): what to patch to see every launch of an
    autotuned kernel."""
    return {cls: cls.__dict__["run"] for cls in (autotuner_class, *autotuner_class.__subclasses__())
            if "run" in cls.__dict__}


@contextmanager
def autotune_choices(sink: dict):
    """Records into `sink` the config each Triton autotuner ran for the launches inside the block,
    kernel name -> config ("BLOCK_M=128, BLOCK_N=64, warps=4, stages=3"): which tile a figure was
    measured with; and the launchers' own choices (kernels.triton._common.note_choice). The
    choice is made during the first calls, so only they are wrapped."""
    try:
        from triton.runtime.autotuner import Autotuner

        from kernels.triton._common import choice_sinks
    except ImportError:  # no Triton here: nothing can be autotuned
        yield
        return
    originals = autotuner_runs(Autotuner)

    def recording(original):
        def run(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            sink[self.base_fn.__name__] = config_text(self.best_config)
            return out
        return run

    for cls, original in originals.items():
        cls.run = recording(original)
    choice_sinks.append(sink)
    try:
        yield
    finally:
        choice_sinks.remove(sink)
        for cls, original in originals.items():
            cls.run = original
