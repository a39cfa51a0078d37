"""The public contract of every implementation: argument checks shared by all backends, and the
shape arithmetic the backends share (output sizes, split-KV splits).

Each check raises TypeError (wrong kind of array, unsupported dtype) or ValueError (wrong rank or
shape) with a message naming the argument and what was expected, and returns the problem's sizes.
Zero-sized dimensions are rejected: every op in the suite needs at least one element per dimension.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
FRAMEWORKS = ("torch", "jax")


_DTYPE_NAMES: dict = {}  # dtype object -> its name


def dtype_name(x) -> str:
    """'float32' / 'float16' / 'bfloat16' for a torch tensor or a jax array. Remembered per dtype:
    str() of a jax array's numpy dtype takes about 4 us (a torch dtype's 0.3), and a call of a
    jax implementation through the public API asks 4 to 6 times. (The benchmarks call JAX
    implementations under one jit, which checks once, when it traces.)"""
    dtype = x.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _is_torch(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _is_jax(x) -> bool:
    import jax

    return isinstance(x, jax.Array)


def check_array(name: str, x, framework: str, rank: int) -> tuple[int, ...]:
    """Checks the array kind, rank and dtype of argument `name`; returns its shape."""
    if framework == "torch" and not _is_torch(x):
        raise TypeError(f"{name} must be a torch.Tensor for this torch implementation, "
                        f"got {type(x).__module__}.{type(x).__name__}")
    if framework == "jax" and not _is_jax(x):
        raise TypeError(f"{name} must be a jax.Array for this jax implementation, "
                        f"got {type(x).__module__}.{type(x).__name__}")
    if framework == "torch" and x.layout is not _strided():
        raise TypeError(f"{name} must be a dense (strided) torch.Tensor, got layout {x.layout}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    dtype = dtype_name(x)
    if dtype not in DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {dtype}")
    shape = tuple(map(int, x.shape))
    if min(shape) < 1:
        raise ValueError(f"{name} must have every dimension >= 1, got shape {shape}")
    return shape


def _strided():
    import torch

    return torch.strided


def check_same_device(**tensors) -> None:
    """torch tensors on one device (torch's conv, given a CPU input and a meta weight, returned
    arbitrary values)."""
    names = list(tensors)
    first = tensors[names[0]].device
    for n in names[1:]:
        if tensors[n].device != first:
            raise ValueError(f"{n} is on {tensors[n].device} but {names[0]} is on {first}: "
                             "all inputs must be on one device")


def check_same_dtype(**arrays) -> str:
    names = list(arrays)
    dtypes = [dtype_name(arrays[n]) for n in names]
    for n, d in zip(names[1:], dtypes[1:]):
        if d != dtypes[0]:
            raise TypeError(f"{n} has dtype {d} but {names[0]} has dtype {dtypes[0]}: "
                            "all inputs must share one dtype")
    return dtypes[0]


def check_device(name: str, x, device_type: str) -> None:
    """For kernels bound to one device type (a Triton kernel: 'cuda', or 'cpu' when
    interpreting)."""
    if x.device.type != device_type:
        raise ValueError(f"{name} must be on a {device_type} device for this implementation, "
                         f"got {x.device}")


class NoKernel(NotImplementedError):
    """A stock backend pinned by an implementation (an SDPA backend, JAX's cuDNN attention) has
    no kernel for these inputs: a limit of that backend, recorded as skipped, not a failure."""


@dataclass(frozen=True)
class MatmulDims:
    M: int
    K: int
    N: int


def matmul_args(a, b, framework: str) -> MatmulDims:
    M, K = check_array("a", a, framework, 2)
    K2, N = check_array("b", b, framework, 2)
    if K2 != K:
        raise ValueError(f"b must have shape [K={K}, N] to match a [M, K] = {[M, K]}, "
                         f"got {[K2, N]}")
    check_same_dtype(a=a, b=b)
    if framework == "torch":
        check_same_device(a=a, b=b)
    return MatmulDims(M, K, N)


@dataclass(frozen=True)
class AttentionDims:
    B: int
    H: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    causal: bool
    scale: float


def attention_args(q, k, v, causal, scale, framework: str) -> AttentionDims:
    B, H, Sq, D = check_array("q", q, framework, 4)
    kshape = check_array("k", k, framework, 4)
    vshape = check_array("v", v, framework, 4)
    if kshape != vshape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Sk, D], got k {list(kshape)} "
                         f"and v {list(vshape)}")
    Bk, Hkv, Sk, Dk = kshape
    if Bk != B:
        raise ValueError(f"k must have batch size {B} like q, got {Bk}")
    if Dk != D:
        raise ValueError(f"k must have head dimension D={D} like q, got {Dk}")
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of k's heads Hkv={Hkv}")
    check_same_dtype(q=q, k=k, v=v)
    if framework == "torch":
        check_same_device(q=q, k=k, v=v)
    # numpy's scalars pass too (a bool from a comparison, a float32 scale), as Python values
    if not _is_bool(causal):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if scale is None:
        scale = D ** -0.5
    elif not isinstance(scale, numbers.Real) or _is_bool(scale):
        raise TypeError(f"scale must be a positive number or None, got {scale!r}")
    elif not 0 < _as_float(scale) < float("inf"):  # NaN fails both comparisons
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return AttentionDims(B, H, Hkv, Sq, Sk, D, bool(causal), float(scale))


def _as_float(x: numbers.Real) -> float:
    """x as a float; inf for an int beyond float's range (float() raises OverflowError)."""
    try:
        return float(x)
    except OverflowError:
        return float("inf") if x > 0 else float("-inf")


def one_visible_key(sq: int, sk: int, causal: bool) -> bool:
    """Every query sees exactly one key: Sk = 1, or under the causal mask (top-left aligned) a
    single query, which sees key 0 alone. The softmax is then constant: that key's probability
    is exactly 1 (a kernel's 2^(s - max) can round to 1 + 1 ulp) and q and k get no gradient,
    exactly (a kernel's dP - delta, two fp32 sums of the same products in different orders,
    leaves rounding noise)."""
    return sk == 1 or (causal and sq == 1)


def _is_bool(x) -> bool:
    return isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    """An int, a numpy integer too; not a bool. (A plain int first: the ABC check costs about a
    microsecond, ten times per conv2d call.)"""
    return type(x) is int or (isinstance(x, numbers.Integral) and not _is_bool(x))


INT_MAX = 2**31 - 1  # a kernel's index arithmetic is 32-bit; jitted arguments overflow past int64


def int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each >= minimum and <= INT_MAX."""
    pair = (value, value) if _is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(map(_is_int, pair)):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > INT_MAX:
        raise ValueError(f"{name} must be <= {INT_MAX}, got {value!r}")
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class Conv2dDims:
    N: int
    H: int
    W: int
    C: int
    KH: int
    KW: int
    K: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    OH: int
    OW: int
    groups: int = 1  # channels in `groups` independent groups: C // groups in, K // groups out

    @property
    def Cg(self) -> int:
        """Input channels per group (w's third dimension)."""
        return self.C // self.groups

    @property
    def Kg(self) -> int:
        """Output channels per group."""
        return self.K // self.groups


def conv2d_args(x, w, stride, padding, dilation, framework: str, groups=1) -> Conv2dDims:
    N, H, W, C = check_array("x", x, framework, 4)
    KH, KW, Cw, K = check_array("w", w, framework, 4)
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide x's channels C={C}")
    if Cw != C // groups:
        per_group = f"C={C}" if groups == 1 else f"C / groups = {C // groups}"
        raise ValueError(f"w must have shape [KH, KW, {per_group}, K] to match x [N, H, W, C] = "
                         f"{[N, H, W, C]} with groups={groups}, got {[KH, KW, Cw, K]}")
    if K % groups:
        raise ValueError(f"w's output channels K={K} must be a multiple of groups={groups}")
    check_same_dtype(x=x, w=w)
    if framework == "torch":
        check_same_device(x=x, w=w)
    s = int_pair("stride", stride, 1)
    p = int_pair("padding", padding, 0)
    d = int_pair("dilation", dilation, 1)
    extent = (d[0] * (KH - 1) + 1, d[1] * (KW - 1) + 1)
    padded = (H + 2 * p[0], W + 2 * p[1])
    if extent[0] > padded[0] or extent[1] > padded[1]:
        raise ValueError(f"w's dilated kernel extent {extent} is larger than the padded input "
                         f"{padded} (x [N, H, W, C] = {[N, H, W, C]}, padding={p})")
    OH = (padded[0] - extent[0]) // s[0] + 1
    OW = (padded[1] - extent[1]) // s[1] + 1
    return Conv2dDims(N, H, W, C, KH, KW, K, s, p, d, OH, OW, groups)


def key_splits(programs: int, key_blocks: int, cores: int) -> tuple[int, int]:
    """(splits, key blocks per split) of a split-KV attention forward (decode): the key blocks
    split until `programs` programs become four per core (a memory-bound stream wants many loads
    in flight; no split when there are that many already), every split whole blocks and none
    empty. Shared by the Triton and Pallas launchers."""
    wanted = min(key_blocks, max(1, -(-4 * cores // programs)))
    per_split = -(-key_blocks // wanted)
    return -(-key_blocks // per_split), per_split
