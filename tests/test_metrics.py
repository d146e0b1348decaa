"""Metrics: JS identities, pose error, depth error, RE (FID/KID: test_metrics_fid.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pof3d.camera import intrinsics, pose_to_cam2world
from pof3d.metrics.js import js_divergence, pose_bins, pose_histograms, pose_js, pose_moments
from pof3d.metrics.pose import constant_guess_error_deg, pose_error_deg, predict_poses
from pof3d.metrics.reprojection import project, reprojection_error
from pof3d.renderer import make_rays

# These tensors are tiny: one intra-op thread is as fast and does not fight other processes.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- JS


def test_js_identical_is_zero_and_disjoint_is_ln2():
    p = np.array([0.2, 0.3, 0.5, 0.0])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([1, 0, 0, 0], [0, 0, 1, 1]) == pytest.approx(math.log(2), abs=1e-12)
    q = np.array([0.5, 0.3, 0.1, 0.1])
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert 0 < js_divergence(p, q) < math.log(2)


def test_js_rejects_bad_histograms():
    with pytest.raises(ValueError, match="differ in size"):
        js_divergence([1, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="positive mass"):
        js_divergence([0, 0], [1, 0])


def test_pose_js_on_samples():
    rng = np.random.default_rng(0)
    a = np.stack((rng.normal(math.pi / 2, 0.3, 20000), rng.normal(math.pi / 2, 0.15, 20000)), 1)
    same = pose_js(a, a)
    assert {k: same[k] for k in ("js", "js_yaw", "js_pitch")} == {"js": 0.0, "js_yaw": 0.0, "js_pitch": 0.0}
    b = a + np.array([math.pi, 0.0])  # yaw turned half a circle: no overlap in yaw
    far = pose_js(a, b)
    assert far["js"] == pytest.approx(math.log(2), abs=1e-9)
    assert far["js_yaw"] == pytest.approx(math.log(2), abs=1e-9)
    assert far["js_pitch"] == pytest.approx(0.0, abs=1e-12)
    near = pose_js(a, a + np.array([0.1, 0.0]))
    assert 0 < near["js"] < far["js"]


def test_pose_bins_and_wrap():
    yaw, pitch = pose_bins(5.0)
    assert len(yaw) == 73 and len(pitch) == 37
    assert yaw[-1] == pytest.approx(2 * math.pi) and pitch[-1] == pytest.approx(math.pi)
    with pytest.raises(ValueError, match="divisor of 180"):
        pose_bins(7.0)
    # yaw -0.01 rad wraps to just below 2 pi; NaN rows are dropped.
    hist = pose_histograms(np.array([[-0.01, 1.0], [np.nan, 1.0]]))
    assert hist["yaw"][-1] == 1.0 and hist["joint"].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- pose


def test_pose_error_perfect_predictor_is_zero_and_offsets_are_degrees():
    true = torch.tensor([[math.pi / 2, math.pi / 2], [1.2, 1.4], [2.0, 1.7], [float("nan"), 1.0]])
    assert pose_error_deg(true.clone(), true) == pytest.approx(0.0, abs=1e-5)
    # At the equator (v = pi/2) a yaw offset of 10 degrees is a 10 degree viewing-angle error.
    eq = torch.tensor([[1.0, math.pi / 2], [2.0, math.pi / 2]])
    assert pose_error_deg(eq + torch.tensor([math.radians(10), 0.0]), eq) == pytest.approx(10.0, abs=1e-4)
    with pytest.raises(ValueError, match="finite"):
        pose_error_deg(eq, torch.full_like(eq, float("nan")))


def test_constant_guess_floor_is_what_a_head_predicting_the_centre_scores():
    g = torch.Generator().manual_seed(0)
    true = torch.stack(
        (
            math.pi / 2 + 0.35 * torch.randn(2000, generator=g),
            math.pi / 2 + 0.15 * torch.randn(2000, generator=g),
        ),
        1,
    )
    floor = constant_guess_error_deg(true)
    centre = true.mean(0, keepdim=True).expand_as(true)
    assert floor == pytest.approx(pose_error_deg(centre, true), rel=1e-3)
    assert 10 < floor < 25  # about the spread of the poses
    assert (
        pose_error_deg(true + 0.01 * torch.randn(true.shape, generator=g), true) < floor / 5
    )  # a real reader
    assert constant_guess_error_deg(torch.full((5, 2), 1.0)) == pytest.approx(0.0, abs=1e-5)
    # Yaw wraps: poses around h = 0 have their centre at 0, not at pi.
    wrapped = torch.tensor([[0.1, 1.5], [2 * math.pi - 0.1, 1.5]])
    assert constant_guess_error_deg(wrapped) < 10


def test_predict_poses_batches():
    images = torch.randn(10, 3, 8, 8)
    seen = []

    def predictor(x):
        seen.append(len(x))
        return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)

    out = predict_poses(predictor, images, batch=4)
    assert seen == [4, 4, 2] and out.shape == (10, 2)
    assert torch.allclose(out[:, 0], images.mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------------------ RE

FOCAL, RADIUS, SPHERE = 4.26, 2.7, 0.25


def _render_sphere(pose: torch.Tensor, res: int, bump: float = 0.0):
    """Analytic render of a textured sphere at the origin: colour is a function of the surface point."""
    cam = pose_to_cam2world(pose, RADIUS, (0.0, 0.0, 0.0))
    origins, dirs = make_rays(cam, intrinsics(FOCAL, len(pose)), res)
    b = (origins * dirs).sum(-1)
    disc = b**2 - ((origins**2).sum(-1) - SPHERE**2)
    hit = disc > 0
    t = torch.where(hit, -b - disc.clamp(min=0).sqrt(), torch.full_like(b, 4.0))
    p = origins + dirs * t[..., None]
    colour = torch.stack((torch.sin(12 * p[..., 0]), torch.cos(10 * p[..., 1]), torch.sin(9 * p[..., 2])), -1)
    colour = torch.where(hit[..., None], colour, torch.full_like(colour, -1.0))
    depth = t + bump * torch.sin(40 * p[..., 0]) * torch.sin(40 * p[..., 1]) * hit
    shape = (len(pose), res, res)
    return (
        colour.reshape(*shape, 3).permute(0, 3, 1, 2),
        depth.reshape(*shape)[:, None],
        hit.reshape(*shape)[:, None],
        cam,
    )


def test_projection_inverts_rays():
    pose = torch.tensor([[1.3, 1.4]])
    cam = pose_to_cam2world(pose, RADIUS, (0.0, 0.0, 0.0))
    origins, dirs = make_rays(cam, intrinsics(FOCAL, 1), 8)
    uv, dist = project(origins + 2.5 * dirs, cam, FOCAL)
    centres = (torch.arange(8) + 0.5) / 8
    assert torch.allclose(uv[0, :, 0].reshape(8, 8), centres[None].expand(8, 8), atol=1e-5)
    assert torch.allclose(uv[0, :, 1].reshape(8, 8), centres[:, None].expand(8, 8), atol=1e-5)
    assert torch.allclose(dist, torch.full_like(dist, 2.5), atol=1e-5)


def test_reprojection_error_zero_for_consistent_geometry_and_grows_when_perturbed():
    pose1 = torch.tensor([[math.pi / 2, math.pi / 2], [1.2, 1.5]])
    pose2 = pose1 + torch.tensor([math.radians(20), 0.0])
    img1, depth1, fg1, cam1 = _render_sphere(pose1, 64)
    img2, depth2, fg2, cam2 = _render_sphere(pose2, 64)
    consistent = reprojection_error(img1, depth1, cam1, img2, depth2, cam2, FOCAL, fg1, fg2)
    assert consistent.shape == (2,) and torch.isfinite(consistent).all()
    assert consistent.max() < 0.01
    errors = []
    for bump in (0.01, 0.03):
        _, bumpy, _, _ = _render_sphere(pose1, 64, bump=bump)
        errors.append(reprojection_error(img1, bumpy, cam1, img2, depth2, cam2, FOCAL, fg1, fg2).mean())
    assert consistent.mean() * 3 < errors[0] < errors[1]


# --------------------------------------------------------------------------------------- depth


def test_normalised_depth_error_is_scale_and_shift_invariant():
    from pof3d.metrics.depth import normalised_depth_error

    g = torch.Generator().manual_seed(0)
    depth = torch.rand(3, 1, 16, 16, generator=g) + 2
    mask = torch.ones_like(depth, dtype=torch.bool)
    mask[:, :, :4] = False
    assert torch.allclose(normalised_depth_error(3 * depth - 1, depth, mask), torch.zeros(3), atol=1e-6)
    # Outside the mask nothing counts; an inverted map is maximally wrong (error 4).
    other = torch.where(mask, depth, torch.full_like(depth, 100.0))
    assert torch.allclose(normalised_depth_error(other, depth, mask), torch.zeros(3), atol=1e-6)
    assert torch.allclose(normalised_depth_error(-depth, depth, mask), torch.full((3,), 4.0), atol=1e-4)
    unrelated = torch.rand(3, 1, 16, 16, generator=g)
    assert (normalised_depth_error(unrelated, depth, mask) > 1.0).all()
    tiny = torch.zeros_like(mask)
    tiny[:, :, 0, :3] = True
    assert torch.isnan(normalised_depth_error(depth, depth, tiny)).all()


def test_depth_estimator_learns_sphere_depth(tmp_path):
    from pof3d.metrics.depth import generated_depth_error, load_or_train_estimator

    poses = torch.stack((torch.linspace(1.2, 1.9, 48), torch.linspace(1.4, 1.7, 48).flip(0)), -1)
    images, depth, fg, _ = _render_sphere(poses, 16)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    gt = torch.where(fg, depth, torch.full_like(depth, float("inf")))[:, 0].numpy()
    model, held_out = load_or_train_estimator(pixels, gt, 16, "k", tmp_path, steps=150)
    assert held_out < 0.5  # uncorrelated depth would score about 2
    again, cached = load_or_train_estimator(pixels, gt, 16, "k", tmp_path, steps=150)
    assert cached == pytest.approx(held_out) and (tmp_path / "depth-estimator-k.pt").is_file()
    right = generated_depth_error(again, images[:8], depth[:8], fg[:8])
    wrong = generated_depth_error(again, images[:8], -depth[:8], fg[:8])
    assert right.mean() < 0.5 < 3.0 < wrong.mean()


# ------------------------------------------------------------------------- JS through the suite


class _PosePrior(torch.nn.Module):
    """Stands in for G: its pose learner maps z to exactly the synthetic faces distribution (+ offset),
    in the polar pitch coordinate, so metrics that forget :meth:`eg3d_pose` see the wrong pitch."""

    def __init__(self, yaw_offset: float) -> None:
        super().__init__()
        self.yaw_offset = yaw_offset

    def map(self, z, truncation_psi=1.0, update_w_avg=False):
        return z[:, None]

    def predict_pose(self, ws):
        from pof3d.data.synthetic_scene import setting

        s, z = setting("faces"), ws[:, 0]
        h = s.h_mean + self.yaw_offset + (s.h_std * z[:, 0]).clamp(-s.h_clip, s.h_clip)
        v = math.pi / 2 + (s.v_std * z[:, 1]).clamp(-s.v_clip, s.v_clip)
        return torch.stack((h, torch.arccos(1 - 2 * v / math.pi)), -1)

    def eg3d_pose(self, pose):
        from pof3d.camera import to_eg3d

        return to_eg3d(pose, "polar")


def test_pose_moments_mean_and_spread():
    """Learned/true pose moments: circular yaw (a set straddling 0/360 is centred at 0, not 180),
    plain pitch; a shift of the samples moves only the mean."""
    rng = np.random.default_rng(1)
    yaw = np.radians(rng.normal(0.0, 10.0, 50000)) % (2 * math.pi)
    pitch = np.radians(rng.normal(80.0, 5.0, 50000))
    m = pose_moments(np.stack((yaw, pitch), 1), "x")
    assert min(m["x_yaw_mean_deg"], 360 - m["x_yaw_mean_deg"]) < 0.3
    assert m["x_yaw_std_deg"] == pytest.approx(10.0, rel=0.02)
    assert m["x_pitch_mean_deg"] == pytest.approx(80.0, abs=0.1)
    assert m["x_pitch_std_deg"] == pytest.approx(5.0, rel=0.02)
    shifted = pose_moments(np.stack((yaw + math.pi / 2, pitch + 0.1), 1), "x")
    assert shifted["x_yaw_mean_deg"] == pytest.approx(90.0, abs=0.3)
    assert shifted["x_pitch_mean_deg"] == pytest.approx(80.0 + math.degrees(0.1), abs=0.1)
    assert shifted["x_yaw_std_deg"] == pytest.approx(m["x_yaw_std_deg"], rel=1e-6)
    assert shifted["x_pitch_std_deg"] == pytest.approx(m["x_pitch_std_deg"], rel=1e-6)
    with_nan = pose_moments(np.array([[0.1, 1.0], [np.nan, np.nan], [0.3, 2.0]]), "x")
    assert with_nan["x_pitch_mean_deg"] == pytest.approx(math.degrees(1.5))


def test_js_of_a_perfect_pose_learner_is_near_zero():
    from pof3d.metrics import evaluate_generator
    from pof3d.presets import load_config

    cfg = load_config("tiny", ["model.z_dim=2", "data.synthetic_poses=faces"])
    perfect = evaluate_generator(_PosePrior(0.0), None, cfg, None, ["js"], num_samples=100)
    assert {"js", "js_yaw", "js_pitch", "learned_pitch_std_deg", "true_pitch_std_deg"} <= set(perfect)
    assert perfect["js"] < 0.03 and perfect["js_yaw"] < 0.005 and perfect["js_pitch"] < 0.005
    shifted = evaluate_generator(_PosePrior(1.0), None, cfg, None, ["js"], num_samples=100)
    assert shifted["js"] > 0.3 and shifted["js_yaw"] > 0.3 and shifted["js_pitch"] < 0.005


def test_reprojection_error_with_the_synthetic_sets_independent_renderer():
    """Cross-checks the camera and depth conventions against the data set's own ray caster."""
    from pof3d.data.synthetic_scene import camera, make_instance, render, setting

    def views(instance, poses, res=64):
        out = [render(instance, np.array(p), res, "faces") for p in poses]
        images = torch.stack([torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1 for rgb, _ in out])
        depth = torch.stack([torch.from_numpy(d)[None] for _, d in out])
        cams = torch.stack([torch.from_numpy(camera(np.array(p), "faces")[0]).float() for p in poses])
        return images, depth, cams

    instance, focal = make_instance("faces", 0, 3), setting("faces").focal
    pose1 = [(1.4, 1.5), (1.7, 1.6)]
    pose2 = [(h + math.radians(15), v) for h, v in pose1]
    (img1, d1, cam1), (img2, d2, cam2) = views(instance, pose1), views(instance, pose2)
    fg1, fg2 = torch.isfinite(d1), torch.isfinite(d2)
    d1, d2 = d1.nan_to_num(posinf=10.0), d2.nan_to_num(posinf=10.0)
    consistent = reprojection_error(img1, d1, cam1, img2, d2, cam2, focal, fg1, fg2)
    # Not exactly 0: anti-aliased silhouettes and part boundaries, and 8-bit colours.
    assert consistent.max() < 0.015
    bumpy = d1 + 0.03 * torch.sin(torch.linspace(0, 30, 64))
    perturbed = reprojection_error(img1, bumpy, cam1, img2, d2, cam2, focal, fg1, fg2)
    assert (perturbed > 1.5 * consistent).all()
