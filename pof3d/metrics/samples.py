"""What the metrics of one evaluation share: its settings, latents and batches, the conversion of
stored pixels to model images, the cache key of a shard set and the foreground of a rendered depth."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pof3d.config import Config
from pof3d.data.shard_reader import read_manifest

BATCH = 16  # generated samples per forward pass
FOREGROUND_DEPTH = 0.95  # rendered depth below ray_start + this * (ray_end - ray_start) is foreground


@dataclass
class EvalRun:
    """The generator and settings of one evaluation."""

    G: torch.nn.Module
    cfg: Config
    data_uri: str | None
    num_samples: int
    device: torch.device
    seed: int
    cache: Path


def latents(n: int, z_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def batches(x: torch.Tensor, size: int = BATCH) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def to_images(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def data_key(data_uri: str, *parts: object) -> str:
    """Cache key of a shard set: its manifest (with checksums) plus what else the cached item depends on."""
    text = json.dumps(read_manifest(data_uri), sort_keys=True, default=str) + "|".join(map(str, parts))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def foreground(depth: torch.Tensor, cfg: Config) -> torch.Tensor:
    m = cfg.model
    return depth < m.ray_start + FOREGROUND_DEPTH * (m.ray_end - m.ray_start)
