"""Typed configuration: dataclasses per concern, dotted overrides, validation.

One resolved :class:`Config` travels with every run and checkpoint as JSON. The named presets build on
these dataclasses in :mod:`pof3d.presets`, whose :func:`~pof3d.presets.load_config` picks one and applies
``--set`` overrides (:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from pof3d.batch_split import check_split
from pof3d.config_choices import check_choices
from pof3d.config_fields import coerce_value, valid_fields
from pof3d.errors import ConfigError

logger = logging.getLogger(__name__)

# Normalised focal length f = 1 / (tan(FoV/2) * sqrt(2)) for EG3D's FFHQ FoV of 18.837 degrees.
FFHQ_FOCAL = 1.0 / (math.tan(math.radians(18.837) / 2) * math.sqrt(2))
# ShapeNet cars in EG3D's dataset labels use this normalised focal length.
CARS_FOCAL = 1.025390625


@dataclass
class ModelConfig:
    """Generator and discriminator architecture, camera model and renderer settings."""

    # Mapping network.
    z_dim: int = 512  #: size of the latent z
    w_dim: int = 512  #: size of the intermediate latent w
    mapping_layers: int = 2  #: fully connected layers of the mapping network z -> w
    mapping_lr_mult: float = 0.01  #: learning-rate multiplier of the mapping network
    w_avg_beta: float = 0.998  #: decay of the running mean of w used by truncation
    # StyleGAN2 synthesis backbone producing tri-planes.
    channel_base: int = 32768  #: backbone width budget: a block's channels are min(base / res, max)
    channel_max: int = 512  #: widest backbone block
    triplane_resolution: int = 256  #: side of each tri-plane, in feature cells
    triplane_channels: int = 32  #: feature channels per tri-plane
    use_noise: bool = True  #: per-pixel noise inputs in the backbone (StyleGAN2's)
    #: super-resolution noise: none (the official code's), random, const, or caller (the mode G is
    #: called with)
    sr_noise_mode: str = "none"
    # Tri-plane decoder and volume rendering.
    decoder_hidden: int = 64  #: hidden width of the tri-plane feature decoder
    decoder_features: int = 32  #: feature channels out of the decoder; the first 3 are RGB
    neural_resolution: int = 64  #: side of the volume-rendered feature image
    image_resolution: int = 256  #: output side; the paper's FFHQ run: 256 px, 4x super-resolution from 64
    sr_channels: int = 128  #: widest super-resolution block
    depth_samples: int = 48  #: stratified samples per ray
    importance_samples: int = 48  #: importance samples per ray, drawn from the first pass's weights
    ray_start: float = 2.25  #: near bound of each ray, in world units from the camera
    ray_end: float = 3.3  #: far bound of each ray, in world units from the camera
    box_warp: float = 1.0  #: side of the cube the tri-planes span, in world units
    white_background: bool = False  #: composite renders over white (cars) instead of black
    triplane_quirk: bool = True  #: EG3D's plane projection, third plane (z, x); the official code's `wrong`
    # Camera: look-at from (yaw h, pitch v) on a sphere around the world origin.
    camera_radius: float = 2.7  #: distance of the camera from the world origin
    pivot: tuple[float, float, float] = (0.0, 0.0, 0.2)  #: point the camera looks at
    focal: float = FFHQ_FOCAL  #: focal length normalised by image size
    # Pose learner.
    yaw_center: float = math.pi / 2  #: yaw h the pose learner's output is centred on (radians)
    pitch_center: float = math.pi / 2  #: pitch v the pose learner's output is centred on (radians)
    pose_clamp: bool = False  #: clamp learned poses (cars): h in [0, 2pi], v in [0, pi]
    #: pass the gradient through the clamp; False: the official code's hard clamp (no gradient outside)
    pose_clamp_straight_through: bool = False
    pose_hidden: int = 512  #: hidden width of the pose learner
    #: take the pose from the truncated w; False: from the untruncated w, as the official code
    pose_from_truncated_w: bool = False
    pose_init_scale: float = 1.0  #: output layer's initial scale; 1.0 = the official code's (~45 deg spread)
    #: the model's pitch coordinate: eg3d's v (the official code) or polar (the camera's polar angle)
    pitch_output: str = "eg3d"
    # Discriminator.
    disc_channel_base: int = 32768  #: D's width budget: a block's channels are min(base / res, max)
    disc_channel_max: int = 512  #: widest D block
    mbstd_group: int = 4  #: group size of D's minibatch standard-deviation layer
    cmap_dim: int = 512  #: size of D's pose embedding (the projection's dimension)
    cmap_layers: int = 8  #: layers of the pose-to-cmap mapping (EG3D's label mapping depth)
    pose_aware_d: bool = True  #: D predicts the pose and scores images conditioned on it
    #: reduced-precision layers (train.precision auto on a GPU, or fp16): D's num_fp16_res highest-resolution
    #: blocks and, when > 0, the super-resolution blocks
    num_fp16_res: int = 4
    backbone_num_fp16_res: int = 0  #: reduced-precision blocks of the tri-plane backbone (official code: 0)


@dataclass
class LossConfig:
    """Loss weights and regularisation intervals; a zero weight removes its term."""

    r1_gamma: float = 1.0  #: weight of D's R1 gradient penalty on reals
    r1_interval: int = 16  #: steps between R1 penalties (lazy regularisation)
    density_reg_weight: float = 0.25  #: weight of the density smoothness regulariser
    density_reg_interval: int = 4  #: steps between density regularisations
    density_reg_sigma: float = 0.004  #: offset of the perturbed point the density is compared with
    symmetry_weight: float = 1.0  #: weight of the G and D terms on mirrored-camera renders
    symmetry_mode: str = "flip_both"  #: mirror of the camera: flip_both | flip_both_cars | left_right
    pose_gd_weight: float = 1.0  #: pulls the pose learner toward D's pose prediction
    dis_cam_weight: float = 2.0  #: trains D's pose head on generated images
    #: D's input blur fades out over blur_fade_kimg x train.batch / 32 kimg (effective_blur_fade_kimg),
    #: as the official code's batch * 200 / 32
    blur_fade_kimg: float = 200.0
    #: scale the blur fade with the batch; off: it lasts blur_fade_kimg itself
    blur_fade_scales_with_batch: bool = True
    #: the official code's sigma: taps 2^-(t / sigma)^2 (a Gaussian of std 0.85 sigma) out to floor(3 sigma),
    #: zero padding (pof3d.layers.gaussian_blur)
    blur_init_sigma: float = 10.0
    #: where the density regulariser draws its points: "cube" = U[-1, 1]^3 in world units, as the official
    #: code does whatever box_warp is; "box" = inside the tri-plane box (+-box_warp / 2), where every point
    #: reaches the tri-planes (with box_warp=1 seven in eight "cube" points lie outside it and add nothing)
    density_reg_region: str = "cube"
    #: drop a G_main or D_main update (zero gradient, the optimiser still steps) when any latent of the
    #: global batch has its learned pitch at or beyond a pole: the official code's faces camera is NaN there
    #: and its loop zeroes NaN gradients, so the update is lost. Off: such poses render at the pole.
    #: Never applies with model.pose_clamp (the official code clamps cars' poses instead)
    skip_past_pole: bool = True
    #: while the blur fades, a pose-aware D predicts the pose from the image blurred once and scores the
    #: image blurred twice, as the official code does (its pose call and its score call each blur the same
    #: image in place). False: one blur and one D pass for both (cheaper until the blur has faded)
    double_blur: bool = True
    #: reals' raw image (D's second input) is a plain bilinear resize, as the official code computes (the
    #: antialias argument of its filtered_resizing is commented out); true: EG3D's antialiased resize
    real_raw_antialias: bool = False


@dataclass
class OptimConfig:
    """Adam settings per network; the pose learner has its own rate (the poster's lr rows)."""

    g_lr: float = 0.0025  #: generator learning rate
    d_lr: float = 0.002  #: discriminator learning rate
    pose_lr: float = 2.5e-5  #: pose learner learning rate (the poster's ablation varies it)
    beta1: float = 0.0  #: Adam's beta1, all networks
    beta2: float = 0.99  #: Adam's beta2, all networks
    eps: float = 1e-8  #: Adam's epsilon, all networks
    #: half-life of G's moving average: ema_kimg x train.batch / 32 kimg (effective_ema_kimg), as the
    #: official code's batch * 10 / 32
    ema_kimg: float = 10.0
    #: scale the EMA half-life with the batch; off: it is ema_kimg itself
    ema_scales_with_batch: bool = True
    ema_rampup: float = 0.05  #: early on the half-life is at most ema_rampup x images seen (0: no ramp-up)


@dataclass
class DataConfig:
    """Where images come from; an empty path means the built-in synthetic set."""

    path: str = ""  #: shard directory or URI; empty: the built-in synthetic set
    synthetic_n: int = 20000  #: images in the built-in synthetic set
    synthetic_poses: str = "faces"  #: pose distribution of the synthetic set: faces | cars
    resolution: int = 256  #: image side of the data; must equal model.image_resolution
    xflip: bool = False  #: add horizontally mirrored copies of the reals
    shuffle_seed: int = 0  #: seed of the data order
    #: decode tasks each training worker may have running at once (each one a Ray worker process, about
    #: 2 CPU seconds to start; one 0.25-CPU task decodes hundreds of images/s); 0 = as many as the free
    #: CPUs allow
    decode_tasks: int = 1


@dataclass
class TrainConfig:
    """Length, batch, cadence of ticks/snapshots/evaluation, and distributed settings."""

    kimg: float = 25000.0  #: training length in thousands of real images shown to D
    batch: int = 32  #: global batch over all workers: one optimiser step, whatever the worker count
    #: images per micro-batch (EG3D's batch_gpu: the most one device processes at once); each worker
    #: accumulates the gradients of whole micro-batches; 0 = the batch shared among the workers
    batch_gpu: int = 0
    tick_kimg: float = 4.0  #: progress line, metrics and tracking cadence, in kimg
    snapshot_kimg: float = 200.0  #: checkpoint + sample grid cadence, in kimg
    eval_kimg: float = 0.0  #: evaluation cadence in kimg; 0 = no metrics during training
    eval_metrics: str = "pose,js"  #: comma-separated metrics of the evaluations during training
    #: generated images per evaluation during training (image metrics, depth) and real images for D's
    #: pose error; JS always draws at least 10,000 poses
    eval_samples: int = 1000
    seed: int = 0  #: random seed of the networks and the latents
    workers: int = 1  #: Ray Train workers (data-parallel replicas); an elastic run's fewest
    #: an elastic run's most workers (--workers MIN-MAX): Ray Train grows the group toward it when nodes
    #: join and shrinks it, down to train.workers, when they go, each time restarting from the latest
    #: checkpoint (pof3d/distributed/elastic.py); 0 = a fixed train.workers
    max_workers: int = 0
    #: seconds between an elastic run's looks for room to grow (Ray Train's
    #: elastic_resize_monitor_interval_s); a lost worker restarts the group at once
    resize_interval_s: float = 60.0
    #: before a resize grows the group, wait at most this long for its checkpoint (0: do not ask)
    resize_save_timeout_s: float = 120.0
    gpus_per_worker: float = 0.0  #: GPUs per worker (0 = CPU)
    cpus_per_worker: float = 0.5  #: CPUs each worker holds; the rest is left to Ray Data's decoding
    #: torch threads of each worker; 0 = the node's cores shared evenly among its workers, less one for
    #: the data pipeline (Ray would give a worker one thread per CPU it holds: one for a 0.5-CPU worker)
    cpu_threads: int = 0
    keep_checkpoints: int = 3  #: newest checkpoints kept in the run directory
    max_failures: int = 2  #: worker-group failures Ray Train recovers from before the run fails
    #: wall-clock bound in minutes (0 = none), counted from the start of the launch (Ray workers
    #: starting, resumes and retries after a failure included; preparing the data before it is not).
    #: When it is reached, rank 0 decides, every worker stops after the same step, and the run ends as
    #: at its kimg target: final checkpoint and evaluation, reported finished ("time limit after X
    #: kimg"). A later --resume gets a new bound of its own
    time_limit_min: float = 0.0
    #: how long the driver waits, in minutes, for an autoscaler to add the nodes a run needs before it
    #: gives up (pof3d/distributed/resources.py); 0 = do not wait. A cluster without an autoscaler fails
    #: at once
    resource_wait_min: float = 30.0
    #: torch.compile the generator's backbone and super-resolution; the compiled graphs are kept in
    #: $POF3D_CACHE/inductor for the next start on the node (pof3d/compile_cache.py); off by default:
    #: on a CPU it has not paid back (benchmarks/compile.py, docs/training-step.md)
    compile: bool = False
    #: arithmetic of the training phases: auto (the official code's fp16/bf16 layers per
    #: model.num_fp16_res on a GPU, fp32 on a CPU), fp32, bf16 (G's and D's convolutions and matrix
    #: products in bfloat16, any device) or fp16 (the num_fp16_res layers in float16, clamped to +-256,
    #: any device); pose learner, rendering, losses and optimiser stay fp32 (docs/training-step.md#precision)
    precision: str = "auto"
    retain_cpu_memory: bool = True  #: CPU workers keep freed memory (pof3d/host_memory.py)

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers of the run; the same count twice when it is fixed."""
        return self.workers, max(self.workers, self.max_workers)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "ffhq256"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        cfg = cls()
        for key, value in data.items():
            if key == "preset":
                cfg.preset = str(value)
                continue
            section = _section(cfg, key)
            for name, raw in value.items():
                removed = REMOVED_FIELDS.get(f"{key}.{name}")
                if removed is not None:
                    logger.warning("ignoring config field %s.%s=%r, removed: %s", key, name, raw, removed)
                    continue
                _set_field(section, key, name, raw)
        validate(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object of sections")
        return cls.from_dict(data)

    def flat(self) -> dict[str, Any]:
        """Flat ``section.field`` mapping, e.g. for MLflow params."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            for name, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{name}"] = value
        return out


