"""Named presets: every value the paper scripts (and the fixed benchmark size) set, in one place.

Each preset is a plain function returning a fresh :class:`~pof3d.config.Config`; the dataclass
defaults are the official code's FFHQ run (``ffhq.sh``: 256 px, trained from the 512 px data resized), so a
preset lists only what differs. Select one with :func:`load_config` (or ``--preset``), then override
fields with ``--set``. The paper presets are ``ffhq256``, ``cats256`` and ``cars128``
(``ffhq.sh``, ``cat.sh``, ``shapenet_cars.sh``); ``docs/fidelity.md`` lists where each value comes
from. ``tiny`` and ``anchor`` are the CPU and benchmark sizes, ``anchor_faces`` the benchmark size with
the FFHQ settings (the synthetic-poses study's GPU run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pof3d.config import CARS_FOCAL, Config, apply_overrides, validate
from pof3d.console import listing
from pof3d.errors import ConfigError


def _cars(cfg: Config) -> Config:
    """The ShapeNet-cars camera and loss settings of the paper scripts."""
    m = cfg.model
    m.camera_radius, m.pivot, m.focal = 1.7, (0.0, 0.0, 0.0), CARS_FOCAL
    m.ray_start, m.ray_end, m.box_warp, m.white_background = 0.1, 2.6, 1.6, True
    m.yaw_center, m.pose_clamp = math.pi, True
    m.depth_samples = m.importance_samples = 64
    cfg.loss.r1_gamma, cfg.loss.dis_cam_weight, cfg.loss.pose_gd_weight = 0.3, 2.0, 2.0
    cfg.loss.symmetry_mode = "flip_both_cars"
    cfg.data.synthetic_poses = "cars"
    return cfg


def _paper_evaluation(cfg: Config) -> Config:
    """Metrics at every snapshot, as EG3D's runs compute FID at each one: pose error and JS (data with
    poses, e.g. converted from labelled zips), the reprojection error, and FID (fd_random where the
    Inception file is missing). The rendering is shared by all workers."""
    cfg.train.eval_kimg = cfg.train.snapshot_kimg
    cfg.train.eval_metrics = "pose,js,re,fid"
    return cfg


def ffhq256() -> Config:
    """The paper's FFHQ run (``ffhq.sh``): 256 px output, 4x super-resolution from 64 px renders."""
    return _paper_evaluation(Config(preset="ffhq256"))


def ffhq512() -> Config:
    """A 512 px FFHQ variant (8x super-resolution, EG3D's 8XDC widths); not what the paper ran."""
    cfg = ffhq256()
    cfg.preset = "ffhq512"
    cfg.model.image_resolution = cfg.data.resolution = 512
    cfg.model.sr_channels = 256
    return cfg


def cats256() -> Config:
    """The paper's cats run (``cat.sh``)."""
    cfg = _paper_evaluation(Config(preset="cats256"))
    cfg.model.pivot = (0.0, 0.0, 0.0)
    cfg.loss.r1_gamma, cfg.loss.dis_cam_weight, cfg.loss.pose_gd_weight = 5.0, 10.0, 10.0
    return cfg


def cars128() -> Config:
    """The paper's ShapeNet-cars run (``shapenet_cars.sh``)."""
    cfg = _paper_evaluation(_cars(Config(preset="cars128")))
    cfg.model.image_resolution = cfg.data.resolution = 128
    return cfg


def _anchor_size(cfg: Config) -> Config:
    """The benchmark's network size: 128 px from 64 px renders, narrower than the paper, fp32."""
    m = cfg.model
    m.image_resolution = cfg.data.resolution = 128
    m.neural_resolution, m.triplane_resolution, m.triplane_channels = 64, 256, 32
    m.channel_base, m.channel_max = 8192, 128
    m.disc_channel_base, m.disc_channel_max = 8192, 128
    m.cmap_dim = 128
    m.mapping_layers, m.z_dim, m.w_dim = 2, 512, 512
    m.decoder_hidden, m.depth_samples, m.importance_samples = 64, 24, 24
    m.num_fp16_res = 0
    return cfg


