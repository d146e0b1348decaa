"""Depth error of generated images against a reference depth estimated from the image itself.

The paper (following EG3D) compares the generator's rendered depth with the depth a pre-trained 3D face
reconstruction network estimates from the same generated image, both normalised. That network is not
shippable here, so the reference is a small CNN trained on the data set's own (image, depth) ground
truth (the synthetic set has exact depth). It learns depth *shape* up to scale and shift and a
foreground mask, is trained once per shard set and cached. Its own error on held-out real images is
reported beside the metric, so that a reader knows how far the reference itself can be trusted.

Normalisation (per image, over the foreground pixels): subtract the mean and divide by the standard
deviation; the error is the mean squared difference of the normalised maps (dimensionless; 0 = same
shape, 2 = uncorrelated).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_PIXELS = 16  # images with fewer foreground pixels are not scored


def normalise_depth(depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation over ``mask`` per image (``[B, 1, R, R]``); 0 outside."""
    m = mask.to(depth.dtype)
    count = m.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1)
    safe = torch.where(mask, depth, torch.zeros_like(depth))
    mean = safe.sum(dim=(1, 2, 3), keepdim=True) / count
    var = ((safe - mean) ** 2 * m).sum(dim=(1, 2, 3), keepdim=True) / count
    return (safe - mean) / var.sqrt().clamp(min=1e-6) * m


def normalised_depth_error(depth: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image MSE ``[B]`` of normalised depths over ``mask``; NaN for images with too few pixels."""
    diff = (normalise_depth(depth, mask) - normalise_depth(reference, mask)) ** 2
    count = mask.sum(dim=(1, 2, 3))
    error = diff.sum(dim=(1, 2, 3)) / count.clamp(min=1)
    return torch.where(count >= MIN_PIXELS, error, torch.full_like(error, float("nan")))


def foreground(depth: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Foreground of a ground-truth depth map: finite, positive depth (background is NaN/inf/0)."""
    depth = torch.as_tensor(depth)
    return torch.isfinite(depth) & (depth > 0)


class DepthEstimator(nn.Module):
    """Tiny encoder-decoder: image ``[B, 3, R, R]`` in [-1, 1] -> (depth, foreground logit) at R."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.enc1, self.enc2, self.enc3 = block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 2)
        self.dec2, self.dec1 = block(4 * w, w, 1), block(2 * w, w, 1)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.enc1(image)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat((F.interpolate(e3, size=e2.shape[-2:], mode="bilinear"), e2), 1))
        d1 = self.dec1(torch.cat((F.interpolate(d2, size=e1.shape[-2:], mode="bilinear"), e1), 1))
        out = self.head(d1)
        return out[:, :1], out[:, 1:]


def _as_tensors(images: np.ndarray, depth: np.ndarray, resolution: int) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    d = torch.from_numpy(np.ascontiguousarray(depth)).float()[:, None]
    mask = foreground(d)
    x = F.interpolate(x, size=resolution, mode="bilinear", antialias=True, align_corners=False)
    # Nearest for depth so that object edges do not blend with the background.
    d = F.interpolate(torch.where(mask, d, torch.zeros_like(d)), size=resolution, mode="nearest")
    mask = F.interpolate(mask.float(), size=resolution, mode="nearest") > 0.5
    return x, d, mask


def estimator_loss(
    model: DepthEstimator, x: torch.Tensor, d: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    pred, logit = model(x)
    shape = normalised_depth_error(pred, d, mask)
    shape = shape[torch.isfinite(shape)].mean() if torch.isfinite(shape).any() else pred.sum() * 0
    return shape + F.binary_cross_entropy_with_logits(logit, mask.float())


def train_depth_estimator(
    images: np.ndarray,
    depth: np.ndarray,
    resolution: int,
    steps: int = 300,
    batch: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[DepthEstimator, float]:
    """Fit the estimator on uint8 images ``[N, H, W, 3]`` with depths ``[N, H, W]``.

    The last eighth of the images (at least one) is held out; returns the model and its normalised
    depth error on them.
    """
    x, d, mask = (t.to(device) for t in _as_tensors(images, depth, resolution))
    n_val = max(1, len(x) // 8)
    if len(x) - n_val < 1:
        raise ValueError(f"depth estimator needs at least 2 images with depth, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DepthEstimator().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    n_train = len(x) - n_val
    for step in range(steps):
        idx = torch.randint(0, n_train, (min(batch, n_train),), generator=g).to(device)
        loss = estimator_loss(model, x[idx], d[idx], mask[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log.info("depth estimator step %d loss %.4f", step, loss.item())
    model.eval()
    with torch.no_grad():
        pred, _ = model(x[n_train:])
        held_out = normalised_depth_error(pred, d[n_train:], mask[n_train:])
    error = (
        float(held_out[torch.isfinite(held_out)].mean()) if torch.isfinite(held_out).any() else float("nan")
    )
    log.info("depth estimator held-out normalised depth error %.4f on %d images", error, n_val)
    return model, error


def load_or_train_estimator(
    images: np.ndarray,
    depth: np.ndarray,
    resolution: int,
    key: str,
    folder: Path | None,
    steps: int = 300,
    device: str | torch.device = "cpu",
) -> tuple[DepthEstimator, float]:
    """:func:`train_depth_estimator`, cached as ``depth-estimator-<key>.pt`` (tensors only) in ``folder``."""
    target = folder / f"depth-estimator-{key}.pt" if folder is not None else None
    if target is not None and target.is_file():
        saved = torch.load(target, map_location=device, weights_only=True)
        model = DepthEstimator().to(device)
        model.load_state_dict(saved["model"])
        log.info("depth estimator from cache %s", target)
        return model.eval(), float(saved["held_out_error"])
    model, error = train_depth_estimator(images, depth, resolution, steps=steps, device=device)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": model.state_dict(), "held_out_error": torch.tensor(error)}, tmp)
        os.replace(tmp, target)
    return model, error


@torch.no_grad()
def generated_depth_error(
    model: DepthEstimator, image: torch.Tensor, depth: torch.Tensor, depth_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image error ``[B]`` of rendered depth ``[B, 1, r, r]`` against the estimate from ``image``.

    Scored on pixels the estimator calls foreground (and ``depth_mask`` if given).
    """
    device = next(model.parameters()).device
    image, depth = image.to(device), depth.to(device)
    depth_mask = depth_mask.to(device) if depth_mask is not None else None
    r = depth.shape[-1]
    x = F.interpolate(image.float(), size=r, mode="bilinear", antialias=True, align_corners=False)
    ref, logit = model(x)
    mask = logit > 0
    if depth_mask is not None:
        mask &= depth_mask
    return normalised_depth_error(depth.float(), ref, mask)
