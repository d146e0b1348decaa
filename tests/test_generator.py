"""Generator and its parts: shapes, ranges, truncation, determinism, gradient paths (tiny preset, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pof3d.camera import V_EPS, camera_direction, to_eg3d
from pof3d.errors import ConfigError
from pof3d.generator import Generator, count_parameters
from pof3d.layers import ModulatedConv2d, upsample2d
from pof3d.pose_learner import PoseLearner
from pof3d.presets import load_config
from pof3d.stylegan import MappingNetwork, SynthesisNetwork
from pof3d.superres import SuperResolution


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


@pytest.fixture()
def G(tiny):
    torch.manual_seed(0)
    return Generator(tiny)


def test_mapping_shapes_w_avg_and_truncation():
    torch.manual_seed(0)
    mapping = MappingNetwork(16, 24, num_ws=5, layers=2, lr_mult=0.01, w_avg_beta=0.5)
    z = torch.randn(6, 16)
    ws = mapping(z)
    assert ws.shape == (6, 5, 24) and ws.dtype == torch.float32
    assert torch.equal(ws[:, 0], ws[:, 4])
    assert torch.count_nonzero(mapping.w_avg) == 0
    ws = mapping(z, update_w_avg=True)
    # beta 0.5 from zero: w_avg is half the batch mean.
    torch.testing.assert_close(mapping.w_avg, 0.5 * ws[:, 0].mean(dim=0))
    truncated = mapping(torch.randn(3, 16), truncation_psi=0.0)
    torch.testing.assert_close(truncated, mapping.w_avg.expand(3, 5, 24))
    half = mapping(z, truncation_psi=0.5)
    torch.testing.assert_close(half, 0.5 * (ws + mapping.w_avg))
    # z is normalised: scaling it changes nothing.
    torch.testing.assert_close(mapping(z * 7.0), ws)


def test_synthesis_shapes_and_num_ws():
    net = SynthesisNetwork(32, 16, 3 * 4, channel_base=256, channel_max=16)
    assert net.num_ws == 1 + 2 * 2 + 1  # 4x4 (1 conv), 8x8 and 16x16 (2 convs), final ToRGB
    assert [b.conv1.weight.shape[0] for b in net.blocks] == [16, 16, 16]
    out = net(torch.randn(2, net.num_ws, 32), noise_mode="random")
    assert out.shape == (2, 12, 16, 16) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="ws must be"):
        net(torch.randn(2, net.num_ws + 1, 32))
    with pytest.raises(ValueError, match="noise_mode"):
        net(torch.randn(2, net.num_ws, 32), noise_mode="bogus")
    wide = SynthesisNetwork(8, 64, 3, channel_base=512, channel_max=64)
    assert [b.conv1.weight.shape[0] for b in wide.blocks] == [64, 64, 32, 16, 8]


def test_upsampling_modulated_conv_equals_upsample_then_conv_inside():
    torch.manual_seed(0)
    up = ModulatedConv2d(6, 5, 3, 8, up=True)
    same = ModulatedConv2d(6, 5, 3, 8)
    same.load_state_dict(up.state_dict())
    x, w = torch.randn(2, 6, 16, 16), torch.randn(2, 8)
    a, b = up(x, w), same(upsample2d(x), w)
    assert a.shape == b.shape == (2, 5, 32, 32)
    torch.testing.assert_close(a[..., 3:-3, 3:-3], b[..., 3:-3, 3:-3], rtol=1e-4, atol=1e-4)


def test_pose_learner_stays_in_range():
    torch.manual_seed(0)
    learner = PoseLearner(32, 32, yaw_center=math.pi / 2, pitch_center=math.pi / 2, init_scale=0.1)
    pose = learner(torch.randn(256, 32))
    assert pose.shape == (256, 2)
    # v = pi/2 (1 - cos phi) moves pi/2 radians per radian of polar angle at the centre.
    assert (pose - math.pi / 2).abs().max() < 0.5 * math.pi / 2
    assert pose.std(dim=0).min() > 1e-3  # not collapsed to one pose
    extreme = learner(torch.randn(256, 32) * 1e5)
    assert extreme[:, 1].min() >= V_EPS and extreme[:, 1].max() <= math.pi - V_EPS
    assert extreme[:, 1].min() < 0.1 and extreme[:, 1].max() > math.pi - 0.1  # the clamp was hit
    assert extreme[:, 0].abs().max() > 2 * math.pi  # faces: yaw is not clamped
    with pytest.raises(ValueError, match="init_scale"):
        PoseLearner(8, 8, init_scale=0.0)


def test_pose_learner_clamp_for_cars_is_hard_by_default():
    torch.manual_seed(0)
    learner = PoseLearner(16, 16, yaw_center=math.pi, pitch_center=math.pi / 2, clamp=True)
    w = torch.randn(128, 16) * 1e5
    pose = learner(w)
    assert pose[:, 0].min() >= 0.0 and pose[:, 0].max() <= 2 * math.pi
    assert pose[:, 1].min() >= V_EPS and pose[:, 1].max() <= math.pi - V_EPS
    assert ((pose[:, 0] == 0.0) | (pose[:, 0] == 2 * math.pi)).all()
    pose[:, 0].sum().backward()
    assert learner.out.weight.grad[0].abs().sum() == 0  # every yaw clamped: no gradient, as the official code


def test_pose_learner_clamp_straight_through_keeps_gradient():
    torch.manual_seed(0)
    learner = PoseLearner(
        16, 16, yaw_center=math.pi, pitch_center=math.pi / 2, clamp=True, straight_through=True
    )
    pose = learner(torch.randn(128, 16) * 1e5)
    assert ((pose[:, 0] == 0.0) | (pose[:, 0] == 2 * math.pi)).all()
    pose[:, 0].sum().backward()
    assert learner.out.weight.grad[0].abs().sum() > 0  # clamped outputs still pass gradient
    G = Generator(load_config("tiny", ["model.pose_clamp_straight_through=true"]).model)
    assert G.pose_learner.straight_through


@pytest.mark.parametrize(("r_in", "r_out"), [(16, 16), (16, 32), (16, 64), (8, 64)])
def test_superresolution_ratios(r_in, r_out):
    sr = SuperResolution(32, in_channels=8, in_resolution=r_in, out_resolution=r_out, channels=16)
    features = torch.randn(2, 8, r_in, r_in)
    out = sr(features[:, :3], features, torch.randn(2, 5, 32))
    assert out.shape == (2, 3, r_out, r_out) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="noise_mode"):
        sr(features[:, :3], features, torch.randn(2, 5, 32), noise_mode="cosnt")
    with pytest.raises(ValueError, match="ratio"):
        SuperResolution(32, 8, 16, 48)


def test_generator_outputs_shapes_and_dtypes(G, tiny):
    z = torch.randn(2, tiny.z_dim)
    out = G(z)
    r, res = tiny.neural_resolution, tiny.image_resolution
    expected = {
        "image": (2, 3, res, res),
        "image_raw": (2, 3, r, r),
        "depth": (2, 1, r, r),
        "pose": (2, 2),
        "ws": (2, G.num_ws, tiny.w_dim),
        "planes": (2, 3, tiny.triplane_channels, tiny.triplane_resolution, tiny.triplane_resolution),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert out["depth"].min() >= tiny.ray_start and out["depth"].max() <= tiny.ray_end
    assert out["image_raw"].abs().max() <= 1.0 + 1e-4
    points = torch.rand(2, 50, 3) - 0.5
    assert G.density(out["planes"], points).shape == (2, 50, 1)


def test_generator_api_pieces_compose_to_forward(G, tiny):
    G.eval()
    z = torch.randn(2, tiny.z_dim)
    out = G(z, noise_mode="const")
    ws = G.map(z)
    pose = G.predict_pose(ws)
    planes = G.synthesize_planes(ws, noise_mode="const")
    img = G.render(planes, ws, pose, noise_mode="const")
    torch.testing.assert_close(pose, out["pose"])
    torch.testing.assert_close(planes, out["planes"])
    torch.testing.assert_close(img["image"], out["image"])


def test_planes_hold_the_backbone_image_channels_innermost_and_its_gradient_keeps_its_layout(G, tiny):
    """The converted planes hold the backbone image's values (channel k of plane p is image channel
    p C + k), each texel's channels consecutive; the gradient reaches the channels-last image as one
    channels-last tensor, so the backbone's last layer gets it without another copy."""
    ws = G.map(torch.randn(2, tiny.z_dim))
    image = G.backbone(ws, noise_mode="const").detach().requires_grad_(True)
    G.backbone.forward, original = (lambda *a, **k: image), G.backbone.forward
    try:
        planes, in_place = G.synthesize_planes(ws), G.synthesize_planes(ws, convert=False)
    finally:
        G.backbone.forward = original
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert planes.permute(0, 1, 3, 4, 2).is_contiguous()  # channels innermost, plane by plane
    c = tiny.triplane_channels
    assert torch.equal(planes, image.view(2, 3, c, *image.shape[-2:])) and torch.equal(planes, in_place)
    (grad,) = torch.autograd.grad((planes * torch.randn_like(planes)).sum(), image)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_truncation_psi_zero_gives_w_avg(G, tiny):
    G.map(torch.randn(64, tiny.z_dim), update_w_avg=True)
    assert torch.count_nonzero(G.mapping.w_avg) > 0
    out = G(torch.randn(3, tiny.z_dim), truncation_psi=0.0)
    torch.testing.assert_close(out["ws"], G.mapping.w_avg.expand(3, G.num_ws, -1))


