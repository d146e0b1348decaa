"""Lengths the official code gives at its batch of 32 and scales with the batch: D's blur fade and the EMA.

Both count in thousands of images, so scaling them with ``train.batch`` keeps them at the same number of
iterations at any batch, as the official code's training script does.
"""

from __future__ import annotations

from pof3d.config import Config

# The batch at which the official code gives its blur fade and EMA half-life (``batch * 200 / 32`` and
# ``batch * 10 / 32`` kimg).
REFERENCE_BATCH = 32


def effective_blur_fade_kimg(cfg: Config) -> float:
    """kimg over which the blur of images seen by D fades to zero (<= 0: no blur).

    ``loss.blur_fade_kimg`` is the length at batch 32 and scales with ``train.batch``, as in the
    reference (200 kimg at batch 32, 50 at batch 8); with ``loss.blur_fade_scales_with_batch`` off it is
    the length itself.
    """
    loss = cfg.loss
    if not loss.blur_fade_scales_with_batch:
        return loss.blur_fade_kimg
    return loss.blur_fade_kimg * cfg.train.batch / REFERENCE_BATCH


def effective_ema_kimg(cfg: Config) -> float:
    """Half-life in kimg of the generator's moving average.

    ``optim.ema_kimg`` is the half-life at batch 32 and scales with ``train.batch``, as in the official code
    (10 kimg at batch 32, 2.5 at batch 8: the same number of steps); with ``optim.ema_scales_with_batch``
    off it is the half-life itself.
    """
    optim = cfg.optim
    if not optim.ema_scales_with_batch:
        return optim.ema_kimg
    return optim.ema_kimg * cfg.train.batch / REFERENCE_BATCH
