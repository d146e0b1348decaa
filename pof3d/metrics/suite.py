"""All metrics of one generator in one call: the glue between the metric maths and the model/data.

Used by ``python -m pof3d.evaluate`` and by training every ``train.eval_kimg``. A metric whose inputs
are missing (no data, no ground-truth poses or depth, no Inception weights, no pose head) is skipped
with a logged warning, so that evaluation during training never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pof3d.camera import pose_to_cam2world, to_eg3d
from pof3d.config import Config
from pof3d.data.shards import iter_rows, load_arrays, read_manifest
from pof3d.data.synthetic import sample_poses
from pof3d.errors import ConfigError
from pof3d.layers import resize
from pof3d.loss import real_raw_image
from pof3d.metrics import depth as depthlib
from pof3d.metrics import fid as fidlib
from pof3d.metrics import random_features
from pof3d.metrics.js import pose_js
from pof3d.metrics.pose import constant_guess_error_deg, pose_error_deg, predict_poses
from pof3d.metrics.reprojection import reprojection_error

log = logging.getLogger(__name__)

# Metric groups and the names they report; any of these names may be asked for.
GROUPS: dict[str, tuple[str, ...]] = {
    "pose": ("pose_error_deg", "pose_error_guess_deg"),
    "js": ("js", "js_yaw", "js_pitch"),
    "depth": ("depth_error", "depth_estimator_error"),
    "re": ("reprojection_error",),
    "fid": ("fid",),
    "kid": ("kid",),
    # Stand-ins for FID/KID over a fixed random network (pof3d.metrics.random_features): no weights needed.
    "fd_random": ("fd_random",),
    "kd_random": ("kd_random",),
}
INCEPTION_GROUPS = ("fid", "kid")
RANDOM_GROUPS = ("fd_random", "kd_random")
RE_YAW_OFFSET_DEG = 15.0  # second view of the reprojection error: the learned pose turned by this yaw
RE_SAMPLES = 64  # latents for RE (two renders each)
DEPTH_SAMPLES = 256  # generated images for the depth error
FOREGROUND_DEPTH = 0.95  # rendered depth below ray_start + this * (ray_end - ray_start) is foreground
BATCH = 16
# Learned poses (and sampler draws) for JS: only the mapping and pose learner run, so many are cheap,
# and the histogram noise floor of JS falls with the sample count (documented in the README metrics section).
JS_SAMPLES = 10000


def resolve_metrics(names: list[str]) -> list[str]:
    """Map requested names (groups such as ``re`` or reported names such as ``js_yaw``) to groups."""
    lookup = {g: g for g in GROUPS} | {name: g for g, names in GROUPS.items() for name in names}
    groups = []
    for name in names:
        key = name.strip().lower()
        if key not in lookup:
            raise ConfigError(f"unknown metric {name!r}; expected some of {', '.join(GROUPS)}")
        if lookup[key] not in groups:
            groups.append(lookup[key])
    return groups


@dataclass
class _Fakes:
    """Generated samples kept for the metrics that need images/depth (not the FID set)."""

    images: torch.Tensor  # [n, 3, r, r] at the neural resolution (for the depth error)
    depth: torch.Tensor  # [n, 1, r, r]


@dataclass
class _Run:
    """What every metric of one evaluation shares."""

    G: torch.nn.Module
    cfg: Config
    data_uri: str | None
    num_samples: int
    device: torch.device
    seed: int
    cache: Path


def _latents(n: int, z_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, size: int = BATCH) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def _to_images(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def _data_key(data_uri: str, *parts: object) -> str:
    """Cache key of a shard set: its manifest (with checksums) plus what else the cached item depends on."""
    text = json.dumps(read_manifest(data_uri), sort_keys=True, default=str) + "|".join(map(str, parts))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _foreground(depth: torch.Tensor, cfg: Config) -> torch.Tensor:
    m = cfg.model
    return depth < m.ray_start + FOREGROUND_DEPTH * (m.ray_end - m.ray_start)


@torch.no_grad()
def _learned_poses(G: torch.nn.Module, n: int, z_dim: int, seed: int, device) -> np.ndarray:
    z = _latents(n, z_dim, seed).to(device)
    poses = [G.eg3d_pose(G.predict_pose(G.map(b))) for b in _batches(z, 256)]
    return torch.cat(poses).cpu().double().numpy()


def _true_poses(cfg: Config, data_uri: str | None, n: int, seed: int) -> np.ndarray | None:
    """Every ground-truth pose of the shard set (pose column only), or ``n`` draws of the synthetic
    setting's sampler when there is no data; None when the data has no poses."""
    if data_uri:
        rows = [row["pose"] for row in iter_rows(data_uri, ["pose"]) if row["pose"] is not None]
        poses = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        poses = poses[np.isfinite(poses).all(axis=1)]
        return poses if len(poses) else None
    return np.asarray(
        sample_poses(cfg.data.synthetic_poses, n, np.random.default_rng(seed)), dtype=np.float64
    )


