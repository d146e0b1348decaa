"""Exponential moving average of generator weights, with EG3D's half-life schedule.

The EMA generator is what gets evaluated and exported: averaging over the last few thousand images
(:func:`pof3d.batch_scaling.effective_ema_kimg`) removes the high-frequency jitter of adversarial training.
"""

from __future__ import annotations

import torch
from torch import nn

from pof3d.batch_scaling import effective_ema_kimg
from pof3d.config import Config


def ema_beta(batch: int, ema_kimg: float, ema_rampup: float | None, images_seen: int | float) -> float:
    """Decay per step so that the weights' half-life is ``ema_kimg * 1000`` images.

    Early in training the half-life is capped at ``ema_rampup * images_seen`` so that the average does
    not stay anchored to the random initialisation (0 images seen gives beta 0: a plain copy).
    """
    ema_nimg = ema_kimg * 1000.0
    if ema_rampup is not None and ema_rampup > 0:
        ema_nimg = min(ema_nimg, images_seen * ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def training_ema_beta(cfg: Config, batch: int, images_seen: int | float) -> float:
    """The decay after a training step of ``batch`` images taken when ``images_seen`` images had been
    seen before it (the official code's order: the step's own images are counted after its EMA update).

    The half-life is :func:`~pof3d.batch_scaling.effective_ema_kimg`, the ramp-up ``optim.ema_rampup``.
    """
    return ema_beta(batch, effective_ema_kimg(cfg), cfg.optim.ema_rampup, images_seen)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema = beta * ema + (1 - beta) * model`` for parameters; buffers (e.g. ``w_avg``) are copied."""
    ema_params = dict(ema_model.named_parameters())
    params = dict(model.named_parameters())
    if ema_params.keys() != params.keys():
        missing = sorted(set(params) ^ set(ema_params))[:5]
        raise ValueError(f"EMA model and model differ in parameter names, e.g. {missing}")
    targets = [ema_params[n] for n in params]
    sources = [params[n].detach().to(ema_params[n].dtype) for n in params]
    if targets:
        # One fused kernel over all tensors instead of a Python loop of small ones.
        torch._foreach_lerp_(targets, sources, 1.0 - beta)
    ema_buffers = dict(ema_model.named_buffers())
    for name, buf in model.named_buffers():
        if name not in ema_buffers:
            raise ValueError(f"EMA model has no buffer {name!r}")
        ema_buffers[name].copy_(buf)
