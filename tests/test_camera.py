"""The EG3D look-at camera driven by (h, v): geometry, mirrors, labels and intrinsics."""

from __future__ import annotations

import math

import pytest
import torch

from pof3d.camera import (
    V_EPS,
    angular_error,
    fov_to_focal,
    from_label,
    intrinsics,
    label_problem,
    mirror_pose,
    pose_from_cam2world,
    pose_from_label,
    pose_to_cam2world,
    to_label,
)
from pof3d.presets import load_config

FACE_PIVOT = (0.0, 0.0, 0.2)


def random_poses(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    v = 0.1 + torch.rand(n, generator=g, dtype=torch.float64) * (math.pi - 0.2)
    return torch.stack((h, v), dim=-1)


def test_camera_on_sphere_of_requested_radius():
    c2w = pose_to_cam2world(random_poses(64), 2.7, FACE_PIVOT)
    assert torch.allclose(c2w[:, :3, 3].norm(dim=-1), torch.full((64,), 2.7, dtype=torch.float64))


def test_per_sample_radius():
    radius = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)
    c2w = pose_to_cam2world(random_poses(3), radius, FACE_PIVOT)
    assert torch.allclose(c2w[:, :3, 3].norm(dim=-1), radius)


@pytest.mark.parametrize("pivot", [FACE_PIVOT, (0.0, 0.0, 0.0)])
def test_camera_looks_at_pivot(pivot):
    c2w = pose_to_cam2world(random_poses(32), 2.7, pivot)
    to_pivot = torch.tensor(pivot, dtype=torch.float64) - c2w[:, :3, 3]
    expected = to_pivot / to_pivot.norm(dim=-1, keepdim=True)
    assert torch.allclose(c2w[:, :3, 2], expected, atol=1e-12)


def test_rotation_is_proper_and_orthonormal():
    c2w = pose_to_cam2world(random_poses(64), 2.7, FACE_PIVOT)
    rot = c2w[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    assert torch.allclose(rot.transpose(1, 2) @ rot, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(64, 4))


def test_frontal_pose_matrix():
    c2w = pose_to_cam2world(torch.tensor([[math.pi / 2, math.pi / 2]]), 2.7, FACE_PIVOT)
    expected = torch.tensor([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]], dtype=torch.float32)
    assert torch.allclose(c2w[0], expected, atol=1e-6)


def test_camera_y_axis_points_down_in_the_image():
    """OpenCV camera: the image's y axis (second column) points towards world -y for upright views."""
    c2w = pose_to_cam2world(random_poses(16), 2.7, FACE_PIVOT)
    assert (c2w[:, 1, 1] < 0).all()
    assert torch.allclose(c2w[:, 1, 0], torch.zeros(16, dtype=torch.float64), atol=1e-12)  # no roll


@pytest.mark.parametrize(("axis", "cars"), [("left_right", False), ("up_down", False), ("left_right", True)])
def test_mirror_twice_is_identity(axis, cars):
    pose = random_poses(32)
    assert torch.allclose(mirror_pose(mirror_pose(pose, axis, cars), axis, cars), pose, atol=1e-12)