def test_truncation_keeps_the_pose_of_the_untruncated_w(G, tiny):
    """As the official code (its mapping computes the pose before truncating w): truncation changes the
    scene, not the view, unless ``model.pose_from_truncated_w``."""
    G.eval()
    G.map(torch.randn(64, tiny.z_dim), update_w_avg=True)
    z = torch.randn(3, tiny.z_dim)
    full = G(z, noise_mode="const")
    for psi in (0.5, 0.0):
        out = G(z, truncation_psi=psi, noise_mode="const")
        torch.testing.assert_close(out["pose"], full["pose"], rtol=0, atol=0)
        torch.testing.assert_close(out["ws"], G.mapping.w_avg.lerp(full["ws"], psi))
        ws, pose = G.map_with_pose(z, truncation_psi=psi)
        torch.testing.assert_close(ws, out["ws"])
        torch.testing.assert_close(pose, full["pose"])
    assert (out["pose"][0] - out["pose"][1]).abs().max() > 1e-4  # psi 0: same w, different views
    other = Generator(load_config("tiny", ["model.pose_from_truncated_w=true"]).model).eval()
    other.load_state_dict(G.state_dict())
    out = other(z, truncation_psi=0.0, noise_mode="const")
    torch.testing.assert_close(out["pose"], G.predict_pose(out["ws"]))
    torch.testing.assert_close(out["pose"][0], out["pose"][2])


