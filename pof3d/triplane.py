"""Tri-plane feature lookup and the small MLP that turns features into density and colour.

A 3D point inside the box of side ``box_warp`` is projected orthogonally onto three axis-aligned
planes (xy, xz, zy; the third read at (z, x) with EG3D's projection, ``model.triplane_quirk``, the
default as in the official code); the bilinearly sampled features of the three planes are averaged and
decoded by a one-hidden-layer MLP, as in EG3D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pof3d import plane_kernel, precision
from pof3d.layers import FullyConnected

# For each plane, the world axes read as (grid x, grid y) = (plane width, plane height).
PLANE_AXES = ((0, 1), (0, 2), (2, 1))  # xy, xz, zy: every axis is seen by two planes
# EG3D (and the PoF3D reference, flag `wrong`, on by default) projects with the inverse of its plane
# matrices, which makes the third plane read (z, x): it duplicates the xz plane (transposed) and y is
# seen by the xy plane only.
QUIRK_PLANE_AXES = ((0, 1), (0, 2), (2, 0))

# EG3D widens the sigmoid slightly so that colours 0 and 1 are reachable with finite logits.
_RGB_PAD = 1e-3
RGB_AFFINE = (1 + 2 * _RGB_PAD, -_RGB_PAD)  # rgb = scale * sigmoid(features) + offset


def _axis_index(quirk: bool, device: torch.device) -> torch.Tensor:
    axes = QUIRK_PLANE_AXES if quirk else PLANE_AXES
    return torch.tensor([a for pair in axes for a in pair], device=device)


def project_to_planes(points: torch.Tensor, box_warp: float, quirk: bool = False) -> torch.Tensor:
    """Grid coordinates ``[B, N, 3, 2]`` of world points ``[B, N, 3]`` on the three planes.

    Each pair is ``grid_sample``'s (x, y) in [-1, 1] over the box ``[-box_warp/2, box_warp/2]^3``:
    ``2 p / box_warp`` read along ``PLANE_AXES`` (or ``QUIRK_PLANE_AXES`` with ``quirk``).
    """
    b, n = points.shape[:2]
    coords = points * (2.0 / box_warp)
    return coords.index_select(-1, _axis_index(quirk, points.device)).view(b, n, 3, 2)


def _plane_grid(planes: torch.Tensor, points: torch.Tensor, box_warp: float, quirk: bool) -> torch.Tensor:
    """``grid_sample``'s coordinates ``[B, N, 3, 2]`` of ``points`` on each plane, after checking shapes."""
    b, n_planes = planes.shape[:2]
    if n_planes != 3:
        raise ValueError(f"planes must be [B, 3, C, R, R], got shape {tuple(planes.shape)}")
    if points.dim() != 3 or points.shape[0] != b or points.shape[-1] != 3:
        raise ValueError(f"points must be [B={b}, N, 3], got shape {tuple(points.shape)}")
    return project_to_planes(points.to(planes.dtype), box_warp, quirk)


