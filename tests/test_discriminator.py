"""Pose-aware dual discriminator: layout and size against the official code, conditioning, one backbone pass,
gradient paths, refusal of old-layout weights; EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pof3d.checkpoint import save_checkpoint
from pof3d.discriminator import Discriminator
from pof3d.ema import ema_beta, update_ema
from pof3d.errors import CheckpointError, ConfigError
from pof3d.evaluate import load_models
from pof3d.generator import Generator
from pof3d.presets import anchor, load_config

B = 4


def _cfg(*overrides: str):
    return load_config("tiny", list(overrides)).model


def _inputs(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, cfg.image_resolution, cfg.image_resolution, generator=g) * 2 - 1
    raw = torch.rand(B, 3, cfg.neural_resolution, cfg.neural_resolution, generator=g) * 2 - 1
    return image, raw


def _frontal_poses(n: int = B) -> torch.Tensor:
    return torch.full((n, 2), math.pi / 2)


@pytest.fixture(scope="module")
def disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(_cfg())


def test_shapes_at_tiny(disc: Discriminator) -> None:
    cfg = _cfg()
    image, raw = _inputs(cfg)
    logits, pred = disc(image, raw)
    assert logits.shape == (B, 1) and logits.dtype == torch.float32
    assert pred is not None and pred.shape == (B, 2)
    assert torch.isfinite(logits).all() and torch.isfinite(pred).all()
    # Blocks from 64 down to 8, each halving: 64, 32, 16, 8 -> 4x4 epilogue.
    assert len(disc.blocks) == 4
    assert disc.blocks[0].fromrgb is not None and disc.blocks[0].fromrgb.weight.shape[1] == 6
    assert all(b.fromrgb is None for b in disc.blocks[1:])


def test_pose_head_reads_the_flattened_epilogue_features(disc: Discriminator) -> None:
    cfg = _cfg()
    width = 64  # tiny: min(1024 // 4, 64) channels at 4x4
    first, last = disc.pose_head
    assert first.weight.shape == (width * 8, width * 16) and last.weight.shape == (2, width * 8)
    seen = {}
    hooks = [
        disc.conv.register_forward_hook(lambda _m, _i, out: seen.update(conv=out.flatten(1))),
        disc.pose_head.register_forward_pre_hook(lambda _m, args: seen.update(head=args[0])),
    ]
    try:
        disc(*_inputs(cfg))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen["head"], seen["conv"])  # after minibatch std and conv, not after fc


def test_pose_head_has_no_centre_offset() -> None:
    cfg = _cfg("model.yaw_center=3.14159", "model.pitch_center=1.5")
    d = Discriminator(cfg)
    last = d.pose_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.25, -0.5]))
    _, pred = d(*_inputs(cfg))
    assert torch.equal(pred, torch.tensor([[0.25, -0.5]]).expand(B, 2))  # the raw head output


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_at_anchor_matches_the_reference() -> None:
    cfg = anchor().model
    d = Discriminator(cfg)
    # The official code's DualDiscriminator at this size (C = 128 channels at 4x4, cmap_dim 128):
    # blocks 1,365,632; epilogue conv 129*9*128 + 128; fc 2048*128 + 128; out 128*128 + 128;
    # mapping embed 2*128 + 128 and 8 layers of 128*128 + 128; pose head 2048*1024 + 1024, 1024*2 + 2.
    assert _count(d.blocks) == 1_365_632
    assert _count(d.conv) == 148_736 and _count(d.fc) == 262_272 and _count(d.out) == 16_512
    assert _count(d.cmap) == 384 + 8 * 16_512
    assert _count(d.pose_head) == 2_100_226
    assert _count(d) == 4_025_858
    # Pose awareness off is the official code with c_dim = 0: no pose head, no mapping, out -> 1 logit.
    cfg.pose_aware_d = False
    plain = Discriminator(cfg)
    assert _count(plain.out) == 129
    assert _count(plain) == 1_365_632 + 148_736 + 262_272 + 129 == 1_776_769


def test_condition_mapping_is_eg3d_label_mapping(disc: Discriminator) -> None:
    cmap_dim = 64
    mapping = disc.cmap
    assert len(mapping.layers) == 8
    # Equalised learning rate: stored weights are scaled at run time, so the 0.01 in the gains is the
    # factor by which Adam's steps move the effective weights of the mapping layers; the embedding
    # trains at the full rate.
    assert mapping.embed.weight_gain == pytest.approx(1 / math.sqrt(2)) and mapping.embed.bias_gain == 1
    for layer in mapping.layers:
        assert layer.weight_gain == pytest.approx(0.01 / math.sqrt(cmap_dim))
        assert layer.bias_gain == pytest.approx(0.01)
        assert layer.activation == "lrelu"
    # Written out: raw (h, v) -> linear embed -> unit second moment -> 8 x (linear, scaled leaky ReLU).
    pose = torch.tensor([[math.pi / 2, math.pi / 2], [0.3, 2.0], [0.3 + 2 * math.pi, 2.0]])
    with torch.no_grad():
        e = mapping.embed
        x = pose @ (e.weight / math.sqrt(2)).T + e.bias
        x = x / (x.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()
        for layer in mapping.layers:
            x = x @ (layer.weight * 0.01 / math.sqrt(cmap_dim)).T + layer.bias * 0.01
            x = torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2)
        cmap = mapping(pose)
    torch.testing.assert_close(cmap, x, rtol=1e-5, atol=1e-6)
    # The angles are not wrapped: a full turn of yaw is a different condition, as in the official code.
    assert not torch.allclose(cmap[1], cmap[2], atol=1e-3)


def test_cmap_layers_is_configurable() -> None:
    assert len(Discriminator(_cfg("model.cmap_layers=2")).cmap.layers) == 2
    with pytest.raises(ConfigError, match="cmap_layers"):
        _cfg("model.cmap_layers=0")


def test_conditional_score_changes_with_condition(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg())
    frontal, _ = disc(image, raw, pose=_frontal_poses())
    side_pose = torch.tensor([[math.pi / 2 + 0.8, math.pi / 2 - 0.3]]).expand(B, 2)
    side, _ = disc(image, raw, pose=side_pose)
    assert not torch.allclose(frontal, side, atol=1e-4)
    # The same condition gives the same score, and the raw image matters (dual discrimination).
    again, _ = disc(image, raw, pose=_frontal_poses())
    assert torch.equal(frontal, again)
    other_raw, _ = disc(image, torch.zeros_like(raw), pose=_frontal_poses())
    assert not torch.allclose(frontal, other_raw, atol=1e-4)


def test_pseudo_label_is_the_predicted_pose(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg())
    logits, pred = disc(image, raw)
    conditioned, _ = disc(image, raw, pose=pred.detach())
    assert torch.allclose(logits, conditioned, atol=1e-6)


def test_pose_unaware_has_no_head_and_takes_no_condition() -> None:
    cfg = _cfg("model.pose_aware_d=false")
    d = Discriminator(cfg)
    names = [n for n, _ in d.named_parameters()]
    assert not any(n.startswith(("pose_head", "cmap")) for n in names)
    assert d.out.weight.shape[0] == 1
    image, raw = _inputs(cfg)
    logits, pred = d(image, raw)
    assert logits.shape == (B, 1) and pred is None
    with pytest.raises(ValueError, match="no pose"):
        d(image, raw, pose=_frontal_poses())
    aware = Discriminator(_cfg())
    assert sum(p.numel() for p in aware.parameters()) > sum(p.numel() for p in d.parameters())


def test_backbone_runs_once_and_equals_two_pass_reference(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg(), seed=3)
    calls = []
    hooks = [blk.register_forward_hook(lambda *_: calls.append(1)) for blk in disc.blocks]
    try:
        logits, pred = disc(image, raw)
        assert len(calls) == len(disc.blocks)  # every block exactly once
    finally:
        for h in hooks:
            h.remove()
    # The official code's two passes: predict the pose, then score again conditioned on it (detached).
    pose_pass = disc.predict_pose(disc.features(image, raw))
    score_pass = disc.score(disc.features(image, raw), pose_pass.detach())
    assert torch.allclose(pred, pose_pass, atol=1e-6)
    assert torch.allclose(logits, score_pass, atol=1e-6)


def test_gradients_reach_pose_head_only_through_pose_loss(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg(), seed=5)
    head = list(disc.pose_head.parameters())
    cmap = list(disc.cmap.parameters())

    disc.zero_grad(set_to_none=True)
    logits, pred = disc(image, raw)
    logits.sum().backward()
    assert all(p.grad is None for p in head), "adversarial score leaked into the pose head"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cmap)
    assert disc.blocks[0].conv0.weight.grad.abs().sum() > 0

    disc.zero_grad(set_to_none=True)
    _, pred = disc(image, raw)
    torch.nn.functional.mse_loss(pred, _frontal_poses() + 0.3).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert all(p.grad is None for p in cmap)
    assert disc.fc.weight.grad is None and disc.out.weight.grad is None  # the score's layers
    assert disc.conv.weight.grad.abs().sum() > 0 and disc.blocks[0].conv0.weight.grad.abs().sum() > 0
    disc.zero_grad(set_to_none=True)


def test_gradient_to_images_for_r1(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg(), seed=7)
    image.requires_grad_(True)
    raw.requires_grad_(True)
    logits, _ = disc(image, raw)
    gi, gr = torch.autograd.grad(logits.sum(), [image, raw], create_graph=True)
    assert gi.abs().sum() > 0 and gr.abs().sum() > 0


def test_bad_shapes_raise(disc: Discriminator) -> None:
    image, raw = _inputs(_cfg())
    with pytest.raises(ValueError, match="image must be"):
        disc(image[:, :, :32, :32], raw)
    with pytest.raises(ValueError, match="pose must be"):
        disc(image, raw, pose=torch.zeros(B, 3))


def _legacy_state_dict(d: Discriminator) -> dict[str, torch.Tensor]:
    """D's weights as the earlier layout stored them: head on the fc output, cos/sin embedding."""
    width = 64
    state = {k: v for k, v in d.state_dict().items() if not k.startswith(("pose_head.", "cmap."))}
    state.update(
        {
            "pose_head.0.weight": torch.randn(width // 2, width),
            "pose_head.0.bias": torch.zeros(width // 2),
            "pose_head.1.weight": torch.randn(2, width // 2),
            "pose_head.1.bias": torch.zeros(2),
            "cmap.fc0.weight": torch.randn(width, 4),
            "cmap.fc0.bias": torch.zeros(width),
            "cmap.fc1.weight": torch.randn(width, width),
            "cmap.fc1.bias": torch.zeros(width),
        }
    )
    return state


def test_old_layout_weights_are_refused_by_name(disc: Discriminator, tmp_path) -> None:
    fresh = Discriminator(_cfg())
    fresh.load_state_dict(disc.state_dict())  # the current layout loads
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="older layout"):
        fresh.load_state_dict(_legacy_state_dict(disc))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half-loaded
    # The same through a checkpoint directory, as evaluation and resuming read it.
    cfg = load_config("tiny")
    state = {"G": Generator(cfg.model).state_dict(), "D": _legacy_state_dict(disc)}
    path = save_checkpoint(tmp_path / "old", state, cfg, {"images_seen": 0})
    with pytest.raises(CheckpointError, match="older layout"):
        load_models(path)


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_beta_matches_half_life_and_rampup() -> None:
    # Without ramp-up: after ema_kimg*1000 images the old weights count half.
    beta = ema_beta(batch=32, ema_kimg=10.0, ema_rampup=None, images_seen=10**9)
    assert beta ** (10_000 / 32) == pytest.approx(0.5)
    # Ramp-up caps the half-life at images_seen * rampup early in training.
    early = ema_beta(batch=32, ema_kimg=10.0, ema_rampup=0.05, images_seen=64_000)
    assert early == pytest.approx(0.5 ** (32 / 3200))
    assert ema_beta(batch=32, ema_kimg=10.0, ema_rampup=0.05, images_seen=0) == 0.0
    late = ema_beta(batch=32, ema_kimg=10.0, ema_rampup=0.05, images_seen=10**7)
    assert late == pytest.approx(beta)


def test_update_ema_interpolates_params_and_copies_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(2.0)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, beta=0.9)
    for p_ema, p_old, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(p_ema, 0.9 * p_old + 0.1 * p.detach())
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    update_ema(ema, model, beta=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True))


