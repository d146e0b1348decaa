"""Tri-plane lookup, rays and volume rendering checked against analytic scenes.

Scenes are built from "coordinate planes": each plane stores the world coordinates of its texel
centres, so bilinear sampling returns the sampled point exactly and a test decoder can define any
density field of the point (a sphere, a shell) while the real sampling code runs unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pof3d.camera import intrinsics, pose_to_cam2world
from pof3d.presets import preset
from pof3d.renderer import VolumeRenderer, importance_depths, make_rays
from pof3d.triplane import TriplaneDecoder, sample_triplanes

FRONTAL = torch.tensor([[math.pi / 2, math.pi / 2]])
RADIUS = 2.7
FOCAL = 4.26
BOX = 8.0  # large enough that every sample of [ray_start, ray_end] is far from the planes' border
EMPTY = -40.0  # raw density whose activation softplus(-41) is ~1e-18


def coordinate_planes(resolution: int = 32, box_warp: float = BOX) -> torch.Tensor:
    """[1, 3, 2, R, R]: channel 0 = the plane's width axis coordinate, channel 1 = its height axis."""
    centres = (torch.arange(resolution, dtype=torch.float32) * 2 + 1) / resolution - 1
    world = centres * box_warp / 2
    width = world.view(1, -1).expand(resolution, resolution)
    height = world.view(-1, 1).expand(resolution, resolution)
    plane = torch.stack((width, height))
    return plane.expand(1, 3, 2, resolution, resolution).clone()


def points_of(sampled: torch.Tensor) -> torch.Tensor:
    """Recover world points from coordinate-plane samples [B, 3, N, 2] (xy plane + z of xz plane)."""
    return torch.stack((sampled[:, 0, :, 0], sampled[:, 0, :, 1], sampled[:, 1, :, 1]), dim=-1)


def raw_for(sigma: float) -> float:
    """Raw density whose activation softplus(raw - 1) equals ``sigma``."""
    return 1.0 + math.log(math.expm1(sigma))


class ShellField(nn.Module):
    """Density ``sigma`` where inner <= |p| <= outer, empty elsewhere; constant colour. Records queries."""

    def __init__(self, inner: float, outer: float, sigma: float, channels: int = 4, colour: float = 0.25):
        super().__init__()
        self.inner, self.outer, self.raw = inner, outer, raw_for(sigma)
        self.channels, self.colour = channels, colour
        self.queries: list[torch.Tensor] = []

    def forward(self, sampled: torch.Tensor) -> dict[str, torch.Tensor]:
        points = points_of(sampled)
        self.queries.append(points.detach())
        r = points.norm(dim=-1, keepdim=True)
        inside = (r >= self.inner) & (r <= self.outer)
        sigma = torch.where(inside, self.raw, EMPTY)
        rgb = torch.full((*points.shape[:-1], self.channels), self.colour)
        return {"rgb": rgb, "sigma": sigma}


def renderer(**changes) -> VolumeRenderer:
    m = dataclasses.replace(preset("ffhq256").model, box_warp=BOX, **changes)
    return VolumeRenderer(m).eval()