SECTIONS = ("model", "loss", "optim", "data", "train")

# Fields that earlier versions saved in config.json and that no longer exist, with the reason. A saved
# config that holds one still loads (the field is ignored, with a warning); an override naming one fails.
REMOVED_FIELDS = {
    "loss.share_passes": "the shared passes are the only training schedule; the official code's independent "
    "passes live in pof3d/testing/reference_schedule.py (tests and benchmarks/step.py --compare)",
}


def _section(cfg: Config, name: str) -> Any:
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; expected one of {', '.join(SECTIONS)}")
    return getattr(cfg, name)


def _set_field(section: Any, section_name: str, name: str, raw: Any) -> None:
    hints = typing.get_type_hints(type(section))
    removed = REMOVED_FIELDS.get(f"{section_name}.{name}")
    if removed is not None:
        raise ConfigError(f"{section_name}.{name} was removed: {removed}")
    if name not in hints:
        raise ConfigError(f"unknown field {section_name}.{name}; {valid_fields(Config(), section_name)}")
    setattr(section, name, coerce_value(raw, hints[name], f"{section_name}.{name}"))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings in order and validate the result."""
    cfg = Config.from_dict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected SECTION.FIELD=VALUE")
        path, value = item.split("=", 1)
        if path.count(".") != 1:
            raise ConfigError(f"override {item!r}: expected SECTION.FIELD=VALUE, e.g. loss.symmetry_weight=0")
        section_name, name = path.strip().split(".")
        _set_field(_section(cfg, section_name), section_name, name, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that make a config unusable; raised before any work starts."""
    m, loss, t = cfg.model, cfg.loss, cfg.train
    ratio = m.image_resolution / m.neural_resolution
    if ratio not in (1, 2, 4, 8):
        raise ConfigError(
            f"model.image_resolution={m.image_resolution} must be 1, 2, 4 or 8 times "
            f"model.neural_resolution={m.neural_resolution}"
        )
    for name in ("image_resolution", "neural_resolution", "triplane_resolution"):
        value = getattr(m, name)
        if value < 4 or value & (value - 1):
            raise ConfigError(f"model.{name}={value}: expected a power of two >= 4")
    if m.ray_start >= m.ray_end or m.ray_start < 0:
        raise ConfigError(f"model.ray_start={m.ray_start} must be >= 0 and below model.ray_end={m.ray_end}")
    check_choices(cfg)  # the fields of named values, e.g. loss.symmetry_mode, train.precision
    if not m.pose_init_scale > 0:
        raise ConfigError(f"model.pose_init_scale={m.pose_init_scale}: expected a positive number")
    if t.eval_samples < 2:
        raise ConfigError(f"train.eval_samples={t.eval_samples}: expected at least 2 (FID needs two images)")
    positive = {
        "train.batch": t.batch,
        "train.workers": t.workers,
        "loss.r1_interval": loss.r1_interval,
        "loss.density_reg_interval": loss.density_reg_interval,
        "model.depth_samples": m.depth_samples,
        "model.cmap_layers": m.cmap_layers,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}={value}: expected a positive value")
    for name in ("kimg", "tick_kimg", "snapshot_kimg"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(t, name)}: expected a positive number")
    if t.time_limit_min < 0:
        raise ConfigError(f"train.time_limit_min={t.time_limit_min}: expected minutes >= 0 (0 = no limit)")
    if t.resource_wait_min < 0:
        raise ConfigError(f"train.resource_wait_min={t.resource_wait_min}: expected minutes >= 0 (0 = none)")
    if t.max_workers < 0 or 0 < t.max_workers < t.workers:
        raise ConfigError(
            f"train.max_workers={t.max_workers}: expected 0 (a fixed train.workers) or at least "
            f"train.workers={t.workers} (--workers MIN-MAX with MIN <= MAX)"
        )
    check_split(t.batch, t.batch_gpu, *t.worker_range())
    for name in ("resize_interval_s", "resize_save_timeout_s"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)}: expected seconds >= 0")
    if t.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads={t.cpu_threads}: expected 0 (automatic) or a thread count")
    if t.cpus_per_worker <= 0 and t.gpus_per_worker <= 0:
        raise ConfigError("train.cpus_per_worker and train.gpus_per_worker cannot both be 0")
    if cfg.data.decode_tasks < 0:
        raise ConfigError(f"data.decode_tasks={cfg.data.decode_tasks}: expected 0 (no cap) or a task count")
    if cfg.data.resolution != m.image_resolution:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} must equal model.image_resolution={m.image_resolution}"
        )
