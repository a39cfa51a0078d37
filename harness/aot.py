"""Compiles the Triton kernels for a GPU that is not here (ahead of time), e.g. Hopper (cuda:90)
on the 2-core CPU machine: every autotune config of every kernel that a tier's cases launch.

What it tells before any GPU time is spent: configs that do not compile for the target, that ask
for more shared memory than a block may have (they fail at launch on the GPU), that spill
registers, whether the dots became Hopper's warpgroup MMA (wgmma) and whether tensor-descriptor
loads became TMA copies. The launches are the launchers' own: each Triton implementation is
called on empty tensors of the case's shapes with kernel launches captured instead of run, so the
arguments, strides and constexprs are exactly what the GPU run will pass (Triton specialises on
them: divisibility by 16, strides of 1).

The Pallas kernels (`pallas`, Pallas' Triton lowering) go the same way from the other side: their
launchers are lowered for CUDA (which needs no GPU), each Triton module Pallas hands over is
captured with its warps and stages, and Triton compiles it for the target. On the GPU it is XLA's
own copy of Triton that compiles these modules, so their figures here are those of Triton 3.6,
close to but not exactly what the GPU run builds.

    python -m harness.aot --tier standard --dtypes bf16 --target cuda:90

Needs TRITON_INTERPRET=0 before the kernels are imported (set here when run as a module; without
a GPU, importing `kernels` would otherwise switch Triton to its interpreter), and a process of its
own: once Triton's code generator has run in a process, its interpreter fails there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from harness.compile import autotuner_runs, config_text

# Largest shared memory one block may ask for, per compute capability (the opt-in maximum); a
# target without an entry is refused, since its builds could not be checked against it.
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024}
# A GPU of each compute capability, by the device kind JAX knows it by.
DEVICE_KINDS = {80: "NVIDIA A100", 86: "NVIDIA A10", 89: "NVIDIA L4", 90: "NVIDIA H100",
                100: "NVIDIA B200"}


def lower_for_cuda(fn: Callable, *args, capability: int = 90):
    """`fn` jitted, traced on `args` (arrays or ShapeDtypeStructs) and lowered for CUDA, for a GPU
    of `capability` whether or not one is here. Pallas' Triton lowering takes the target from the
    abstract device of the mesh in context: without one and without a GPU, jax 0.11 refuses
    ("No supported GPU devices found"), where jax 0.10 assumed compute capability 9.0."""
    import jax

    if capability not in DEVICE_KINDS:
        raise ValueError(f"capability={capability}: Pallas lowers here for one of "
                         f"{', '.join(map(str, DEVICE_KINDS))}")
    device = jax.sharding.AbstractDevice(device_kind=DEVICE_KINDS[capability], num_cores=None,
                                         platform="cuda")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("device",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@dataclass
class Launch:
    """One kernel launch as the launcher made it: the Triton kernel and its arguments."""
    kernel: object  # triton Autotuner or JITFunction
    args: tuple
    kwargs: dict
    case: str


@dataclass
class Build:
    """One kernel compiled with one config."""
    kernel: str
    config: str
    cases: list[str] = field(default_factory=list)
    status: str = "ok"  # ok / spills / over_shared / error
    error: str = ""
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads per thread
    shared_bytes: int | None = None
    mma: str = ""  # "wgmma", "mma" or "" (no tensor-core instruction in the PTX)
    tma: bool = False  # tiles moved by the Tensor Memory Accelerator (cp.async.bulk.tensor)
    # warp-specialized: partitions of warps given their own register budgets (setmaxnreg), as
    # Triton's Hopper warp specialization makes them
    ws: bool = False


@contextmanager
def captured_launches(sink: list, case: str):
    """Triton launches inside the block are recorded into `sink` instead of being run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kernels.triton import _common

    originals = {**autotuner_runs(Autotuner), JITFunction: JITFunction.run}

    def capture(self, *args, grid=None, warmup=False, **kwargs):
        sink.append(Launch(self, args, kwargs, case))

    for cls in originals:
        cls.run = capture
    _common.launches_captured = True
    try:
        yield
    finally:
        _common.launches_captured = False
        for cls, original in originals.items():
            cls.run = original


