"""The figures a snapshot writes beside its checkpoint: a grid of samples and the learned pose
distribution, both from the same latents at every snapshot so that they compare over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pof3d.plots import plot_pose_distribution, save_image_grid

SAMPLE_SEED = 123
SAMPLE_COUNT = 16
POSE_SAMPLES = 512


def fixed_latents(g: Any, count: int) -> torch.Tensor:
    """The same ``count`` latents at every snapshot, on ``g``'s device."""
    z = torch.randn(count, g.cfg.z_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    return z.to(next(g.parameters()).device)


@torch.no_grad()
def sample_grid(g: Any, path: Path) -> Path:
    """``g``'s images of the fixed latents (constant noise) as one grid image at ``path``."""
    return save_image_grid(g(fixed_latents(g, SAMPLE_COUNT), noise_mode="const")["image"], path)


@torch.no_grad()
def pose_plot(g: Any, path: Path, true_poses: list[np.ndarray]) -> Path:
    """The poses ``g``'s pose learner gives the fixed latents, beside the data's true poses where the
    batches carried any (non-finite rows, the unlabelled, left out)."""
    learned = g.eg3d_pose(g.predict_pose(g.map(fixed_latents(g, POSE_SAMPLES)))).float().cpu().numpy()
    truth = np.concatenate(true_poses) if true_poses else None
    if truth is not None:
        truth = truth[np.isfinite(truth).all(axis=1)]
        truth = truth if len(truth) else None
    return plot_pose_distribution(learned, path, true=truth)