def _with_noise(G: Generator) -> Generator:
    for module in G.modules():  # non-zero noise strengths, so that noise would show in the output
        if hasattr(module, "noise_strength"):
            torch.nn.init.constant_(module.noise_strength, 0.5)
    return G.eval()


def test_superresolution_runs_without_noise_by_default(tiny):
    """The official code's super-resolution never injects noise (sr_noise_mode 'none', whatever G is called
    with); ``model.sr_noise_mode=caller`` makes it follow the call's noise mode."""
    assert tiny.sr_noise_mode == "none"
    torch.manual_seed(0)
    G = _with_noise(Generator(tiny))
    z = torch.randn(2, tiny.z_dim)
    ws, pose = G.map_with_pose(z)
    planes = G.synthesize_planes(ws, noise_mode="const")
    a = G.render(planes, ws, pose, noise_mode="random")["image"]
    b = G.render(planes, ws, pose, noise_mode="random")["image"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    features = G.render(planes, ws, pose, noise_mode="none")
    caller = _with_noise(Generator(load_config("tiny", ["model.sr_noise_mode=caller"]).model))
    caller.load_state_dict(G.state_dict())
    c = caller.render(planes, ws, pose, noise_mode="random")["image"]
    assert (a - c).abs().max() > 1e-3
    torch.testing.assert_close(caller.render(planes, ws, pose, noise_mode="none")["image"], features["image"])
    with pytest.raises(ConfigError, match="sr_noise_mode"):
        load_config("tiny", ["model.sr_noise_mode=off"])


def test_fixed_seed_and_const_noise_is_deterministic(G, tiny):
    z = torch.randn(1, tiny.z_dim)
    for module in G.modules():  # non-zero noise strengths, so a noise difference would show
        if hasattr(module, "noise_strength"):
            torch.nn.init.constant_(module.noise_strength, 0.5)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(G(z, noise_mode="const"))
    for key in ("image", "image_raw", "depth", "pose"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)
    G.eval()  # no depth jitter: const noise alone makes it deterministic
    a, b = G(z, noise_mode="const")["image"], G(z, noise_mode="const")["image"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = G(z, noise_mode="random")["image"]
    assert not torch.allclose(a, c)


def test_image_gradient_reaches_pose_learner(G, tiny):
    out = G(torch.randn(2, tiny.z_dim))
    out["image"].sum().backward()
    for p in G.pose_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert G.backbone.blocks[0].const.grad.abs().sum() > 0


def test_explicit_pose_is_used(G, tiny):
    G.eval()
    z = torch.randn(1, tiny.z_dim)
    front = torch.tensor([[math.pi / 2, math.pi / 2]])
    side = torch.tensor([[math.pi / 2 + 0.6, math.pi / 2]])
    a = G(z, pose=front, noise_mode="const")
    b = G(z, pose=side, noise_mode="const")
    assert torch.equal(a["pose"], front)
    torch.testing.assert_close(a["planes"], b["planes"])
    assert (a["image"] - b["image"]).abs().max() > 1e-4


def test_state_dict_round_trip_and_deepcopy(G, tiny):
    G.eval()
    z = torch.randn(1, tiny.z_dim)
    twin = Generator(tiny).eval()
    twin.load_state_dict(G.state_dict())
    clone = copy.deepcopy(G)
    ref = G(z, noise_mode="const")["image"]
    torch.testing.assert_close(twin(z, noise_mode="const")["image"], ref)
    torch.testing.assert_close(clone(z, noise_mode="const")["image"], ref)


def test_parameter_groups_partition(G):
    pose_ids = {id(p) for p in G.pose_parameters()}
    main_ids = {id(p) for p in G.main_parameters()}
    assert pose_ids and main_ids and not pose_ids & main_ids
    assert pose_ids | main_ids == {id(p) for p in G.parameters()}


def test_count_parameters(G):
    counts = count_parameters(G)
    print("tiny generator parameters:", counts)
    assert counts["total"] == sum(p.numel() for p in G.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["pose_learner"] == 64 * 64 + 64 + 64 * 2 + 2


def test_mixed_precision_setting_is_fp32_on_cpu():
    m = load_config("tiny", ["model.num_fp16_res=2"]).model
    G = Generator(m)
    # As the official code: the backbone stays fp32 unless asked, the super-resolution follows num_fp16_res.
    assert not any(b.use_fp16 for b in G.backbone.blocks)
    assert all(b.use_fp16 for b in G.superres.blocks)
    m = load_config("tiny", ["model.num_fp16_res=2", "model.backbone_num_fp16_res=2"]).model
    G = Generator(m)
    assert [b.use_fp16 for b in G.backbone.blocks] == [False, False, True, True]
    out = G(torch.randn(1, m.z_dim))
    assert out["image"].dtype == torch.float32 and out["planes"].dtype == torch.float32


def test_anchor_preset_builds_and_runs_one_sample():
    m = load_config("anchor").model
    torch.manual_seed(0)
    G = Generator(m).eval()
    print("anchor generator parameters:", count_parameters(G))
    with torch.no_grad():
        out = G(torch.randn(1, m.z_dim), noise_mode="const")
    assert out["image"].shape == (1, 3, 128, 128)
    assert out["planes"].shape == (1, 3, 32, 256, 256)
    assert G.num_ws == 14
    assert torch.isfinite(out["image"]).all()


def test_planes_come_channels_innermost_and_render_without_a_copy() -> None:
    """Sampling reads C contiguous values per texel; the renderer's conversion must then be a no-op."""
    from pof3d.triplane import channels_last

    cfg = load_config("tiny", []).model
    G = Generator(cfg)
    planes = G.synthesize_planes(G.map(torch.randn(2, cfg.z_dim)))
    assert planes.shape == (2, 3, cfg.triplane_channels, *planes.shape[-2:])
    assert planes.stride(2) == 1  # channels innermost
    assert channels_last(planes).data_ptr() == planes.data_ptr()


@pytest.mark.parametrize("phi_deg", [0.5, 30.0, 90.0, 150.0, 179.5])
def test_polar_pitch_coordinate_places_the_camera_at_that_polar_angle(phi_deg):
    """In the polar coordinate the pitch is the camera's polar angle: the camera direction's up component
    is cos(phi), and the pose as EG3D's (h, v) has v = pi/2 (1 - cos phi)."""
    phi = math.radians(phi_deg)
    pose = torch.tensor([[0.3, phi]], dtype=torch.float64)
    direction = camera_direction(pose, "polar")
    assert float(direction[0, 1]) == pytest.approx(math.cos(phi), abs=1e-9)
    eg3d = to_eg3d(pose, "polar")
    assert float(eg3d[0, 1]) == pytest.approx(math.pi / 2 * (1 - math.cos(phi)), abs=1e-12)
    assert float(eg3d[0, 0]) == 0.3
    torch.testing.assert_close(camera_direction(eg3d, "eg3d"), direction)  # the same camera
    assert to_eg3d(pose, "eg3d") is pose


def _camera_speed(pitch: str, value: float) -> float:
    """|d camera_direction / d (pitch output)| of a generator's camera for a learner pitch ``value``."""
    learner = PoseLearner(4, 4)
    with torch.no_grad():
        learner.out.weight.zero_()
        learner.out.bias.copy_(torch.tensor([0.0, value - math.pi / 2]))
    direction = camera_direction(learner(torch.zeros(1, 4)), pitch)[0]
    grads = [torch.autograd.grad(direction[i], learner.out.bias, retain_graph=True)[0][1] for i in range(3)]
    return float(torch.stack(grads).norm())


@pytest.mark.parametrize("phi_deg", [2.0, 45.0, 90.0, 135.0, 178.0])
def test_polar_pitch_moves_the_camera_at_unit_speed_up_to_the_poles(phi_deg):
    """With the polar coordinate the camera moves one radian per radian of the learner's output
    everywhere; with EG3D's v the rate is 2 / (pi sin phi): more than 10x within a few degrees of a
    pole, which is what let near-pole latents dominate the pose learner's updates."""
    phi = math.radians(phi_deg)
    assert _camera_speed("polar", phi) == pytest.approx(1.0, rel=1e-3)
    eg3d = _camera_speed("eg3d", math.pi / 2 * (1 - math.cos(phi)))
    assert eg3d == pytest.approx(2 / (math.pi * math.sin(phi)), rel=2e-2)
    if phi_deg in (2.0, 178.0):
        assert eg3d > 10 * _camera_speed("polar", phi)


def test_generator_renders_and_reports_in_its_pitch_coordinate():
    """A polar-coordinate generator renders pose (h, phi) exactly as an EG3D one renders (h, v(phi)),
    and reports its poses to metrics as EG3D's (h, v)."""
    polar = Generator(load_config("tiny", ["model.pitch_output=polar"]).model).eval()
    eg3d = Generator(load_config("tiny", ["model.pitch_output=eg3d"]).model).eval()
    eg3d.load_state_dict(polar.state_dict())
    z = torch.randn(2, polar.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    ws = polar.map(z)
    planes = polar.synthesize_planes(ws, noise_mode="const")
    pose = torch.tensor([[1.4, 0.5], [1.7, 2.6]])
    a = polar.render(planes, ws, pose, noise_mode="const")["image_raw"]
    b = eg3d.render(planes, ws, polar.eg3d_pose(pose), noise_mode="const")["image_raw"]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    c = eg3d.render(planes, ws, pose, noise_mode="const")["image_raw"]
    assert (a - c).abs().max() > 1e-2  # the coordinate matters away from the centre


def test_pitch_coordinate_is_validated():
    with pytest.raises(ValueError, match="pitch coordinate"):
        camera_direction(torch.zeros(1, 2), "degrees")
