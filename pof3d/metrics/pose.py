"""Pose error: how well a pose predictor (D's pose head) recovers known camera poses.

The error of one image is the angle between the viewing directions of the predicted and the true pose
(:func:`pof3d.camera.angular_error`), so it is independent of the (h, v) parametrisation and of yaw
wrap-around. The metric is the mean over images, in degrees. Rows whose true pose is NaN (images
without ground truth) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pof3d.camera import angular_error

PosePredictor = Callable[[torch.Tensor], torch.Tensor]


def pose_error_deg(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean angular error in degrees between predicted and true poses ``[N, 2]``; NaN rows skipped."""
    pred, true = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(true, dtype=torch.float64)
    if pred.shape != true.shape or pred.shape[-1] != 2:
        raise ValueError(f"poses must both be [N, 2], got {tuple(pred.shape)} and {tuple(true.shape)}")
    keep = torch.isfinite(true).all(-1) & torch.isfinite(pred).all(-1)
    if not keep.any():
        raise ValueError("no image has both a finite predicted and a finite true pose")
    return math.degrees(float(angular_error(pred[keep], true[keep]).mean()))


def constant_guess_error_deg(true: torch.Tensor) -> float:
    """Pose error of the best-informed constant predictor: every image gets the set's mean pose.

    This is the floor a pose predictor must beat to show that it reads poses from images at all: a head
    that predicts the centre of the distribution for everything scores exactly this. The mean yaw is
    circular (it wraps), the mean pitch arithmetic. NaN rows skipped.
    """
    true = torch.as_tensor(true, dtype=torch.float64)
    true = true[torch.isfinite(true).all(-1)]
    if not len(true):
        raise ValueError("no image has a finite true pose")
    h = torch.atan2(torch.sin(true[:, 0]).mean(), torch.cos(true[:, 0]).mean())
    guess = torch.stack((h, true[:, 1].mean())).expand_as(true)
    return pose_error_deg(guess, true)


@torch.no_grad()
def predict_poses(predictor: PosePredictor, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Run ``predictor`` (images [b,3,H,W] in [-1,1] -> poses [b,2]) over ``images`` in batches."""
    out = [predictor(images[i : i + batch]).detach().float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, 2)
