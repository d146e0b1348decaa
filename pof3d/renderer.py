"""Camera rays and EG3D-style volume rendering of a tri-plane field.

Each ray is sampled in two passes: stratified depths in ``[ray_start, ray_end]``, then importance
depths drawn from the (smoothed) opacity of the first pass. Both passes are composited together with
EG3D's "mip" ray marcher: densities and features are averaged between consecutive samples and the
density is activated as ``softplus(sigma - 1)``.

Two choices differ in form, not in result, from the official code code:
- compositing is done with per-sample weights on the unsorted coarse and fine features, so the large
  feature tensors are never concatenated or re-ordered (only scalars per sample are sorted);
- transmittance is ``exp(-cumsum(sigma * delta))`` instead of a cumulative product of ``1 - alpha``,
  the same quantity with a cheaper and better-behaved backward pass.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pof3d.config import ModelConfig
from pof3d.triplane import RGB_AFFINE, TriplaneDecoder, channels_last, sample_plane_sum, sample_triplanes

log = logging.getLogger(__name__)

# Added to the smoothed coarse weights so that empty stretches of a ray still get a few samples.
IMPORTANCE_FLOOR = 0.01


def make_rays(
    cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions ``[B, R*R, 3]`` through the pixel centres.

    OpenCV camera (x right, y down, z forward); ``intrinsics`` ``[B, 3, 3]`` are normalised by the
    image size. Rays are in row-major pixel order (index = row * R + column). Differentiable in
    ``cam2world`` and ``intrinsics``.
    """
    b = cam2world.shape[0]
    dtype, device = cam2world.dtype, cam2world.device
    centres = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    pixels = torch.stack((u, v, torch.ones_like(u)), dim=-1).reshape(-1, 3)  # [R*R, 3]
    cam_dirs = pixels @ torch.linalg.inv(intrinsics.to(dtype)).transpose(-1, -2)  # K^-1 [u, v, 1]
    directions = F.normalize(cam_dirs @ cam2world[:, :3, :3].transpose(-1, -2), dim=-1)
    origins = cam2world[:, None, :3, 3].expand(b, resolution * resolution, 3)
    return origins, directions


def stratified_depths(
    shape: tuple[int, int], samples: int, start: float, end: float, jitter: bool, device, dtype
) -> torch.Tensor:
    """``[B, N, samples]`` sorted depths, one per equal bin of ``[start, end]``.

    With ``jitter`` each depth is uniform in its bin (training); otherwise it is the bin centre.
    """
    step = (end - start) / samples
    base = start + step * torch.arange(samples, device=device, dtype=dtype)
    if jitter:
        return base + step * torch.rand(*shape, samples, device=device, dtype=dtype)
    return (base + 0.5 * step).expand(*shape, samples)


def smooth_weights(weights: torch.Tensor) -> torch.Tensor:
    """EG3D's smoothing of interval weights ``[..., K]``: max-pool then avg-pool (size 2), plus a floor.

    Each interval gets the mean of the maxima over its two neighbouring pairs, which widens thin
    peaks by one interval on each side; the result keeps the length ``K``.
    """
    shape = weights.shape
    flat = weights.reshape(-1, 1, shape[-1])
    flat = F.avg_pool1d(F.max_pool1d(flat, 2, 1, padding=1), 2, 1)
    return flat.reshape(shape) + IMPORTANCE_FLOOR


def importance_depths(
    depths: torch.Tensor, weights: torch.Tensor, samples: int, jitter: bool
) -> torch.Tensor:
    """Inverse-CDF samples ``[B, N, samples]`` of the piecewise-constant pdf given by ``weights``.

    ``weights`` ``[B, N, S-1]`` belong to the intervals between consecutive ``depths`` ``[B, N, S]``
    (sorted). Deterministic (evenly spaced quantiles) when ``jitter`` is False. Not differentiable:
    sample positions carry no gradient, as in EG3D.
    """
    with torch.no_grad():
        pdf = smooth_weights(weights)
        cdf = torch.cumsum(pdf, dim=-1)
        cdf = torch.cat((torch.zeros_like(cdf[..., :1]), cdf / cdf[..., -1:]), dim=-1)  # [B, N, S]
        shape = (*cdf.shape[:-1], samples)
        if jitter:
            u = torch.rand(shape, device=cdf.device, dtype=cdf.dtype)
        else:
            u = ((torch.arange(samples, device=cdf.device, dtype=cdf.dtype) + 0.5) / samples).expand(shape)
        u = u.contiguous()
        above = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
        below = above - 1
        cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
        z_lo, z_hi = depths.gather(-1, below), depths.gather(-1, above)
        t = ((u - cdf_lo) / (cdf_hi - cdf_lo).clamp_min(1e-12)).clamp(0.0, 1.0)
        return z_lo + t * (z_hi - z_lo)


