"""StyleGAN2 mapping network and the synthesis backbone that paints the tri-planes.

The backbone is an ordinary StyleGAN2 "skip" generator whose output image has ``3 * C`` channels; the
generator reshapes it into three C-channel feature planes. Blocks are shared with the super-resolution
module, which is the same kind of block conditioned on the last w.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pof3d import precision
from pof3d.layers import FullyConnected, ModulatedConv2d, upsample2d
from pof3d.precision import clamp_half

logger = logging.getLogger(__name__)

NOISE_MODES = ("random", "const", "none")


def check_noise_mode(noise_mode: str) -> None:
    """Reject a misspelt mode early: the layers would otherwise silently treat it as "random"."""
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row to unit root-mean-square, so the mapping sees z on a sphere of fixed radius."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z -> w through leaky-ReLU FC layers; keeps the running mean ``w_avg`` used for truncation.

    The pose-free model has no camera conditioning, so unlike EG3D there is no c input.
    """

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_ws: int,
        layers: int = 2,
        lr_mult: float = 0.01,
        w_avg_beta: float = 0.998,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"mapping network needs at least one layer, got {layers}")
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        self.layers = nn.ModuleList(
            FullyConnected(z_dim if i == 0 else w_dim, w_dim, activation="lrelu", lr_mult=lr_mult)
            for i in range(layers)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = False
    ) -> torch.Tensor:
        """Return ws ``[B, num_ws, w_dim]``; ``update_w_avg`` is for training steps only."""
        # Float32 in every precision mode: w feeds the pose learner, and bfloat16 here moved the learned
        # poses by tenths of a degree and raised the error of the pose learner's gradient on the test
        # batch from 1.5 % to 14 % of its norm, for no speed: the mapping is a few small products.
        x = normalize_2nd_moment(z.to(torch.float32))
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return self.truncate(x.unsqueeze(1).expand(-1, self.num_ws, -1), truncation_psi)

    def truncate(self, ws: torch.Tensor, truncation_psi: float) -> torch.Tensor:
        """ws pulled toward ``w_avg``: ``w_avg + psi * (ws - w_avg)`` (psi = 1 returns ws itself)."""
        return ws if truncation_psi == 1.0 else self.w_avg.lerp(ws, truncation_psi)


class SynthesisBlock(nn.Module):
    """One resolution of a skip-architecture StyleGAN2 generator.

    Two modulated 3x3 convs (the first upsamples 2x when ``up``; a block without input starts from a
    learned 4x4 constant and has one conv), then a modulated 1x1 "ToRGB" (no demodulation) whose output
    is added to the upsampled image from the block below.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        *,
        up: bool = True,
        use_noise: bool = True,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.up, self.use_fp16 = in_channels, resolution, up, use_fp16
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.conv0 = ModulatedConv2d(
                in_channels, out_channels, 3, w_dim, up=up, use_noise=use_noise, resolution=resolution
            )
        self.conv1 = ModulatedConv2d(
            out_channels, out_channels, 3, w_dim, use_noise=use_noise, resolution=resolution
        )
        self.torgb = ModulatedConv2d(
            out_channels, img_channels, 1, w_dim, demodulate=False, activation="linear"
        )
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws`` holds ``num_conv + 1`` entries: one per conv, then the ToRGB's."""
        w_iter = iter(ws.unbind(dim=1))
        if self.conv0 is None:
            # Channels-last from the first block on: later ops keep the layout, and oneDNN/cuDNN
            # convolutions run on it without reordering to and from their blocked formats.
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = x.contiguous(memory_format=torch.channels_last)
        # The official code clamps the conv outputs of its float16 blocks (conv_clamp=256); clamp_half
        # passes other dtypes unchanged.
        with precision.region(x.device, "G", self.use_fp16):
            if self.conv0 is not None:
                x = clamp_half(self.conv0(x, next(w_iter), noise_mode))
            x = clamp_half(self.conv1(x, next(w_iter), noise_mode))
            y = clamp_half(self.torgb(x, next(w_iter))).float()
        if img is not None:
            img = upsample2d(img) if self.up else img
            y = img + y
        return x, y


class SynthesisNetwork(nn.Module):
    """StyleGAN2 synthesis from 4x4 up to ``resolution`` with ``out_channels`` output channels.

    Channels at resolution r are ``min(channel_base // r, channel_max)``. The ``num_fp16_res`` highest
    resolutions (EG3D's rule for which ones) are the blocks that ``train.precision`` auto and fp16 run in
    reduced precision (pof3d/precision.py).
    """

    def __init__(
        self,
        w_dim: int,
        resolution: int,
        out_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        use_noise: bool = True,
        num_fp16_res: int = 0,
    ) -> None:
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"synthesis resolution must be a power of two >= 4, got {resolution}")
        self.w_dim, self.resolution, self.out_channels = w_dim, resolution, out_channels
        log2 = int(math.log2(resolution))
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.resolutions = [2**i for i in range(2, log2 + 1)]
        blocks = []
        in_channels = 0
        for res in self.resolutions:
            channels = min(channel_base // res, channel_max)
            blocks.append(
                SynthesisBlock(
                    in_channels,
                    channels,
                    w_dim,
                    res,
                    out_channels,
                    up=in_channels > 0,
                    use_noise=use_noise,
                    use_fp16=num_fp16_res > 0 and res >= fp16_resolution,
                )
            )
            in_channels = channels
        self.blocks = nn.ModuleList(blocks)

    @property
    def num_ws(self) -> int:
        """Number of w vectors consumed: one per conv plus the final ToRGB's."""
        return sum(block.num_conv for block in self.blocks) + 1

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws ``[B, num_ws, w_dim]`` -> image ``[B, out_channels, resolution, resolution]`` (float32)."""
        check_noise_mode(noise_mode)
        if ws.dim() != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], noise_mode)
            w_idx += block.num_conv
        return img
