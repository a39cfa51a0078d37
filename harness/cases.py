"""Shape cases as data, per op and tier, and the two numbers every case starts from: the
floating-point operations it does and the fewest bytes it must move (each input element some output
needs read once, each output written once).

Tiers: `smoke` runs on a 2-core CPU in minutes (interpreters included); `standard` is the GPU set;
`full` adds the rest of the grids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

TIERS = ("smoke", "standard", "full")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
ATTENTION_MODES = ("fwd", "bwd", "fwd_bwd")
MODES_BY_OP = {"matmul": ("fwd",), "conv2d": ("fwd",), "attention": ATTENTION_MODES}


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    dims: dict = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"


# ---------------------------------------------------------------- matmul: M, K, N
def _mm(M, K, N):
    return Case("matmul", f"{M}x{K}x{N}", {"M": M, "K": K, "N": N})


_MATMUL_SMOKE = [_mm(128, 128, 128), _mm(256, 256, 256), _mm(16, 512, 256), _mm(257, 131, 67)]
# LLM-like: MLP up (4096 tokens, 4096 -> 14336) and down projections, an attention-sized
# projection, and a decode step (16 tokens).
_MATMUL_STANDARD = [_mm(n, n, n) for n in (1024, 2048, 4096, 8192)] + [
    _mm(4096, 4096, 14336), _mm(4096, 14336, 4096), _mm(8192, 1024, 4096), _mm(16, 4096, 4096)]
_MATMUL_FULL = _MATMUL_STANDARD + [_mm(n, n, n) for n in (512, 3072, 6144, 16384)] + [
    _mm(4097, 4095, 4093), _mm(65536, 256, 256), _mm(256, 65536, 256), _mm(1, 8192, 8192)]


# ---------------------------------------------------------------- attention
def _attn(B, H, Hkv, Sq, Sk, D, causal):
    mask = "causal" if causal else "full"
    heads = f"h{H}" if H == Hkv else f"h{H}kv{Hkv}"
    return Case("attention", f"b{B}_{heads}_q{Sq}_k{Sk}_d{D}_{mask}",
                {"B": B, "H": H, "Hkv": Hkv, "Sq": Sq, "Sk": Sk, "D": D, "causal": causal})


def _flash_grid(seqlens, head_dims, tokens=16384, width=2048):
    """The FlashAttention paper's grid: batch * seqlen = 16k tokens, heads * D = 2048."""
    return [_attn(tokens // s, width // d, width // d, s, s, d, causal)
            for d in head_dims for s in seqlens for causal in (False, True)]


_ATTENTION_SMOKE = [
    _attn(1, 2, 2, 128, 128, 64, False), _attn(1, 2, 2, 128, 128, 64, True),
    _attn(1, 4, 1, 1, 256, 64, False),  # decode step, multi-query
    _attn(1, 2, 1, 67, 131, 32, True),  # odd lengths, GQA, Sq < Sk
]
_DECODE = [_attn(8, 32, 8, 1, 4096, 128, False), _attn(8, 32, 8, 1, 32768, 128, False)]
_ATTENTION_ODD = [_attn(2, 16, 4, 1000, 1000, 128, True), _attn(1, 8, 8, 4099, 2053, 64, True)]
# D=128 first: it holds the forward target (D=128, S >= 4k), and a GPU run cut by its time limit
# keeps what came first (the first H100 run stopped after the D=64 half).
_ATTENTION_STANDARD = _flash_grid((1024, 4096, 16384), (128, 64)) + _DECODE + _ATTENTION_ODD
_ATTENTION_FULL = _flash_grid((512, 1024, 2048, 4096, 8192, 16384), (64, 128)) + _DECODE + \
    _ATTENTION_ODD


# ---------------------------------------------------------------- conv2d
def _conv(N, H, W, C, K, KH, KW, stride=1, padding=0, dilation=1, label="", groups=1):
    def fmt(v):
        return str(v) if isinstance(v, int) else f"{v[0]}x{v[1]}"
    name = f"{label + '_' if label else ''}n{N}_{H}x{W}x{C}_k{KH}x{KW}x{K}_s{fmt(stride)}" \
           f"_p{fmt(padding)}_d{fmt(dilation)}" + (f"_g{groups}" if groups != 1 else "")
    return Case("conv2d", name, {"N": N, "H": H, "W": W, "C": C, "K": K, "KH": KH, "KW": KW,
                                 "stride": stride, "padding": padding, "dilation": dilation,
                                 "groups": groups})


def _resnet50(batch):
    """The distinct convolution layers of ResNet-50 (stem, bottleneck 1x1 / 3x3 / 1x1 per stage,
    the stride-2 3x3 and the projection shortcuts of the transitions), NHWC."""
    layers = [_conv(batch, 224, 224, 3, 64, 7, 7, 2, 3, label="stem")]
    # stage: input size, width, input channels of the first block
    for size, width, cin in ((56, 64, 64), (28, 128, 256), (14, 256, 512), (7, 512, 1024)):
        stride = 1 if width == 64 else 2
        in_size = size * stride
        layers += [
            _conv(batch, in_size, in_size, cin, width, 1, 1, label=f"c{width}_reduce_first"),
            _conv(batch, in_size, in_size, cin, width * 4, 1, 1, stride,
                  label=f"c{width}_shortcut"),
            _conv(batch, size, size, width * 4, width, 1, 1, label=f"c{width}_reduce"),
            _conv(batch, size, size, width, width, 3, 3, 1, 1, label=f"c{width}_3x3"),
            _conv(batch, size, size, width, width * 4, 1, 1, label=f"c{width}_expand"),
        ]
        if stride == 2:
            layers.append(_conv(batch, in_size, in_size, width, width, 3, 3, 2, 1,
                                label=f"c{width}_3x3_s2"))
    return layers


def _grouped(batch):
    """Grouped convolutions: MobileNetV2's depthwise 3x3 layers (groups = C, one filter per
    channel; the stride-2 ones where a stage shrinks), where a conv moves far more bytes than it
    does FLOPs, and ResNeXt-50's grouped 3x3 (32 groups of 4 channels)."""
    return [
        _conv(batch, 112, 112, 32, 32, 3, 3, 1, 1, label="dw_c32", groups=32),
        _conv(batch, 112, 112, 96, 96, 3, 3, 2, 1, label="dw_c96_s2", groups=96),
        _conv(batch, 56, 56, 144, 144, 3, 3, 1, 1, label="dw_c144", groups=144),
        _conv(batch, 28, 28, 192, 192, 3, 3, 1, 1, label="dw_c192", groups=192),
        _conv(batch, 14, 14, 576, 576, 3, 3, 1, 1, label="dw_c576", groups=576),
        _conv(batch, 7, 7, 960, 960, 3, 3, 1, 1, label="dw_c960", groups=960),
        _conv(batch, 56, 56, 128, 128, 3, 3, 1, 1, label="resnext_c128", groups=32),
    ]


_CONV_ODD = [
    _conv(2, 31, 29, 3, 1, 3, 3, 1, 1, label="odd_k1"),
    _conv(2, 33, 33, 16, 32, 3, 3, 1, 2, 2, label="odd_dilation2"),
    _conv(2, 35, 35, 8, 24, 5, 5, 3, 1, label="odd_stride3"),
    _conv(2, 40, 24, 12, 20, 3, 5, 1, (1, 2), label="odd_nonsquare"),
]
_CONV_SMOKE = [
    _conv(2, 16, 16, 16, 32, 3, 3, 1, 1, label="c3x3"),
    _conv(2, 16, 16, 32, 64, 1, 1, label="c1x1"),
    _conv(1, 32, 32, 3, 16, 7, 7, 2, 3, label="stem"),
    _conv(1, 15, 13, 3, 1, 3, 3, 1, 1, label="odd_k1"),
    _conv(1, 17, 17, 8, 8, 3, 3, 3, 2, 2, label="odd_s3_d2"),
    _conv(2, 16, 16, 32, 32, 3, 3, 1, 1, label="dw", groups=32),
    _conv(1, 15, 13, 12, 24, 3, 3, 2, 1, label="grouped", groups=4),
]
# The GPU run's time goes to the ResNet-50 layers (issue targets) first: two grouped layers in
# the standard tier, all of them in the full one.
_CONV_STANDARD = _resnet50(32) + _CONV_ODD + [
    c for c in _grouped(32) if c.name.startswith(("dw_c144_", "resnext_c128_"))]
_CONV_FULL = _resnet50(32) + _resnet50(128) + _CONV_ODD + _grouped(32) + _grouped(128)
# the cases the conv2d targets are judged over (harness.targets)
RESNET50_LAYERS = frozenset(c.name for batch in (32, 128) for c in _resnet50(batch))

CASES: dict[str, dict[str, list[Case]]] = {
    "matmul": {"smoke": _MATMUL_SMOKE, "standard": _MATMUL_STANDARD, "full": _MATMUL_FULL},
    "attention": {"smoke": _ATTENTION_SMOKE, "standard": _ATTENTION_STANDARD,
                  "full": _ATTENTION_FULL},
    "conv2d": {"smoke": _CONV_SMOKE, "standard": _CONV_STANDARD, "full": _CONV_FULL},
}


def cases(op: str, tier: str) -> list[Case]:
    if op not in CASES:
        raise ValueError(f"op must be one of {sorted(CASES)}, got {op!r}")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {list(TIERS)}, got {tier!r}")
    return list(CASES[op][tier])


def chosen(op: str, tier: str, shapes: list[Case] | tuple = ()) -> list[Case]:
    """The cases a run takes for op: those of `shapes` that are op's where shapes are given (the
    user's own, from `parse`), else the tier's."""
    return [c for c in shapes if c.op == op] if shapes else cases(op, tier)


# ---------------------------------------------------------------- a case from its name
_SIDE = r"\d+(?:x\d+)?"  # an int, or an (h, w) pair written hxw
_FORMATS = {
    "matmul": (r"(?P<M>\d+)x(?P<K>\d+)x(?P<N>\d+)",
               "MxKxN (a [M, K] @ b [K, N]), e.g. 4096x4096x1024"),
    "attention": (r"b(?P<B>\d+)_h(?P<H>\d+)(?:kv(?P<Hkv>\d+))?_q(?P<Sq>\d+)_k(?P<Sk>\d+)"
                  r"_d(?P<D>\d+)_(?P<mask>full|causal)",
                  "b<B>_h<H>[kv<Hkv>]_q<Sq>_k<Sk>_d<D>_<full|causal>, "
                  "e.g. b8_h32kv8_q1_k8192_d128_full"),
    "conv2d": (r"(?:(?P<label>.+)_)?n(?P<N>\d+)_(?P<H>\d+)x(?P<W>\d+)x(?P<C>\d+)"
               r"_k(?P<KH>\d+)x(?P<KW>\d+)x(?P<K>\d+)"
               rf"_s(?P<stride>{_SIDE})_p(?P<padding>{_SIDE})_d(?P<dilation>{_SIDE})"
               r"(?:_g(?P<groups>\d+))?",
               "[label_]n<N>_<H>x<W>x<C>_k<KH>x<KW>x<K>_s<stride>_p<padding>_d<dilation>"
               "[_g<groups>] (stride, padding, dilation: 2 or 2x1), "
               "e.g. n32_56x56x64_k3x3x64_s1_p1_d1"),
}


def _side(text: str):
    """`2` or `2x1`; a pair of equal sides is the one number (s1x1 is the case s1, one name)."""
    h, _, w = text.partition("x")
    return (int(h), int(w)) if w and int(w) != int(h) else int(h)


def _from_fields(op: str, f: dict) -> Case:
    n = {k: int(v) for k, v in f.items() if v is not None and v.isdigit()}
    if op == "matmul":
        return _mm(n["M"], n["K"], n["N"])
    if op == "attention":
        return _attn(n["B"], n["H"], n.get("Hkv", n["H"]), n["Sq"], n["Sk"], n["D"],
                     f["mask"] == "causal")
    return _conv(n["N"], n["H"], n["W"], n["C"], n["K"], n["KH"], n["KW"], _side(f["stride"]),
                 _side(f["padding"]), _side(f["dilation"]), f["label"] or "", n.get("groups", 1))


def _refusal(case: Case) -> str | None:
    """Why the public contract would refuse a call of this case, or None: its checks run on
    tensors that have a shape and no data."""
    import torch

    from harness import inputs
    from kernels import contract

    arrays = [torch.empty(s, device="meta") for s in inputs.shapes(case).values()]
    d = case.dims
    try:
        if case.op == "matmul":
            contract.matmul_args(*arrays, "torch")
        elif case.op == "attention":
            contract.attention_args(*arrays, d["causal"], None, "torch")
        else:
            contract.conv2d_args(*arrays, d["stride"], d["padding"], d["dilation"], "torch",
                                 conv_groups(d))
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def parse(name: str) -> Case:
    """The case a name stands for, in the tiers' own naming (a report's case column), so that any
    shape can be benchmarked: `make bench SHAPES=4096x4096x1024,b1_h32_q8192_k8192_d128_causal`.
    The name is given back in its canonical form (b1_h4kv4_... is b1_h4_...)."""
    for op, (pattern, _) in _FORMATS.items():
        match = re.fullmatch(pattern, name.strip())
        if match:
            case = _from_fields(op, match.groupdict())
            refusal = _refusal(case)
            if refusal:
                raise ValueError(f"shape {name!r} ({op}): {refusal}")
            return case
    formats = "; ".join(f"{op}: {text}" for op, (_, text) in _FORMATS.items())
    raise ValueError(f"shape {name!r} is in none of the case formats ({formats})")


def normalize_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or {sorted(DTYPE_ALIASES)}), "
                         f"got {name!r}")
    return name