def frontal_rays(resolution: int, pivot=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    c2w = pose_to_cam2world(FRONTAL, RADIUS, pivot)
    return make_rays(c2w, intrinsics(FOCAL), resolution)


def constant_decoder(sigma: float, colour_logit: float = 0.0, channels: int = 4) -> TriplaneDecoder:
    """A real decoder made constant: zero output weights, bias = (raw density, colour logits)."""
    dec = TriplaneDecoder(2, 8, channels)
    with torch.no_grad():
        dec.out.weight.zero_()
        dec.out.bias.fill_(colour_logit)
        dec.out.bias[0] = raw_for(sigma) if sigma > 0 else EMPTY
    return dec


# --------------------------------------------------------------------------------------------
# Tri-plane sampling


def test_sample_triplanes_projects_onto_xy_xz_zy():
    points = torch.tensor([[[0.3, -0.2, 0.1], [-1.1, 0.7, 2.5], [0.0, 0.0, 0.0]]])
    out = sample_triplanes(coordinate_planes(), points, BOX)
    assert out.shape == (1, 3, 3, 2)
    x, y, z = points[0].unbind(-1)
    expected = torch.stack((torch.stack((x, y), -1), torch.stack((x, z), -1), torch.stack((z, y), -1)))
    assert torch.allclose(out[0], expected, atol=1e-5)


def test_quirk_reads_third_plane_at_z_x():
    points = torch.tensor([[[0.3, -0.2, 0.1], [-1.1, 0.7, 2.5]]])
    out = sample_triplanes(coordinate_planes(), points, BOX, quirk=True)
    x, y, z = points[0].unbind(-1)
    assert torch.allclose(out[0, :2], sample_triplanes(coordinate_planes(), points, BOX)[0, :2])
    assert torch.allclose(out[0, 2], torch.stack((z, x), -1), atol=1e-5)


def test_box_warp_scales_the_box_and_outside_is_zero():
    planes = torch.ones(2, 3, 5, 16, 16)
    inside = torch.full((2, 1, 3), 0.3)  # inside a box of side 1
    outside = torch.tensor([[[0.0, 0.0, 0.6]], [[-0.7, 0.0, 0.0]]])  # beyond 0.5 on one axis
    out = sample_triplanes(planes, torch.cat((inside, outside), dim=1), box_warp=1.0)
    assert torch.allclose(out[:, :, 0], torch.ones(2, 3, 5))
    # Each outside point leaves the box along one axis: the two planes that see that axis read zero.
    assert out[:, :, 1].sum(dim=-1).count_nonzero().item() == 2
    assert (out[:, :, 1] == 0).sum().item() == 2 * 2 * 5
    wide = sample_triplanes(planes, outside, box_warp=2.0)
    assert torch.allclose(wide, torch.ones_like(wide))


def test_sample_triplanes_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, C, R, R\]"):
        sample_triplanes(torch.zeros(1, 2, 4, 8, 8), torch.zeros(1, 5, 3), 1.0)
    with pytest.raises(ValueError, match="points must be"):
        sample_triplanes(torch.zeros(1, 3, 4, 8, 8), torch.zeros(2, 5, 3), 1.0)


def test_deferred_colour_map_renders_the_same_image():
    """Applying the decoder's widening after compositing gives the same features and gradients."""
    torch.manual_seed(0)
    m = preset("tiny").model
    renderer = VolumeRenderer(m).eval()
    decoder = TriplaneDecoder(m.triplane_channels, m.decoder_hidden, m.decoder_features)
    planes = (torch.randn(2, 3, m.triplane_channels, 16, 16) * 2).requires_grad_(True)
    cam = pose_to_cam2world(torch.tensor([[1.4, 1.6], [1.8, 1.5]]), m.camera_radius, m.pivot)
    origins, dirs = make_rays(cam, intrinsics(m.focal, 2), 8)

    def eager_decoder(sampled: torch.Tensor) -> dict[str, torch.Tensor]:
        return decoder(sampled)  # not a TriplaneDecoder: the renderer cannot defer its colour map

    results = []
    for dec in (decoder, eager_decoder):
        out = renderer(planes, dec, origins, dirs)
        (grad,) = torch.autograd.grad(out["features"].square().sum(), planes)
        results.append((out["features"], out["depth"], grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_centre_pixel_looks_forward_and_origins_are_camera():
    c2w = pose_to_cam2world(torch.tensor([[1.2, 1.9], [2.0, 1.3]]), RADIUS, (0.0, 0.0, 0.2))
    origins, dirs = make_rays(c2w, intrinsics(FOCAL, 2), 5)
    assert origins.shape == dirs.shape == (2, 25, 3)
    assert torch.allclose(dirs[:, 12], c2w[:, :3, 2], atol=1e-6)  # pixel (2, 2) of 5x5
    assert torch.allclose(origins, c2w[:, None, :3, 3].expand(2, 25, 3))
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, 25), atol=1e-6)


def test_ray_directions_follow_pinhole_model():
    """In camera coordinates pixel (row i, col j) looks along ((u - 1/2) / f, (v - 1/2) / f, 1)."""
    res = 4
    c2w = pose_to_cam2world(torch.tensor([[1.0, 1.7]]), RADIUS, (0.0, 0.0, 0.2))
    _, dirs = make_rays(c2w, intrinsics(FOCAL), res)
    cam = dirs[0] @ c2w[0, :3, :3]  # world -> camera
    centres = (torch.arange(res) + 0.5) / res
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    expected = torch.stack(((cols - 0.5) / FOCAL, (rows - 0.5) / FOCAL, torch.ones_like(rows)), -1)
    expected = torch.nn.functional.normalize(expected.reshape(-1, 3), dim=-1)
    assert torch.allclose(cam, expected, atol=1e-6)
    assert cam[0, 0] < 0 and cam[0, 1] < 0  # first ray: top-left (x right, y down)


# --------------------------------------------------------------------------------------------
# Volume rendering