def anchor() -> Config:
    """Fixed benchmark size; must not drift (the official code is timed at exactly this size)."""
    cfg = _anchor_size(_cars(Config(preset="anchor")))
    cfg.train.batch = 4
    return cfg


def anchor_faces() -> Config:
    """The ``anchor`` network on faces: the paper's FFHQ settings (camera, losses, pose learner, rates,
    batch 32) with the benchmark's widths and samples, 128 px on the synthetic ``faces`` set.

    The GPU recipe of the synthetic-poses study (``studies/synthetic_poses/gpu.sh``) trains it. Chosen
    over the paper's full widths at 128 px because its speed on one H200 is measured (28.8 img/s
    amortised, fp32, docs/training-step.md), about 100 kimg an hour, and because the study's question,
    whether the pose learner moves at the paper's rate, needs iterations more than width: the full-width
    model has four times the channels in its tri-plane backbone and D, renders twice the samples per
    ray, and is untimed at this size.
    """
    return _anchor_size(_paper_evaluation(Config(preset="anchor_faces")))


def tiny() -> Config:
    """CPU-sized: 64 px output from 32 px rendering; a few minutes per thousand images on 2 cores."""
    cfg = Config(preset="tiny")
    m = cfg.model
    m.z_dim = m.w_dim = 64
    m.channel_base, m.channel_max = 1024, 64
    m.disc_channel_base, m.disc_channel_max = 1024, 64
    m.cmap_dim = 64
    m.pose_hidden = 64
    m.triplane_resolution, m.triplane_channels = 32, 16
    m.decoder_hidden, m.decoder_features = 32, 16
    m.neural_resolution, m.image_resolution = 32, 64
    m.sr_channels = 32
    m.depth_samples = m.importance_samples = 12
    m.num_fp16_res = 0
    cfg.data.resolution = 64
    cfg.data.synthetic_n = 2000
    # A 5 kimg fade at any batch (not scaled from batch 32 as the paper presets): 1 kimg runs need it.
    cfg.loss.blur_fade_kimg, cfg.loss.blur_fade_scales_with_batch = 5.0, False
    cfg.loss.blur_init_sigma = 2.0
    # Likewise a 0.5 kimg EMA half-life at any batch.
    cfg.optim.ema_kimg, cfg.optim.ema_scales_with_batch = 0.5, False
    t = cfg.train
    t.kimg, t.batch, t.tick_kimg, t.snapshot_kimg = 1.0, 8, 0.2, 0.5
    return cfg


@dataclass(frozen=True)
class Preset:
    """A named preset: the function that builds it and the line ``--help`` shows for it."""

    build: Callable[[], Config]
    summary: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(tiny, "CPU smoke and learning runs: 64 px from 32 px renders, about 1 kimg in minutes"),
    "anchor": Preset(anchor, "the benchmark's fixed size: cars settings, 128 px from 64 px renders, fp32"),
    "ffhq256": Preset(ffhq256, "the paper's FFHQ run (ffhq.sh): 256 px, 4x super-resolution from 64 px"),
    "cats256": Preset(cats256, "the paper's cats run (cat.sh): 256 px, stronger R1 and pose terms"),
    "cars128": Preset(cars128, "the paper's ShapeNet-cars run (shapenet_cars.sh): 128 px, cars camera"),
    "ffhq512": Preset(ffhq512, "512 px FFHQ with 8x super-resolution; not a run of the paper"),
    "anchor_faces": Preset(anchor_faces, "the anchor network with the paper's FFHQ settings (faces, 128 px)"),
}


def presets_help() -> str:
    """The presets, one per line with their summary, for the ``--help`` of the commands that take one."""
    return listing("presets", {name: p.summary for name, p in PRESETS.items()})


def preset(name: str) -> Config:
    """A fresh, validated ``Config`` of the preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg = PRESETS[name].build()
    validate(cfg)
    return cfg


def load_config(name: str, overrides: list[str] | None = None) -> Config:
    """Preset plus ``--set`` overrides, validated."""
    return apply_overrides(preset(name), list(overrides or []))
