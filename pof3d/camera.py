"""Cameras in EG3D's look-at convention, driven by the learned pose (h, v).

A pose is (h, v) = (yaw, pitch) in radians; h = v = pi/2 is the frontal view. v is *not* the polar
angle: the polar angle is phi = arccos(1 - 2 v / pi), as in EG3D's pose samplers. The camera sits on a
sphere of radius r around the world origin and looks at a pivot. Camera axes are OpenCV-style
(x right, y down, z forward). Intrinsics are normalised by the image size.
"""

from __future__ import annotations

import math

import torch

WORLD_UP = (0.0, 1.0, 0.0)
V_EPS = 1e-5  # the pitch is kept inside (eps, pi - eps) so that the camera stays off the poles
RIGID_TOLERANCE = 1e-3  # how far a label's rotation may be from orthonormal (float32 text is ~1e-7 off)
MIN_CAMERA_DISTANCE = 1e-6  # a camera centre closer than this to the origin has no direction
# What a pose's pitch coordinate means inside a model (``model.pitch_output``): ``eg3d`` is EG3D's v
# (polar angle arccos(1 - 2 v / pi)); ``polar`` is the polar angle itself. Data, labels and metrics
# always use EG3D's v; :func:`to_eg3d` converts a model's poses for them.
PITCH_COORDINATES = ("polar", "eg3d")


def polar_angle(v: torch.Tensor) -> torch.Tensor:
    """phi = arccos(1 - 2 v / pi): v = pi/2 is the equator."""
    return torch.arccos((1 - 2 * v / math.pi).clamp(-1.0, 1.0))


def to_eg3d(pose: torch.Tensor, pitch: str) -> torch.Tensor:
    """Poses ``[..., 2]`` in pitch coordinate ``pitch`` as EG3D's (h, v): v = pi/2 (1 - cos phi),
    written pi sin^2(phi/2) to keep its precision near the pole."""
    _check_pitch(pitch)
    if pitch == "eg3d":
        return pose
    return torch.stack((pose[..., 0], math.pi * torch.sin(pose[..., 1] / 2).square()), dim=-1)


def _check_pitch(pitch: str) -> None:
    if pitch not in PITCH_COORDINATES:
        raise ValueError(f"pitch coordinate {pitch!r}: expected one of {', '.join(PITCH_COORDINATES)}")


def camera_direction(pose: torch.Tensor, pitch: str = "eg3d") -> torch.Tensor:
    """Unit vector from the world origin to the camera for poses ``[..., 2]``."""
    _check_pitch(pitch)
    h, p = pose[..., 0], pose[..., 1].clamp(V_EPS, math.pi - V_EPS)
    phi = p if pitch == "polar" else polar_angle(p)
    return torch.stack(
        (torch.sin(phi) * torch.cos(math.pi - h), torch.cos(phi), torch.sin(phi) * torch.sin(math.pi - h)),
        dim=-1,
    )