# (axis, cars, pivot, M: reflection of the world, F: camera axis flipped to keep det +1)
MIRRORS = [
    ("left_right", False, FACE_PIVOT, (-1.0, 1.0, 1.0), (-1.0, 1.0, 1.0)),
    ("up_down", False, FACE_PIVOT, (1.0, -1.0, 1.0), (1.0, -1.0, 1.0)),
    ("left_right", True, (0.0, 0.0, 0.0), (1.0, 1.0, -1.0), (-1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize(("axis", "cars", "pivot", "m", "f"), MIRRORS)
def test_mirrored_pose_is_reflected_camera(axis, cars, pivot, m, f):
    """R' = M R F and o' = M o, the official code's construction of the mirrored camera."""
    pose = random_poses(32, seed=1)
    c2w = pose_to_cam2world(pose, 2.7, pivot)
    mirrored = pose_to_cam2world(mirror_pose(pose, axis, cars), 2.7, pivot)
    mm = torch.diag(torch.tensor(m, dtype=torch.float64))
    ff = torch.diag(torch.tensor(f, dtype=torch.float64))
    assert torch.allclose(mirrored[:, :3, :3], mm @ c2w[:, :3, :3] @ ff, atol=1e-9)
    assert torch.allclose(mirrored[:, :3, 3], c2w[:, :3, 3] @ mm, atol=1e-9)


def test_left_right_mirror_of_frontal_view_is_frontal():
    frontal = torch.tensor([[math.pi / 2, math.pi / 2]])
    assert torch.allclose(mirror_pose(frontal, "left_right"), frontal)


def test_mirror_rejects_unknown_axis():
    with pytest.raises(ValueError, match="left_right or up_down"):
        mirror_pose(random_poses(2), "diagonal")


def test_label_round_trip():
    c2w = pose_to_cam2world(random_poses(8), 2.7, FACE_PIVOT)
    k = intrinsics(4.26, 8).double()
    label = to_label(c2w, k)
    assert label.shape == (8, 25)
    assert torch.equal(label[:, :16], c2w.reshape(8, 16))
    c2w_back, k_back = from_label(label)
    assert torch.equal(c2w_back, c2w) and torch.equal(k_back, k)


def test_label_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="25 values, got 24"):
        from_label(torch.zeros(3, 24))


def test_pose_from_cam2world_inverts_pose_to_cam2world():
    pose = random_poses(128, seed=2)
    back = pose_from_cam2world(pose_to_cam2world(pose, 2.7, FACE_PIVOT))
    dh = torch.remainder(back[:, 0] - pose[:, 0] + math.pi, 2 * math.pi) - math.pi  # yaw is periodic
    assert dh.abs().max() < 1e-9
    assert torch.allclose(back[:, 1], pose[:, 1], atol=1e-9)


def test_fov_to_focal_matches_eg3d():
    assert fov_to_focal(18.837) == pytest.approx(4.26, abs=5e-3)  # EG3D FFHQ labels: 4.2647
    k = intrinsics(fov_to_focal(18.837), batch=2)
    assert k.shape == (2, 3, 3)
    assert k[0, 0, 2] == 0.5 and k[0, 1, 2] == 0.5 and k[0, 2, 2] == 1.0


def test_angular_error():
    pose = random_poses(16, seed=3)
    assert angular_error(pose, pose).max() < 1e-6
    equator = torch.tensor([[math.pi / 2, math.pi / 2]], dtype=torch.float64)
    turned = equator + torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    assert angular_error(equator, turned).item() == pytest.approx(0.1, abs=1e-9)


def test_cam2world_is_differentiable_in_pose():
    pose = random_poses(4, seed=4).requires_grad_(True)
    c2w = pose_to_cam2world(pose, 2.7, FACE_PIVOT)
    c2w[:, :3, :].sum().backward()
    assert torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0


# Poses near both poles (V_EPS is the closest the renderer's camera goes) and around the equator.
NEAR_POLES = (V_EPS, 1e-3, 0.05, math.pi / 2, math.pi - 0.05, math.pi - 1e-3, math.pi - V_EPS)


@pytest.mark.parametrize("preset", ["ffhq256", "cars128"])
def test_pose_from_label_gives_back_the_pose_the_label_was_built_from(preset: str):
    """Labels built by the renderer's own camera code (faces: radius 2.7, pivot (0, 0, 0.2); cars:
    radius 1.7, pivot at the origin), stored as float32 as EG3D's dataset.json holds them."""
    m = load_config(preset).model
    h = torch.linspace(0.0, 2 * math.pi, 13, dtype=torch.float64)[:-1]
    h, v = torch.meshgrid(h, torch.tensor(NEAR_POLES, dtype=torch.float64), indexing="ij")
    poses = torch.stack((h.reshape(-1), v.reshape(-1)), dim=-1)
    cam2world = pose_to_cam2world(poses, m.camera_radius, m.pivot)
    labels = to_label(cam2world, intrinsics(m.focal, len(poses)).double()).float()
    back = torch.stack([pose_from_label(label) for label in labels])
    dh = torch.remainder(back[:, 0] - poses[:, 0] + math.pi, 2 * math.pi) - math.pi
    assert dh.abs().max() < 1e-5 and (back[:, 1] - poses[:, 1]).abs().max() < 1e-5
    assert back[:, 0].min() >= 0 and back[:, 0].max() < 2 * math.pi


def test_labels_that_are_not_rigid_cameras_are_named():
    good = to_label(pose_to_cam2world(torch.tensor([[1.0, 1.2]]), 2.7, FACE_PIVOT), intrinsics(4.26))[0]
    assert label_problem(good) is None

    def changed(index: int, value: float) -> torch.Tensor:
        label = good.clone()
        label[index] = value
        return label

    mirrored = good.clone()
    mirrored[[0, 4, 8]] *= -1  # the camera's x axis flipped: orthonormal but a reflection
    cases = {
        "not orthonormal": changed(0, good[0] + 0.1),
        "determinant -1": mirrored,
        "last row": changed(15, 2.0),
        "NaN or infinite": changed(3, float("nan")),
        "world origin": torch.cat(
            (good[:3], torch.zeros(1), good[4:7], torch.zeros(1), good[8:11], torch.zeros(1), good[12:])
        ),
    }
    for expected, label in cases.items():
        with pytest.raises(ValueError, match=expected):
            pose_from_label(label)
    assert label_problem(good[:24]) == "has 24 values; expected 25"