def pair(v):
    """An int or (h, w) pair (a list, read back from JSON) as an (h, w) tuple."""
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_groups(d: dict) -> int:
    """A conv case's channel groups (1 where the case does not say)."""
    return d.get("groups", 1)


def conv_group_channels(d: dict) -> int:
    """Input channels each output channel reads: C / groups (w's third dimension)."""
    return d["C"] // conv_groups(d)


def conv_out_hw(d: dict) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = pair(d["stride"]), pair(d["padding"]), pair(d["dilation"])
    oh = (d["H"] + 2 * ph - dh * (d["KH"] - 1) - 1) // sh + 1
    ow = (d["W"] + 2 * pw - dw * (d["KW"] - 1) - 1) // sw + 1
    return oh, ow


def _lines_read(size: int, out: int, taps: int, stride: int, pad: int, dilation: int) -> int:
    """The input rows (or columns) some output reads: all of them, but for a stride past the
    kernel's reach (a 1x1 kernel at stride 2 reads every other row) or padding the kernel never
    leaves."""
    return len({o * stride - pad + t * dilation for o in range(out) for t in range(taps)}
               & set(range(size)))


def _attention_pairs(d: dict) -> float:
    """Query-key pairs computed: all of them, or under the causal mask (top-left) those with
    j <= i; exactly half when Sq == Sk, as the FlashAttention benchmarks count it."""
    sq, sk = d["Sq"], d["Sk"]
    if not d["causal"]:
        return sq * sk
    if sq == sk:
        return sq * sk / 2
    return sum(min(i + 1, sk) for i in range(sq))


