"""train.precision: which parts of G and D compute in which dtype, and how far bf16 and fp16 move the
losses and gradients of a training step from fp32.

The comparisons run each phase twice on one fixed batch (the tiny networks of tests/loss_setup.py, G in
eval mode with constant noise, the RNGs reseeded before each run, as tests/test_losses.py does), once in
fp32 and once in the reduced mode, and measure the relative difference of every loss and the relative L2
norm of the difference of each network's flattened gradient.
"""

from __future__ import annotations

import random

import pytest
import torch
from loss_setup import loss_cfg

from pof3d import precision
from pof3d.config import Config
from pof3d.discriminator import Discriminator
from pof3d.errors import ConfigError
from pof3d.generator import Generator
from pof3d.loss import PoF3DLoss, schedule
from pof3d.presets import PRESETS, load_config
from pof3d.stylegan import SynthesisBlock

PHASES = ("G_main", "G_density", "D_main", "D_r1")
# fp16 needs layers marked for reduced precision: the tiny preset has none (num_fp16_res=0).
FP16_MODEL = ("model.num_fp16_res=2",)

# Tolerances, about 3x the errors measured on this batch (on a CPU with native bfloat16, torch 2.13):
# phase -> {"loss": largest relative error of the phase's losses, "G" / "pose" / "D": relative L2 error of
# the gradient of G's main parameters / of the pose learner / of D}. Measured with the renderer reading the
# decoder through its plane-sum path; the earlier per-plane path gave errors within 1.5x of these.
BF16_TOLERANCE = {
    # measured: losses 3.6e-3, G 5.4e-2, pose learner 1.1e-2 (1.4e-1 while the mapping ran in bf16)
    "G_main": {"loss": 1.5e-2, "G": 0.2, "pose": 0.1},
    # measured: loss 8.0e-4, G 1.3e-1 (the decoder computes densities in fp32 here, see Generator.density)
    "G_density": {"loss": 4e-3, "G": 0.35},
    # measured: losses 9.3e-3, D 4.5e-2
    "D_main": {"loss": 3.5e-2, "D": 0.1},
    # measured: loss 4.5e-3, D 5.7e-2. R1 is a squared gradient norm, so it doubles the gradient's error,
    # and over seeds 0-4 of networks and batch its loss error spread over 7.1e-4-6.8e-2 (7.2e-5-1.9e-2
    # before the activations' gains were folded into the weights and D took the official resampling,
    # pof3d.layers, which moved every rounding of bfloat16 and made the penalty itself 0.4-0.8x as large).
    "D_r1": {"loss": 2.5e-2, "D": 0.15},
}
# fp16 with num_fp16_res=2: D's 64 and 32 px blocks and both super-resolution blocks in float16.
FP16_TOLERANCE = {
    # measured: losses 2.8e-4, G 1.8e-2, pose learner 6.6e-3
    "G_main": {"loss": 1e-3, "G": 0.11, "pose": 0.16},
    # measured: exactly 0 (the backbone and the decoder stay fp32 with backbone_num_fp16_res=0)
    "G_density": {"loss": 0.0, "G": 0.0},
    # measured: losses 3.2e-4, D 5.0e-3
    "D_main": {"loss": 1e-3, "D": 2e-2},
    # measured: loss 1.6e-3, D 5.6e-2. Over seeds 0-3 of networks and batch: loss 3.1e-4-2.6e-2, D
    # 1.7e-3-1.9e-1 (8.0e-4-2.6e-3 and 1.5e-3-7.2e-3 with the reflect-padded, one pixel shifted resampling
    # before D took the official code's, pof3d.layers.resample_filter). Not the layers' arithmetic: a down
    # block's R1 gradient is as close to float64 in float16 either way (6e-4). Most of D's R1 gradient is
    # that of the pose conditioning's embedding (cmap.embed), which sums contributions that mostly cancel.
    "D_r1": {"loss": 5e-3, "D": 0.15},
}
# Over seeds 0-4 of networks and batch the errors spread widely: bf16 pose learner 0.1 %-19 %, D_r1's D
# 5.7 %-17 % (0.3 %-29 % and 5 %-28 % while the mapping still ran in bf16). The pose learner's gradient
# sums the contributions of every rendered pixel, which mostly cancel, so a small error in each leaves a
# large relative error in the sum.


def _nets(*overrides: str) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    cfg = loss_cfg(*overrides)
    return Generator(cfg.model).eval(), Discriminator(cfg.model)