@dataclass
class TritonModule:
    """One Pallas kernel as Pallas' GPU lowering hands it to Triton: its IR and launch options."""
    name: str
    ir: str
    num_warps: int
    num_stages: int
    case: str
    programs: int = 0  # the launch grid's size


@contextmanager
def captured_pallas_modules(sink: list, case: str):
    """The Pallas launchers lower for the GPU inside the block (not in interpret mode), and each
    Triton module their lowering for CUDA makes is recorded into `sink`."""
    import jax
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration  # noqa: F401 - registers the rule

    from kernels.pallas import _common, attention, conv2d, matmul

    rule = pallas_core.get_lowering_rule(triton_core.CompilerParams, "gpu")
    to_module = lowering.lower_jaxpr_to_triton_module
    options = {}  # of the kernel being lowered: the rule runs first, then makes its module

    # The suite's Pallas launchers always pass Triton compiler params on a GPU, so each of their
    # kernels goes through this rule.
    def recording_rule(ctx, *args, compiler_params=None, **kwargs):
        params = compiler_params or triton_core.CompilerParams()
        options.update(num_warps=params.num_warps or 4, num_stages=params.num_stages or 3)
        return rule(ctx, *args, compiler_params=compiler_params, **kwargs)

    def recording_to_module(*args, **kwargs):
        result = to_module(*args, **kwargs)
        ir = result.module.operation.get_asm()
        sink.append(TritonModule(re.match(r"module @(\S+)", ir).group(1), ir, case=case,
                                 programs=math.prod(result.grid), **options))
        return result

    launchers = (_common, attention, conv2d, matmul)  # each holds its own name `interpret`
    interpret = [m.interpret for m in launchers]
    jax.clear_caches()  # jitted launchers traced in interpret mode must trace again
    pallas_core.register_lowering_rule(triton_core.CompilerParams, recording_rule, "gpu")
    lowering.lower_jaxpr_to_triton_module = recording_to_module
    for m in launchers:
        m.interpret = lambda: False
    try:
        yield
    finally:
        for m, original in zip(launchers, interpret):
            m.interpret = original
        lowering.lower_jaxpr_to_triton_module = to_module
        pallas_core.register_lowering_rule(triton_core.CompilerParams, rule, "gpu")
        jax.clear_caches()


def _chosen_cases(op: str, tier: str, max_cases: int | None, name_pattern: str,
                  shapes: Sequence = ()) -> list:
    from harness import cases as cases_mod

    return [c for c in cases_mod.chosen(op, tier, shapes)
            if re.search(name_pattern, c.name)][:max_cases]


def _is_triton(backend: str) -> bool:
    return backend.startswith("Triton")


def _is_pallas(backend: str) -> bool:
    return backend == "Pallas"  # Pallas' Triton lowering; not Mosaic GPU, not the TPU kernels


def _implementations(op: str, backend: Callable[[str], bool], names: Sequence[str]) -> list:
    """The op's registered implementations whose backend passes `backend` (those in `names`
    only, unless it is empty)."""
    from kernels import registry

    impls = [registry.get(op, n) for n in registry.impls(op) if not names or n in names]
    return [impl for impl in impls if backend(impl.backend)]


def pallas_modules(ops: list[str], tier: str, dtypes: list[str], modes: list[str],
                   max_cases: int | None = None, name_pattern: str = "",
                   impls: Sequence[str] = (), shapes: Sequence = (),
                   capability: int = 90) -> list[TritonModule]:
    """The Triton modules of every Pallas (Triton-lowered) implementation on the tier's cases,
    chosen as in `launches`, forward and (attention) backward, lowered for a GPU of
    `capability`."""
    import jax
    import jax.numpy as jnp

    from harness import inputs

    found: list[TritonModule] = []
    for op in ops:
        for impl in _implementations(op, _is_pallas, impls):
            for case in _chosen_cases(op, tier, max_cases, name_pattern, shapes):
                opts = inputs.options(case)

                def forward(*xs):
                    return impl.fn(*xs, **opts)

                def gradients(*xs):
                    out, vjp = jax.vjp(forward, *xs)
                    return vjp(out)

                calls = ([forward] if "fwd" in modes or op != "attention" else []) + (
                    [gradients] if op == "attention" and {"bwd", "fwd_bwd"} & set(modes) else [])
                for dtype in dtypes:
                    arrays = [jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
                              for s in inputs.shapes(case).values()]
                    with captured_pallas_modules(found, f"{case.name} {dtype}"):
                        for call in calls:
                            lower_for_cuda(call, *arrays, capability=capability)
    return found