def _grid_sample_planes(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[B, 3, C, N]`` at ``grid`` ``[B, N, 3, 2]``: all planes in one grid_sample call, one grid row per
    (plane, sample)."""
    b, _, c, h, w = planes.shape
    # Channels-last planes make each bilinear tap read (and its gradient write) C contiguous values.
    flat = planes.reshape(b * 3, c, h, w).contiguous(memory_format=torch.channels_last)
    out = F.grid_sample(
        flat,
        grid.transpose(1, 2).reshape(b * 3, 1, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out.view(b, 3, c, -1)


def sample_triplanes(
    planes: torch.Tensor, points: torch.Tensor, box_warp: float, quirk: bool = False
) -> torch.Tensor:
    """Bilinear features of ``points`` on the three planes.

    planes ``[B, 3, C, R, R]`` (xy, xz, zy), points ``[B, N, 3]`` in world units -> ``[B, 3, N, C]``.
    The planes span the box ``[-box_warp/2, box_warp/2]^3``; outside it the features are zero.
    ``quirk=True`` reproduces EG3D's historic projection of the third plane (see ``QUIRK_PLANE_AXES``).
    """
    return _grid_sample_planes(planes, _plane_grid(planes, points, box_warp, quirk)).transpose(2, 3)


def channels_last(planes: torch.Tensor) -> torch.Tensor:
    """The same ``[B, 3, C, R, R]`` planes stored channels-innermost, the layout sampling reads fastest.

    :func:`sample_triplanes` converts on every call; converting once up front saves a copy (and one
    in the backward pass) per call when the same planes are sampled repeatedly.
    """
    return planes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def sample_plane_sum(
    planes: torch.Tensor, points: torch.Tensor, box_warp: float, quirk: bool = False, kernel: bool = True
) -> torch.Tensor:
    """Sum over the three planes of the bilinear features of ``points`` ``[B, N, 3]``: ``[B, N, C]``.

    The decoder takes the mean as this sum with 1/3 folded into its first layer's weight. On the CPU
    the sum comes from :mod:`pof3d.plane_kernel` (the same values and gradients, several times faster
    than ``grid_sample``'s backward pass there), one row of channels per point as the decoder reads it;
    elsewhere from ``grid_sample`` (channels first as it writes them, returned as a transposed view).
    ``kernel=False`` takes ``grid_sample`` on the CPU too (for side-by-side timings).
    """
    grid = _plane_grid(planes, points, box_warp, quirk)
    if kernel and plane_kernel.usable(planes, grid):
        return plane_kernel.plane_sum(planes.permute(0, 1, 3, 4, 2), grid)
    return _grid_sample_planes(planes, grid).sum(dim=1).transpose(1, 2)


class TriplaneDecoder(nn.Module):
    """Mean over planes -> FC -> softplus -> FC; outputs raw density and a feature vector.

    The first output channel is the raw density (activated by the renderer); the remaining
    ``out_features`` channels go through a widened sigmoid, the first three being RGB in [0, 1].
    The renderer calls :meth:`decode` on the plane sum, a row per point; ``forward`` takes per-plane
    samples ``[B, 3, N, C]`` and computes the same through it.
    """

    def __init__(self, in_channels: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.in_channels, self.out_features = in_channels, out_features
        self.hidden = FullyConnected(in_channels, hidden, lr_mult=1.0)
        self.out = FullyConnected(hidden, 1 + out_features, lr_mult=1.0)

    def decode(self, plane_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plane sum ``[B, N, C]`` (:func:`sample_plane_sum`) -> raw density ``[B, N]`` and the plain
        sigmoid of the features ``[B, N, out_features]``; the widening ``RGB_AFFINE`` is left to the
        caller (the renderer applies it once per ray after compositing, which is linear and whose
        weights sum to the opacity: two passes fewer over the per-sample features).

        One row of channels per point: each layer is one ``[B N, in] @ [in, out]`` product, a shape the
        CPU's matrix library runs faster for these narrow layers than the channels-first ``[out, in] @
        [in, N]`` per image (docs/training-step.md), and the rows are what the CPU sampling kernel writes
        and takes its gradient in, so nothing is transposed forward or backward.
        """
        # In the precision the phase asks for (pof3d/precision.py); the renderer gets float32 whatever the
        # MLP computed in, since its density activation, transmittance and compositing stay float32.
        with precision.region(plane_sum.device, "G"):
            # The mean over the three planes is folded into the first weight: W (s / 3) = (W / 3) s.
            w1 = self.hidden.weight * (self.hidden.weight_gain / 3.0)
            h = F.softplus(F.linear(plane_sum, w1, self.hidden.bias * self.hidden.bias_gain))
            x = F.linear(h, self.out.weight * self.out.weight_gain, self.out.bias * self.out.bias_gain)
            sigma, features = x.split((1, self.out_features), dim=-1)  # split's backward: one concatenation
            # On a contiguous copy: torch's CPU sigmoid runs a strided slice element by element where a
            # row is shorter than two vectors (16 channels with AVX-512) or in bfloat16, several times
            # slower than the copy and a vectorised pass (docs/training-step.md).
            features = torch.sigmoid(features.contiguous())
        return sigma.squeeze(-1).float(), features.float()

    def forward(self, sampled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-plane samples ``[B, 3, N, C]`` -> ``{"rgb": [B, N, out_features], "sigma": [B, N, 1]}``,
        the colour widened to ``RGB_AFFINE``."""
        sigma, features = self.decode(sampled.sum(dim=1))
        scale, offset = RGB_AFFINE
        return {"rgb": features * scale + offset, "sigma": sigma.unsqueeze(-1)}
