"""What every Triton launcher shares: the device it runs on, interpreter quirks, config choice."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from triton.runtime import _async_compile
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from kernels import ON_CUDA, TRITON_INTERPRET

DEVICE_TYPE = "cuda" if ON_CUDA else "cpu"
# Registry tags: "interpreted" where the kernels run in the Triton interpreter (no CUDA device).
TAGS = ("interpreted",) if TRITON_INTERPRET else ()
# An implementation that runs on GPUs of compute capability 9.0 or later only (TMA)
SM90_TAG = "sm90"


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are constexpr
# functions in Triton 3.6, which unwrap their arguments on every host call: 3-5 us each on this
# suite's CPU machine, several of them per launch. These are the same arithmetic in plain Python.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def upcast_dot(dtype: torch.dtype) -> bool:
    """True when tl.dot operands must be cast to fp32 inside the kernel.

    The Triton 3.6 interpreter multiplies the raw uint16 bit patterns of bf16 tl.dot operands
    (errors near 1e10), so under the interpreter, and only there, bf16 tiles are widened to fp32
    before the dot. bf16 -> fp32 is exact and the GPU's bf16 dot also accumulates exact products in
    fp32, so the result is what the GPU computes; on a GPU the flag is False and the compiled kernel
    is unchanged (the branch is on a tl.constexpr).
    """
    return TRITON_INTERPRET and dtype == torch.bfloat16


@triton.jit
def to_output(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Casts an fp32 tile to the output dtype. The interpreter truncates fp32 -> bf16 where the GPU
    rounds to nearest even, doubling the error; with INTERP_BF16 (= upcast_dot(dtype), so never on
    a GPU) the rounding is done on the bits first and the truncation is then exact."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(row, column) tile of program `pid` in grouped order: GROUP_M consecutive programs walk
    down a column band of tiles, so the right-hand operand's tiles are re-read from L2 rather than
    from memory."""
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting, so the comparison with cuBLAS is like for like:
    'ieee' (true fp32) unless the user allowed TF32 in torch."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def autotune(configs: list, key: list, fits=None, reset_to_zero: list | None = None):
    """triton.autotune with this suite's timer (`autotune_bench`) and pruning (`prune_by(fits)`),
    whose configs are compiled in parallel before they are timed (`ParallelCompileAutotuner`).
    reset_to_zero: arguments the kernel adds into, zeroed before each timed launch and after
    the tuning (Triton's)."""
    def decorate(fn):
        return ParallelCompileAutotuner(
            fn, fn.arg_names, configs, key, reset_to_zero=reset_to_zero, restore_value=None,
            prune_configs_by=prune_by(fits) if fits else None, do_bench=autotune_bench)
    return decorate


def autotune_bench(kernel_call, quantiles):
    """The autotuner's timer: 5 ms of warmup and 25 ms of repetitions per config. Its default
    (25 + 100 ms per config) made the first call of every new shape spend seconds choosing."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# True while harness.aot captures launches instead of running them (it compiles them for a GPU
# that is not here): a launcher that would time alternatives of its own (attention's dQ methods)
# launches each of them instead, so that each is built.
launches_captured = False

# Dicts that harness.compile.autotune_choices records into while it runs: note_choice adds to them.
choice_sinks: list[dict] = []


def note_choice(name: str, text: str) -> None:
    """Records a launcher's own choice, one no autotuner makes (e.g. how attention's backward
    sums dQ), beside the autotuners' configs in the benchmark records."""
    for sink in choice_sinks:
        sink[name] = text


def compile_threads() -> int:
    """Threads that compile an autotuner's configs: KERNELS_COMPILE_THREADS, else one per CPU."""
    value = os.environ.get("KERNELS_COMPILE_THREADS", "")
    if value and not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"KERNELS_COMPILE_THREADS={value!r}: expected a whole number >= 1")
    return int(value) if value else os.cpu_count() or 1


def _parse_one_at_a_time(parse):
    """Triton's front end parses each kernel and every @triton.jit function it calls with
    ast.parse, and CPython (3.11 here) keeps ast.parse's recursion-depth count per interpreter,
    not per thread: two threads parsing at once fail now and then with "SystemError: AST
    constructor recursion depth mismatch" (seen compiling the attention configs in 2 threads).
    Parsing is a sliver of a compile; the passes and ptxas after it still run in parallel."""
    lock = threading.Lock()

    def locked(self):
        with lock:
            return parse(self)
    return locked


JITFunction.parse = _parse_one_at_a_time(JITFunction.parse)


# argument types that have no dtype attribute (hasattr on them raises and catches an exception)
_NO_DTYPE = (int, float, bool, str, type(None))