@pytest.mark.parametrize("white", [False, True])
def test_uniform_density_gives_exponential_opacity(white):
    sigma, start, end, n = 1.5, 2.25, 3.3, 48
    r = renderer(white_background=white)
    origins, dirs = frontal_rays(6)
    out = r(torch.zeros(1, 3, 2, 8, 8), constant_decoder(sigma, colour_logit=0.0), origins, dirs)
    # Deterministic stratified samples sit at bin centres; importance samples stay between them.
    length = (end - start) * (n - 1) / n
    opacity = 1 - math.exp(-sigma * length)
    assert torch.allclose(out["weights_sum"], torch.full((1, 36, 1), opacity), atol=1e-5)
    colour = 0.5 * (1 + 2e-3) - 1e-3  # sigmoid(0), widened as EG3D
    composite = opacity * colour + ((1 - opacity) if white else 0.0)
    assert torch.allclose(out["features"], torch.full((1, 36, 4), 2 * composite - 1), atol=1e-5)
    a, lam = start + (end - start) / (2 * n), sigma
    expected_depth = a + 1 / lam - length * math.exp(-lam * length) / (1 - math.exp(-lam * length))
    assert torch.allclose(out["depth"], torch.full((1, 36, 1), expected_depth), atol=0.01)


def test_jittered_samples_stay_inside_the_depth_range():
    sigma, start, end, n = 1.5, 2.25, 3.3, 48
    r = renderer().train()
    origins, dirs = frontal_rays(8)
    out = r(torch.zeros(1, 3, 2, 8, 8), constant_decoder(sigma), origins, dirs)
    most = 1 - math.exp(-sigma * (end - start))
    least = 1 - math.exp(-sigma * (end - start) * (n - 2) / n)
    assert (out["weights_sum"] <= most + 1e-6).all() and (out["weights_sum"] >= least - 1e-6).all()
    assert out["weights_sum"].std() > 0  # jitter really changes the samples between rays


def test_empty_space_is_transparent_and_white_background_is_white():
    origins, dirs = frontal_rays(6)
    for white, value in ((True, 1.0), (False, -1.0)):
        out = renderer(white_background=white)(
            torch.zeros(1, 3, 2, 8, 8), constant_decoder(0.0), origins, dirs
        )
        assert out["weights_sum"].abs().max() < 1e-6
        assert torch.allclose(out["features"], torch.full_like(out["features"], value), atol=1e-5)
        assert torch.all(out["depth"] <= 3.3) and torch.all(out["depth"] >= 3.25)  # empty rays: far