@torch.no_grad()
def _pose_error(D: torch.nn.Module, cfg: Config, real: dict, device) -> dict[str, float] | None:
    """D's pose error on the real images with a pose, and the constant-guess floor on the same images."""
    poses = torch.as_tensor(np.asarray(real["pose"], dtype=np.float32))
    keep = torch.isfinite(poses).all(-1)
    if not keep.any():
        log.warning("pose error skipped: the data has no ground-truth poses")
        return None
    images = _to_images(real["image"][keep.numpy()], "cpu")
    res = cfg.model.image_resolution

    def predictor(x: torch.Tensor) -> torch.Tensor:
        x = resize(x.to(device), res, antialias=True)
        return to_eg3d(D.predict_pose(D.features(x, real_raw_image(x, cfg))), cfg.model.pitch_output)

    return {
        "pose_error_deg": pose_error_deg(predict_poses(predictor, images), poses[keep]),
        "pose_error_guess_deg": constant_guess_error_deg(poses[keep]),
    }


@torch.no_grad()
def _generate(
    run: _Run, feature_fns: dict[str, fidlib.FeatureFn], keep: int
) -> tuple[dict[str, np.ndarray], _Fakes | None]:
    """Render the samples once; features of all of them per feature network, images/depth of the first
    ``keep``."""
    z = _latents(run.num_samples, run.cfg.model.z_dim, run.seed + 1)
    features: dict[str, list[np.ndarray]] = {name: [] for name in feature_fns}
    kept_images, kept_depth = [], []
    r = run.cfg.model.neural_resolution
    for i, zb in enumerate(_batches(z)):
        out = run.G(zb.to(run.device), noise_mode="const")
        for name, fn in feature_fns.items():
            features[name].append(fn(out["image"]).double().cpu().numpy())
        if i * BATCH < keep:
            kept_images.append(resize(out["image"], r, antialias=True).cpu())
            kept_depth.append(out["depth"].cpu())
    stacked = {name: np.concatenate(parts) for name, parts in features.items() if parts}
    if not kept_images:
        return stacked, None
    return stacked, _Fakes(torch.cat(kept_images)[:keep], torch.cat(kept_depth)[:keep])


@torch.no_grad()
def _reprojection(G, cfg: Config, n: int, seed: int, device) -> float:
    m = cfg.model
    errors = []
    for zb in _batches(_latents(n, m.z_dim, seed + 2)):
        ws = G.map(zb.to(device))
        pose1 = G.predict_pose(ws)
        pose2 = pose1 + torch.tensor([math.radians(RE_YAW_OFFSET_DEG), 0.0], device=device)
        planes = G.synthesize_planes(ws, noise_mode="const")
        views = [G.render(planes, ws, p, noise_mode="const") for p in (pose1, pose2)]
        cams = [
            pose_to_cam2world(p.float(), m.camera_radius, m.pivot, m.pitch_output) for p in (pose1, pose2)
        ]
        errors.append(
            reprojection_error(
                views[0]["image_raw"],
                views[0]["depth"],
                cams[0],
                views[1]["image_raw"],
                views[1]["depth"],
                cams[1],
                m.focal,
                _foreground(views[0]["depth"], cfg),
                _foreground(views[1]["depth"], cfg),
            ).cpu()
        )
    values = torch.cat(errors)
    return float(values[torch.isfinite(values)].mean()) if torch.isfinite(values).any() else float("nan")