def interval_weights(raw_sigma: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """Compositing weights ``[..., S-1]`` of the intervals between sorted samples ``[..., S]``.

    Mip ray marcher: the raw density of an interval is the mean of its two end samples, activated
    with ``softplus(sigma - 1)``; weight = alpha * transmittance before the interval.
    """
    deltas = depths[..., 1:] - depths[..., :-1]
    density = F.softplus(0.5 * (raw_sigma[..., 1:] + raw_sigma[..., :-1]) - 1.0)
    optical = density * deltas
    alpha = 1.0 - torch.exp(-optical)
    before = torch.cumsum(optical, dim=-1) - optical  # exclusive prefix sum
    return alpha * torch.exp(-before)


class VolumeRenderer(nn.Module):
    """Renders features, depth and opacity of tri-plane fields along given rays."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.depth_samples, self.importance_samples = m.depth_samples, m.importance_samples
        self.ray_start, self.ray_end = m.ray_start, m.ray_end
        self.white_background = m.white_background
        self.box_warp, self.quirk = m.box_warp, m.triplane_quirk

    def density(self, planes: torch.Tensor, decoder: nn.Module, points: torch.Tensor) -> torch.Tensor:
        """Raw (not activated) density ``[B, N, 1]`` at world ``points`` ``[B, N, 3]``."""
        return self._decode(planes, decoder, points)[1].unsqueeze(-1)

    def _decode(
        self, planes: torch.Tensor, decoder: nn.Module, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float] | None]:
        """Features ``[B, N, C]`` and raw density ``[B, N]`` at ``points`` ``[B, N, 3]``, with the affine
        colour map still to apply to composited features (None: already applied).

        The tri-plane decoder reads the plane sum, a row of channels per point
        (:meth:`TriplaneDecoder.decode`); any other module gets the per-plane samples ``[B, 3, N, C]`` and
        returns ``{"rgb": [B, N, C], "sigma": [B, N, 1]}`` (the analytic fields of the renderer's tests).
        """
        if isinstance(decoder, TriplaneDecoder):
            sigma, features = decoder.decode(sample_plane_sum(planes, points, self.box_warp, self.quirk))
            return features, sigma, RGB_AFFINE
        out = decoder(sample_triplanes(planes, points, self.box_warp, self.quirk))
        return out["rgb"], out["sigma"].squeeze(-1), None

    def _query(
        self,
        planes: torch.Tensor,
        decoder: nn.Module,
        origins: torch.Tensor,
        directions: torch.Tensor,
        depths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float] | None]:
        """Features ``[B, N, S, C]``, raw density ``[B, N, S]`` at the given depths along each ray, and
        the affine map still to apply to the composited features (None: already applied)."""
        b, n, s = depths.shape
        points = origins[:, :, None, :] + depths[..., None] * directions[:, :, None, :]
        features, sigma, affine = self._decode(planes, decoder, points.reshape(b, n * s, 3))
        return features.view(b, n, s, -1), sigma.view(b, n, s), affine

    def forward(
        self,
        planes: torch.Tensor,
        decoder: nn.Module,
        origins: torch.Tensor,
        directions: torch.Tensor,
        jitter: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Composite the field along rays ``[B, N, 3]``.

        Returns ``features`` ``[B, N, C]`` (in [-1, 1]; first 3 channels RGB; ``features.transpose(1, 2)``
        viewed as ``[B, C, H, W]`` is the feature image, channels-last, without a copy), ``depth``
        ``[B, N, 1]`` (expected depth of the ray's termination) and ``weights_sum`` ``[B, N, 1]``
        (opacity). Depths are jittered when ``jitter`` is True; by default in training mode only.
        """
        jitter = self.training if jitter is None else jitter
        b, n, _ = origins.shape
        planes = channels_last(planes)  # sampled twice: convert once (no copy if already in that layout)
        coarse = stratified_depths(
            (b, n), self.depth_samples, self.ray_start, self.ray_end, jitter, origins.device, origins.dtype
        )
        rgb_coarse, sigma_coarse, affine = self._query(planes, decoder, origins, directions, coarse)
        if self.importance_samples <= 0:
            return self._composite(coarse, sigma_coarse, [rgb_coarse], None, affine)
        weights = interval_weights(sigma_coarse.detach(), coarse)
        fine = importance_depths(coarse, weights, self.importance_samples, jitter)
        rgb_fine, sigma_fine, _ = self._query(planes, decoder, origins, directions, fine)
        depths, order = torch.sort(torch.cat((coarse, fine), dim=-1), dim=-1)
        sigma = torch.cat((sigma_coarse, sigma_fine), dim=-1).gather(-1, order)
        return self._composite(depths, sigma, [rgb_coarse, rgb_fine], order, affine)

    def _composite(
        self,
        depths: torch.Tensor,
        sigma: torch.Tensor,
        features: list[torch.Tensor],
        order: torch.Tensor | None,
        affine: tuple[float, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """March sorted samples; ``order`` maps sorted positions to the concatenated ``features``
        (``[B, N, S, C]`` each).

        ``affine`` = (scale, offset) is the decoder's per-sample colour map, deferred to here:
        sum_s w_s (scale f_s + offset) = scale sum_s w_s f_s + offset sum_s w_s.
        """
        weights = interval_weights(sigma, depths)  # [B, N, S-1]
        total = weights.sum(dim=-1, keepdim=True)
        mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
        near, far = depths[..., :1], depths[..., -1:]
        depth = (weights * mids).sum(dim=-1, keepdim=True) / total.clamp_min(1e-10)
        depth = torch.where(total > 1e-10, depth, far)
        depth = torch.minimum(torch.maximum(depth, near), far)
        # An interval's feature is the mean of its end samples, so each sample gets half the weight
        # of each interval it bounds; features are then summed in their original (unsorted) order.
        per_sample = 0.5 * (F.pad(weights, (1, 0)) + F.pad(weights, (0, 1)))
        if order is not None:
            per_sample = torch.zeros_like(per_sample).scatter(-1, order, per_sample)
        out, start = None, 0
        for feat in features:
            s = feat.shape[2]
            # A weighted sum over a ray's few samples: an element-wise product and a sum, which beat
            # a batched matrix product of one [1, S] x [S, C] product per ray.
            part = (feat * per_sample[..., start : start + s, None]).sum(dim=2)
            out = part if out is None else out + part
            start += s
        if affine is not None:
            out = out * affine[0] + total * affine[1]
        if self.white_background:
            out = out + (1.0 - total)
        return {"features": out * 2.0 - 1.0, "depth": depth, "weights_sum": total}
