"""A stand-in for Inception features: a fixed, randomly initialised convolutional network.

FID needs NVIDIA's Inception weights, which are never downloaded implicitly and are absent on many
machines (CI, air-gapped clusters). Fréchet and kernel distances over the features of a *random*,
untrained convolutional network still compare image distributions: such embeddings respond to colour,
texture and layout statistics, and rank generators consistently with Inception features for the coarse
differences seen early in training (Naeem et al., "Reliable Fidelity and Diversity Metrics for
Generative Models", ICML 2020, use random embeddings for this reason). Their values are on another
scale than published FIDs, so they are reported as ``fd_random`` / ``kd_random``, never as ``fid``.

The network is fully determined by :data:`SEED` and :data:`VERSION`: same weights on every machine and
every run, so values are comparable across runs, checkpoints and variants of one study.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pof3d.metrics.fid import FeatureFn

SEED = 20230603  # fixed: changing it changes every fd_random value
VERSION = 1  # part of the real-feature cache key; bump when the architecture changes
INPUT_RESOLUTION = 64  # images are resized (antialiased) to this size first
CHANNELS = (32, 64, 128, 256)  # four stride-2 3x3 convolutions: 64 -> 32 -> 16 -> 8 -> 4


class RandomConvFeatures(nn.Module):
    """Four stride-2 convolutions with leaky ReLU; features = spatial mean and std of the last two.

    Weights are He-normal from a private seeded generator (the global RNG is left untouched), biases
    zero. Output: ``2 * (CHANNELS[-2] + CHANNELS[-1])`` = 768 features per image.
    """

    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers, c_in = [], 3
        for c_out in CHANNELS:
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                he_std = (2 / (c_in * 9)) ** 0.5
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * he_std)
                conv.bias.zero_()
            layers.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` in [-1, 1] -> features ``[B, 768]``."""
        x = F.interpolate(
            images.float(), size=(INPUT_RESOLUTION, INPUT_RESOLUTION), mode="bilinear", antialias=True
        )
        pooled = []
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.2)
            if i >= len(self.convs) - 2:
                pooled += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


def random_feature_fn(device: str | torch.device = "cpu", seed: int = SEED) -> FeatureFn:
    """Feature function over the fixed random network, on ``device``."""
    net = RandomConvFeatures(seed).to(device)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return net(images.to(device))

    return features
