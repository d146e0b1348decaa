"""PoF3D losses: every ablation switch removes exactly its term, and shared passes compute the same losses.

The reference schedule (:mod:`pof3d.testing.reference_schedule`, a generator pass, D calls and a backward
per term as the official implementation runs them) is the yardstick for the shared passes.

The generator runs in eval mode (no depth jitter) with constant noise, and the Python and torch RNGs
are reseeded before each phase, so two runs that differ only in a loss weight see the same latents,
renders and mirror coin. A term's gradient contribution is then the difference of the two runs'
gradients, and linearity in its weight shows that exactly that term was added.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch
from loss_setup import B
from loss_setup import loss_cfg as _cfg

from pof3d.config import Config
from pof3d.discriminator import Discriminator
from pof3d.layers import gaussian_blur, resize
from pof3d.loss import Phase, PoF3DLoss, schedule
from pof3d.testing.reference_schedule import ReferenceSchedule

SCHEDULES = {"shared": PoF3DLoss, "reference": ReferenceSchedule}


def _phase(cfg: Config, name: str) -> Phase:
    return next(p for p in schedule(cfg) if p.name == name)


def _run(nets, real, phase: str, *overrides: str, D=None, seed: int = 0, kind: str = "shared"):
    """One phase from a fixed RNG state; returns (figures, G grads, D grads) with None as zeros."""
    G, D0 = nets
    D = D0 if D is None else D
    cfg = _cfg(*overrides)
    for p in list(G.parameters()) + list(D.parameters()):
        p.grad = None
    random.seed(seed)
    torch.manual_seed(seed)
    loss = SCHEDULES[kind](G, D, cfg, noise_mode="const")
    figures = loss.accumulate_gradients(_phase(cfg, phase), real, gain=1.0)

    def grads(m):
        return {
            n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in m.named_parameters()
        }

    return figures, grads(G), grads(D)


def _diff(a: dict, b: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n: a[n] - b[n] for n in a if n.startswith(prefix)}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.square().sum()) for g in grads.values()))


def _assert_linear(g0: dict, g1: dict, g2: dict, prefix: str = "") -> None:
    """g(w) = g(0) + w * t: the term t is non-zero at weight 1 and doubles at weight 2."""
    t1, t2 = _diff(g1, g0, prefix), _diff(g2, g0, prefix)
    assert _norm(t1) > 1e-6
    for name in t1:
        torch.testing.assert_close(t2[name], 2 * t1[name], rtol=1e-3, atol=1e-7 + 1e-3 * _norm(t1))


class _CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


@pytest.mark.parametrize("kind", SCHEDULES)
def test_symmetry_switch_g_main(nets, real, kind: str) -> None:
    G, _ = nets
    counter = _CallCounter(G.superres)
    f0, g0, d0 = _run(nets, real, "G_main", "loss.symmetry_weight=0", kind=kind)
    renders_off, counter.calls = counter.calls, 0
    _, g1, _ = _run(nets, real, "G_main", "loss.symmetry_weight=1", kind=kind)
    renders_on = counter.calls
    _, g2, _ = _run(nets, real, "G_main", "loss.symmetry_weight=2", kind=kind)
    counter.handle.remove()
    # Off: the mirrored render is not computed (one render less), and no figure for it.
    assert renders_on == renders_off + 1
    assert "loss/G_sym" not in f0
    _assert_linear(g0, g1, g2)
    # D's parameters collect nothing in a G phase.
    assert _norm(d0) == 0.0


def test_symmetry_switch_d_main(nets, real) -> None:
    _, D = nets
    counter = _CallCounter(D)
    f0, _, d0 = _run(nets, real, "D_main", "loss.symmetry_weight=0")
    passes_off, counter.calls = counter.calls, 0
    _, g1, d1 = _run(nets, real, "D_main", "loss.symmetry_weight=1")
    passes_on = counter.calls
    _, _, d2 = _run(nets, real, "D_main", "loss.symmetry_weight=2")
    counter.handle.remove()
    # Fakes + reals, plus the mirrored fakes; each scored with a pose pass (blur once) and a score pass
    # (blur twice) while the blur is on.
    assert (passes_off, passes_on) == (4, 6)
    assert "loss/D_sym" not in f0
    _assert_linear(d0, d1, d2)
    assert _norm(g1) == 0.0  # G gets nothing in a D phase


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pose_regulariser_reaches_only_the_pose_learner(nets, real, kind: str) -> None:
    f0, g0, _ = _run(nets, real, "G_main", "loss.pose_gd_weight=0", kind=kind)
    f1, g1, _ = _run(nets, real, "G_main", "loss.pose_gd_weight=1", kind=kind)
    _, g2, _ = _run(nets, real, "G_main", "loss.pose_gd_weight=2", kind=kind)
    assert "loss/G_pose" not in f0 and float(f1["loss/G_pose"]) > 0
    _assert_linear(g0, g1, g2, prefix="pose_learner.")
    others = [n for n in g0 if not n.startswith("pose_learner.")]
    for name in others:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-9)


def test_dis_cam_switch_trains_pose_head(nets, real) -> None:
    f0, _, d0 = _run(nets, real, "D_main", "loss.dis_cam_weight=0")
    f1, _, d1 = _run(nets, real, "D_main", "loss.dis_cam_weight=2")
    _, _, d2 = _run(nets, real, "D_main", "loss.dis_cam_weight=4")
    head = {n: g for n, g in d0.items() if n.startswith("pose_head.")}
    assert head and _norm(head) == 0.0  # the score uses the detached prediction: no other path
    assert _norm({n: g for n, g in d1.items() if n.startswith("pose_head.")}) > 0
    assert "loss/D_pose" not in f0 and float(f1["loss/D_pose"]) > 0
    assert "pose/D_error_deg" not in f0 and "pose/D_error_deg" in f1  # measured where the pose head trains
    _assert_linear(d0, d1, d2)


def test_r1_switch(nets, real) -> None:
    f0, _, d0 = _run(nets, real, "D_r1", "loss.r1_gamma=0")
    assert f0 == {} and _norm(d0) == 0.0
    f1, _, d1 = _run(nets, real, "D_r1", "loss.r1_gamma=1")
    _, _, d2 = _run(nets, real, "D_r1", "loss.r1_gamma=2")
    assert float(f1["r1_penalty"]) > 0
    torch.testing.assert_close(f1["loss/D_r1"], f1["r1_penalty"] / 2)
    for name in d1:
        torch.testing.assert_close(d2[name], 2 * d1[name], rtol=1e-4, atol=1e-9)
    assert _norm(d1) > 0


def test_r1_penalty_matches_direct_gradient(nets, real) -> None:
    """With no blur, the penalty is the squared input gradient of D's logits on both inputs."""
    _, D = nets
    f, _, _ = _run(nets, real, "D_r1", "loss.blur_init_sigma=0")
    image = real.clone().requires_grad_(True)
    raw = torch.nn.functional.interpolate(real, size=32, mode="bilinear").requires_grad_(True)  # plain
    logits, _ = D(image, raw)
    gi, gr = torch.autograd.grad(logits.sum(), [image, raw])
    expected = (gi.square().sum(dim=(1, 2, 3)) + gr.square().sum(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(f["r1_penalty"], expected, rtol=1e-4, atol=1e-10)


def _input_gradients(D, image, raw, at=None, pose=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch means of |dD/d at|^2 and |dD/d raw|^2 by hand; ``at`` = the leaf the image comes from."""
    logits, _ = D(image, raw, pose=pose)
    grads = torch.autograd.grad(logits.sum(), [image if at is None else at, raw])
    return tuple(g.square().sum(dim=(1, 2, 3)).mean() for g in grads)


@pytest.mark.parametrize("double_blur", [False, True])
def test_r1_is_taken_at_the_blurred_input(nets, real, double_blur: bool) -> None:
    """While the blur is on, R1 is D's input gradient at the images D scores (as the official code takes it):
    the reals blurred once, or twice with ``double_blur`` (conditioned on the pose from the once-blurred)."""
    _, D = nets
    f, _, _ = _run(nets, real, "D_r1", f"loss.double_blur={double_blur}")  # blur sigma 1
    raw = gaussian_blur(resize(real, 32), 1.0).requires_grad_(True)
    blurred = gaussian_blur(real, 1.0)
    pose = None
    if double_blur:
        pose = D(blurred, raw)[1].detach()
        blurred = gaussian_blur(blurred, 1.0)
    blurred.requires_grad_(True)
    image_term, raw_term = _input_gradients(D, blurred, raw, pose=pose)
    torch.testing.assert_close(f["r1_penalty"], image_term + raw_term, rtol=1e-4, atol=1e-10)
    # Taken at the unblurred reals, through the blur(s), the image's term is smaller (the blur's
    # transpose smooths the gradient); the raw image's term is the same.
    leaf = real.clone().requires_grad_(True)
    through = gaussian_blur(gaussian_blur(leaf, 1.0), 1.0 if double_blur else 0.0)
    image_through_blur, raw_again = _input_gradients(D, through, raw, at=leaf, pose=pose)
    assert float(image_through_blur) < 0.85 * float(image_term)
    torch.testing.assert_close(raw_again, raw_term)


def test_double_blur_costs_a_d_pass_only_while_the_blur_is_on(nets, real) -> None:
    """Scored images get a pose pass and a score pass while the blur is on, one pass once it is off."""
    _, D = nets
    counter = _CallCounter(D)
    runs = {}
    for double in (True, False):
        for sigma in (1.0, 0.0):
            counter.calls = 0
            f, _, _ = _run(
                nets, real, "D_main", f"loss.double_blur={double}", f"loss.blur_init_sigma={sigma}"
            )
            runs[double, sigma] = (counter.calls, f)
    counter.handle.remove()
    passes = {key: calls for key, (calls, _) in runs.items()}
    assert passes == {(True, 1.0): 6, (False, 1.0): 3, (True, 0.0): 3, (False, 0.0): 3}
    # The second blur changes the scores, not D's pose (predicted from the image blurred once).
    (_, twice), (_, once) = runs[True, 1.0], runs[False, 1.0]
    assert abs(float(twice["scores/D_fake"]) - float(once["scores/D_fake"])) > 1e-4
    torch.testing.assert_close(twice["loss/D_pose"], once["loss/D_pose"])
    # With the blur off the switch changes nothing.
    (_, a), (_, b) = runs[True, 0.0], runs[False, 0.0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_density_switch(nets, real) -> None:
    f0, g0, _ = _run(nets, real, "G_density", "loss.density_reg_weight=0")
    assert f0 == {} and _norm(g0) == 0.0
    f1, g1, d1 = _run(nets, real, "G_density", "loss.density_reg_weight=0.25")
    assert float(f1["loss/G_density"]) > 0
    assert _norm(_diff(g1, g0, "decoder.")) > 0 and _norm(_diff(g1, g0, "backbone.")) > 0
    # Density does not depend on the pose, the super-resolution or D.
    assert _norm(_diff(g1, g0, "pose_learner.")) == 0 and _norm(_diff(g1, g0, "superres.")) == 0
    assert _norm(d1) == 0.0


@pytest.mark.parametrize(("region", "extent"), [("cube", 1.0), ("box", 0.3)])
def test_density_points_are_drawn_in_their_region(
    nets, real, monkeypatch, region: str, extent: float
) -> None:
    """ "cube": U[-1, 1]^3 world units whatever box_warp is (official code); "box": within +-box_warp/2."""
    G, _ = nets
    drawn = []
    density = G.density
    monkeypatch.setattr(
        G, "density", lambda planes, points: (drawn.append(points.detach()), density(planes, points))[1]
    )
    f, _, _ = _run(nets, real, "G_density", f"loss.density_reg_region={region}", "model.box_warp=0.6")
    assert float(f["loss/G_density"]) > 0
    (points,) = drawn
    initial, perturbed = points[:, :1000], points[:, 1000:]
    assert initial.shape == (B, 1000, 3)
    assert float(initial.abs().max()) <= extent and float(initial.abs().max()) > 0.95 * extent
    for axis in range(3):  # uniform: mean about 0, variance extent^2 / 3
        assert abs(float(initial[..., axis].mean())) < 0.05 * extent
        assert float(initial[..., axis].var()) == pytest.approx(extent**2 / 3, rel=0.1)
    torch.testing.assert_close(float((perturbed - initial).std()), 0.004, rtol=0.05, atol=0)
    if region == "cube":  # most points lie outside the box: any coordinate beyond 0.3
        outside = (initial.abs() > 0.3).any(dim=-1).float().mean()
        assert float(outside) > 0.9


def test_without_pose_aware_d_no_pose_terms(nets, real) -> None:
    torch.manual_seed(0)
    cfg = _cfg("model.pose_aware_d=false")
    D = Discriminator(cfg.model)
    fg, g, _ = _run(nets, real, "G_main", "model.pose_aware_d=false", D=D)
    fd, _, d = _run(nets, real, "D_main", "model.pose_aware_d=false", D=D)
    assert "loss/G_pose" not in fg and "loss/D_pose" not in fd and "pose/D_error_deg" not in fd
    assert _norm(_diff(g, {n: torch.zeros_like(v) for n, v in g.items()}, "pose_learner.")) > 0
    assert _norm(d) > 0


def _assert_same(shared: tuple, ref: tuple) -> None:
    """Same figures (names and values) and the same gradients of G and D, up to float round-off."""
    (fs, gs, ds), (fr, gr, dr) = shared, ref
    assert fs.keys() == fr.keys()
    for name in fs:
        torch.testing.assert_close(fs[name], fr[name], rtol=1e-4, atol=1e-6)
    for got, want in ((gs, gr), (ds, dr)):
        scale = _norm(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.parametrize("double_blur", [True, False])
@pytest.mark.parametrize("phase", ["G_main", "D_main", "D_r1"])
def test_shared_passes_compute_the_reference_losses(nets, real, phase: str, double_blur: bool) -> None:
    """Same latents, noise and coin: the shared schedule gives the official code's values and gradients."""
    blur = f"loss.double_blur={double_blur}"
    shared = _run(nets, real, phase, blur, seed=3)
    _assert_same(shared, _run(nets, real, phase, blur, seed=3, kind="reference"))
    assert _norm(shared[1] if phase == "G_main" else shared[2]) > 0


@pytest.mark.parametrize("phase", ["G_main", "D_r1"])
def test_the_comparison_sees_the_second_blur(nets, real, phase: str) -> None:
    shared = _run(nets, real, phase, "loss.double_blur=true", seed=3)
    with pytest.raises(AssertionError):
        _assert_same(shared, _run(nets, real, phase, "loss.double_blur=false", seed=3, kind="reference"))


@pytest.mark.parametrize(
    ("phase", "weight"),
    [
        ("G_main", "loss.symmetry_weight"),
        ("G_main", "loss.pose_gd_weight"),
        ("D_main", "loss.symmetry_weight"),
        ("D_main", "loss.dis_cam_weight"),
        ("D_r1", "loss.r1_gamma"),
    ],
)
def test_the_comparison_catches_a_changed_or_dropped_term(nets, real, phase: str, weight: str) -> None:
    """The check above fails when one term's weight differs, and when a term is missing altogether."""
    shared = _run(nets, real, phase, seed=3)
    half = _run(nets, real, phase, f"{weight}=0.5", seed=3, kind="reference")
    with pytest.raises(AssertionError):
        _assert_same(shared, half)
    if phase != "D_r1":  # without R1 there is no D_r1 phase at all
        dropped = _run(nets, real, phase, f"{weight}=0", seed=3, kind="reference")
        with pytest.raises(AssertionError):
            _assert_same(shared, dropped)


def test_training_code_does_not_use_the_reference_schedule() -> None:
    """The reference schedule is for tests and benchmarks: no library module outside it imports it."""
    package = Path(__file__).resolve().parents[1] / "pof3d"
    imports = re.compile(r"^\s*(from|import)\s+pof3d\.testing\b", re.MULTILINE)
    users = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "testing" not in path.relative_to(package).parts and imports.search(path.read_text())
    ]
    assert users == []