# Backward of attention: 2.5x the forward's FLOPs (two matmuls forward, five backward).
_MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def flops(case: Case, mode: str = "fwd") -> float:
    d = case.dims
    if case.op == "matmul":
        return 2.0 * d["M"] * d["N"] * d["K"]
    if case.op == "attention":
        return 4.0 * d["B"] * d["H"] * d["D"] * _attention_pairs(d) * _MODE_FLOP_FACTOR[mode]
    if case.op == "conv2d":
        oh, ow = conv_out_hw(d)
        return 2.0 * d["N"] * oh * ow * d["K"] * conv_group_channels(d) * d["KH"] * d["KW"]
    raise ValueError(f"unknown op {case.op!r}")


def min_bytes(case: Case, dtype: str, mode: str = "fwd") -> float:
    """Each input element some output needs read once, each output written once."""
    d = case.dims
    if case.op == "matmul":
        elements = d["M"] * d["K"] + d["K"] * d["N"] + d["M"] * d["N"]
    elif case.op == "attention":
        q = d["B"] * d["H"] * d["Sq"] * d["D"]  # q, o, do, dq each have this size
        kv = d["B"] * d["Hkv"] * d["Sk"] * d["D"]  # k, v, dk, dv each
        # under the causal mask (top-left) no query sees a key past the last query's row: only
        # the first Sq rows of k and v are read (dk and dv are written whole, zeros included)
        kv_read = kv * min(d["Sk"], d["Sq"]) // d["Sk"] if d["causal"] else kv
        elements = {"fwd": 2 * q + 2 * kv_read,  # read q, k, v; write o
                    # read q, o, do, k, v; write dq, dk, dv
                    "bwd": 3 * q + 2 * kv_read + q + 2 * kv,
                    # read q, k, v, do; write dq, dk, dv (o need not leave the chip)
                    "fwd_bwd": 2 * q + 2 * kv_read + q + 2 * kv}[mode]
    elif case.op == "conv2d":
        oh, ow = conv_out_hw(d)
        (sh, sw), (ph, pw), (dh, dw) = pair(d["stride"]), pair(d["padding"]), pair(d["dilation"])
        rows = _lines_read(d["H"], oh, d["KH"], sh, ph, dh)
        cols = _lines_read(d["W"], ow, d["KW"], sw, pw, dw)
        elements = (d["N"] * rows * cols * d["C"]
                    + d["KH"] * d["KW"] * conv_group_channels(d) * d["K"]
                    + d["N"] * oh * ow * d["K"])
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return float(elements * ITEMSIZE[dtype])


