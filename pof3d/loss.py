"""PoF3D losses by training phase: adversarial, pose, symmetry and the lazy regularisers.

Phases (EG3D-style lazy regularisation; the trainer runs each on its interval with its own
optimiser step and passes ``gain`` = the interval for the regularisers):

- ``G_main``: non-saturating loss on fakes, plus ``symmetry_weight`` times the same loss on the render
  of the same latent from the mirrored camera, plus the pose regulariser
  ``pose_gd_weight * MSE(Psi(z), stopgrad(D_pose(G(z))))`` whose gradient reaches only the pose
  learner (w is detached into the pose learner for this term).
- ``G_density``: ``density_reg_weight * L1(sigma(x), sigma(x + eps))`` at random points x, uniform in
  ``[-1, 1]^3`` world units as the official code draws them (``density_reg_region="cube"``) or inside the
  tri-plane box (``"box"``).
- ``D_main``: softplus(D(fake)) + ``symmetry_weight`` * softplus(D(mirrored fake)) + softplus(-D(real))
  + ``dis_cam_weight * MSE(D_pose(fake), Psi(z).detach())``.
- ``D_r1``: ``r1_gamma / 2 * (|dD/d image|^2 + |dD/d image_raw|^2)`` on reals, with respect to the
  (blurred) images D receives.

D sees images blurred by a Gaussian whose sigma fades to zero. While it is on, a pose-aware D predicts
the pose from the image blurred once and scores the image blurred twice, as the official code's pair of D
calls does (``loss.double_blur``; a second D pass until the blur has faded).

A term whose weight is zero (or that needs a pose head when ``pose_aware_d`` is off) is not computed
at all: no render, no D pass, no contribution to any gradient.

Work the official code repeats for every term is done once here; each choice keeps what
every term computes in expectation (it only changes which random draws are reused):

1. The mirrored render shares the latent's mapping and tri-planes with the normal render: only the
   rays, the volume rendering and the super-resolution run twice. The backbone's backward pass also
   runs once, for the summed gradient of both terms.
2. The pose regulariser's target is D's pose prediction on the G-main fakes, which the G-main D pass
   already computes; the term then costs one pose-learner forward on detached w, instead of a third
   full generator pass and another D pass.
3. In ``D_main`` the pose loss and the fake logits use the same rendered fakes and the same D pass
   (the discriminator computes its pose head and its score from one backbone pass; while the blur
   is on and ``double_blur`` makes the score see a second blur, the same two D passes as the
   official code's).
4. All ``G_main`` terms are backpropagated together (one backward instead of three).

The official code's schedule (a generator pass, D calls and a backward per term) is not part of training:
:mod:`pof3d.testing.reference_schedule` keeps it for the tests that compare both schedules' losses and
gradients and for ``benchmarks/step.py --compare``.

Which phases exist, on which interval, for which network and with which loss method is defined once,
by :func:`schedule`; the trainer builds its optimisers and steps from that list.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pof3d import precision
from pof3d.batch_scaling import effective_blur_fade_kimg
from pof3d.camera import angular_error, mirror_pose
from pof3d.config import Config
from pof3d.layers import blur_radius, gaussian_blur, resize

logger = logging.getLogger(__name__)

# Figure of G_main and D_main: the fraction of the batch's latents with a pitch at or past a pole; a
# non-zero value on any worker drops the phase's update (``loss.skip_past_pole``, as the official code).
PAST_POLE = "pose/past_pole_fraction"
DENSITY_POINTS = 1000  # random points per latent for the density regulariser (as EG3D)

Figures = dict[str, torch.Tensor]


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Stop a network's parameters from collecting gradients while gradients still flow through it."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class PoF3DLoss:
    """Computes one phase's losses for a generator/discriminator pair and accumulates their gradients.

    ``noise_mode`` is the generator's noise mode for training passes ("const" makes G deterministic in
    tests, together with ``G.eval()`` which turns off the renderer's depth jitter).
    """

    def __init__(self, G: nn.Module, D: nn.Module, cfg: Config, noise_mode: str = "random") -> None:
        self.G, self.D, self.cfg = G, D, cfg
        self.noise_mode = noise_mode

    # ------------------------------------------------------------------------------------------
    # Switches

    @property
    def symmetry_on(self) -> bool:
        return self.cfg.loss.symmetry_weight > 0

    @property
    def pose_gd_on(self) -> bool:
        return self.cfg.model.pose_aware_d and self.cfg.loss.pose_gd_weight > 0

    @property
    def dis_cam_on(self) -> bool:
        return self.cfg.model.pose_aware_d and self.cfg.loss.dis_cam_weight > 0

    def blur_sigma(self, images_seen: int) -> float:
        """Blur of images seen by D, fading linearly to zero (EG3D) over
        :func:`~pof3d.batch_scaling.effective_blur_fade_kimg` thousand images."""
        fade_kimg = effective_blur_fade_kimg(self.cfg)
        if fade_kimg <= 0:
            return 0.0
        return max(1.0 - images_seen / (fade_kimg * 1e3), 0.0) * self.cfg.loss.blur_init_sigma

    # ------------------------------------------------------------------------------------------
    # Building blocks

    def mirror(self, pose: torch.Tensor) -> torch.Tensor:
        """Mirrored camera pose; with ``flip_both*`` a fair coin per (micro-)batch picks left-right or
        up-down. The coin is torch's, so a micro-batch seeded by its place in the global batch tosses the
        same on any worker (pof3d/loop.py)."""
        mode = self.cfg.loss.symmetry_mode
        axis = "left_right"
        if mode != "left_right" and float(torch.rand(())) >= 0.5:
            axis = "up_down"
        return mirror_pose(pose, axis, cars=mode == "flip_both_cars")

    def blurs_twice(self, sigma: float) -> bool:
        """Whether D scores images blurred twice: ``loss.double_blur``, a pose-aware D and a blur that
        changes the image (radius floor(3 sigma) > 0; below that both of the official code's calls see the
        same image)."""
        return self.cfg.loss.double_blur and self.cfg.model.pose_aware_d and blur_radius(sigma) > 0

    def score_input(
        self, image: torch.Tensor, image_raw: torch.Tensor, sigma: float, pose_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image D scores and, when it is blurred twice, the pose D predicts from the image blurred once.

        The official code calls D twice on one image dict, once for the pose and once for the score, and each
        call blurs the dict's image in place: the score sees it blurred twice. Without the second blur (or
        with the blur off) one D pass gives both, and the pose returned here is None.
        """
        image = gaussian_blur(image, sigma)
        if not self.blurs_twice(sigma):
            return image, None
        with torch.set_grad_enabled(pose_grad and torch.is_grad_enabled()):
            _, pose = self.D(image, image_raw)
        return gaussian_blur(image, sigma), pose

    def run_D(
        self, image: torch.Tensor, image_raw: torch.Tensor, sigma: float, pose_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D on blurred images: logits conditioned on D's own detached pose prediction, and that pose.

        ``pose_grad=False`` when the pose is only used detached: a pose pass of its own (see
        :meth:`score_input`) then runs without a graph.
        """
        scored, pose = self.score_input(image, image_raw, sigma, pose_grad)
        if pose is None:
            return self.D(scored, image_raw)
        logits, _ = self.D(scored, image_raw, pose=pose.detach())
        return logits, pose

    def real_raw(self, real: torch.Tensor, sigma: float) -> torch.Tensor:
        """Raw counterpart of reals: resized to the neural resolution (see :func:`real_raw_image`), then
        blurred as D's input is."""
        return gaussian_blur(real_raw_image(real, self.cfg), sigma)

    def latents(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.randn(batch, self.cfg.model.z_dim, device=device)

    # ------------------------------------------------------------------------------------------
    # Phases

    def accumulate_gradients(
        self, phase: Phase, real: torch.Tensor, gain: float = 1.0, images_seen: int = 0
    ) -> Figures:
        """Run one phase on this worker's ``real`` batch and backpropagate ``gain`` * its loss.

        The other network is frozen (gradients flow through it but its parameters collect none). Returns
        detached scalar figures (losses and statistics) for logging; an inactive phase returns none. The
        latent batch has the size of ``real``.
        """
        if not phase.active:
            return {}
        other = self.D if phase.network == "G" else self.G
        # G and D compute in train.precision's dtypes during the phase (pof3d/precision.py); the losses,
        # R1's penalty and every backward pass here run outside their autocast regions, in float32.
        with frozen(other), precision.training(self.cfg.train.precision):
            return phase.run(self, real, gain, self.blur_sigma(images_seen))

    def g_main(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """Adversarial, mirrored-camera and pose-regulariser terms of G from one generator pass."""
        loss_cfg, G = self.cfg.loss, self.G
        z = self.latents(real.shape[0], real.device)
        ws = G.map(z)
        pose = G.predict_pose(ws)
        planes = G.synthesize_planes(ws, noise_mode=self.noise_mode)
        fake = G.render(planes, ws, pose, noise_mode=self.noise_mode)
        logits, pred_pose = self.run_D(fake["image"], fake["image_raw"], sigma, pose_grad=False)
        adv = F.softplus(-logits).mean()
        total, figures = adv, {"loss/G_adv": adv.detach(), "scores/G_fake": logits.detach().mean()}
        if self.symmetry_on:
            # Sharing 1: same ws and tri-planes, new camera.
            flipped = G.render(planes, ws, self.mirror(pose), noise_mode=self.noise_mode)
            flip_logits, _ = self.run_D(flipped["image"], flipped["image_raw"], sigma, pose_grad=False)
            sym = F.softplus(-flip_logits).mean()
            total = total + loss_cfg.symmetry_weight * sym
            figures["loss/G_sym"] = sym.detach()
        if self.pose_gd_on:
            # Sharing 2: D's pose prediction from the pass above is the (detached) target.
            assert pred_pose is not None
            pose_reg = F.mse_loss(G.predict_pose(ws.detach()), pred_pose.detach())
            total = total + loss_cfg.pose_gd_weight * pose_reg
            figures["loss/G_pose"] = pose_reg.detach()
        total.mul(gain).backward()
        figures.update(pose_figures(self.G.eg3d_pose(pose.detach())))
        figures.update(self.past_pole(ws))
        return figures

    def g_density(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """L1 between raw densities at random points and at slightly perturbed points."""
        loss_cfg, G = self.cfg.loss, self.G
        batch, device = real.shape[0], real.device
        ws = G.map(self.latents(batch, device))
        # A few thousand points: sampled in place from the backbone's image (Generator.synthesize_planes).
        planes = G.synthesize_planes(ws, noise_mode=self.noise_mode, convert=False)
        half = 1.0 if loss_cfg.density_reg_region == "cube" else 0.5 * self.cfg.model.box_warp
        points = (torch.rand(batch, DENSITY_POINTS, 3, device=device) * 2 - 1) * half
        perturbed = points + torch.randn_like(points) * loss_cfg.density_reg_sigma
        density = G.density(planes, torch.cat((points, perturbed), dim=1))
        tv = F.l1_loss(density[:, :DENSITY_POINTS], density[:, DENSITY_POINTS:])
        (tv * loss_cfg.density_reg_weight).mul(gain).backward()
        return {"loss/G_density": tv.detach()}

    def d_main(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """D's fake, mirrored-fake, real and pose terms; the fakes come from one generator pass."""
        loss_cfg, G = self.cfg.loss, self.G
        z = self.latents(real.shape[0], real.device)
        with torch.no_grad():
            ws = G.map(z, update_w_avg=True)
            pose = G.predict_pose(ws)
            planes = G.synthesize_planes(ws, noise_mode=self.noise_mode)
            fake = G.render(planes, ws, pose, noise_mode=self.noise_mode)
            flipped = None
            if self.symmetry_on:
                flipped = G.render(planes, ws, self.mirror(pose), noise_mode=self.noise_mode)
        # Sharing 3: one D pass on the fakes gives both the fake logits and the pose prediction.
        logits, pred_pose = self.run_D(fake["image"], fake["image_raw"], sigma, pose_grad=self.dis_cam_on)
        fake_loss = F.softplus(logits).mean()
        total = fake_loss
        figures = {"loss/D_fake": fake_loss.detach(), "scores/D_fake": logits.detach().mean()}
        if self.dis_cam_on:
            assert pred_pose is not None
            total = total + loss_cfg.dis_cam_weight * self.pose_loss(pred_pose, pose, figures)
        if flipped is not None:
            flip_logits, _ = self.run_D(flipped["image"], flipped["image_raw"], sigma, pose_grad=False)
            sym = F.softplus(flip_logits).mean()
            total = total + loss_cfg.symmetry_weight * sym
            figures["loss/D_sym"] = sym.detach()
        total = total + self.real_loss(real, sigma, figures)
        total.mul(gain).backward()
        figures.update(self.past_pole(ws))
        return figures

    def past_pole(self, ws: torch.Tensor) -> Figures:
        """``{PAST_POLE: fraction}`` of this batch's latents whose pitch lies at or beyond a pole, when
        ``loss.skip_past_pole`` applies; the trainer then drops the phase's update on every worker."""
        if not self.cfg.loss.skip_past_pole or self.cfg.model.pose_clamp:
            return {}
        with torch.no_grad():
            return {PAST_POLE: self.G.past_pole(ws.detach()).float().mean()}

    def pose_loss(self, pred_pose: torch.Tensor, pose: torch.Tensor, figures: Figures) -> torch.Tensor:
        """D's pose loss on fakes with known pose; records it and the angular error in degrees."""
        pose_loss = F.mse_loss(pred_pose, pose.detach())
        figures["loss/D_pose"] = pose_loss.detach()
        error = angular_error(pred_pose.detach(), pose.detach(), self.cfg.model.pitch_output)
        figures["pose/D_error_deg"] = torch.rad2deg(error).mean()
        return pose_loss

    def real_loss(self, real: torch.Tensor, sigma: float, figures: Figures) -> torch.Tensor:
        logits, _ = self.run_D(real, self.real_raw(real, sigma), sigma, pose_grad=False)
        real_loss = F.softplus(-logits).mean()
        figures["loss/D_real"] = real_loss.detach()
        figures["scores/D_real"] = logits.detach().mean()
        return real_loss

    def d_r1(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """R1 with respect to the images D scores: the blurred reals and their blurred raw images.

        As in the official code, whose D call replaces the image by its blurred version before the gradient is
        taken: the penalty is on D's own input gradient, with the blur outside the differentiated function.
        """
        with torch.no_grad():
            image_raw = self.real_raw(real, sigma)
            image, pose = self.score_input(real, image_raw, sigma)
        image, image_raw = image.detach().requires_grad_(True), image_raw.detach().requires_grad_(True)
        logits, _ = self.D(image, image_raw, pose=pose)
        return self.r1_figures(logits, [image, image_raw], gain)

    def r1_figures(self, logits: torch.Tensor, inputs: list[torch.Tensor], gain: float) -> Figures:
        """Backpropagate ``gain * r1_gamma / 2 * |d logits / d inputs|^2`` (mean over the batch)."""
        grads = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
        penalty = sum(g.square().sum(dim=(1, 2, 3)) for g in grads)
        loss = (penalty * (self.cfg.loss.r1_gamma / 2)).mean()
        loss.mul(gain).backward()
        return {"loss/D_r1": loss.detach(), "r1_penalty": penalty.detach().mean()}


def real_raw_image(real: torch.Tensor, cfg: Config) -> torch.Tensor:
    """A real image at the neural resolution, as D's raw input: plain bilinear, as the official code's
    ``filtered_resizing`` computes, or antialiased with ``loss.real_raw_antialias``."""
    return resize(real, cfg.model.neural_resolution, antialias=cfg.loss.real_raw_antialias)


def pose_figures(pose: torch.Tensor) -> Figures:
    """Mean and spread of the learned pose in degrees (how wide a pose distribution G has found)."""
    deg = torch.rad2deg(pose.float())
    std = deg.std(dim=0) if deg.shape[0] > 1 else torch.zeros(2, device=deg.device)
    return {
        "pose/h_mean_deg": deg[:, 0].mean(),
        "pose/h_std_deg": std[0],
        "pose/v_mean_deg": deg[:, 1].mean(),
        "pose/v_std_deg": std[1],
    }


# ----------------------------------------------------------------------------------------------
# The schedule of phases

PhaseLoss = Callable[[PoF3DLoss, torch.Tensor, float, float], Figures]


@dataclass(frozen=True)
class Phase:
    """One optimiser step of one network, on its interval (EG3D's lazy regularisation).

    ``run(loss, real, gain, sigma)`` computes the phase's loss and backpropagates ``gain`` times it;
    ``gain`` is the interval. A ``lazy`` phase is a regulariser: its network's Adam gets EG3D's
    ``interval / (interval + 1)`` correction. An inactive phase (its weight is zero) has no step.
    """

    name: str
    network: Literal["G", "D"]
    interval: int
    run: PhaseLoss
    active: bool = True
    lazy: bool = False


def schedule(cfg: Config) -> tuple[Phase, ...]:
    """The phases of a training iteration, in EG3D's order, for this config (active or not)."""
    loss = cfg.loss
    return (
        Phase("G_main", "G", 1, PoF3DLoss.g_main),
        Phase(
            "G_density",
            "G",
            loss.density_reg_interval,
            PoF3DLoss.g_density,
            active=loss.density_reg_weight > 0,
            lazy=True,
        ),
        Phase("D_main", "D", 1, PoF3DLoss.d_main),
        Phase("D_r1", "D", loss.r1_interval, PoF3DLoss.d_r1, active=loss.r1_gamma > 0, lazy=True),
    )
