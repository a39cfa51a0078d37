"""op -> {implementation name -> Impl}: the one place that knows which implementations exist.

Built-in modules register themselves when first asked for (importing torch and jax is slow, so
`import kernels.registry` alone imports neither). Users add their own with the `register` decorator.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

OPS = ("attention", "conv2d", "matmul")
KINDS = ("stock", "hand", "plugin")

_BUILTIN_MODULES = (
    "kernels.stock_torch",
    "kernels.stock_xla",
    "kernels.triton.matmul",
    "kernels.pallas.matmul",
    "kernels.pallas_mosaic.matmul",
    "kernels.triton.conv2d",
    "kernels.pallas.conv2d",
    "kernels.triton.attention",
    "kernels.pallas.attention",
    "kernels.pallas_mosaic.attention",
    "kernels.pallas_tpu.matmul",
    "kernels.pallas_tpu.attention",
    "kernels.pallas_tpu.conv2d",
)


@dataclass(frozen=True)
class Layout:
    """A JAX implementation's own layout where the contract's is not it
    (jax.nn.dot_product_attention takes [B, S, heads, D], the contract [B, heads, S, D]). As for the
    stock ops' other layout conversions, the harness does it outside the timed call: it converts
    each input (and a backward's output gradient) with `to_native`, times `fn` on them, and
    converts each array `fn` returns (the output, or each gradient) with `to_contract` for the
    check."""

    fn: Callable[..., Any]  # (*native arrays, **options) -> native output
    to_native: Callable[[Any], Any]
    to_contract: Callable[[Any], Any]
    name: str = ""  # for the records, e.g. "q, k, v, out [B, S, heads, D]"


@dataclass(frozen=True)
class Impl:
    """One implementation of one op. Call it like the op: impl(a, b), impl(q, k, v, ...), ..."""

    op: str
    name: str
    fn: Callable[..., Any]
    framework: str  # "torch" or "jax": the kind of arrays it takes and returns
    kind: str  # "stock" (vendor library or compiler), "hand" (hand-written kernel), "plugin"
    backend: str = ""  # what runs underneath, for reports ("cuBLAS", "Triton", "XLA", ...)
    # (*args, **kwargs) -> zero-argument callable. Untimed setup (layout conversion, jit binding,
    # weight repacking) happens here so the timed call holds only the op itself.
    prepare: Callable[..., Callable[[], Any]] | None = None
    # Drops in-memory compile caches so the next call compiles again (cold/warm compile timing).
    reset: Callable[[], None] | None = None
    # The hand-written torch kernels take out= so tests can poison the output buffer with NaN.
    accepts_out: bool = False
    # "tpu": a TPU kernel; off a TPU it runs only in the TPU interpreter (tested, benchmarked on a
    # TPU only). "interpreted": runs in an interpreter on this machine (Triton without CUDA,
    # Pallas interpret mode), so its memory is the interpreter's and is not measured.
    tags: tuple[str, ...] = field(default=())
    layout: Layout | None = None  # the layout it is timed in, where not the contract's

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def bind(self, *args, **kwargs) -> Callable[[], Any]:
        """A zero-argument callable that runs the op on these inputs (setup done, untimed)."""
        if self.prepare is not None:
            return self.prepare(*args, **kwargs)
        return lambda: self.fn(*args, **kwargs)


_IMPLS: dict[str, dict[str, Impl]] = {op: {} for op in OPS}
_DISABLED: dict[tuple[str, str], str] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_loaded = False


def register(op: str, name: str, *, framework: str, kind: str = "plugin", backend: str = "",
             enabled: bool = True, reason: str = "", prepare=None, reset=None,
             accepts_out: bool = False, tags: tuple[str, ...] = (), layout: Layout | None = None):
    """Decorator adding `fn` as implementation `name` of `op`.

    enabled=False keeps the name known (reported as skipped with `reason`) without making it
    callable: a backend the machine lacks is a skip, not a crash.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    if framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if layout is not None and framework != "jax":
        raise ValueError("layout is for JAX implementations, whose arrays have no strides; a torch "
                         "one converts its inputs in `prepare` and returns a view")

    def add(fn):
        taken = _IMPLS[op].get(name)
        if kind == "plugin" and (taken is not None or (op, name) in _DISABLED):
            # its records would stand under a name that reports and targets read as another's
            by = f"the {taken.kind} implementation" if taken else "an implementation disabled here"
            raise ValueError(f"{op} implementation name {name!r} is taken by {by}; a plugin "
                             "needs a name of its own")
        if enabled:
            _IMPLS[op][name] = Impl(op, name, fn, framework, kind, backend, prepare, reset,
                                    accepts_out, tuple(tags), layout)
            _DISABLED.pop((op, name), None)
        else:
            _DISABLED[(op, name)] = reason or "not available on this machine"
        return fn

    return add


def load_builtins() -> None:
    """Imports the built-in implementations, then the plugin files named in KERNELS_PLUGINS."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:  # a missing backend must not hide the others
            _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
    for path in plugin_paths():
        load_plugin(path)


def plugin_paths() -> list[str]:
    return [p.strip() for p in os.environ.get("KERNELS_PLUGINS", "").split(",") if p.strip()]


def load_plugin(path: str) -> None:
    """Imports a user's Python file whose `register` calls add implementations. An import failure
    is kept in import_errors() under the file's path."""
    name = "kernels_plugin_" + os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        _IMPORT_ERRORS[path] = f"{type(e).__name__}: {e}"


def ops() -> list[str]:
    return list(OPS)


def impls(op: str) -> list[str]:
    """Names of the implementations of `op` that can run on this machine, sorted."""
    load_builtins()
    _check_op(op)
    return sorted(_IMPLS[op])


def get(op: str, name: str) -> Impl:
    load_builtins()
    _check_op(op)
    if name not in _IMPLS[op]:
        if (op, name) in _DISABLED:
            raise KeyError(f"{op} implementation {name!r} is not available here: "
                           f"{_DISABLED[(op, name)]}")
        raise KeyError(f"unknown {op} implementation {name!r}; known: {impls(op)}")
    return _IMPLS[op][name]


def disabled(op: str) -> dict[str, str]:
    """Implementations known but not runnable here, with the reason."""
    load_builtins()
    _check_op(op)
    return {name: why for (o, name), why in sorted(_DISABLED.items()) if o == op}


def import_errors() -> dict[str, str]:
    load_builtins()
    return dict(_IMPORT_ERRORS)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