def rates(flop_count: float, byte_count: float, seconds: float) -> dict:
    """Achieved TFLOP/s and GB/s of a case's counts done in `seconds`."""
    return {"tflops": flop_count / seconds / 1e12, "gbps": byte_count / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    """Lists a tier's cases (the names SHAPES and -k take) with their two numbers."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m harness.cases", description=main.__doc__)
    p.add_argument("--tier", default="standard", choices=TIERS)
    p.add_argument("--ops", default=",".join(CASES), help="comma-separated ops")
    p.add_argument("--dtype", default="bf16", help="for the bytes (default bf16)")
    p.add_argument("--mode", default="fwd", choices=ATTENTION_MODES, help="attention's FLOPs")
    args = p.parse_args(argv)
    try:
        dtype = normalize_dtype(args.dtype)
        listed = [c for op in args.ops.split(",") for c in cases(op.strip(), args.tier)]
    except ValueError as e:
        p.error(str(e))
    width = max(len(c.name) for c in listed)
    print(f"{'op':<10} {'case':<{width}}{'GFLOP':>12}{'MB':>10}{'FLOP/byte':>11}")
    for c in listed:
        mode = args.mode if c.op == "attention" else "fwd"
        f, b = flops(c, mode), min_bytes(c, dtype, mode)
        print(f"{c.op:<10} {c.name:<{width}}{f / 1e9:>12.4g}{b / 1e6:>10.4g}{f / b:>11.4g}")
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the listing quietly
    raise SystemExit(main())
