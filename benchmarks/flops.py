"""FLOPs of the matrix work that runs under a context manager, and the machine's matrix-product peak.

``with FlopCounter() as counter: ...`` counts every matrix product and convolution that reaches the
dispatcher while it is open: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution`` (and the
lower-level names it has when called directly) and ``convolution_backward``, at 2 FLOPs per
multiply-add (FlopCounterMode's convention; bias adds, activations and other elementwise work are not
counted). ``counter.total`` is the sum and ``counter.by_op`` the split by op.

Why not ``torch.utils.flop_counter.FlopCounterMode``: its counts agree with this counter on G_main,
G_density and D_main, but it cannot run D_r1. On entry it also enters a ``ModuleTracker``, which hooks
every module's forward inputs with ``register_multi_grad_hook`` to know which module a backward op
belongs to. R1 takes ``torch.autograd.grad(logits.sum(), [image, image_raw], create_graph=True)``, and
those images are D's inputs and leaf tensors: when the gradient reaches them, the hook asks the engine
``torch._C._will_engine_execute_node`` about their AccumulateGrad nodes, which the engine refuses
during ``autograd.grad`` ("A leaf node was passed to _will_engine_execute_node but we are currently
running autograd.grad()"), so the phase raises in its first backward pass. The counting itself is
not at fault: with the tracker replaced by a stub, FlopCounterMode counts D_r1 exactly as this counter
does (checked at ``tiny``). Its formula for ``convolution_backward`` does count a grouped convolution's
weight gradient ``groups`` times over (it takes the input's full channel count against a weight that
sees ``channels / groups``), but no grouped convolution in G or D has a weight gradient: the blur
filters are constants.

This counter is a bare dispatch mode, with no module hooks, so a double backward runs under it as
anything else does. The double backward of a convolution (and of a transposed one) reaches the
dispatcher as ordinary ``convolution`` calls on transposed or strided shapes, plus
``convolution_backward`` for the parts that go back through the first convolution, and each is counted
by the same shape rule: multiply-adds = batch x every weight element x the positions where the filter
is placed (the output's for a convolution, the input's for a transposed one). ``convolution_backward``
costs that figure once for the input gradient and once for the weight gradient, each when its output
mask asks for it: each gradient pairs up exactly the products of the forward convolution. For a
strided convolution the double backward's weight-gradient convolution computes a few positions beyond
the filter's taps and drops them (4 x 4 for a 3 x 3 filter at stride 2); they are counted, since they run.

Ops whose name says they do matrix work but that have no rule here are listed in ``counter.uncounted``
(tests assert it stays empty), so that a new op path cannot silently drop out of the count.

:func:`measure_peaks` times a large ``torch.mm`` per precision, the figure a benchmark's achieved FLOP/s
is held against.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _shape(x: object) -> list[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else list(x)  # type: ignore[arg-type]


def conv_macs(
    input_shape: Sequence[int], weight_shape: Sequence[int], output_shape: Sequence[int], transposed: bool
) -> int:
    """Multiply-adds of a convolution, grouped or not, with or without stride, padding or dilation.

    The weight is ``[C_out, C_in / groups, *k]`` for a convolution and ``[C_in, C_out / groups, *k]`` for
    a transposed one, so its element count is both channel counts over the groups times the filter
    taps. A convolution places the filter at every output position; a transposed one scatters it from
    every input position. Taps that fall on padding are counted, as is usual.
    """
    positions = (input_shape if transposed else output_shape)[2:]
    return input_shape[0] * math.prod(weight_shape) * math.prod(positions)


def _mm(args: tuple, out: object) -> int:
    a, b = _shape(args[0]), _shape(args[1])
    return a[0] * a[1] * b[1]


def _addmm(args: tuple, out: object) -> int:
    return _mm(args[1:], out)


def _bmm(args: tuple, out: object) -> int:
    a, b = _shape(args[0]), _shape(args[1])
    return a[0] * a[1] * a[2] * b[2]


def _baddbmm(args: tuple, out: object) -> int:
    return _bmm(args[1:], out)


def _convolution(args: tuple, out: object) -> int:
    # (input, weight, bias, stride, padding, dilation, transposed, ...) for every forward variant
    transposed = bool(args[6]) if len(args) > 6 else False
    return conv_macs(_shape(args[0]), _shape(args[1]), _shape(out), transposed)


def _convolution_backward(args: tuple, out: object) -> int:
    # (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
    #  groups, output_mask); the forward's output has grad_output's shape
    grad_output, x, weight, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
    per_gradient = conv_macs(_shape(x), _shape(weight), _shape(grad_output), transposed)
    return per_gradient * (int(bool(mask[0])) + int(bool(mask[1])))


def _slow_conv2d(args: tuple, out: object) -> int:
    # (input, weight, kernel_size, bias, stride, padding): never transposed
    return conv_macs(_shape(args[0]), _shape(args[1]), _shape(out), False)


# Multiply-adds per op, from its positional arguments and its output.
MACS: dict[object, Callable[[tuple, object], int]] = {
    aten.mm: _mm,
    aten.addmm: _addmm,
    aten.bmm: _bmm,
    aten.baddbmm: _baddbmm,
    aten.convolution: _convolution,
    aten._convolution: _convolution,
    aten.convolution_overrideable: _convolution,
    aten.cudnn_convolution: lambda args, out: conv_macs(_shape(args[0]), _shape(args[1]), _shape(out), False),
    aten.cudnn_convolution_transpose: lambda args, out: conv_macs(
        _shape(args[0]), _shape(args[1]), _shape(out), True
    ),
    aten._slow_conv2d_forward: _slow_conv2d,
    aten.convolution_backward: _convolution_backward,
}

# Words of op names that do matrix work (``_scaled_mm``, ``mkldnn_linear``, ``addmv``, ``conv_depthwise2d``):
# such an op without a rule above is reported, not ignored.
_MATRIX_WORDS = frozenset(
    ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear", "einsum")
)


def does_matrix_work(name: str) -> bool:
    words = name.strip("_").split("_")
    return any(w in _MATRIX_WORDS or w.startswith("conv") or "attention" in w for w in words)


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs (2 per multiply-add) of the matrix products and convolutions run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = defaultdict(int)
        self.uncounted: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        rule = MACS.get(packet)
        if rule is not None:
            self.by_op[str(packet)] += 2 * rule(_with_defaults(func, args, kwargs), out)
        elif does_matrix_work(packet.__name__):
            self.uncounted.add(str(func))
        return out


def _with_defaults(func, args: tuple, kwargs: dict) -> tuple:
    """Positional arguments with keyword ones and schema defaults filled in, in the schema's order."""
    params = func._schema.arguments
    if len(args) >= len(params) and not kwargs:
        return tuple(args)
    full = list(args)
    for p in params[len(args) :]:
        if p.name in kwargs:
            full.append(kwargs[p.name])
        elif p.has_default_value():
            full.append(p.default_value)
        else:
            full.append(None)
    return tuple(full)