def launches(ops: list[str], tier: str, dtypes: list[str], modes: list[str],
             max_cases: int | None = None, name_pattern: str = "",
             impls: Sequence[str] = (), shapes: Sequence = (),
             capability: int = 90) -> list[Launch]:
    """The Triton launches of every Triton implementation (or those named in `impls`) on the
    tier's cases or the given `shapes` (those whose name `name_pattern` finds, a regular
    expression; then the first `max_cases` of each op), forward and (attention) backward, on
    empty tensors, as a GPU of `capability` launches them: its variants (no TMA before 9.0),
    and none of an implementation it cannot run (triton_tma before 9.0)."""
    import torch

    from harness import inputs
    from kernels.triton._common import SM90_TAG, launching_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    found: list[Launch] = []
    for op in ops:
        for impl in _implementations(op, _is_triton, impls):
            if SM90_TAG in impl.tags and capability < 90:
                continue
            for case in _chosen_cases(op, tier, max_cases, name_pattern, shapes):
                for dtype in dtypes:
                    arrays = [torch.empty(s, dtype=inputs.TORCH_DTYPES[dtype], device=device)
                              for s in inputs.shapes(case).values()]
                    opts = inputs.options(case)
                    with captured_launches(found, f"{case.name} {dtype}"), \
                            launching_for(capability):
                        if "fwd" in modes or op != "attention":
                            impl.fn(*arrays, **opts)
                        if op == "attention" and {"bwd", "fwd_bwd"} & set(modes):
                            leaves = [a.requires_grad_() for a in arrays]
                            out = impl.fn(*leaves, **opts)
                            torch.autograd.grad(out, leaves, torch.empty_like(out))
    return found


def _configs(launch: Launch, prune: bool = True) -> list:
    """The configs the autotuner would try for this launch (after its pruning unless `prune` is
    False), or [None]."""
    from triton.runtime.autotuner import Autotuner

    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [None]
    if not prune:
        return kernel.configs
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))
    try:  # Triton's own pruning: the suite's autotuner would also compile the configs here
        return Autotuner.prune_configs(kernel, launch.kwargs)
    finally:
        kernel.nargs = None