def test_update_ema_refuses_mismatched_models() -> None:
    with pytest.raises(ValueError, match="parameter"):
        update_ema(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4)), beta=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_mixed_precision_on_cuda_matches_fp32() -> None:
    cfg16 = _cfg("model.num_fp16_res=2")
    torch.manual_seed(0)
    d16 = Discriminator(cfg16).cuda()
    d32 = Discriminator(_cfg()).cuda()
    d32.load_state_dict(d16.state_dict())
    assert [b.use_fp16 for b in d16.blocks] == [True, True, False, False]  # 64 and 32 px blocks
    dtypes = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype)) for b in d16.blocks]
    image, raw = (t.cuda() for t in _inputs(cfg16, seed=11))
    logits16, pose16 = d16(image, raw)
    for h in hooks:
        h.remove()
    logits32, pose32 = d32(image, raw)
    assert dtypes == [torch.float16, torch.float16, torch.float32, torch.float32]
    assert logits16.dtype == torch.float32 and pose16.dtype == torch.float32
    assert torch.allclose(logits16, logits32, atol=2e-2, rtol=2e-2)
    assert torch.allclose(pose16, pose32, atol=2e-2, rtol=2e-2)
    (logits16.sum() + pose16.square().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in d16.parameters() if p.grad is not None)
