"""Pose-aware dual discriminator (StyleGAN2 residual backbone with a pose head and projection score).

Dual discrimination (EG3D): D sees the final image and the raw neural rendering upsampled to the same
size, stacked as 6 channels, so the super-resolution stage cannot drift away from the 3D rendering.

Pose awareness (PoF3D): from the 4x4 epilogue features a small head regresses the camera pose (h, v).
The real/fake score is a projection discriminator conditioned on a pose: ``<out(features), cmap(pose)>``.
When no pose is given, the head's own prediction, detached, is the condition (the *pseudo label*).

The reference runs D twice per image: once unconditioned to predict the pose, then again conditioned on
that pose. The condition only enters after the backbone (through ``cmap`` at the projection), so both
passes compute the same backbone features; we run the backbone once and feed the same features to the
pose head and to the projection. The results are identical and half of D's work is saved.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from pof3d.config import ModelConfig
from pof3d.layers import Conv2dLayer, FullyConnected, MinibatchStd, resize

logger = logging.getLogger(__name__)

# EG3D clamps conv outputs of fp16 blocks to +-256 so that half precision cannot overflow.
FP16_CLAMP = 256.0
# The conditioning mapping network trains slowly, as EG3D's label mapping does.
CMAP_LR_MULT = 0.01
SKIP_GAIN = math.sqrt(0.5)


def disc_channels(cfg: ModelConfig, resolution: int) -> int:
    """Feature width of D at a resolution: ``min(disc_channel_base // res, disc_channel_max)``."""
    return min(cfg.disc_channel_base // resolution, cfg.disc_channel_max)


class DiscriminatorBlock(nn.Module):
    """Residual block: (fromRGB) -> conv3x3 -> conv3x3 down, plus a 1x1 down skip, both scaled by sqrt(.5)."""

    def __init__(
        self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int, use_fp16: bool
    ) -> None:
        super().__init__()
        self.use_fp16 = use_fp16
        self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1) if in_channels == 0 else None
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, down=True)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, activation="linear", down=True, bias=False)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(img)
        assert x is not None
        y = _clamp_half(self.skip(x, gain=SKIP_GAIN))
        x = _clamp_half(self.conv0(x))
        x = _clamp_half(self.conv1(x, gain=SKIP_GAIN))
        return y + x


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP16_CLAMP, FP16_CLAMP) if x.dtype == torch.float16 else x


class PoseEmbedding(nn.Module):
    """Maps a 2-d pose (h, v) to the ``cmap`` vector of the projection discriminator.

    The angles are embedded as (cos h, sin h, cos v, sin v), which is continuous across the yaw wrap
    at 2*pi (cars span the full circle), normalised to unit second moment, then two leaky-ReLU layers.
    """

    def __init__(self, cmap_dim: int) -> None:
        super().__init__()
        self.fc0 = FullyConnected(4, cmap_dim, activation="lrelu", lr_mult=CMAP_LR_MULT)
        self.fc1 = FullyConnected(cmap_dim, cmap_dim, activation="lrelu", lr_mult=CMAP_LR_MULT)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        h, v = pose[:, 0], pose[:, 1]
        x = torch.stack((h.cos(), h.sin(), v.cos(), v.sin()), dim=1)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        return self.fc1(self.fc0(x))


