"""Super-resolution from the neural-rendering resolution to the output image (EG3D's hybrid design).

The raw RGB image (first three feature channels) is the skip image: it is upsampled through two
StyleGAN2 blocks that each add a modulated ToRGB residual computed from the full feature image, so
the output stays anchored to the rendered colours while gaining detail. Both blocks are conditioned on
the last w of the latent, as in EG3D.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from pof3d.stylegan import SynthesisBlock, check_noise_mode

logger = logging.getLogger(__name__)


class SuperResolution(nn.Module):
    """(raw RGB ``[B,3,r,r]``, features ``[B,F,r,r]``, ws) -> RGB ``[B,3,R,R]`` for R/r in {1, 2, 4, 8}.

    Two blocks with ``channels`` and ``channels // 2`` outputs, laid out as the official code's modules:
    2x and 4x first resize the inputs bilinearly to half the output size (a no-op for 2x), then one
    block at that size and one that upsamples 2x; 8x resizes to a quarter of the output size and both
    blocks upsample (EG3D's "8XDC", with 256 and 128 channels there). 1x has no upsampling at all.
    """

    def __init__(
        self,
        w_dim: int,
        in_channels: int,
        in_resolution: int,
        out_resolution: int,
        channels: int = 128,
        use_noise: bool = True,
        num_fp16_res: int = 0,
    ) -> None:
        super().__init__()
        ratio = out_resolution / in_resolution
        if ratio not in (1, 2, 4, 8):
            raise ValueError(
                f"super-resolution ratio must be 1, 2, 4 or 8, got {out_resolution}/{in_resolution}"
            )
        ups = int(math.log2(ratio))
        self.in_resolution, self.out_resolution = in_resolution, out_resolution
        self.pre_scale = 2 if ups == 3 else 2 ** max(ups - 1, 0)
        block_ups = [ups == 3, ups >= 1]
        res = in_resolution * self.pre_scale
        blocks = []
        widths = [in_channels, channels, max(channels // 2, 1)]
        for i, up in enumerate(block_ups):
            res = res * 2 if up else res
            blocks.append(
                SynthesisBlock(
                    widths[i],
                    widths[i + 1],
                    w_dim,
                    res,
                    3,
                    up=up,
                    use_noise=use_noise,
                    use_fp16=num_fp16_res > 0,
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, rgb: torch.Tensor, features: torch.Tensor, ws: torch.Tensor, noise_mode: str = "random"
    ) -> torch.Tensor:
        check_noise_mode(noise_mode)
        if self.pre_scale > 1:
            size = features.shape[-1] * self.pre_scale
            features = F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False)
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
        w = ws[:, -1:]
        # The renderer's [B, N, C] output already is a channels-last image; keep that layout.
        x = features.contiguous(memory_format=torch.channels_last)
        img = rgb.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x, img = block(x, img, w.expand(-1, block.num_conv + 1, -1), noise_mode)
        return img