def sphere_hits(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry depth and chord length of rays through a sphere at the origin (nan where missed)."""
    b = (origins * dirs).sum(-1)
    disc = b**2 - (origins.square().sum(-1) - radius**2)
    root = disc.clamp_min(0).sqrt()
    entry = torch.where(disc > 0, -b - root, torch.nan)
    return entry, torch.where(disc > 0, 2 * root, 0.0)


def test_dense_sphere_depth_and_silhouette():
    radius, res = 0.2, 16
    origins, dirs = frontal_rays(res)
    field = ShellField(0.0, radius, sigma=300.0)
    out = renderer()(coordinate_planes(), field, origins, dirs)
    entry, chord = sphere_hits(origins[0], dirs[0], radius)
    solid = chord > 0.1  # rays well inside the silhouette
    missed = chord == 0
    assert solid.sum() > 20 and missed.sum() > 20
    assert (out["weights_sum"][0, solid, 0] > 0.999).all()
    assert (out["weights_sum"][0, missed, 0] < 1e-6).all()
    depth = out["depth"][0, solid, 0]
    assert (depth - entry[solid]).abs().max() < 1.05 / 48  # within one coarse interval of the surface


def test_uniform_sphere_opacity_follows_chord_length():
    sigma, radius = 2.0, 0.3
    origins, dirs = frontal_rays(12)
    out = renderer()(coordinate_planes(), ShellField(0.0, radius, sigma), origins, dirs)
    _, chord = sphere_hits(origins[0], dirs[0], radius)
    expected = 1 - torch.exp(-sigma * chord)
    hit = chord > 0
    # Intervals that straddle the surface carry (almost) no density: at most one coarse interval
    # (1.05 / 48) of chord is lost at each end of the ray's segment inside the sphere.
    slack = sigma * 2 * 1.05 / 48
    err = out["weights_sum"][0, :, 0] - expected
    assert (err[hit] <= 1e-5).all() and (err[hit] >= -slack).all()
    assert err[hit].abs().mean() < slack / 2


def test_importance_samples_concentrate_on_a_thin_shell():
    inner, outer = 0.25, 0.27
    origins, dirs = frontal_rays(8)
    field = ShellField(inner, outer, sigma=60.0)
    renderer()(coordinate_planes(), field, origins, dirs)
    coarse, fine = (q.norm(dim=-1) for q in field.queries)
    assert coarse.shape == fine.shape == (1, 64 * 48)
    _, chord = sphere_hits(origins[0], dirs[0], outer)
    through = (chord > 0.2).repeat_interleave(48)  # rays that cross the shell well inside its rim
    band = 1.05 / 48
    near_shell = (fine >= inner - band) & (fine <= outer + band)
    near_coarse = (coarse >= inner - band) & (coarse <= outer + band)
    assert near_shell[0, through].float().mean() > 0.6
    assert near_shell[0, through].float().mean() > 3 * near_coarse[0, through].float().mean()


def test_importance_depths_follow_the_weights():
    depths = torch.linspace(0.0, 1.0, 11).expand(2, 3, 11)
    weights = torch.zeros(2, 3, 10)
    weights[..., 6] = 1.0  # all opacity in [0.6, 0.7]
    for jitter in (False, True):
        fine = importance_depths(depths, weights, 200, jitter)
        assert fine.shape == (2, 3, 200)
        assert ((fine >= 0) & (fine <= 1)).all()
        # Smoothing spreads the peak to its neighbours: [0.5, 0.8] holds 2 / (2 + 10 * 0.01) of the mass.
        share = ((fine >= 0.5) & (fine <= 0.8)).float().mean()
        assert share > 0.9
        assert ((fine >= 0.6) & (fine <= 0.7)).float().mean() > 0.4


def test_eval_rendering_is_deterministic_and_no_importance_works():
    origins, dirs = frontal_rays(4)
    planes = torch.randn(1, 3, 2, 8, 8)
    dec = TriplaneDecoder(2, 8, 4)
    r = renderer()
    a, b = r(planes, dec, origins, dirs), r(planes, dec, origins, dirs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    coarse_only = renderer(importance_samples=0)(planes, dec, origins, dirs)
    assert coarse_only["features"].shape == (1, 16, 4)


def test_density_matches_decoder_sigma():
    r = renderer()
    planes, dec = torch.randn(2, 3, 2, 8, 8), TriplaneDecoder(2, 8, 4)
    points = torch.rand(2, 10, 3) * 6 - 3
    sigma = r.density(planes, dec, points)
    assert sigma.shape == (2, 10, 1)
    # The renderer sums the planes in its own order (the CPU kernel), so equal up to float rounding.
    expected = dec(sample_triplanes(planes, points, BOX, quirk=True))["sigma"]
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-6)


class ThirdPlaneHeight(nn.Module):
    """Reports as density what the zy plane reads along its height axis."""

    def forward(self, sampled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sigma": sampled[:, 2, :, 1:2], "rgb": sampled[:, 2]}


def test_triplane_quirk_flag_reaches_the_renderer():
    points = torch.tensor([[[0.3, -0.2, 0.1], [-1.1, 0.7, 2.5]]])
    correct = renderer(triplane_quirk=False).density(coordinate_planes(), ThirdPlaneHeight(), points)
    quirk = renderer(triplane_quirk=True).density(coordinate_planes(), ThirdPlaneHeight(), points)
    assert torch.allclose(correct[0, :, 0], points[0, :, 1], atol=1e-5)  # y
    assert torch.allclose(quirk[0, :, 0], points[0, :, 0], atol=1e-5)  # x


def test_shapes_dtypes_and_gradients_reach_planes_decoder_and_pose():
    m = preset("tiny").model
    r = VolumeRenderer(m).train()
    b, res = 2, 6
    planes = (torch.randn(b, 3, m.triplane_channels, 16, 16) * 0.5).requires_grad_(True)
    dec = TriplaneDecoder(m.triplane_channels, m.decoder_hidden, m.decoder_features)
    pose = torch.tensor([[1.4, 1.6], [1.7, 1.5]], requires_grad=True)
    c2w = pose_to_cam2world(pose, m.camera_radius, m.pivot)
    origins, dirs = make_rays(c2w, intrinsics(m.focal, b), res)
    out = r(planes, dec, origins, dirs)
    assert out["features"].shape == (b, res * res, m.decoder_features)
    assert out["depth"].shape == out["weights_sum"].shape == (b, res * res, 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert out["features"].min() >= -1.01 and out["features"].max() <= 1.01
    (out["features"].sum() + out["depth"].sum()).backward()
    assert planes.grad.abs().sum() > 0 and torch.isfinite(planes.grad).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())
    assert pose.grad.abs().min() > 0 and torch.isfinite(pose.grad).all()