def look_at(origin: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
    """cam2world ``[..., 4, 4]`` for cameras at ``origin`` looking at ``pivot``."""
    forward = torch.nn.functional.normalize(pivot.expand_as(origin) - origin, dim=-1)
    up = torch.tensor(WORLD_UP, dtype=origin.dtype, device=origin.device).expand_as(forward)
    right = -torch.nn.functional.normalize(torch.linalg.cross(up, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.linalg.cross(forward, right, dim=-1), dim=-1)
    cam2world = torch.zeros(*origin.shape[:-1], 4, 4, dtype=origin.dtype, device=origin.device)
    cam2world[..., :3, 0] = right
    cam2world[..., :3, 1] = up
    cam2world[..., :3, 2] = forward
    cam2world[..., :3, 3] = origin
    cam2world[..., 3, 3] = 1.0
    return cam2world


def pose_to_cam2world(
    pose: torch.Tensor,
    radius: float | torch.Tensor,
    pivot: tuple[float, float, float] | torch.Tensor,
    pitch: str = "eg3d",
) -> torch.Tensor:
    """cam2world ``[B, 4, 4]`` for poses ``[B, 2]`` in pitch coordinate ``pitch`` (differentiable)."""
    if not torch.is_tensor(pivot):
        pivot = torch.tensor(pivot, dtype=pose.dtype, device=pose.device)
    if torch.is_tensor(radius) and radius.dim() == 1:
        radius = radius[:, None]
    origin = camera_direction(pose, pitch) * radius
    return look_at(origin, pivot)


def pose_from_cam2world(cam2world: torch.Tensor) -> torch.Tensor:
    """Recover (h, v) from the camera position (inverse of :func:`camera_direction`).

    Only the direction of the camera centre about the world origin counts (not where it looks). The
    polar angle comes from atan2 and v from pi sin^2(phi/2), so both keep their precision next to the
    poles, where arccos and 1 - cos lose it. h is in [0, 2 pi).
    """
    origin = cam2world[..., :3, 3]
    x, y, z = origin[..., 0], origin[..., 1], origin[..., 2]
    phi = torch.atan2(torch.hypot(x, z), y)
    v = math.pi * torch.sin(phi / 2).square()
    h = torch.remainder(math.pi - torch.atan2(z, x), 2 * math.pi)
    return torch.stack((h, v), dim=-1)


def label_problem(label: torch.Tensor, tolerance: float = RIGID_TOLERANCE) -> str | None:
    """Why one 25-float camera label is not a rigid camera with a pose, or None when it is.

    Rigid: finite, rotation part orthonormal with determinant +1 and last row (0, 0, 0, 1), each within
    ``tolerance`` (labels are stored as float32 text, so exact equality cannot be asked for), and a
    camera centre away from the world origin (else it has no direction).
    """
    label = torch.as_tensor(label, dtype=torch.float64)
    if label.shape != (25,):
        return f"has {label.numel()} values; expected 25"
    if not torch.isfinite(label).all():
        return "has NaN or infinite values; expected 25 finite numbers"
    cam2world, _ = from_label(label)
    rotation = cam2world[:3, :3]
    off = (rotation.T @ rotation - torch.eye(3, dtype=torch.float64)).abs().max().item()
    if off > tolerance:
        return f"its rotation is not orthonormal (max |R^T R - I| = {off:.3g}, tolerance {tolerance:g})"
    det = torch.linalg.det(rotation).item()
    if abs(det - 1) > tolerance:
        return f"its rotation has determinant {det:.3g}; expected +1 (a reflection is not a camera)"
    last = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    if (cam2world[3] - last).abs().max().item() > tolerance:
        return f"its last row is {cam2world[3].tolist()}; expected [0, 0, 0, 1]"
    if cam2world[:3, 3].norm().item() < MIN_CAMERA_DISTANCE:
        return "its camera sits at the world origin, so it has no direction (no pose)"
    return None


def pose_from_label(label: torch.Tensor) -> torch.Tensor:
    """(h, v) of one 25-float camera label (float64); ``ValueError`` naming what is wrong with a label
    that is not a rigid camera (:func:`label_problem`)."""
    label = torch.as_tensor(label, dtype=torch.float64)
    problem = label_problem(label)
    if problem is not None:
        raise ValueError(problem)
    return pose_from_cam2world(from_label(label)[0])


def fov_to_focal(fov_degrees: float) -> float:
    """Normalised focal length as EG3D computes it (note the sqrt(2))."""
    return 1.0 / (math.tan(math.radians(fov_degrees) / 2) * math.sqrt(2))


def intrinsics(focal: float, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised intrinsics ``[B, 3, 3]``: [[f, 0, 1/2], [0, f, 1/2], [0, 0, 1]]."""
    k = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], device=device)
    return k.expand(batch, 3, 3).clone()


def to_label(cam2world: torch.Tensor, intr: torch.Tensor) -> torch.Tensor:
    """EG3D's 25-float camera label: flattened 4x4 cam2world then flattened 3x3 intrinsics."""
    return torch.cat((cam2world.reshape(*cam2world.shape[:-2], 16), intr.reshape(*intr.shape[:-2], 9)), -1)


def from_label(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 25-float label back into (cam2world, intrinsics)."""
    if label.shape[-1] != 25:
        raise ValueError(f"camera label must have 25 values, got {label.shape[-1]}")
    return label[..., :16].reshape(*label.shape[:-1], 4, 4), label[..., 16:].reshape(*label.shape[:-1], 3, 3)


def mirror_pose(pose: torch.Tensor, axis: str = "left_right", cars: bool = False) -> torch.Tensor:
    """Pose of the camera reflected through the object's symmetry plane.

    ``left_right``: h -> pi - h (faces, plane x = 0) or 2 pi - h (cars, plane z = 0).
    ``up_down``: v -> pi - v (plane y = 0). Mirroring twice gives the pose back.
    """
    h, v = pose[..., 0], pose[..., 1]
    if axis == "left_right":
        h = (2 * math.pi - h) if cars else (math.pi - h)
    elif axis == "up_down":
        v = math.pi - v
    else:
        raise ValueError(f"mirror axis must be left_right or up_down, got {axis!r}")
    return torch.stack((h, v), dim=-1)


def angular_error(pose_a: torch.Tensor, pose_b: torch.Tensor, pitch: str = "eg3d") -> torch.Tensor:
    """Angle in radians between the viewing directions of two poses ``[..., 2]``."""
    cos = (camera_direction(pose_a, pitch) * camera_direction(pose_b, pitch)).sum(-1)
    return torch.arccos(cos.clamp(-1.0, 1.0))