class ParallelCompileAutotuner(Autotuner):
    """Triton's autotuner, except that the configs it is about to time for a new key are first
    compiled together in a thread pool (Triton's AsyncCompileMode), where Triton's own compiles
    each one as it first launches it, one after another. A cold first call took 4.5-6.4 s per
    case in the H100 baseline, of which timing 6-10 configs at 30 ms each is well under 1 s.
    Compiling releases the GIL for its MLIR passes and ptxas: on 2 CPU cores, 2 threads build the
    six sm_90 matmul configs in 2.4 s against 4.1 s.
    Then timing each config finds its binary in memory. A config that fails to compile is left
    to its timed launch, which raises the error the autotuner handles. Nothing changes in the
    interpreter (nothing is compiled) or with KERNELS_COMPILE_THREADS=1.

    A launch whose key is already tuned looks its config up more cheaply than Triton's run: that
    builds the key with a list-membership test per argument and hasattr(arg, "dtype") on every
    int (an exception raised and caught each), 25 us of host time per conv2d launch on the CPU
    machine, more than the launcher's own Python. `_key` is the same tuple, so a new key (a
    miss) goes to Triton's run, which tunes and stores it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._arg_set = frozenset(self.arg_names)

    def run(self, *args, **kwargs):
        config = self.cache.get(self._key(args, kwargs)) if len(self.configs) > 1 else None
        if config is None or config.pre_hook is not None:
            return super().run(*args, **kwargs)
        self.best_config = config
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def _key(self, args: tuple, kwargs: dict) -> tuple:
        """Triton's autotune key of a launch: the key arguments' values, then the dtype of
        every argument that has one, in argument order."""
        named = dict(zip(self.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self._arg_set})
        key = [named[k] for k in self.keys if k in named]
        key += [str(v.dtype) for v in named.values()
                if type(v) not in _NO_DTYPE and hasattr(v, "dtype")]
        return tuple(key)

    def prune_configs(self, kwargs: dict) -> list:
        configs = super().prune_configs(kwargs)
        threads = min(len(configs), compile_threads())
        if not TRITON_INTERPRET and threads > 1 and _async_compile.active_mode.get() is None:
            self._compile(configs, kwargs, threads)
        return configs

    def _compile(self, configs: list, kwargs: dict, threads: int) -> None:
        # kwargs are the launch's, with the grid and warmup flag of Triton's launch path
        meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        args = list(self.nargs.values())
        with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool, \
                triton.AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                if config.pre_hook is not None:  # it may set arguments the signature includes
                    config.pre_hook({**self.nargs, **meta, **config.all_kwargs()})
                self.fn.run(*args, grid=None, warmup=True, **meta, **config.all_kwargs())


def prune_by(fits) -> dict:
    """The autotuner's `prune_configs_by` keeping the configs `fits(meta, args)` accepts (meta: the
    config's meta-parameters with its num_warps and num_stages; args: the launch's named
    arguments), or the config with the smallest tile when none fits. Pruned configs are neither
    compiled nor timed: autotuning is compile time.
    """
    def meta(c):
        return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if fits(meta(c), args)]
        return kept or [min(configs, key=lambda c: math.prod(
            v for k, v in c.kwargs.items() if k.startswith("BLOCK")))]
    return {"early_config_prune": prune}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# The compute capability (e.g. 80, 90) harness.aot compiles for while it captures launches,
# for a GPU that is not here; None outside it.
_aot_capability: int | None = None


@contextlib.contextmanager
def launching_for(capability: int):
    """Launchers choose their variants (TMA or pointer loads) for a GPU of `capability`, as on
    that GPU: harness.aot captures what it would launch."""
    global _aot_capability
    before, _aot_capability = _aot_capability, capability
    try:
        yield
    finally:
        _aot_capability = before


def tma_device(device: torch.device | None = None) -> bool:
    """TMA needs a GPU of compute capability 9.0 or later (`device`'s, else the current GPU's;
    asked of CUDA once per GPU, not at every launch; harness.aot's target while it captures
    launches); without a GPU, descriptors run in the interpreter."""
    if _aot_capability is not None:
        return _aot_capability >= 90
    if not ON_CUDA:
        return True
    index = device.index if device is not None and device.index is not None \
        else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def resolved(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as a kernel reads them: a lazily negated view (is_neg: x.conj().imag) holds
    its values before the negation in memory, so it is negated into a copy (the kernels read it
    unnegated: results of the wrong sign); any other tensor is itself."""
    return tuple(t.resolve_neg() if t.is_neg() else t for t in tensors)


def check_out(out, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """A preallocated output (launchers' `out`, outside the public contract): a tensor of the
    result's shape, in the inputs' dtype, on their device."""
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape)
            and out.dtype == like.dtype and out.device == like.device
            and out.layout is torch.strided and not out.is_neg()):
        got = (f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"out must be a {like.dtype} tensor of shape {list(shape)} on "
                         f"{like.device}, got {got}")


def tma_ready(t: torch.Tensor) -> bool:
    """What a TMA tensor descriptor needs: contiguous rows, every other stride a positive multiple
    of 16 bytes (a broadcast view's stride 0 is not), a 16-byte aligned base."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def _allocate(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=DEVICE_TYPE)


def use_descriptor_allocator() -> None:
    """Kernels that make tensor descriptors on the GPU need global scratch memory for them (one
    per program), which Triton takes from the allocator set in the launching thread's context;
    torch's caching allocator serves it. The interpreter needs none."""
    if not TRITON_INTERPRET:
        triton.set_allocator(_allocate)


def small_tile_if_fp32(meta, fp32: bool, cap: int) -> bool:
    """For an autotuner's fits: fp32 inputs (true fp32 dots, no tensor cores) only with tiles of
    at most `cap` output elements. fp32 is here to be checked, not raced: fewer configs compile
    per autotune key, which is most of the time of the tests on a GPU (40-77 s a test there)."""
    return not fp32 or meta["BLOCK_M"] * meta["BLOCK_N"] <= cap


def pick_configs(gpu_configs: list, interpret_configs: list) -> list:
    """The interpreter would 'autotune' by running every config at interpreter speed: one is
    enough."""
    return interpret_configs if TRITON_INTERPRET else gpu_configs


def reset_jit(*kernels) -> None:
    """Forget compiled binaries and autotune choices held in memory by these kernels, so the next
    launch compiles (from the on-disk cache if warm) and re-tunes: used to time compilation."""
    for k in kernels:
        cache = getattr(k, "cache", None)  # Autotuner: key -> best config
        if isinstance(cache, dict):
            cache.clear()
        inner = getattr(k, "fn", None)
        if inner is not None and inner is not k:
            reset_jit(inner)
        device_caches = getattr(k, "device_caches", None)  # JITFunction: device -> binaries
        if isinstance(device_caches, dict):
            device_caches.clear()