# ----------------------------------------------------------------------------------------------
# The machine's side: how fast it runs a large matrix product


@dataclass(frozen=True)
class Peak:
    """Measured FLOP/s of an ``n x n`` by ``n x n`` ``torch.mm`` in one precision."""

    precision: str
    gflops: float
    native: bool  #: False: the hardware emulates the type (slower than or close to fp32)
    n: int

    def describe(self) -> str:
        size = "" if self.n == PEAK_N else f", {self.n}^3"
        return f"{self.precision} {self.gflops:.1f}" + ("" if self.native else f" (emulated{size})")


PEAK_N = 2048  # big enough to reach the library's best kernel, small enough to take well under a second
PEAK_REPEATS = 5  # timings per figure; the best counts (other processes only ever slow one down)
_PROBE_N = 256  # the product an emulated type is timed on (a full-size one can take tens of seconds)
_NATIVE_MARGIN = 1.3  # without CPU flags: a low precision this much faster than fp32 runs natively
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    device: torch.device, dtype: torch.dtype, n: int = PEAK_N, repeats: int = PEAK_REPEATS
) -> float:
    """Best GFLOP/s of ``torch.mm`` on ``n x n`` operands over ``repeats`` timings, after a warm-up.

    On CUDA one timing covers several products, so that launch and synchronisation overheads do not
    count against a product of a few tens of microseconds.
    """
    gen = torch.Generator().manual_seed(0)  # leaves the global generators alone
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1
    torch.mm(a, b, out=out)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best / 1e9


# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of instructions that compute in each type.
_NATIVE_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16", "bf16"}, "fp16": {"avx512_fp16", "amx_fp16", "asimdhp"}}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where the system does not list them (no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def measure_peaks(device: torch.device) -> dict[str, Peak]:
    """The matrix-product peaks of this process's device and thread count, by precision.

    CUDA: fp32, TF32 (fp32 operands on tensor cores: cuDNN runs fp32 convolutions that way unless
    ``torch.backends.cudnn.allow_tf32`` is off), bf16 and fp16, all native. CPU: fp32, then bf16 and
    fp16. A type is native when the CPU has instructions for it (its flags: AVX512-BF16 or AMX for
    bf16, AVX512-FP16 or AMX-FP16 for fp16) and PyTorch has oneDNN to use them; it is then timed at
    full size. Otherwise it is emulated and timed on a small product only: at full size that can take
    tens of seconds (fp16 on a 2-core AVX512 CPU without AVX512-FP16: about 45 s per product). Where the
    system lists no flags, a type counts as native when a small product beats fp32's full-size rate and
    the full-size one then beats it by ``_NATIVE_MARGIN``. Small products are not compared with each
    other: a product of a fraction of a millisecond is at the mercy of other processes on a shared machine.
    """
    peaks = {"fp32": Peak("fp32", matmul_gflops(device, torch.float32), True, PEAK_N)}
    if device.type == "cuda":
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            peaks["tf32"] = Peak("tf32", matmul_gflops(device, torch.float32), True, PEAK_N)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
        for name in ("bf16", "fp16"):
            peaks[name] = Peak(name, matmul_gflops(device, _DTYPES[name]), True, PEAK_N)
        return peaks
    fp32, flags = peaks["fp32"].gflops, cpu_flags()
    for name in ("bf16", "fp16"):
        small = None
        if flags is not None:
            native = bool(flags & _NATIVE_FLAGS[name]) and torch.backends.mkldnn.is_available()
        else:
            small = matmul_gflops(device, _DTYPES[name], _PROBE_N)
            native = small > fp32
        if not native:
            small = small if small is not None else matmul_gflops(device, _DTYPES[name], _PROBE_N)
            peaks[name] = Peak(name, small, False, _PROBE_N)
            continue
        full = matmul_gflops(device, _DTYPES[name])
        peaks[name] = Peak(name, full, flags is not None or full >= _NATIVE_MARGIN * fp32, PEAK_N)
    return peaks


def peak_for(precision: str, peaks: dict[str, Peak], device: torch.device) -> Peak:
    """The peak a run in ``precision`` is held against: its own type's, except that fp32 on CUDA meets
    TF32's when cuDNN convolutions (most of the work) use tensor cores, and ``auto`` (fp32 on a CPU, the
    official code's float16 layers on a GPU) meets fp32's on a CPU and float16's on a GPU."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32" and "tf32" in peaks and torch.backends.cudnn.allow_tf32 and device.type == "cuda":
        return peaks["tf32"]
    return peaks[precision]