def _config_text(config) -> str:
    return "(no autotuning)" if config is None else config_text(config)


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill stores + loads in bytes) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory(prefix="aot-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v",
                              f"--gpu-name={sm_arch_from_capability(capability)}", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def compile_all(found: list[Launch], target: str, prune: bool = True) -> list[Build]:
    """Each distinct (kernel, specialisation, config) compiled once for `target` ("cuda:90"), in
    parallel threads (as the suite's autotuners compile on a GPU: kernels.triton._common);
    prune=False: every config of each kernel, also those its autotuner would not try here."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    from kernels.triton._common import compile_threads

    backend_name, capability = target.split(":")
    gpu = GPUTarget(backend_name, int(capability), 32)
    backend = make_backend(gpu)
    builds: dict[tuple, Build] = {}
    jobs = []
    binders = {}
    for launch in found:
        fn = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
        if id(fn) not in binders:
            binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        for config in _configs(launch, prune):
            kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
            if config is not None and config.pre_hook is not None:  # may set signature args
                config.pre_hook({**dict(zip(fn.arg_names, launch.args)), **kwargs})
            bound, spec, opts = binders[id(fn)](*launch.args, **kwargs)
            key = (fn.__name__, repr(spec), _config_text(config))
            if key in builds:
                builds[key].cases.append(launch.case)
                continue
            build = builds[key] = Build(fn.__name__, _config_text(config), [launch.case])
            try:  # the specialisation is taken now: the next config's pre-hook changes the args
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                                      spec, opts)
                jobs.append((build, ASTSource(fn, signature, constexprs, attrs),
                             options.__dict__))
            except Exception as e:  # noqa: BLE001 - a config that fails is the finding
                build.status, build.error = "error", f"{type(e).__name__}: {e}"[:500]
    with ThreadPoolExecutor(compile_threads()) as pool:
        list(pool.map(lambda job: _build(*job, gpu), jobs))
    return list(builds.values())


def compile_modules(modules: list[TritonModule], target: str) -> list[Build]:
    """Each distinct Pallas kernel (module text, warps, stages) compiled once for `target`."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.backends.compiler import GPUTarget

    from kernels.triton._common import compile_threads

    backend_name, capability = target.split(":")
    gpu = GPUTarget(backend_name, int(capability), 32)
    builds: dict[tuple, Build] = {}
    jobs = []
    for m in modules:
        key = (m.ir, m.num_warps, m.num_stages)
        if key in builds:
            builds[key].cases.append(m.case)
            continue
        builds[key] = Build(m.name, f"pallas, {m.programs} programs, warps={m.num_warps}, "
                                    f"stages={m.num_stages}", [m.case])
        jobs.append((builds[key], m))
    with tempfile.TemporaryDirectory(prefix="aot-pallas-") as tmp:
        def compile_one(i: int, job: tuple) -> None:
            build, m = job
            path = os.path.join(tmp, f"{i}.ttir")  # Triton compiles IR from a file
            with open(path, "w") as f:
                f.write(m.ir)
            _build(build, path, dict(num_warps=m.num_warps, num_stages=m.num_stages), gpu)

        with ThreadPoolExecutor(compile_threads()) as pool:
            list(pool.map(compile_one, range(len(jobs)), jobs))
    return list(builds.values())


def _build(build: Build, source, options: dict, gpu) -> None:
    """Compiles one kernel (a Triton ASTSource or a Triton IR file) and fills in `build`: what
    ptxas and the compiler report."""
    import triton

    try:
        compiled = triton.compile(source, target=gpu, options=options)
        ptx = compiled.asm["ptx"]
        build.registers, build.spill_bytes = _ptxas_usage(ptx, gpu.arch)
    except Exception as e:  # noqa: BLE001 - a config that fails is the finding
        build.status, build.error = "error", f"{type(e).__name__}: {e}"[:500]
        return
    build.shared_bytes = compiled.metadata.shared
    build.mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else ""
    build.tma = "cp.async.bulk.tensor" in ptx
    build.ws = "setmaxnreg" in ptx
    limit = SHARED_LIMIT.get(gpu.arch)
    if limit is not None and build.shared_bytes > limit:
        build.status = "over_shared"
    elif build.spill_bytes:
        build.status = "spills"


def table(builds: list[Build], target: str) -> str:
    limit = SHARED_LIMIT.get(int(target.split(":")[1]))
    width = max([len("kernel")] + [len(b.kernel) for b in builds])
    lines = [f"{len(builds)} kernel builds for {target}"
             + (f" (shared memory limit {limit // 1024} KiB per block)" if limit else ""),
             f"{'kernel':<{width}} {'config':<58} {'status':<11} {'regs':>4} {'spill B':>7} "
             f"{'smem KiB':>8} {'mma':<5} {'tma':<3} {'ws':<3} {'cases':>5}  first case"]
    for b in sorted(builds, key=lambda b: (b.kernel, b.config, b.cases[0])):
        smem = f"{b.shared_bytes / 1024:.0f}" if b.shared_bytes is not None else "-"
        lines.append(f"{b.kernel:<{width}} {b.config:<58} {b.status:<11} {b.registers or '-':>4} "
                     f"{b.spill_bytes if b.spill_bytes is not None else '-':>7} {smem:>8} "
                     f"{b.mma or '-':<5} {'yes' if b.tma else '-':<3} {'yes' if b.ws else '-':<3} "
                     f"{len(b.cases):>5}  "
                     f"{b.cases[0]}")
        if b.error:
            lines.append(f"    {b.error.splitlines()[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from harness import cases as cases_mod
    from kernels import registry

    p = argparse.ArgumentParser(prog="python -m harness.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="matmul,conv2d,attention")
    p.add_argument("--tier", default="standard", choices=cases_mod.TIERS)
    p.add_argument("--dtypes", default="bf16", help="comma-separated, e.g. bf16,fp32")
    p.add_argument("--modes", default="fwd,bwd", help="attention modes: fwd, bwd")
    p.add_argument("--cases", default="", metavar="REGEX",
                   help="only the cases whose name this finds, e.g. '_q1_' (decode)")
    p.add_argument("--shapes", default="", metavar="NAMES",
                   help="comma-separated case names (as make bench SHAPES=), instead of the "
                        "tier's cases")
    p.add_argument("--max-cases", type=int, help="only the first N cases of each op")
    p.add_argument("--impls", default="",
                   help="comma-separated implementations, e.g. pallas (default: every Triton "
                        "and Pallas one)")
    p.add_argument("--target", default="cuda:90", help="backend:capability, e.g. cuda:90")
    p.add_argument("--all-configs", action="store_true",
                   help="every config of each kernel, also those its autotuner prunes for a case")
    p.add_argument("--json", help="also write the builds here as JSON")
    args = p.parse_args(argv)
    backend, _, capability = args.target.partition(":")
    if backend != "cuda" or not capability.isdigit():
        p.error(f"--target: cuda:<capability>, e.g. cuda:90, not {args.target!r}")
    capability = int(capability)
    if capability not in SHARED_LIMIT:
        p.error(f"--target: no shared-memory limit is known here for {args.target!r}, so its "
                f"builds could not be checked; known: "
                f"{', '.join(f'cuda:{c}' for c in SHARED_LIMIT)}")
    # each op and dtype once, as the bench takes them: fp32,float32 had built every case twice
    ops, impls = list(dict.fromkeys(args.ops.split(","))), [n for n in args.impls.split(",") if n]
    unknown = [op for op in ops if op not in registry.ops()]
    if unknown:
        p.error(f"--ops: {', '.join(unknown)} is not an op; those are {', '.join(registry.ops())}")
    try:
        dtypes = list(dict.fromkeys(cases_mod.normalize_dtype(d) for d in args.dtypes.split(",")))
    except ValueError as e:
        p.error(f"--dtypes: {e}")
    compiled_here = {impl.name for op in ops for impl in _implementations(
        op, lambda backend: _is_triton(backend) or _is_pallas(backend), ())}
    if set(impls) - compiled_here:
        p.error(f"--impls: {', '.join(sorted(set(impls) - compiled_here))} is not a Triton or "
                f"Pallas implementation of {args.ops}; those are "
                f"{', '.join(sorted(compiled_here))}")
    pallas = {impl.name for op in ops for impl in _implementations(op, _is_pallas, impls)}
    if pallas and capability not in DEVICE_KINDS:  # Triton alone compiles for any capability
        p.error(f"--target: {', '.join(sorted(pallas))} lower here for a capability of "
                f"{', '.join(map(str, DEVICE_KINDS))}, not {args.target!r} (--impls without "
                "them builds the Triton kernels for it)")
    try:
        shapes = [cases_mod.parse(s) for s in args.shapes.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--shapes: {e}")
    unselected = [c.name for c in shapes if c.op not in ops]
    if unselected:
        p.error(f"--shapes: {', '.join(unselected)} not of the selected ops {args.ops}")
    selection = (ops, args.tier, dtypes, args.modes.split(","), args.max_cases, args.cases, impls,
                 shapes)
    builds = compile_all(launches(*selection, capability=capability), args.target,
                         prune=not args.all_configs)
    builds += compile_modules(pallas_modules(*selection, capability=capability), args.target)
    if not builds:
        print(f"no kernel builds: the selection (--ops {args.ops}, --cases {args.cases!r}, "
              f"--shapes, --impls) launches no Triton or Pallas kernel", file=sys.stderr)
        return 1
    print(table(builds, args.target))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(b) for b in builds], f, indent=1)
    return 1 if any(b.status in ("error", "over_shared") for b in builds) else 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before kernels (and triton.jit) are imported
    sys.exit(main())
