"""Figures written next to runs and checkpoints: image grids and the learned pose distribution."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] float in [-1, 1] -> [N, H, W, 3] uint8."""
    images = torch.as_tensor(images).detach().float().cpu()
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None) -> Path:
    """Tile images ``[N, 3, H, W]`` in [-1, 1] into one PNG (``ncols`` defaults to about sqrt(N))."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    if n == 0:
        raise ValueError("save_image_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def plot_pose_distribution(learned: np.ndarray, path: str | Path, true: np.ndarray | None = None) -> Path:
    """Yaw and pitch histograms (degrees) of learned poses ``[N, 2]`` (h, v) radians, true overlaid."""
    learned = np.degrees(np.asarray(learned, dtype=np.float64).reshape(-1, 2))
    truth = None if true is None else np.degrees(np.asarray(true, dtype=np.float64).reshape(-1, 2))
    if truth is not None:
        truth = truth[np.isfinite(truth).all(axis=1)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, (ax, name) in enumerate(zip(axes, ("yaw h (deg)", "pitch v (deg)"), strict=True)):
        values = [learned[:, axis]] + ([truth[:, axis]] if truth is not None and len(truth) else [])
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        bins = np.linspace(lo - 1, hi + 1, 41)
        ax.hist(learned[:, axis], bins=bins, density=True, alpha=0.6, label="learned")
        if len(values) > 1:
            ax.hist(values[1], bins=bins, density=True, histtype="step", linewidth=2, label="true")
        ax.set_xlabel(name)
        ax.legend()
    fig.suptitle("pose distribution")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