def evaluate_generator(
    G: torch.nn.Module,
    D: torch.nn.Module | None,
    cfg: Config,
    data_uri: str | None,
    metrics: list[str],
    *,
    num_samples: int = 1000,
    device: str | torch.device = "cpu",
    seed: int = 0,
    inception_path: str | None = None,
    feature_fn: fidlib.FeatureFn | None = None,
    cache: Path | None = None,
) -> dict[str, float]:
    """Compute the requested metrics of generator ``G`` (pass G_ema) and discriminator ``D``.

    ``data_uri``: shard set with the real images (and poses/depth where known); None means the
    built-in synthetic setting (JS against its true pose sampler; no image metrics). ``feature_fn``
    replaces the Inception network (its real-image features are then not cached); ``cache`` is the
    folder for real-image features and the depth estimator (default :func:`pof3d.metrics.fid.cache_dir`).
    """
    groups = resolve_metrics(metrics)
    run = _Run(G, cfg, data_uri, num_samples, torch.device(device), seed, Path(cache or fidlib.cache_dir()))
    results: dict[str, float] = {}
    started = time.perf_counter()
    modes = (G.training, D.training if D is not None else False)
    G.eval()
    if D is not None:
        D.eval()
    try:
        real = None
        if data_uri and set(groups) & {"pose", "depth", "fid", "kid"}:
            real = load_arrays(data_uri, limit=num_samples)
        if "js" in groups:
            n_js = max(num_samples, JS_SAMPLES)
            true = _true_poses(cfg, data_uri, n_js, seed)
            if true is None:
                log.warning("JS skipped: the data has no ground-truth poses")
            else:
                results.update(pose_js(_learned_poses(G, n_js, cfg.model.z_dim, seed, run.device), true))
        if "pose" in groups:
            if real is None or D is None or not getattr(D, "pose_aware", False):
                log.warning("pose error skipped: needs data with poses and a pose-aware discriminator")
            elif (values := _pose_error(D, cfg, real, run.device)) is not None:
                results.update(values)
        if "re" in groups:
            results["reprojection_error"] = _reprojection(
                G, cfg, min(num_samples, RE_SAMPLES), seed, run.device
            )
        results.update(_image_metrics(run, real, groups, inception_path, feature_fn))
    finally:
        G.train(modes[0])
        if D is not None:
            D.train(modes[1])
    summary = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
    log.info("metrics %s in %.1f s", summary, time.perf_counter() - started)
    return results


def _image_metrics(
    run: _Run, real: dict | None, groups: list[str], inception_path: str | None, feature_fn
) -> dict[str, float]:
    """FID/KID, their random-network stand-ins and depth error: the metrics that need many generated
    images (rendered once for all of them)."""
    results: dict[str, float] = {}
    wanted = [g for g in groups if g in INCEPTION_GROUPS + RANDOM_GROUPS]
    if wanted and real is None:
        log.warning("%s skipped: needs data with real images", "/".join(wanted))
        wanted = []
    # Each feature network: (function, cache folder or None, cache key, the distances it serves).
    networks: dict[str, tuple[fidlib.FeatureFn, Path | None, str, list[str]]] = {}
    inception = [g for g in wanted if g in INCEPTION_GROUPS]
    if inception:
        custom = feature_fn is not None
        try:
            fn = feature_fn if custom else fidlib.load_inception(inception_path, run.device)
            key = _data_key(run.data_uri, "inception", fidlib.INCEPTION_SHA256, len(real["image"]))
            networks["inception"] = (fn, None if custom else run.cache / "stats", key, inception)
        except fidlib.WeightsError as exc:
            log.warning("%s skipped: %s", "/".join(inception), exc)
    stand_in = [g for g in wanted if g in RANDOM_GROUPS]
    if stand_in:
        fn = random_features.random_feature_fn(run.device)
        key = _data_key(
            run.data_uri, "random", random_features.SEED, random_features.VERSION, len(real["image"])
        )
        networks["random"] = (fn, run.cache / "stats", key, stand_in)
    estimator = None
    if "depth" in groups:
        if real is None or "depth" not in real:
            log.warning("depth error skipped: needs data with ground-truth depth")
        else:
            r = run.cfg.model.neural_resolution
            key = _data_key(run.data_uri, "depth", r)
            estimator, results["depth_estimator_error"] = depthlib.load_or_train_estimator(
                real["image"], real["depth"], r, key, run.cache / "depth", device=run.device
            )
    if not networks and estimator is None:
        return results
    keep = min(run.num_samples, DEPTH_SAMPLES) if estimator is not None else 0
    fake_features, fakes = _generate(run, {name: net[0] for name, net in networks.items()}, keep)
    if estimator is not None:
        mask = _foreground(fakes.depth, run.cfg)
        per_image = depthlib.generated_depth_error(estimator, fakes.images, fakes.depth, mask)
        finite = per_image[torch.isfinite(per_image)]
        results["depth_error"] = float(finite.mean()) if len(finite) else float("nan")
    batches = lambda: (_to_images(b, run.device) for b in _chunks(real["image"]))  # noqa: E731
    for name, (fn, folder, key, distances) in networks.items():
        real_features = fidlib.cached_features(fn, batches, key, folder)
        fake = fake_features[name]
        for distance in distances:
            if distance in ("fid", "fd_random"):
                results[distance] = fidlib.fid_from_features(real_features, fake)
            else:
                results[distance] = fidlib.kid_from_features(real_features, fake, seed=run.seed)
    return results


def _chunks(pixels: np.ndarray, size: int = 64) -> Iterator[np.ndarray]:
    for i in range(0, len(pixels), size):
        yield pixels[i : i + size]
