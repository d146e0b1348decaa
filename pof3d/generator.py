"""The pose-free generator: latent -> (learned pose, tri-planes) -> volume rendering -> super-resolution.

G(z) = render(planes(w), pose_learner(w)): the pose is predicted from the latent instead of being drawn
from a dataset's pose prior. Every step from the pose to the image is differentiable, so image losses
train the pose learner through the camera and the rays.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pof3d import precision
from pof3d.camera import intrinsics, pose_to_cam2world, to_eg3d
from pof3d.config import ModelConfig
from pof3d.pose_learner import PoseLearner
from pof3d.renderer import VolumeRenderer, make_rays
from pof3d.stylegan import MappingNetwork, SynthesisNetwork
from pof3d.superres import SuperResolution
from pof3d.triplane import TriplaneDecoder

logger = logging.getLogger(__name__)


class Generator(nn.Module):
    """PoF3D generator; see ``docs/architecture.md`` for the contract other modules rely on."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.triplane_channels
        self.backbone = SynthesisNetwork(
            cfg.w_dim,
            cfg.triplane_resolution,
            3 * c,
            channel_base=cfg.channel_base,
            channel_max=cfg.channel_max,
            use_noise=cfg.use_noise,
            num_fp16_res=cfg.backbone_num_fp16_res,
        )
        self.mapping = MappingNetwork(
            cfg.z_dim,
            cfg.w_dim,
            self.backbone.num_ws,
            layers=cfg.mapping_layers,
            lr_mult=cfg.mapping_lr_mult,
            w_avg_beta=cfg.w_avg_beta,
        )
        self.pose_learner = PoseLearner(
            cfg.w_dim,
            cfg.pose_hidden,
            cfg.yaw_center,
            cfg.pitch_center,
            clamp=cfg.pose_clamp,
            init_scale=cfg.pose_init_scale,
            straight_through=cfg.pose_clamp_straight_through,
        )
        self.decoder = TriplaneDecoder(c, cfg.decoder_hidden, cfg.decoder_features)
        self.renderer = VolumeRenderer(cfg)
        self.superres = SuperResolution(
            cfg.w_dim,
            cfg.decoder_features,
            cfg.neural_resolution,
            cfg.image_resolution,
            channels=cfg.sr_channels,
            use_noise=cfg.use_noise,
            num_fp16_res=cfg.num_fp16_res,
        )
        logger.debug("generator parameters: %s", count_parameters(self))

    @property
    def num_ws(self) -> int:
        return self.mapping.num_ws

    def pose_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at ``optim.pose_lr``."""
        return list(self.pose_learner.parameters())

    def main_parameters(self) -> list[nn.Parameter]:
        """All other parameters, trained at ``optim.g_lr``."""
        pose_ids = {id(p) for p in self.pose_learner.parameters()}
        return [p for p in self.parameters() if id(p) not in pose_ids]

    def map(self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        """z ``[B, z_dim]`` -> ws ``[B, num_ws, w_dim]``."""
        return self.mapping(z, truncation_psi=truncation_psi, update_w_avg=update_w_avg)

    def predict_pose(self, ws: torch.Tensor) -> torch.Tensor:
        """Learned pose ``[B, 2]`` from the first w (all entries are equal before style mixing), in the
        model's pitch coordinate (``model.pitch_output``), which :meth:`render` takes."""
        return self.pose_learner(ws[:, 0])

    def past_pole(self, ws: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the learned pitch of each latent lies at or beyond a pole before clamping."""
        return self.pose_learner.past_pole(ws[:, 0])

    def eg3d_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """A pose of this model as EG3D's (h, v), the convention of data, labels and metrics."""
        return to_eg3d(pose, self.cfg.pitch_output)

    def map_with_pose(
        self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, learned pose) of ``z``. As in the official code, the pose comes from the untruncated w, so
        truncation changes the scene but not the view; ``model.pose_from_truncated_w`` takes it from
        the truncated ws instead (poses then shrink toward the mean pose as well)."""
        ws = self.map(z, update_w_avg=update_w_avg)
        truncated = self.mapping.truncate(ws, truncation_psi)
        return truncated, self.predict_pose(truncated if self.cfg.pose_from_truncated_w else ws)

    def synthesize_planes(
        self, ws: torch.Tensor, noise_mode: str = "random", convert: bool = True
    ) -> torch.Tensor:
        """Tri-planes ``[B, 3, C, R, R]`` (xy, xz, zy) from the backbone's ``3C``-channel image.

        Stored channels-innermost per plane (:func:`~pof3d.triplane.channels_last`), the layout that
        sampling reads fastest: converted once here rather than once per render (G's main phase
        renders the same planes from two cameras). ``convert=False`` returns a view of the backbone's
        channels-last image instead (the planes' channels interleave per texel), which the CPU kernel
        samples in place: for a few thousand points, as the density regulariser samples, that costs
        less than converting the planes and converting their gradient back (docs/training-step.md).
        """
        img = self.backbone(ws, noise_mode=noise_mode)
        b, _, h, w = img.shape
        c = self.cfg.triplane_channels
        if not convert:
            return img.view(b, 3, c, h, w)
        # Converted through the texel-major view of the image ([B, H, W, 3C]: no copy when the image is
        # channels-last, as the backbone makes it), so that the planes' gradient goes back into the
        # image's own layout with one transposing copy; through the [B, 3, C, H, W] view it took two, the
        # second into channels-last for the backbone's last layer.
        rows = img.permute(0, 2, 3, 1).reshape(b, h, w, 3, c).permute(0, 3, 1, 2, 4).contiguous()
        return rows.permute(0, 1, 4, 2, 3)

    def render(
        self, planes: torch.Tensor, ws: torch.Tensor, pose: torch.Tensor, noise_mode: str = "random"
    ) -> dict[str, torch.Tensor]:
        """Render the planes from ``pose``: dict(image [B,3,H,W], image_raw [B,3,r,r], depth [B,1,r,r]).

        The super-resolution's noise follows ``model.sr_noise_mode``: "none" (the official code's: its SR
        never injects noise, whatever the call asks) or a fixed mode, or "caller" for ``noise_mode``.
        """
        m = self.cfg
        b, r = planes.shape[0], m.neural_resolution
        cam2world = pose_to_cam2world(pose.to(torch.float32), m.camera_radius, m.pivot, m.pitch_output)
        intr = intrinsics(m.focal, b, device=planes.device)
        origins, dirs = make_rays(cam2world, intr, r)
        out = self.renderer(planes, self.decoder, origins, dirs)
        features = out["features"].permute(0, 2, 1).reshape(b, -1, r, r)
        depth = out["depth"].permute(0, 2, 1).reshape(b, 1, r, r)
        image_raw = features[:, :3]
        sr_noise = noise_mode if m.sr_noise_mode == "caller" else m.sr_noise_mode
        image = self.superres(image_raw, features, ws, noise_mode=sr_noise)
        return {"image": image, "image_raw": image_raw, "depth": depth}

    def density(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Density ``[B, N, 1]`` at world points ``[B, N, 3]`` (for the density regulariser and meshes).

        The decoder computes it in float32 whatever ``train.precision``: the density regulariser compares
        the densities of points 0.004 apart, whose difference bfloat16's 8-bit mantissa does not resolve
        (in bf16 the regulariser's gradient of the decoder was 10 % off the float32 one, in float32 1 %).
        """
        with precision.float32():
            return self.renderer.density(planes, self.decoder, points)

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        pose: torch.Tensor | None = None,
        noise_mode: str = "random",
        update_w_avg: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Full pass; ``pose`` overrides the learned pose (e.g. for view sweeps and mirrored renders).

        With truncation the learned pose is that of the untruncated w (see :meth:`map_with_pose`).
        """
        ws, learned = self.map_with_pose(z, truncation_psi=truncation_psi, update_w_avg=update_w_avg)
        if pose is None:
            pose = learned
        planes = self.synthesize_planes(ws, noise_mode=noise_mode)
        out = self.render(planes, ws, pose, noise_mode=noise_mode)
        out.update(pose=pose, ws=ws, planes=planes)
        return out


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Trainable parameter count per direct child plus ``total``, e.g. for logging model sizes."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    counts["total"] = sum(p.numel() for p in module.parameters())
    return counts
