"""The official code's schedule of passes, for checking and timing the shared passes.

The official loss (``training/loss_pose.py`` of PoF3D, on EG3D) gives every term its own work: a full
generator pass, its own discriminator calls and its own backward. With a pose-conditioned D each scored
image goes through two D calls, one that predicts the pose and one that scores conditioned on that pose
(detached). :class:`ReferenceSchedule` repeats exactly that with this library's networks and building
blocks, so that, from the same random state, it must give :class:`pof3d.loss.PoF3DLoss`'s losses and
gradients; ``tests/test_losses.py`` checks this and ``benchmarks/step.py --compare`` times both.

D's inputs travel in a dict, as in the official code: every D call blurs ``img["image"]`` and stores the
result back in the dict, so a score call after a pose call sees the image blurred twice (with
``loss.double_blur=false`` the score call does not blur again, which is what the library's single pass
computes).

Not used in training: the trainer always runs :mod:`pof3d.loss`'s shared passes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from pof3d.layers import gaussian_blur
from pof3d.loss import Figures, Phase, PoF3DLoss, pose_figures

Images = dict[str, torch.Tensor]


class ReferenceSchedule(PoF3DLoss):
    """:class:`PoF3DLoss` with the official code's schedule for ``G_main``, ``D_main`` and ``D_r1``.

    ``G_density`` is a single pass in both schedules and is inherited unchanged.
    """

    def accumulate_gradients(
        self, phase: Phase, real: torch.Tensor, gain: float = 1.0, images_seen: int = 0
    ) -> Figures:
        run = _REFERENCE_RUNS.get(phase.run, phase.run)
        return super().accumulate_gradients(dataclasses.replace(phase, run=run), real, gain, images_seen)

    # ------------------------------------------------------------------------------------------
    # The official code's D calls

    def predict_pose(self, img: Images, sigma: float) -> torch.Tensor:
        """A pose call: blur the dict's image in place of the entry, then D's pose head."""
        img["image"] = gaussian_blur(img["image"], sigma)
        _, pose = self.D(img["image"], img["image_raw"])
        assert pose is not None
        return pose

    def score(self, img: Images, sigma: float) -> torch.Tensor:
        """D's logits: with a pose-conditioned D a pose call first, then a score call on its pose."""
        if not self.cfg.model.pose_aware_d:
            img["image"] = gaussian_blur(img["image"], sigma)
            logits, _ = self.D(img["image"], img["image_raw"])
            return logits
        pose = self.predict_pose(img, sigma).detach()
        if self.cfg.loss.double_blur:
            img["image"] = gaussian_blur(img["image"], sigma)
        logits, _ = self.D(img["image"], img["image_raw"], pose=pose)
        return logits

    def generate(
        self, z: torch.Tensor, mirrored: bool = False, update_w_avg: bool = False
    ) -> tuple[Images, torch.Tensor]:
        """A full generator pass (mapping, pose, tri-planes, render) from the learned or mirrored pose."""
        G = self.G
        ws = G.map(z, update_w_avg=update_w_avg)
        pose = G.predict_pose(ws)
        planes = G.synthesize_planes(ws, noise_mode=self.noise_mode)
        render_pose = self.mirror(pose) if mirrored else pose
        out = G.render(planes, ws, render_pose, noise_mode=self.noise_mode)
        return {"image": out["image"], "image_raw": out["image_raw"]}, pose

    # ------------------------------------------------------------------------------------------
    # Phases

    def reference_g_main(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """A generator pass and a backward per term: adversarial, mirrored camera, pose regulariser."""
        loss_cfg, G = self.cfg.loss, self.G
        z = self.latents(real.shape[0], real.device)
        fake, pose = self.generate(z)
        logits = self.score(fake, sigma)
        adv = F.softplus(-logits).mean()
        adv.mul(gain).backward()
        figures = {"loss/G_adv": adv.detach(), "scores/G_fake": logits.detach().mean()}
        if self.symmetry_on:
            flipped, _ = self.generate(z, mirrored=True)
            flip_logits = self.score(flipped, sigma)
            sym = F.softplus(-flip_logits).mean()
            sym.mul(loss_cfg.symmetry_weight * gain).backward()
            figures["loss/G_sym"] = sym.detach()
        if self.pose_gd_on:
            ws = G.map(z)
            own_pose = G.predict_pose(ws.detach())
            planes = G.synthesize_planes(ws, noise_mode=self.noise_mode)
            out = G.render(planes, ws, own_pose, noise_mode=self.noise_mode)
            pred_pose = self.predict_pose({"image": out["image"], "image_raw": out["image_raw"]}, sigma)
            pose_reg = F.mse_loss(own_pose, pred_pose.detach())
            pose_reg.mul(loss_cfg.pose_gd_weight * gain).backward()
            figures["loss/G_pose"] = pose_reg.detach()
        figures.update(pose_figures(G.eg3d_pose(pose.detach())))
        figures.update(self.past_pole(G.map(z)))
        return figures

    def reference_d_main(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """Separate generator passes for D's pose loss, the fakes and the mirrored fakes; reals last."""
        loss_cfg = self.cfg.loss
        z = self.latents(real.shape[0], real.device)
        figures: Figures = {}
        if self.dis_cam_on:
            with torch.no_grad():
                fake, pose = self.generate(z, update_w_avg=True)
            pose_loss = self.pose_loss(self.predict_pose(fake, sigma), pose, figures)
            pose_loss.mul(loss_cfg.dis_cam_weight * gain).backward()
        with torch.no_grad():
            fake, _ = self.generate(z, update_w_avg=True)
        logits = self.score(fake, sigma)
        fake_loss = F.softplus(logits).mean()
        fake_loss.mul(gain).backward()
        figures.update({"loss/D_fake": fake_loss.detach(), "scores/D_fake": logits.detach().mean()})
        if self.symmetry_on:
            with torch.no_grad():
                flipped, _ = self.generate(z, mirrored=True, update_w_avg=True)
            flip_logits = self.score(flipped, sigma)
            sym = F.softplus(flip_logits).mean()
            sym.mul(loss_cfg.symmetry_weight * gain).backward()
            figures["loss/D_sym"] = sym.detach()
        real_logits = self.score({"image": real, "image_raw": self.real_raw(real, sigma)}, sigma)
        real_loss = F.softplus(-real_logits).mean()
        real_loss.mul(gain).backward()
        figures.update({"loss/D_real": real_loss.detach(), "scores/D_real": real_logits.detach().mean()})
        with torch.no_grad():
            figures.update(self.past_pole(self.G.map(z)))
        return figures

    def reference_d_r1(self, real: torch.Tensor, gain: float, sigma: float) -> Figures:
        """R1 on reals through the official code's D calls, with respect to the dict's entries after them.

        Those are the tensors the score call received: the blurred image (the D calls replaced the entry)
        and the raw image, blurred before it went into the dict.
        """
        image = real.detach().requires_grad_(True)
        image_raw = self.real_raw(real.detach(), sigma).requires_grad_(True)
        img = {"image": image, "image_raw": image_raw}
        logits = self.score(img, sigma)
        return self.r1_figures(logits, [img["image"], img["image_raw"]], gain)


_REFERENCE_RUNS = {
    PoF3DLoss.g_main: ReferenceSchedule.reference_g_main,
    PoF3DLoss.d_main: ReferenceSchedule.reference_d_main,
    PoF3DLoss.d_r1: ReferenceSchedule.reference_d_r1,
}
