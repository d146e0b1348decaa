"""Generator-side behaviour checked against the official code (VivianSZF/pof3d, on EG3D).

The expected values are written out by hand from the official code's formulas, layer shapes and defaults,
not computed with our code; docs/fidelity.md lists which row each test covers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pof3d.generator import Generator, count_parameters
from pof3d.pose_learner import PoseLearner
from pof3d.presets import load_config, preset
from pof3d.renderer import VolumeRenderer
from pof3d.stylegan import MappingNetwork
from pof3d.superres import SuperResolution
from pof3d.triplane import project_to_planes

# --------------------------------------------------------------------------------------------
# Pose learner initialisation


# Initial pose spread of the official code (StyleGAN2 init of mapping and pose layers, z -> w -> pose, w_dim
# 512): the std over latents of one freshly initialised network, averaged over 16 networks, is
# 0.790 rad in yaw and 0.794 rad in pitch (45.3 and 45.5 degrees; +-0.04 from network to network).
REFERENCE_INITIAL_SPREAD = 0.79


def _reference_initial_poses(z: torch.Tensor, seed: int) -> torch.Tensor:
    """The official code's initialisation written out: every FC layer's effective weight is N(0, 1/fan_in)
    (stored N(0,1)/lr_mult, used x lr_mult/sqrt(fan_in)), biases 0, leaky ReLU 0.2 with gain sqrt(2);
    z is normalised to unit RMS, two mapping layers, then FC(512, lrelu) -> FC(2, linear)."""
    g = torch.Generator().manual_seed(seed)

    def fc(x: torch.Tensor, out: int, act: bool) -> torch.Tensor:
        y = x @ (torch.randn(out, x.shape[1], generator=g) / math.sqrt(x.shape[1])).T
        return torch.nn.functional.leaky_relu(y, 0.2) * math.sqrt(2) if act else y

    x = z * z.square().mean(dim=1, keepdim=True).add(1e-8).rsqrt()
    x = fc(fc(x, 512, True), 512, True)
    return fc(fc(x, 512, True), 2, False)


def test_initial_pose_spread_matches_the_reference_at_paper_width():
    """At w_dim 512 our mapping + pose learner start with the official code's spread: ~45 degrees per axis
    over 4096 latents around a random centre; ``pose_init_scale`` scales spread and centre offset."""
    m = load_config("ffhq256").model
    assert (m.w_dim, m.pose_hidden, m.pose_init_scale) == (512, 512, 1.0)
    z = torch.randn(4096, m.z_dim, generator=torch.Generator().manual_seed(7))
    ours, reference, offsets = [], [], []
    for seed in range(4):
        torch.manual_seed(seed)
        mapping = MappingNetwork(m.z_dim, m.w_dim, 1, layers=m.mapping_layers, lr_mult=m.mapping_lr_mult)
        torch.manual_seed(1000 + seed)
        learner = PoseLearner(m.w_dim, m.pose_hidden, init_scale=m.pose_init_scale)
        torch.manual_seed(1000 + seed)
        narrow = PoseLearner(m.w_dim, m.pose_hidden, init_scale=0.1)
        with torch.no_grad():
            w = mapping(z)[:, 0]
            # The offset from the centre before the pole guard (the official code has none for faces).
            pose = learner.out(learner.hidden(w))
            torch.testing.assert_close(learner(w)[:, 0], pose[:, 0] + math.pi / 2)
            # The same seed gives the same weights: init_scale scales the whole initial output.
            torch.testing.assert_close(narrow.out(narrow.hidden(w)), pose * 0.1, rtol=1e-4, atol=1e-5)
        ours.append(pose.std(dim=0))
        offsets.append(pose.mean(dim=0))
        reference.append(_reference_initial_poses(z, 100 + seed).std(dim=0))
    ours_mean, reference_mean = torch.stack(ours).mean(0), torch.stack(reference).mean(0)
    assert torch.allclose(reference_mean, torch.full((2,), REFERENCE_INITIAL_SPREAD), atol=0.06)
    assert torch.allclose(ours_mean, reference_mean, atol=0.08), (ours_mean, reference_mean)
    # The centre moves by a random offset of the same order (0.55-0.7 rad rms over many networks).
    assert 0.15 < torch.stack(offsets).square().mean().sqrt() < 1.2


# --------------------------------------------------------------------------------------------
# Tri-plane projection


# The official code's projection, written out by hand: grid = (2 / box_warp) * p @ inv(P_k), first two
# entries, with P_0 = I, P_1 = [[1,0,0],[0,0,1],[0,1,0]] and P_2 = [[0,0,1],[1,0,0],[0,1,0]] when
# `wrong=True` (its default), so inv(P_2) = P_2^T reads (z, x); with `wrong=False` P_2 =
# [[0,0,1],[0,1,0],[1,0,0]] reads (z, y). Points (0.1, -0.2, 0.3) at box 1 -> (0.2, -0.4, 0.6) and
# (-0.45, 0.25, -0.05) at box 1.6 -> (-0.5625, 0.3125, -0.0625).
PROJECTION_CASES = [
    ((0.1, -0.2, 0.3), 1.0, [[0.2, -0.4], [0.2, 0.6], [0.6, 0.2]], [0.6, -0.4]),
    (
        (-0.45, 0.25, -0.05),
        1.6,
        [[-0.5625, 0.3125], [-0.5625, -0.0625], [-0.0625, -0.5625]],
        [-0.0625, 0.3125],
    ),
]


@pytest.mark.parametrize(("point", "box", "reference", "correct_third"), PROJECTION_CASES)
def test_projection_matches_the_reference_formula(point, box, reference, correct_third):
    points = torch.tensor([[point]])
    quirk = project_to_planes(points, box, quirk=True)
    assert quirk.shape == (1, 1, 3, 2)
    torch.testing.assert_close(quirk[0, 0], torch.tensor(reference), rtol=0, atol=1e-6)
    correct = project_to_planes(points, box, quirk=False)
    torch.testing.assert_close(correct[0, 0, :2], torch.tensor(reference[:2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(correct[0, 0, 2], torch.tensor(correct_third), rtol=0, atol=1e-6)


def test_quirk_is_the_default_as_in_the_reference():
    assert preset("ffhq256").model.triplane_quirk and preset("cars128").model.triplane_quirk
    assert VolumeRenderer(preset("tiny").model).quirk


# --------------------------------------------------------------------------------------------
# Super-resolution layout and parameter counts


def _layer(i: int, o: int) -> int:
    """The official code's modulated 3x3 SynthesisLayer: affine FC(512 -> i), weight, bias, noise strength."""
    return 512 * i + i + o * i * 9 + o + 1


