"""Reprojection error (RE): are two renders of the same latent explained by one geometry?

View 1's pixels are lifted to 3D with view 1's rendered depth (distance along the ray, as the volume
renderer outputs it), projected into view 2, and view 2's colour is read there (bilinear). RE is the
mean absolute colour difference in [0, 1] units (images in [-1, 1] are halved), averaged over channels
and over the valid pixels: foreground in view 1, landing inside view 2 on its foreground, and not
occluded there (the distance from camera 2 to the lifted point agrees with view 2's depth within
``occlusion_tol`` world units). Consistent geometry and view-independent colours give RE = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pof3d.camera import intrinsics
from pof3d.renderer import make_rays


def project(points: torch.Tensor, cam2world: torch.Tensor, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image coordinates ``[B, N, 2]`` (u, v in [0, 1] inside the image) and distances from
    the camera ``[B, N]`` of world points ``[B, N, 3]``; points behind the camera get u = v = -1."""
    rel = points - cam2world[:, None, :3, 3]
    cam = rel @ cam2world[:, :3, :3]  # world -> camera frame (rotation is orthonormal)
    z = cam[..., 2]
    ahead = z > 1e-6
    safe_z = torch.where(ahead, z, torch.ones_like(z))
    uv = torch.stack((focal * cam[..., 0] / safe_z + 0.5, focal * cam[..., 1] / safe_z + 0.5), -1)
    uv = torch.where(ahead[..., None], uv, torch.full_like(uv, -1.0))
    return uv, rel.norm(dim=-1)


def _sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear read of ``image [B, C, R, R]`` at normalised coordinates ``uv [B, N, 2]`` -> [B, N, C]."""
    grid = (uv * 2 - 1)[:, :, None, :]
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)[
        ..., 0
    ].transpose(1, 2)


def reprojection_error(
    image1: torch.Tensor,
    depth1: torch.Tensor,
    cam1: torch.Tensor,
    image2: torch.Tensor,
    depth2: torch.Tensor,
    cam2: torch.Tensor,
    focal: float,
    foreground1: torch.Tensor | None = None,
    foreground2: torch.Tensor | None = None,
    occlusion_tol: float | None = 0.05,
) -> torch.Tensor:
    """Per-image RE ``[B]`` (NaN where no pixel is valid) for renders of the same scenes from two cameras.

    images ``[B, 3, R, R]`` in [-1, 1]; depths ``[B, 1, R, R]`` along the ray; cameras ``[B, 4, 4]``
    cam2world; foreground masks ``[B, 1, R, R]`` bool (None: every pixel).
    """
    b, _, r, _ = image1.shape
    origins, dirs = make_rays(cam1, intrinsics(focal, b, device=cam1.device).to(cam1.dtype), r)
    points = origins + dirs * depth1.reshape(b, -1, 1)
    uv, dist = project(points, cam2, focal)
    valid = ((uv >= 0) & (uv <= 1)).all(-1)
    if foreground1 is not None:
        valid &= foreground1.reshape(b, -1)
    if foreground2 is not None:
        valid &= _sample(foreground2.to(image2.dtype), uv)[..., 0] > 0.5
    if occlusion_tol is not None:
        valid &= (_sample(depth2, uv)[..., 0] - dist).abs() < occlusion_tol
    colour1 = image1.reshape(b, 3, -1).transpose(1, 2)
    colour2 = _sample(image2, uv)
    diff = (colour1 - colour2).abs().mean(-1) / 2  # [-1, 1] -> [0, 1] units
    count = valid.sum(-1)
    per_image = (diff * valid).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, per_image, torch.full_like(per_image, float("nan")))
