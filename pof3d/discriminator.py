"""Pose-aware dual discriminator (StyleGAN2 residual backbone with a pose head and projection score).

Dual discrimination (EG3D): D sees the final image and the raw neural rendering upsampled to the same
size, stacked as 6 channels, so the super-resolution stage cannot drift away from the 3D rendering.

Pose awareness (PoF3D), laid out as in the official code's ``DiscriminatorEpilogue`` and
``DualDiscriminator``: after minibatch std and the 4x4 conv, the flattened features feed both a pose
head, which regresses the camera pose (h, v) in two layers, and the usual ``fc -> out`` score path. The
real/fake score is a projection discriminator conditioned on a pose: ``<out, cmap(pose)>``, with
``cmap`` from EG3D's label mapping network applied to the raw angles. When no pose is given, the head's
own prediction, detached, is the condition (the *pseudo label*).

The official code runs D twice per image: once unconditioned to predict the pose, then again conditioned on
that pose. The condition only enters after the backbone (through ``cmap`` at the projection), so both
passes compute the same backbone features; we run the backbone once and feed the same features to the
pose head and to the projection. The results are identical and half of D's work is saved.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pof3d import precision
from pof3d.config import ModelConfig
from pof3d.errors import CheckpointError
from pof3d.layers import Conv2dLayer, FullyConnected, MinibatchStd, resize
from pof3d.precision import clamp_half

logger = logging.getLogger(__name__)

# The conditioning mapping's layers train 100x slower than the rest of D, as EG3D's label mapping
# (the official code's MappingNetwork default, which its D keeps); its embedding trains at full rate.
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
        # The official code clamps float16 conv outputs to +-256 (precision.FP16_CLAMP); other dtypes pass.
        y = clamp_half(self.skip(x, gain=SKIP_GAIN))
        x = clamp_half(self.conv0(x))
        x = clamp_half(self.conv1(x, gain=SKIP_GAIN))
        return y + x


class ConditionMapping(nn.Module):
    """Maps the raw pose (h, v) to the ``cmap`` vector of the projection score.

    EG3D's label mapping with no latent input (the official code's ``MappingNetwork(z_dim=0, c_dim=2)``):
    a linear embedding of the two angles, normalised to unit second moment, then ``num_layers``
    leaky-ReLU layers of width ``cmap_dim`` at learning-rate multiplier 0.01. The embedding itself
    trains at the full rate. The angles enter as they are, so poses that differ by 2*pi map to
    different vectors, as in the official code.
    """

    def __init__(self, cmap_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the condition mapping needs at least one layer, got {num_layers}")
        self.embed = FullyConnected(2, cmap_dim)
        self.layers = nn.ModuleList(
            FullyConnected(cmap_dim, cmap_dim, activation="lrelu", lr_mult=CMAP_LR_MULT)
            for _ in range(num_layers)
        )

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        x = self.embed(pose.float())
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = layer(x)
        return x


class Discriminator(nn.Module):
    """``logits, pred_pose = D(image, image_raw, pose=None)``; see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.resolution = cfg.image_resolution
        self.raw_resolution = cfg.neural_resolution
        self.pose_aware = cfg.pose_aware_d
        self.cmap_dim = cfg.cmap_dim

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

        # Epilogue at 4x4: minibatch std and conv give the shared features (width * 16 values);
        # the score reads them through fc -> out, the pose head directly.
        width = disc_channels(cfg, 4)
        flat = width * 4 * 4
        self.mbstd = MinibatchStd(group_size=cfg.mbstd_group)
        self.conv = Conv2dLayer(width + 1, width, 3)
        self.fc = FullyConnected(flat, width, activation="lrelu")
        if self.pose_aware:
            # The pose head does not go through `fc`, so the pose loss leaves the score's layers alone.
            self.pose_head = nn.Sequential(
                FullyConnected(flat, flat // 2, activation="lrelu"),
                FullyConnected(flat // 2, 2),
            )
            self.out = FullyConnected(width, cfg.cmap_dim)
            self.cmap = ConditionMapping(cfg.cmap_dim, cfg.cmap_layers)
        else:
            self.out = FullyConnected(width, 1)

    def features(self, image: torch.Tensor, image_raw: torch.Tensor) -> torch.Tensor:
        """The backbone: dual input -> residual blocks -> minibatch std, conv -> ``[B, width * 16]``.

        Each block computes in the dtype pof3d/precision.py gives it; the features are float32 unless
        ``train.precision=bf16`` (then bfloat16, which the heads read under the same autocast).
        """
        self._check_images(image, image_raw)
        img = torch.cat((image, resize(image_raw, self.resolution)), dim=1)
        img = img.contiguous(memory_format=torch.channels_last)  # convolutions run fastest in this layout
        x: torch.Tensor | None = None
        for block in self.blocks:
            dtype = precision.part_dtype(img.device, "D", block.use_fp16)
            if x is not None and dtype is None:
                x = x.float()  # a float32 block after reduced-precision ones
            with precision.autocast(img.device, dtype):
                x = block(x, img)
        assert x is not None
        x = self.mbstd(x.float())
        with precision.region(img.device, "D"):
            return self.conv(x).flatten(1)

    def predict_pose(self, features: torch.Tensor) -> torch.Tensor:
        """Pose head: the raw (h, v) regressed from the flattened 4x4 features (float32)."""
        if not self.pose_aware:
            raise ValueError("this discriminator was built with pose_aware_d=False and has no pose head")
        with precision.region(features.device, "D"):
            pose = self.pose_head(features)
        return pose.float()  # the pose loss and the pose regulariser's target are float32

    def score(self, features: torch.Tensor, pose: torch.Tensor | None) -> torch.Tensor:
        """Real/fake logits ``[B, 1]`` (float32): projection on ``cmap(pose)``, or a plain linear score."""
        if self.pose_aware and pose is None:
            raise ValueError("a pose-aware discriminator needs a pose to score with")
        with precision.region(features.device, "D"):
            out = self.out(self.fc(features))
            cmap = self.cmap(pose) if self.pose_aware else None
        # The projection and everything after it (the losses, R1's gradient) are float32.
        out = out.float()
        if cmap is None:
            return out
        return (out * cmap.float()).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Weights saved before the pose head and conditioning followed the official code cannot be mapped
        # onto the new layers; say so instead of listing missing and unexpected keys.
        head = state_dict.get(prefix + "pose_head.0.weight")
        legacy_head = self.pose_aware and head is not None and head.shape[1] != self.fc.weight.shape[1]
        if legacy_head or prefix + "cmap.fc0.weight" in state_dict:
            raise CheckpointError(
                "discriminator weights of the older layout (pose head on the fc output, cos/sin pose "
                "embedding); this version's pose head reads the 4x4 features and its conditioning is the "
                "official code's mapping network, so such a checkpoint cannot be loaded: train a new one"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_images(self, image: torch.Tensor, image_raw: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(
                f"image must be [B, 3, {self.resolution}, {self.resolution}], got {tuple(image.shape)}"
            )
        if image_raw.ndim != 4 or image_raw.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"image_raw must be [B, 3, r, r] with B={image.shape[0]}, got {tuple(image_raw.shape)}"
            )