def _block(i: int, o: int) -> int:
    """Two layers and a ToRGB (affine FC(512 -> o), 1x1 weight to 3 channels, bias)."""
    return _layer(i, o) + _layer(o, o) + 512 * o + o + 3 * o + 3


# SuperresolutionHybrid2X/4X: blocks 32 -> 128 -> 64; SuperresolutionHybrid8XDC: 32 -> 256 -> 128.
REFERENCE_SR_4X = _block(32, 128) + _block(128, 64)  # 574,954
REFERENCE_SR_8XDC = _block(32, 256) + _block(256, 128)  # 1,649,578
REFERENCE_POSE_LEARNER = 512 * 512 + 512 + 512 * 2 + 2  # affine_layer1, affine_layer2
REFERENCE_DECODER = 32 * 64 + 64 + 64 * 33 + 33  # OSGDecoder: FC(32 -> 64), softplus, FC(64 -> 1 + 32)


def _counts(name: str) -> dict[str, int]:
    with torch.device("meta"):  # shapes only: no memory, no time
        return count_parameters(Generator(load_config(name).model))


def test_parameter_counts_at_anchor_and_paper_presets():
    anchor = _counts("anchor")
    assert anchor["total"] == 4_024_570  # the benchmark size must not drift
    assert (anchor["backbone"], anchor["mapping"]) == (2_656_365, 525_312)
    for name in ("anchor", "ffhq256", "cats256", "cars128", "ffhq512"):
        counts = _counts(name)
        assert counts["pose_learner"] == REFERENCE_POSE_LEARNER
        assert counts["decoder"] == REFERENCE_DECODER
        assert counts["superres"] == (REFERENCE_SR_8XDC if name == "ffhq512" else REFERENCE_SR_4X)
    assert _counts("ffhq256")["total"] == 29_575_738


@pytest.mark.parametrize(
    ("r_out", "pre_scale", "ups"),
    [(16, 1, [False, False]), (32, 1, [False, True]), (64, 2, [False, True]), (128, 2, [True, True])],
)
def test_superresolution_layout_is_the_references(r_out, pre_scale, ups):
    """2x (Hybrid2X): a block at 64 then an upsampling block; 4x (Hybrid4X): inputs resized bilinearly
    to 128, a block at 128, an upsampling block; 8x (Hybrid8XDC): resized to 128, two upsampling blocks."""
    sr = SuperResolution(32, in_channels=8, in_resolution=16, out_resolution=r_out, channels=16)
    assert sr.pre_scale == pre_scale and [b.up for b in sr.blocks] == ups
    assert [b.resolution for b in sr.blocks] == [16 * pre_scale * (2 if ups[0] else 1), r_out]


def test_4x_superresolution_resizes_then_runs_a_block_at_half_the_output_size():
    torch.manual_seed(0)
    sr = SuperResolution(32, in_channels=8, in_resolution=16, out_resolution=64, channels=16).eval()
    features, ws = torch.randn(2, 8, 16, 16), torch.randn(2, 5, 32)
    out = sr(features[:, :3], features, ws, noise_mode="none")
    x = F.interpolate(features, size=(32, 32), mode="bilinear", align_corners=False)
    img = x[:, :3]
    for block in sr.blocks:
        x, img = block(x, img, ws[:, -1:].expand(-1, 3, -1), "none")
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, img)
