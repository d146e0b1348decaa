"""The CPU kernel of tri-plane sampling (``plane_sampler.cpp``): built on first use, cached, optional.

:func:`plane_sum` is bilinear sampling of three planes at once, summed over the planes, with the values
and gradients of ``grid_sample`` (bilinear, zero padding, ``align_corners=False``) followed by that sum.
On the CPU, torch's ``grid_sample`` backward pass visits every sample once per channel, so its scatter
into the planes' gradient misses the cache on every channel; it was the largest single cost of a
training step at the benchmark size (docs/training-step.md). The kernel handles each sample's four taps
while their rows of channels are in cache.

The C++ file has no torch headers and compiles in about a second with the system's C++ compiler; the
library is cached under ``$POF3D_KERNEL_CACHE`` (default ``~/.cache/pof3d/kernels``), keyed by the
source, the compiler and its flags, and written atomically, so concurrent workers on one node build it at
most once each and never load a half-written file. Without a compiler (or with ``POF3D_PLANE_KERNEL=0``)
:func:`available` is False and the renderer uses ``grid_sample``, with one warning naming the reason.
GPUs always use ``grid_sample``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("plane_sampler.cpp")
# Portable flags only: a library cached in a home directory shared by nodes of different CPUs must run on
# all of them (no -march=native).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
ENV_SWITCH = "POF3D_PLANE_KERNEL"
ENV_CACHE = "POF3D_KERNEL_CACHE"

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel cannot be used, once known


def _compiler() -> str | None:
    return os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cache_dirs() -> list[Path]:
    if os.environ.get(ENV_CACHE):
        return [Path(os.environ[ENV_CACHE])]
    return [Path.home() / ".cache" / "pof3d" / "kernels", Path(tempfile.gettempdir()) / "pof3d-kernels"]


def build(source: Path = SOURCE, compiler: str | None = None) -> Path:
    """The compiled library of ``source`` (this package's kernel by default; another version of it for
    ``benchmarks/plane_kernel.py``), compiling it unless a cached copy exists."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (c++, g++, clang++ or $CXX)")
    key = hashlib.sha256(
        source.read_bytes() + "\0".join((compiler, *FLAGS, platform.machine())).encode()
    ).hexdigest()[:16]
    errors = []
    for cache in _cache_dirs():
        library = cache / f"plane_sampler-{key}.so"
        if library.exists():
            return library
        try:
            cache.mkdir(parents=True, exist_ok=True)
            partial = cache / f".plane_sampler-{key}.{os.getpid()}.tmp"
            subprocess.run(
                [compiler, *FLAGS, str(source), "-o", str(partial)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            os.replace(partial, library)  # atomic: a concurrent loader sees no file or a whole one
            return library
        except OSError as exc:  # an unwritable cache: try the next one
            errors.append(f"{cache}: {exc}")
    raise OSError("; ".join(errors))


def open_library(path: Path) -> ctypes.CDLL:
    """A built kernel, its two entry points typed."""
    library = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # pointers; B, P, H, W, C; the planes' strides for B, plane, row and texel; threads
    library.plane_sum_forward.argtypes = [ptr] * 3 + [i64] * 9 + [ctypes.c_int]
    library.plane_sum_backward.argtypes = [ptr] * 5 + [i64] * 9 + [ctypes.c_int]
    return library


def _load() -> ctypes.CDLL:
    global _library, _unavailable
    if _library is None and _unavailable is None:
        try:
            if os.environ.get(ENV_SWITCH, "1") == "0":
                raise RuntimeError(f"{ENV_SWITCH}=0")
            _library = open_library(build())
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = (
                exc.stderr.decode(errors="replace")[-2000:] if hasattr(exc, "stderr") and exc.stderr else ""
            )
            _unavailable = f"{exc} {detail}".strip()
            logger.warning(
                "the CPU tri-plane sampling kernel is not available (%s); sampling uses torch's grid_sample, "
                "which is slower on CPU",
                _unavailable,
            )
    if _library is None:
        raise RuntimeError(f"the CPU tri-plane sampling kernel is not available: {_unavailable}")
    return _library


def available() -> bool:
    """Whether the kernel is built (or can be) and switched on; builds it on the first call."""
    try:
        _load()
    except RuntimeError:
        return False
    return True


def usable(planes: torch.Tensor, grid: torch.Tensor) -> bool:
    """The kernel takes float32 CPU tensors; anything else goes to ``grid_sample``."""
    return (
        planes.device.type == "cpu"
        and planes.dtype == grid.dtype == torch.float32
        and grid.device.type == "cpu"
        and available()
    )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dense_channels_innermost(t: torch.Tensor) -> bool:
    """Channels consecutive and every element stored once, with no gaps: the kernel reads such planes in
    place, whatever the order of the other dimensions (the backbone's channels-last image viewed as
    ``[B, 3, H, W, C]`` is one), and writes their gradient with the same strides."""
    if t.stride(-1) != 1:
        return False
    expected = 1
    for dim in sorted(range(t.dim()), key=t.stride):
        if t.size(dim) == 1:
            continue
        if t.stride(dim) != expected:
            return False
        expected *= t.size(dim)
    return True


def run_forward(library: ctypes.CDLL, planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The plane sum ``[B, P, C]`` of dense channels-innermost ``planes`` at a contiguous ``grid``."""
    b, _, h, w, c = planes.shape
    p = grid.shape[1]
    out = planes.new_empty(b, p, c)
    library.plane_sum_forward(
        _ptr(planes), _ptr(grid), _ptr(out), b, p, h, w, c, *planes.stride()[:4], torch.get_num_threads()
    )
    return out


def run_backward(
    library: ctypes.CDLL,
    grad: torch.Tensor,
    planes: torch.Tensor,
    grid: torch.Tensor,
    want: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the planes and the grid (each only where ``want`` asks) for a contiguous ``grad``."""
    b, _, h, w, c = planes.shape
    # With the planes' strides: zeros_like keeps them for dense planes, the only kind passed here.
    grad_planes = torch.zeros_like(planes) if want[0] else None
    grad_grid = torch.empty_like(grid) if want[1] else None
    library.plane_sum_backward(
        _ptr(grad),
        _ptr(planes),
        _ptr(grid),
        _ptr(grad_planes),
        _ptr(grad_grid),
        b,
        grid.shape[1],
        h,
        w,
        c,
        *planes.stride()[:4],
        torch.get_num_threads(),
    )
    return grad_planes, grad_grid


class _PlaneSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(planes, grid)
        return run_forward(_load(), planes, grid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        planes, grid = ctx.saved_tensors
        return run_backward(_load(), grad.contiguous(), planes, grid, ctx.needs_input_grad[:2])


def plane_sum(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples summed over the planes: planes ``[B, 3, H, W, C]`` (channels innermost), grid
    ``[B, P, 3, 2]`` (``grid_sample``'s (x, y) in [-1, 1] on each plane) -> ``[B, P, C]``. Float32 CPU
    tensors only (:func:`usable`); differentiable once in both inputs."""
    b, planes_n, h, w, c = planes.shape
    if planes_n != 3 or grid.dim() != 4 or grid.shape[0] != b or grid.shape[2:] != (3, 2):
        raise ValueError(
            f"planes must be [B, 3, H, W, C] and grid [B, P, 3, 2], got {planes.shape}, {grid.shape}"
        )
    if not dense_channels_innermost(planes):
        planes = planes.contiguous()
    return _PlaneSum.apply(planes, grid.contiguous())