@pytest.fixture(scope="module")
def fp16_nets() -> tuple[Generator, Discriminator]:
    return _nets(*FP16_MODEL)


def _run(nets, real, phase: str, *overrides: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One phase from a fixed RNG state: its losses and the flattened gradients of G's main parameters,
    the pose learner and D (zeros where a parameter got none)."""
    G, D = nets
    cfg = loss_cfg(*overrides)
    for p in list(G.parameters()) + list(D.parameters()):
        p.grad = None
    random.seed(0)
    torch.manual_seed(0)
    step = next(p for p in schedule(cfg) if p.name == phase)
    figures = PoF3DLoss(G, D, cfg, noise_mode="const").accumulate_gradients(step, real)
    losses = {k: float(v) for k, v in figures.items() if k.startswith("loss/")}

    def flat(params) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    grads = {"G": flat(G.main_parameters()), "pose": flat(G.pose_parameters()), "D": flat(D.parameters())}
    return losses, grads


def _errors(nets, real, phase: str, mode: str, *model: str) -> dict[str, float]:
    """Relative errors of ``mode`` against fp32: the largest over the phase's losses, and per network."""
    ref_losses, ref_grads = _run(nets, real, phase, *model, "train.precision=fp32")
    losses, grads = _run(nets, real, phase, *model, f"train.precision={mode}")
    errors = {"loss": max(abs(losses[k] - ref_losses[k]) / abs(ref_losses[k]) for k in ref_losses)}
    for name, ref in ref_grads.items():
        if float(ref.norm()) > 0:
            errors[name] = float((grads[name] - ref).norm() / ref.norm())
    return errors


def test_precision_is_a_validated_train_field_auto_by_default() -> None:
    assert all(PRESETS[name].build().train.precision == "auto" for name in PRESETS)
    assert load_config("tiny", ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision='half': expected auto, fp32, bf16 or fp16"):
        load_config("tiny", ["train.precision=half"])
    # A config saved before the field existed trains as before.
    saved = load_config("tiny").to_dict()
    del saved["train"]["precision"]
    assert Config.from_dict(saved).train.precision == "auto"


def test_one_rule_decides_each_parts_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    half, bf16 = torch.float16, torch.bfloat16
    # (mode, device, network, reduced) -> dtype; None is float32.
    expected = {
        ("auto", cuda, "D", True): half,
        ("auto", cuda, "G", True): bf16,
        ("auto", cuda, "D", False): None,
        ("auto", cpu, "D", True): None,
        ("auto", cpu, "G", True): None,
        ("fp32", cuda, "D", True): None,
        ("fp32", cpu, "G", True): None,
        ("fp16", cpu, "D", True): half,
        ("fp16", cpu, "G", True): half,
        ("fp16", cuda, "G", False): None,
        ("bf16", cpu, "G", False): bf16,
        ("bf16", cuda, "D", True): bf16,
    }
    for (mode, device, network, reduced), dtype in expected.items():
        with precision.training(mode):
            assert precision.part_dtype(device, network, reduced) == dtype, (mode, device, network, reduced)
    assert precision.current() == "auto"  # restored after each phase


@pytest.mark.parametrize("phase", PHASES)
def test_fp32_is_bit_identical_to_auto_on_cpu(nets, real, phase: str) -> None:
    auto_losses, auto_grads = _run(nets, real, phase)
    losses, grads = _run(nets, real, phase, "train.precision=fp32")
    assert losses == auto_losses
    assert all(torch.equal(grads[k], auto_grads[k]) for k in grads)


@pytest.mark.parametrize("phase", PHASES)
def test_bf16_losses_and_gradients_stay_close_to_fp32(nets, real, phase: str) -> None:
    errors = _errors(nets, real, phase, "bf16")
    tolerance = BF16_TOLERANCE[phase]
    assert errors.keys() == tolerance.keys()
    for name, error in errors.items():
        assert error <= tolerance[name], (phase, name, error)
    # bfloat16 was applied: a gradient computed through it is not fp32's to the last bit.
    assert all(errors[name] > 1e-4 for name in ("G", "D") if name in errors), errors


@pytest.mark.parametrize("phase", PHASES)
def test_fp16_losses_and_gradients_stay_close_to_fp32(fp16_nets, real, phase: str) -> None:
    errors = _errors(fp16_nets, real, phase, "fp16", *FP16_MODEL)
    tolerance = FP16_TOLERANCE[phase]
    assert errors.keys() == tolerance.keys()
    for name, error in errors.items():
        assert error <= tolerance[name], (phase, name, error)
    if phase != "G_density":  # the only phase that runs no float16 layer
        assert all(errors[name] > 1e-5 for name in ("G", "D") if name in errors), errors


def _output_dtypes(modules: dict[str, torch.nn.Module], run) -> dict[str, torch.dtype]:
    """The dtype of each module's (first tensor) output during ``run()``."""
    seen: dict[str, torch.dtype] = {}

    def hook(name):
        def record(_module, _inputs, out):
            values = [out] if torch.is_tensor(out) else out.values() if isinstance(out, dict) else out
            first = next(v for v in values if torch.is_tensor(v))
            seen.setdefault(name, first.dtype)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_bf16_runs_convolutions_in_bfloat16_and_hands_float32_on(nets, real) -> None:
    G, D = nets
    modules = {
        "backbone": G.backbone.blocks[-1].conv1,
        "superres": G.superres.blocks[-1].conv1,
        "D block": D.blocks[0].conv0,
        "D epilogue": D.conv,
        "D heads": D.pose_head,
        # float32 by design
        "mapping": G.mapping.layers[0],
        "pose learner": G.pose_learner,
        "renderer": G.renderer,
        "D": D,
    }
    seen = _output_dtypes(modules, lambda: _run(nets, real, "G_main", "train.precision=bf16"))
    reduced = ("backbone", "superres", "D block", "D epilogue", "D heads")
    assert {k: seen[k] for k in reduced} == dict.fromkeys(reduced, torch.bfloat16)
    kept = ("mapping", "pose learner", "renderer", "D")
    assert {k: seen[k] for k in kept} == dict.fromkeys(kept, torch.float32)
    # Autocast, not conversion: parameters and their gradients stay float32.
    assert all(p.dtype == torch.float32 for p in [*G.parameters(), *D.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in G.parameters() if p.grad is not None)


def test_bf16_decoder_computes_in_bfloat16_and_returns_float32(nets) -> None:
    G, _ = nets
    sampled = torch.randn(2, 3, 50, G.cfg.triplane_channels, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = G.decoder(sampled)
        with precision.training("bf16"):
            out = G.decoder(sampled)
            density = G.density(G.synthesize_planes(G.map(torch.zeros(1, G.cfg.z_dim))), torch.zeros(1, 4, 3))
    for key in ("rgb", "sigma"):
        assert out[key].dtype == torch.float32
        assert 0 < float((out[key] - ref[key]).abs().max()) < 0.1
    assert density.dtype == torch.float32


def test_fp16_runs_the_marked_layers_in_float16(fp16_nets) -> None:
    G, D = fp16_nets
    modules = {
        "D 64 px": D.blocks[0].conv0,
        "D 32 px": D.blocks[1].conv0,
        "D 16 px": D.blocks[2].conv0,
        "D epilogue": D.conv,
        "superres": G.superres.blocks[0].conv1,
        "backbone": G.backbone.blocks[-1].conv1,
        "mapping": G.mapping.layers[0],
    }

    def forward() -> None:
        with torch.no_grad(), precision.training("fp16"):
            fake = G(torch.randn(2, G.cfg.z_dim), noise_mode="const")
            D(fake["image"], fake["image_raw"])

    seen = _output_dtypes(modules, forward)
    assert seen == {
        "D 64 px": torch.float16,
        "D 32 px": torch.float16,
        "D 16 px": torch.float32,
        "D epilogue": torch.float32,
        "superres": torch.float16,
        "backbone": torch.float32,
        "mapping": torch.float32,
    }


def test_fp16_clamps_the_synthesis_conv_outputs_as_the_official_code() -> None:
    torch.manual_seed(0)
    block = SynthesisBlock(8, 8, 16, 8, 3, up=False, use_noise=False, use_fp16=True)
    with torch.no_grad():
        block.conv1.bias.fill_(1000.0)  # far past the +-256 clamp
        block.torgb.bias.fill_(-1000.0)
    x, ws = torch.randn(2, 8, 8, 8), torch.randn(2, 3, 16)
    with torch.no_grad():
        x32, img32 = block(x, None, ws)
        with precision.training("fp16"):
            x16, img16 = block(x, None, ws)
    assert float(x32.max()) > 1000 and float(img32.min()) < -1000
    assert x16.dtype == torch.float16 and float(x16.abs().max()) == 256.0
    assert img16.dtype == torch.float32 and float(img16.min()) == -256.0
