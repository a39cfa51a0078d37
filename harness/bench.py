"""One benchmark: an implementation meets a case in one dtype (and, for attention, one mode).

It produces one record with everything measured: correctness against float64, device time,
compile time, peak memory. A failure of the implementation is caught and recorded with its reason;
it never ends the run.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness import cases as cases_mod
from harness import check, env, guards, memory, timing
from harness import compile as compile_mod
from harness import inputs as inputs_mod
from harness.cases import Case
from kernels import ON_CUDA, reference, registry
from kernels.registry import Impl

STOCK_FOR_ERROR = "torch"  # the stock op whose error in the same dtype sets the budget's scale
# Off a TPU a TPU kernel runs only in the TPU interpreter: its timings say nothing about the kernel
# and cost minutes on CPU (race detection, simulated cores). `make test` checks it there.
TPU_ONLY = ("a TPU kernel, benchmarked on a TPU only: elsewhere it runs in the TPU interpreter, "
            "whose timings say nothing about the kernel (the tests check its results there)")
HOPPER_ONLY = ("a Hopper GPU kernel, benchmarked on one only: elsewhere it runs in Mosaic GPU's "
               "interpreter, whose timings say nothing about the kernel (the tests check its "
               "results there)")


@dataclass(frozen=True)
class Bench:
    op: str
    impl: str
    case: Case
    dtype: str
    mode: str = "fwd"

    @property
    def group(self) -> str:
        suffix = "" if self.mode == "fwd" else f"-{self.mode}"
        return f"{self.op}/{self.case.name}-{self.dtype}{suffix}"

    @property
    def id(self) -> str:
        return f"{self.group}/{self.impl}"

    @property
    def key(self) -> str:
        """The same key as results.record_key of its record."""
        suffix = "" if self.mode == "fwd" else f"-{self.mode}"
        return f"{self.op}/{self.impl}/{self.case.name}-{self.dtype}{suffix}"


def plan(ops, impl_filter, tier, dtypes, modes, shapes=()) -> list[Bench]:
    """Every benchmark selected (on the user's `shapes` where given, else the tier's cases),
    ordered case -> dtype -> mode -> implementation, so all implementations of one case run
    together and share one reference."""
    out = []
    for op in ops:
        names = sorted(set(registry.impls(op)) | set(registry.disabled(op)))
        if impl_filter:
            names = [n for n in names if n in impl_filter]
        for case in cases_mod.chosen(op, tier, shapes):
            for dtype in dtypes:
                for mode in (m for m in cases_mod.MODES_BY_OP[op] if m in modes):
                    out += [Bench(op, name, case, dtype, mode) for name in names]
    return out


# ---------------------------------------------------------------- building the calls
def _same(array):
    return array


@dataclass
class Calls:
    timed: Callable[[], Any]  # steady state, setup done
    first: Callable[[], Any]  # the checked call: writes into a NaN-poisoned buffer when it can
    # JAX: (jitted function, its arguments), timed = jitted(*arguments); XLA's memory analysis is
    # read from its compiled executable (a jit-cache hit, not a second compilation)
    memory: tuple = ()
    # an implementation timed in its own layout: its output (each gradient) in the contract's
    to_contract: Callable[[Any], Any] = _same
    # run untimed before each first call, after the reset (compile.first_calls)
    prepare: Callable[[], None] | None = None
    # `first` again after the first calls, into its buffer poisoned anew: an autotuner tries its
    # configs on the real arguments, so by the time the chosen one runs, the others have written
    # elements it may never write, and the first call's output hides them
    repoisoned: Callable[[], Any] | None = None

    def checked(self, output):
        """What `first` returned (an output, or a tuple of gradients) as the check compares it.
        What is not an array stays as it is, for check.check_array to name."""
        if isinstance(output, (tuple, list)):  # a forward's tuple is reported as one
            return (tuple if isinstance(output, tuple) else list)(map(self._contract, output))
        return self._contract(output)

    def _contract(self, output):
        return self.to_contract(output) if hasattr(output, "shape") else output


def _timed_form(impl: Impl, arrays: dict, *extra) -> tuple[Callable[..., Any], tuple, tuple,
                                                           Callable[[Any], Any]]:
    """(the function to time, its input arrays, the `extra` arrays, the conversion of what it
    returns to the contract's layout): the implementation's own layout where it has one, the
    arrays converted here, untimed and finished before any timing; else the contract's."""
    args = tuple(arrays.values())
    if impl.layout is None:
        return impl.fn, args, extra, _same

    def native(some: tuple) -> tuple:
        return tuple(timing.sync(impl.layout.to_native(a)) for a in some)

    return impl.layout.fn, native(args), native(extra), impl.layout.to_contract


def _expected_shape(case: Case) -> tuple[int, ...]:
    d = case.dims
    if case.op == "matmul":
        return (d["M"], d["N"])
    if case.op == "attention":
        return (d["B"], d["H"], d["Sq"], d["D"])
    oh, ow = cases_mod.conv_out_hw(d)
    return (d["N"], oh, ow, d["K"])


def _forward_calls(impl: Impl, case: Case, arrays: dict) -> Calls:
    args, kwargs = tuple(arrays.values()), inputs_mod.options(case)
    if impl.layout is not None:  # a JAX implementation (registry.register checks)
        fn, native, _, to_contract = _timed_form(impl, arrays)
        calls = _jitted_calls(functools.partial(fn, **kwargs), native)
        calls.to_contract = to_contract
        return calls
    if impl.framework == "jax":
        calls = _jitted_calls(functools.partial(impl.fn, **kwargs), args)
        if impl.prepare is not None:  # timed as prepared; memory compiles the plain call apart
            calls.timed = calls.first = impl.bind(*args, **kwargs)
        return calls
    timed = impl.bind(*args, **kwargs)
    if not impl.accepts_out:
        return Calls(timed, timed)
    poisoned = torch.full(_expected_shape(case), float("nan"), dtype=args[0].dtype,
                          device=args[0].device)
    first = impl.bind(*args, out=poisoned, **kwargs)

    def repoisoned():
        poisoned.fill_(float("nan"))
        return first()

    return Calls(timed, first, repoisoned=repoisoned)


def _jitted_calls(fn: Callable[..., Any], args: tuple) -> Calls:
    """A JAX call under one jax.jit: the implementation's argument checks run once, at trace
    time, not in every timed call, and the compiled function is the one memory reads."""
    import jax

    jitted = jax.jit(fn)
    call = lambda: jitted(*args)  # noqa: E731
    return Calls(call, call, (jitted, args))


def _grad_output(case: Case, dtype: str, framework: str, device: str):
    shape = _expected_shape(case)
    gen = torch.Generator(device=device).manual_seed(inputs_mod.seed_for(case, dtype, salt=1))
    do = torch.randn(shape, generator=gen, device=device).to(inputs_mod.TORCH_DTYPES[dtype])
    return do if framework == "torch" else inputs_mod.to_jax({"do": do})["do"]


def _torch_grad_calls(impl: Impl, case: Case, arrays: dict, do, mode: str) -> Calls:
    leaves = tuple(t.requires_grad_(True) for t in arrays.values())
    forward = impl.bind(*leaves, **inputs_mod.options(case))  # a stock op's checks, once

    def fwd_bwd():
        return torch.autograd.grad(forward(), leaves, do)

    if mode == "fwd_bwd":
        return Calls(fwd_bwd, fwd_bwd)
    graph = {}

    def forward_graph():  # untimed: each timed call reruns this graph's backward
        graph["out"] = forward()

    def bwd():
        return torch.autograd.grad(graph["out"], leaves, do, retain_graph=True)

    # A graph keeps its compiled backward (torch.compile's) through any reset: the first calls
    # each get a fresh one, made after the reset, so the warm call compiles the backward again.
    return Calls(bwd, bwd, prepare=forward_graph)


def _backward_reruns(mode: str):
    """A bwd benchmark reruns one forward's backward (retain_graph). torch.compile's backward may
    take saved tensors' memory for its results (AOTAutograd's donated buffers), and a backward
    so compiled refuses a retained graph on every call ("compiled with non-empty donated buffers
    which requires ... retain_graph=False"): torch_compile attention with grouped-query heads,
    once a fwd_bwd benchmark of it had run in the process (its backward then came compiled from
    the cache). So a bwd benchmark runs without donated buffers from its forward to its last
    call; fwd_bwd keeps torch's default."""
    if mode != "bwd":
        return contextlib.nullcontext()
    import torch._functorch.config

    return torch._functorch.config.patch(donated_buffer=False)


def _jax_grad_calls(impl: Impl, case: Case, arrays: dict, do, mode: str) -> Calls:
    import jax

    op, leaves, (do,), to_contract = _timed_form(impl, arrays, do)
    kwargs = inputs_mod.options(case)

    def fn(*xs):
        return op(*xs, **kwargs)

    def grads(*xs_and_do):
        return jax.vjp(fn, *xs_and_do[:-1])[1](xs_and_do[-1])

    if mode == "fwd_bwd":
        calls = _jitted_calls(grads, leaves + (do,))
    else:
        # forward once, untimed; each timed call runs the backward from its residuals (as torch's)
        _, vjp_fn = jax.vjp(fn, *leaves)
        calls = _jitted_calls(lambda f, g: f(g), (vjp_fn, do))
    calls.to_contract = to_contract
    return calls


# ---------------------------------------------------------------- references
@contextlib.contextmanager
def _outside_cudnn_plan_caches():
    """Keeps the stock error's call out of cuDNN's per-process plan caches: its algorithm search
    under cudnn.benchmark (per conv shape and layout) and SDPA's cuDNN attention graphs (per
    shape). Made first, in the untimed setup, that call paid for them and left the `torch`
    implementations' first calls, whose cold figure is to hold them, nothing to build: in the
    2026-11-23 H100 run `torch` conv2d's cold compile was 0.2-0.6 ms on every layer, and
    `torch_nchw`'s, whose layout has plans of its own, up to 1 s. The call runs with cuDNN
    disabled (torch's own conv kernels) and SDPA choosing among its other backends.
    cudnn.benchmark=False would not do: cuDNN caches the heuristics' plan under the same key as
    the search's, and the search would never run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cudnn.enabled = enabled


class References:
    """float64 answers and the stock op's error, per (case, dtype, mode); the latest few kept
    (a GPU-sized float64 reference is hundreds of MB)."""

    def __init__(self, device: str, keep: int = 2):
        self.device, self.keep = device, keep
        self._cache: dict[tuple, tuple] = {}

    def get(self, case: Case, dtype: str, mode: str):
        key = (case.key, dtype, mode)
        if key not in self._cache:
            while len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._compute(case, dtype, mode)
        return self._cache[key]

    def _compute(self, case: Case, dtype: str, mode: str):
        arrays = inputs_mod.make_torch(case, dtype, self.device)
        kwargs = inputs_mod.options(case)
        oracle = getattr(reference, case.op)
        stock_op = registry.get(case.op, STOCK_FOR_ERROR)
        if mode == "fwd":
            ref = oracle(*arrays.values(), **kwargs, device=self.device)
            with _outside_cudnn_plan_caches():
                stock = stock_op(*arrays.values(), **kwargs)
            return ref, check.error(stock, ref)
        do = _grad_output(case, dtype, "torch", self.device)
        grads_oracle = getattr(reference, f"{case.op}_grads", None)  # written out, memory-bounded
        if grads_oracle is not None:
            ref = grads_oracle(*arrays.values(), do, **kwargs, device=self.device)
        else:
            leaves = [reference.as_float64(t, self.device).requires_grad_(True)
                      for t in arrays.values()]
            ref = torch.autograd.grad(oracle(*leaves, **kwargs, device=self.device), leaves,
                                      reference.as_float64(do, self.device))
        stock_leaves = [t.requires_grad_(True) for t in arrays.values()]
        with _outside_cudnn_plan_caches():
            stock = torch.autograd.grad(stock_op(*stock_leaves, **kwargs), stock_leaves, do)
        return ref, _grads_err(stock, ref)


def _grads_err(outs, refs) -> check.Error:
    """The worst error over the gradients (dq, dk, dv)."""
    return check.worst(check.error(o, r) for o, r in zip(outs, refs))


def judged(calls: Calls, output, ref, mode: str, dtype: str,
           framework: str) -> tuple[check.Error, str]:
    """The error of the checked call's `output` (as Calls.checked gives it) and, where the timed
    call makes an output of its own (checked writing into a poisoned buffer, timed allocating
    one), of the timed call's too, the worse of each measure: the call that is timed is the one
    judged. With it, the contract's dtype fault if either output breaks it ("" if none).
    Raises check.WrongOutput for an output that is not one array of `framework` (each
    gradient, in a backward) or not the answer's shape."""
    outputs = [output]
    if calls.timed is not calls.first:
        outputs.append(calls.checked(timing.sync(calls.timed())))
    arrays = [a for o in outputs for a in (o if mode != "fwd" else [o])]
    for a in arrays:
        check.check_array(a, framework)
    err = check.worst(check.error(o, ref) if mode == "fwd" else _grads_err(o, ref)
                      for o in outputs)
    return err, check.wrong_dtype(arrays, dtype)


# ---------------------------------------------------------------- the record
@dataclass
class Session:
    run_id: str
    cache_root: str
    policy: timing.Policy | None = None
    profile_dir: Path | None = None  # when set, every benchmark also writes a profiler trace
    retime: tuple[str, ...] = ()  # implementations timed twice: the harness's own noise
    # "each": every benchmark compiles cold then warm; "first": cold only for the first benchmark
    # of each (op, implementation, dtype, mode), warm for the rest (a GPU tier's biggest cost)
    compile_cold: str = "each"
    # (op, implementation, dtype, mode) -> the compile caches' directory its cold call filled,
    # where its warm-only calls look (under "first")
    _compile_caches: dict = field(default_factory=dict, repr=False)
    device: str = field(default_factory=lambda: Session.device_type())

    @staticmethod
    def device_type() -> str:
        return "cuda" if ON_CUDA else "cpu"

    def __post_init__(self):
        self.references = References(self.device)

    def settings(self) -> dict:
        """The arguments that make an equal Session in another process (harness.worker): the
        run's settings, none of this one's caches."""
        return {"run_id": self.run_id, "cache_root": self.cache_root, "policy": self.policy,
                "profile_dir": self.profile_dir, "retime": self.retime,
                "compile_cold": self.compile_cold}

    def base_record(self, b: Bench) -> dict:
        rec = {"run_id": self.run_id, "op": b.op, "impl": b.impl, "case": b.case.name,
               "dims": b.case.dims, "dtype": b.dtype, "mode": b.mode, "status": "failed",
               "reason": "", "flops": cases_mod.flops(b.case, b.mode),
               "bytes": cases_mod.min_bytes(b.case, b.dtype, b.mode), "device": env.device_name(),
               "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "versions": env.versions()}
        for k in ("median_s", "p20_s", "p80_s", "reps", "timing_method", "host_s",
                  "device_busy_s", "tflops",
                  "gbps", "peak_bytes", "peak_method", "compile_cold_s", "compile_warm_s",
                  "compile_warm_built", "compile_startup_s", "compile_method", "rel_err",
                  "err_budget", "stock_err", "max_err", "max_err_budget", "stock_max_err"):
            rec[k] = None
        return rec

    def skipped_or_impl(self, b: Bench, rec: dict) -> Impl | None:
        """The implementation, its facts filled into `rec`; None (rec marked skipped) if
        disabled."""
        disabled = registry.disabled(b.op)
        if b.impl in disabled:
            rec.update(status="skipped", reason=disabled[b.impl])
            return None
        impl = registry.get(b.op, b.impl)
        # interpreted: the Triton interpreter or Pallas' interpret mode, whose times say nothing
        # about the kernel (the reports mark them and leave them out of the kernels' geomeans)
        rec.update(framework=impl.framework, kind=impl.kind, backend=impl.backend,
                   interpreted="interpreted" in impl.tags)
        if impl.layout is not None:
            rec["timed_layout"] = impl.layout.name
        if "tpu" in impl.tags and not env.jax_device().startswith("tpu"):
            rec.update(status="skipped", reason=TPU_ONLY)
            return None
        if "hopper" in impl.tags and "interpreted" in impl.tags:
            rec.update(status="skipped", reason=HOPPER_ONLY)
            return None
        return impl

    def run(self, b: Bench) -> tuple[dict, timing.Timing | None]:
        rec = self.base_record(b)
        impl = self.skipped_or_impl(b, rec)
        if impl is None:
            return rec, None
        if impl.framework == "jax":
            rec["jax_device"] = env.jax_device()
        measured = None
        try:
            with _backward_reruns(b.mode):
                measured = self._measure(impl, b, rec)
        except NotImplementedError as e:  # e.g. a forward-only kernel asked for its backward
            rec.update(status="skipped", reason=_reason(e))
        except check.WrongOutput as e:  # no error could be measured on it
            rec.update(status="failed", reason=f"wrong result: {e}")
        except Exception as e:  # the implementation failed: record it and go on
            rec.update(status="failed", reason=_reason(e))
        lost = guards.cuda_context_error() if rec["status"] == "failed" else None
        if lost:  # nothing more can run on the GPU in this process: the runner must know
            rec.update(context_lost=lost,
                       reason=f"{rec['reason']}; CUDA context lost after it ({lost})")
        elif ON_CUDA:
            torch.cuda.empty_cache()
        return rec, measured

    def _measure(self, impl: Impl, b: Bench, rec: dict) -> timing.Timing:
        # Every step's wall-clock span goes into rec["phases"] as it ends, so a benchmark that
        # fails still shows where its time went (run timeline, report's time breakdown).
        phases = rec.setdefault("phases", [])
        with timing.phase(phases, "setup"):  # float64 reference (once per case), inputs
            ref, stock = self.references.get(b.case, b.dtype, b.mode)
            arrays = inputs_mod.make(b.case, b.dtype, impl.framework, self.device)
            if b.mode == "fwd":
                calls = _forward_calls(impl, b.case, arrays)
            else:
                do = _grad_output(b.case, b.dtype, impl.framework, self.device)
                build = _torch_grad_calls if impl.framework == "torch" else _jax_grad_calls
                calls = build(impl, b.case, arrays, do, b.mode)

        kind = (b.op, impl.name, b.dtype, b.mode)
        caches = self._compile_caches.get(kind) if self.compile_cold == "first" else None
        cold = caches is None
        if cold:
            caches = compile_mod.fresh_caches(self.cache_root)
            if impl.reset is not None:  # no cold figure holds a compiler's process start-up
                rec["compile_startup_s"] = compile_mod.start_up(
                    compile_mod.compilers(impl.framework, impl.backend), self.cache_root, phases)
        autotuned: dict[str, str] = {}
        with compile_mod.autotune_choices(autotuned):
            first = compile_mod.first_calls(calls.first, impl.reset, caches, cold, calls.prepare)
        phases += first.phases
        if autotuned:
            rec["autotuned"] = autotuned
        output = calls.checked(first.output if calls.repoisoned is None
                               else timing.sync(calls.repoisoned()))
        err, wrong_dtype = judged(calls, output, ref, b.mode, b.dtype, impl.framework)
        t = timing.time_fn(calls.timed, impl.framework, ON_CUDA, self.policy)
        phases += t.phases
        rec["flags"] = guards.flags()
        cold_s, warm_s = first.compile_times(t.median_s)
        if rec["interpreted"]:
            peak, peak_method = None, memory.INTERPRETED
        else:
            with timing.phase(phases, "memory"):
                peak, peak_method = memory.peak_bytes(calls.timed, impl.framework, ON_CUDA,
                                                      *calls.memory)
        if self.profile_dir is not None:
            with timing.phase(phases, "trace"):
                rec.update(self._trace(b, impl, calls.timed))
        if impl.name in self.retime:  # again, with other work in between: the run-to-run noise
            with timing.phase(phases, "retime"):
                again = timing.time_fn(calls.timed, impl.framework, ON_CUDA, self.policy)
            rec.update(median_again_s=again.median_s, again_change=again.median_s / t.median_s - 1)
        budget = check.budgets(b.dtype, stock)
        rec.update(median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, reps=t.reps,
                   spread=t.spread, timing_method=t.method, host_s=t.host_s,
                   device_busy_s=t.busy_s,
                   **cases_mod.rates(rec["flops"], rec["bytes"], t.median_s),
                   peak_bytes=peak, peak_method=peak_method, compile_cold_s=cold_s,
                   compile_warm_s=warm_s,
                   compile_warm_built=first.warm_built,
                   compile_method="first call - median" + (
                       "; no compile step" if not impl.reset
                       else "; warm after in-memory reset; the compilers' once-per-process "
                       "start-up paid before the cold call, apart (compile_startup_s)" if cold
                       else "; warm only: cold measured on this implementation's first case"
                       + (f"; the warm call built {first.warm_built} compile-cache files, "
                          "compiling what no earlier benchmark of it had"
                          if first.warm_built else "")),
                   rel_err=err.frobenius, err_budget=budget.frobenius,
                   stock_err=stock.frobenius, max_err=err.element,
                   max_err_budget=budget.element, stock_max_err=stock.element)
        # the later cases' warm-only calls use these caches, and their records point at this
        # cold figure: kept once a record holds it (a case failing before then leaves the next
        # case to compile cold)
        self._compile_caches[kind] = caches
        wrong = wrong_dtype or check.wrong(err, b.dtype, stock)
        rec.update(status="failed" if wrong else "ok", reason=wrong)
        return t

    def _trace(self, b: Bench, impl: Impl, call) -> dict:
        """A few repetitions under the framework's profiler, after the timing; trace_path is
        relative to the profiles root's parent (the repository), so records stay portable."""
        from harness import trace

        suffix = "" if b.mode == "fwd" else f"-{b.mode}"
        base = self.profile_dir / b.op / b.impl / f"{b.case.name}-{b.dtype}{suffix}"
        base.parent.mkdir(parents=True, exist_ok=True)
        info = trace.capture(call, impl.framework, base)
        info["trace_path"] = os.path.relpath(info["trace_path"], self.profile_dir.parent.parent)
        return info


# harness.runner's alarm handler raises an in-process timeout: not where the benchmark was
_ALARM_HANDLER = str(Path(__file__).with_name("runner.py"))


def _reason(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if len(frames) > 1 and frames[-1].filename == _ALARM_HANDLER:
        frames.pop()  # the frame the alarm interrupted is the one before
    where = frames[-1] if frames else None
    at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}{at}"[:500]