class Discriminator(nn.Module):
    """``logits, pred_pose = D(image, image_raw, pose=None)``; see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.resolution = cfg.image_resolution
        self.raw_resolution = cfg.neural_resolution
        self.pose_aware = cfg.pose_aware_d
        self.cmap_dim = cfg.cmap_dim
        self.register_buffer(
            "pose_center", torch.tensor([cfg.yaw_center, cfg.pitch_center]), persistent=False
        )

        log2 = int(math.log2(self.resolution))
        block_resolutions = [2**i for i in range(log2, 2, -1)]
        fp16_resolution = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8) if cfg.num_fp16_res > 0 else math.inf
        self.blocks = nn.ModuleList()
        for res in block_resolutions:
            self.blocks.append(
                DiscriminatorBlock(
                    in_channels=disc_channels(cfg, res) if res < self.resolution else 0,
                    tmp_channels=disc_channels(cfg, res),
                    out_channels=disc_channels(cfg, res // 2),
                    img_channels=6,
                    use_fp16=res >= fp16_resolution,
                )
            )

        # Epilogue at 4x4: minibatch std, conv, flatten, FC -> features.
        width = disc_channels(cfg, 4)
        self.mbstd = MinibatchStd(group_size=cfg.mbstd_group)
        self.conv = Conv2dLayer(width + 1, width, 3)
        self.fc = FullyConnected(width * 4 * 4, width, activation="lrelu")
        if self.pose_aware:
            self.pose_head = nn.Sequential(
                FullyConnected(width, max(width // 2, 1), activation="lrelu"),
                FullyConnected(max(width // 2, 1), 2),
            )
            self.out = FullyConnected(width, cfg.cmap_dim)
            self.cmap = PoseEmbedding(cfg.cmap_dim)
        else:
            self.out = FullyConnected(width, 1)

    def _precision(
        self, block: DiscriminatorBlock, device: torch.device
    ) -> contextlib.AbstractContextManager:
        if block.use_fp16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def features(self, image: torch.Tensor, image_raw: torch.Tensor) -> torch.Tensor:
        """The backbone: dual input -> residual blocks -> 4x4 epilogue -> ``[B, width]`` features."""
        self._check_images(image, image_raw)
        img = torch.cat((image, resize(image_raw, self.resolution)), dim=1)
        img = img.contiguous(memory_format=torch.channels_last)  # convolutions run fastest in this layout
        x: torch.Tensor | None = None
        for block in self.blocks:
            if x is not None and not block.use_fp16:
                x = x.float()
            with self._precision(block, img.device):
                x = block(x, img)
        assert x is not None
        x = self.mbstd(x.float())
        x = self.conv(x)
        return self.fc(x.flatten(1))

    def predict_pose(self, features: torch.Tensor) -> torch.Tensor:
        """Pose head: zero output means the frontal pose (the config's yaw/pitch centres)."""
        if not self.pose_aware:
            raise ValueError("this discriminator was built with pose_aware_d=False and has no pose head")
        return self.pose_head(features) + self.pose_center

    def score(self, features: torch.Tensor, pose: torch.Tensor | None) -> torch.Tensor:
        """Real/fake logits ``[B, 1]``: projection on ``cmap(pose)``, or a plain linear score."""
        out = self.out(features)
        if not self.pose_aware:
            return out
        if pose is None:
            raise ValueError("a pose-aware discriminator needs a pose to score with")
        cmap = self.cmap(pose)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)

    def forward(
        self, image: torch.Tensor, image_raw: torch.Tensor, pose: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.pose_aware:
            if pose is not None:
                raise ValueError("pose_aware_d=False: the discriminator takes no pose condition")
            return self.score(self.features(image, image_raw), None), None
        if pose is not None and (pose.ndim != 2 or pose.shape != (image.shape[0], 2)):
            raise ValueError(f"pose must be [B, 2] = (h, v) with B={image.shape[0]}, got {tuple(pose.shape)}")
        features = self.features(image, image_raw)
        pred_pose = self.predict_pose(features)
        condition = pose if pose is not None else pred_pose.detach()
        return self.score(features, condition), pred_pose

    def _check_images(self, image: torch.Tensor, image_raw: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(
                f"image must be [B, 3, {self.resolution}, {self.resolution}], got {tuple(image.shape)}"
            )
        if image_raw.ndim != 4 or image_raw.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"image_raw must be [B, 3, r, r] with B={image.shape[0]}, got {tuple(image_raw.shape)}"
            )
