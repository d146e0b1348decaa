"""Learning and the training loop at ``tiny``: D's pose head learns, steps are deterministic and resumable."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from pof3d.camera import angular_error
from pof3d.discriminator import Discriminator
from pof3d.errors import TrainingError
from pof3d.generator import Generator
from pof3d.loop import Trainer
from pof3d.loss import PoF3DLoss
from pof3d.presets import load_config

TIMING = ("time/step_s",)  # the one wall-clock figure train_step returns


def _real(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _cfg(*overrides: str):
    return load_config("tiny", ["train.batch=4", *overrides])


def _figures(fig: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in fig.items() if k not in TIMING}


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("G.", trainer.G), ("D.", trainer.D), ("G_ema.", trainer.G_ema)):
        out.update({prefix + n: t.detach().clone() for n, t in module.state_dict().items()})
    return out


def test_d_pose_head_learns_known_poses() -> None:
    """Two hundred D steps of the pose loss on fixed fakes with known poses cut the pose error > 2x."""
    torch.set_flush_denormal(True)  # as the trainer does on CPU; tiny activations are otherwise 4x slower
    torch.manual_seed(0)
    cfg = _cfg("loss.blur_init_sigma=0")
    G, D = Generator(cfg.model).eval(), Discriminator(cfg.model)
    loss = PoF3DLoss(G, D, cfg, noise_mode="const")
    n = 8
    g = torch.Generator().manual_seed(2)
    pose = torch.stack(
        (
            math.pi / 2 + (torch.rand(n, generator=g) - 0.5),
            math.pi / 2 + 0.6 * (torch.rand(n, generator=g) - 0.5),
        ),
        dim=1,
    )
    with torch.no_grad():
        fake = G(torch.randn(n, cfg.model.z_dim, generator=g), pose=pose, noise_mode="const")
    opt = torch.optim.Adam(D.parameters(), lr=cfg.optim.d_lr, betas=(cfg.optim.beta1, cfg.optim.beta2))

    def error() -> float:
        with torch.no_grad():
            _, pred = loss.run_D(fake["image"], fake["image_raw"], 0.0)
        return float(torch.rad2deg(angular_error(pred, pose)).mean())

    before = error()
    for _ in range(200):
        opt.zero_grad(set_to_none=True)
        _, pred = loss.run_D(fake["image"], fake["image_raw"], 0.0)
        F.mse_loss(pred, pose).backward()
        opt.step()
    after = error()
    assert before > 5.0  # the poses span about +-30 degrees of yaw
    assert after < 0.5 * before, (before, after)


def test_training_is_deterministic_for_a_seed() -> None:
    real = _real()
    start = _params(Trainer(_cfg(), seed=5))
    runs = []
    for _ in range(2):
        trainer = Trainer(_cfg(), seed=5)
        figures = [_figures(trainer.train_step(real)) for _ in range(2)]
        runs.append((figures, _params(trainer), trainer.images_seen, trainer.step))
    (fig_a, par_a, seen_a, step_a), (fig_b, par_b, seen_b, step_b) = runs
    assert fig_a == fig_b
    assert (seen_a, step_a) == (seen_b, step_b) == (8, 2)
    for name in par_a:
        assert torch.equal(par_a[name], par_b[name]), name
    # The steps trained every part of G (pose learner included), D and G's moving average...
    parts = {".".join(name.split(".")[:2]) for name in start}
    unchanged = [
        part
        for part in sorted(parts)
        if all(torch.equal(start[n], par_a[n]) for n in start if n.startswith(part + "."))
    ]
    assert not unchanged, f"a training step left these unchanged: {unchanged}"
    # ... and another seed gives another run.
    other = Trainer(_cfg(), seed=6)
    assert [_figures(other.train_step(real)) for _ in range(2)] != fig_a


def test_phases_run_on_their_intervals() -> None:
    trainer = Trainer(_cfg("loss.r1_interval=2", "loss.density_reg_interval=3"), seed=0)
    real = _real()
    seen = [set(trainer.train_step(real)) for _ in range(4)]
    has = [("loss/D_r1" in s, "loss/G_density" in s) for s in seen]
    assert has == [(True, True), (False, False), (True, False), (False, True)]
    assert all("loss/G_adv" in s and "loss/D_real" in s and "pose/D_error_deg" in s for s in seen)
    assert trainer.images_seen == 16 and trainer.step == 4


def test_ema_follows_the_reference_schedule() -> None:
    """The first step's EMA is a copy of G (the ramp-up caps the half-life at 0.05 x the 0 images seen
    before it, as the official code counts a step's images after its EMA update); later steps blend with the
    half-life ema_kimg x batch / 32 (0.1 kimg at batch 4: 12.5 images)."""
    trainer = Trainer(_cfg("loss.density_reg_weight=0", "loss.r1_gamma=0", "optim.ema_kimg=0.1"), seed=0)
    trainer.cfg.optim.ema_scales_with_batch = True
    real = _real()
    trainer.train_step(real)
    for name, p in trainer.G.named_parameters():
        torch.testing.assert_close(dict(trainer.G_ema.named_parameters())[name], p, rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in trainer.G_ema.named_parameters()}
    trainer.cfg.optim.ema_rampup = 0.0
    trainer.train_step(real)
    beta = 0.5 ** (4 / 12.5)
    for name, p in trainer.G.named_parameters():
        expected = beta * before[name] + (1 - beta) * p.detach()
        torch.testing.assert_close(dict(trainer.G_ema.named_parameters())[name], expected)


def test_lazy_regularisation_correction_of_adam() -> None:
    cfg = _cfg()
    trainer = Trainer(cfg, seed=0)
    g_ratio, d_ratio = 4 / 5, 16 / 17
    main, pose = trainer.opt_G.param_groups
    assert main["lr"] == pytest.approx(cfg.optim.g_lr * g_ratio)
    assert pose["lr"] == pytest.approx(cfg.optim.pose_lr * g_ratio)
    assert main["betas"] == pytest.approx((0.0, 0.99**g_ratio))
    assert {id(p) for p in pose["params"]} == {id(p) for p in trainer.G.pose_learner.parameters()}
    assert trainer.opt_D.param_groups[0]["lr"] == pytest.approx(cfg.optim.d_lr * d_ratio)
    # Without a regulariser there is no correction and no phase.
    plain = Trainer(_cfg("loss.density_reg_weight=0", "loss.r1_gamma=0"), seed=0)
    assert plain.opt_G.param_groups[0]["lr"] == pytest.approx(cfg.optim.g_lr)
    assert [p.name for p in plain.phases] == ["G_main", "D_main"]


def test_resume_from_state_dict_continues_bit_identically() -> None:
    real = _real()
    a = Trainer(_cfg(), seed=3)
    a.train_step(real)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = _figures(a.train_step(real))

    b = Trainer(_cfg(), seed=99)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert (b.images_seen, b.step) == (4, 1)
    assert _figures(b.train_step(real)) == expected
    pa, pb = _params(a), _params(b)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_non_finite_loss_raises_training_error() -> None:
    trainer = Trainer(_cfg(), seed=0)
    real = _real()
    real[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"D_main at step 0"):
        trainer.train_step(real)


def test_non_finite_parameters_are_refused_before_a_checkpoint() -> None:
    trainer = Trainer(_cfg(), seed=0)
    trainer.check_finite_parameters()  # a fresh trainer passes
    with torch.no_grad():
        next(trainer.D.parameters()).view(-1)[:3] = float("inf")
    with pytest.raises(TrainingError, match=r"non-finite parameters in D after step 0 .*: 3 values"):
        trainer.check_finite_parameters()


def _data_parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = Trainer(_cfg(f"train.workers={world}"), seed=rank)  # rank 0's weights must win
        trainer.train_step(_real(batch=2, seed=10 + rank))  # each worker its own half of the batch
        grads = torch.cat([p.grad.flatten() for p in trainer.D.parameters() if p.grad is not None])
        torch.save(
            {"params": _params(trainer), "grads": grads, "seen": trainer.images_seen}, f"{out}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_workers_stay_in_sync(tmp_path) -> None:
    """Two gloo workers: rank 0's weights are broadcast, gradients averaged, weights equal after a step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_data_parallel_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert a["seen"] == b["seen"] == 4  # images over all workers
    assert torch.equal(a["grads"], b["grads"])
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    single = Trainer(_cfg(), seed=0)
    assert not torch.equal(single.D.state_dict()["fc.weight"], a["params"]["D.fc.weight"])  # it trained


