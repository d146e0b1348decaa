"""The arithmetic of each part of G and D: one rule for ``train.precision``.

The networks ask this module which dtype a part computes in (:func:`part_dtype`) and enter the matching
context (:func:`region`); the training phases choose the mode (:func:`training`, entered by
``PoF3DLoss.accumulate_gradients``). Outside a phase (sampling, evaluation, exports) the mode is
``auto``, so a network computes the same whatever precision it was trained in.

- ``auto``: the official code's reduced-precision layers where a GPU runs them: D's ``num_fp16_res``
  highest-resolution blocks in float16, the super-resolution blocks (when ``num_fp16_res > 0``) and the
  backbone's ``backbone_num_fp16_res`` blocks in bfloat16; everything on a CPU in float32.
- ``fp32``: no autocast anywhere.
- ``fp16``: the official code's mixed precision on any device: those same blocks of D, the
  super-resolution and the backbone in float16, their conv outputs clamped to +-256 (:func:`clamp_half`).
- ``bf16``: every convolution and matrix product of G (backbone, tri-plane decoder, super-resolution) and
  of D in bfloat16, on any device.

In every mode the mapping network and the pose learner (the learned pose comes from them), the camera and
rays, the volume renderer's density activation,
transmittance, compositing and depth, the losses and R1's penalty run in float32: reduced-precision
parts hand float32 tensors on. Autocast only changes the arithmetic of the forward pass; parameters, their
gradients and Adam's moments stay float32. No gradient scaler is used: bfloat16 has float32's exponent
range, so gradients do not underflow, and for float16 the official code uses no loss scaling either, it
clamps the activations instead (as here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from pof3d.config_choices import PRECISIONS

Network = Literal["G", "D"]

# EG3D's conv_clamp: conv outputs of float16 layers are clamped to +-256 so that half precision cannot
# overflow in the layers that follow.
FP16_CLAMP = 256.0
# Under ``auto`` on a GPU, D's reduced blocks run in float16 as EG3D's (with the clamp); G's in bfloat16,
# which has float32's exponent range and needs no clamp.
AUTO_DTYPES: dict[str, torch.dtype] = {"G": torch.bfloat16, "D": torch.float16}

# The mode of the phase that runs now. The training step runs on one thread of its process, and the
# networks read this at every call (a plain module variable, which torch.compile guards on).
_mode = "auto"


@contextlib.contextmanager
def training(mode: str) -> Iterator[None]:
    """G and D compute in ``mode`` (one of :data:`PRECISIONS`) until the block ends."""
    global _mode
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
    before, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = before


def float32() -> contextlib.AbstractContextManager:
    """Exempt a computation from the phase's reduced precision: G and D compute in float32 inside."""
    return training("fp32")


def current() -> str:
    """The precision mode in effect (``auto`` outside a training phase)."""
    return _mode


def part_dtype(device: torch.device, network: Network, reduced: bool = False) -> torch.dtype | None:
    """The dtype a part of ``network`` computes in on ``device``; None for float32.

    ``reduced`` marks the parts that the official code runs in reduced precision: D's ``num_fp16_res``
    highest-resolution blocks, the super-resolution blocks and the backbone's ``backbone_num_fp16_res``
    blocks. The other parts (decoder, D's epilogue and heads, the lower-resolution blocks) are
    only reduced by ``bf16``.
    """
    if _mode == "bf16":
        return torch.bfloat16
    if _mode == "fp16":
        return torch.float16 if reduced else None
    if _mode == "auto" and reduced and device.type == "cuda":
        return AUTO_DTYPES[network]
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s kind; a no-op for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def region(
    device: torch.device, network: Network, reduced: bool = False
) -> contextlib.AbstractContextManager:
    """The context to run one part of ``network`` in: :func:`autocast` to its :func:`part_dtype`."""
    return autocast(device, part_dtype(device, network, reduced))


def clamp_half(x: torch.Tensor) -> torch.Tensor:
    """A float16 conv output clamped to +-:data:`FP16_CLAMP`; other dtypes pass unchanged."""
    return x.clamp(-FP16_CLAMP, FP16_CLAMP) if x.dtype == torch.float16 else x


def to_float(out: dict[str, Any]) -> dict[str, Any]:
    """A module's output dict with its floating-point tensors in float32 (float32 ones are returned as
    they are), other entries unchanged."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