def _pitch_past_pole(trainer: Trainer, offset: float) -> None:
    """Shift the pose learner's pitch by ``offset`` so that some latents land beyond a pole."""
    with torch.no_grad():
        trainer.G.pose_learner.out.bias[1] += offset


@pytest.mark.parametrize("skip", [True, False])
def test_a_pitch_past_a_pole_drops_the_update_as_the_reference(skip: bool) -> None:
    """With ``loss.skip_past_pole`` a G_main or D_main step whose batch holds a latent with its pitch
    beyond a pole leaves the weights as they were (the official code's NaN camera and nan_to_num), while
    the same step without it trains; a batch inside (0, pi) trains either way."""
    torch.manual_seed(0)
    cfg = _cfg("loss.density_reg_weight=0", "loss.r1_gamma=0", f"loss.skip_past_pole={str(skip).lower()}")
    trainer = Trainer(cfg, seed=0)
    _pitch_past_pole(trainer, 3.0)  # pitch = pi/2 + 3 + spread: most latents past pi
    nets = {"G": trainer.G, "D": trainer.D}
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    fig = trainer.train_step(_real())
    changed = {
        k: any(not torch.equal(a, b) for a, b in zip(before[k], n.parameters(), strict=True))
        for k, n in nets.items()
    }
    if skip:
        assert fig["pose/past_pole_fraction"] > 0.5
        assert fig["dropped/G_main"] == 1.0 and fig["dropped/D_main"] == 1.0
        assert changed == {"G": False, "D": False}
        assert trainer.step == 1 and trainer.images_seen == 4  # the step still counts
    else:
        assert "dropped/G_main" not in fig
        assert changed == {"G": True, "D": True}
    _pitch_past_pole(trainer, -3.0)  # back inside
    with torch.no_grad():
        trainer.G.pose_learner.out.weight.mul_(0.01)  # every latent near the centre
    fig = trainer.train_step(_real(seed=2))
    assert fig.get("pose/past_pole_fraction", 0.0) == 0.0
    assert fig.get("dropped/G_main", 0.0) == 0.0
