"""All metrics of one generator in one call: the glue between the metric maths and the model/data.

Used by ``python -m pof3d.evaluate`` and by training every ``train.eval_kimg``, where all workers
share the rendering of the image metrics (:mod:`pof3d.metrics.spread`). A metric whose inputs are
missing (no data, no ground-truth poses or depth, no Inception weights, no pose head) is skipped with a
logged warning, so that evaluation during training never stops a run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pof3d.cache import cache_dir
from pof3d.camera import pose_to_cam2world, to_eg3d
from pof3d.config import Config
from pof3d.data.shard_reader import iter_rows, load_arrays
from pof3d.data.synthetic_scene import sample_poses
from pof3d.errors import ConfigError
from pof3d.layers import resize
from pof3d.loss import real_raw_image
from pof3d.metrics import fid as fidlib
from pof3d.metrics.image_metrics import image_metrics
from pof3d.metrics.js import pose_js
from pof3d.metrics.pose import constant_guess_error_deg, pose_error_deg, predict_poses
from pof3d.metrics.reprojection import reprojection_error
from pof3d.metrics.samples import EvalRun, batches, foreground, latents, to_images
from pof3d.metrics.spread import ALONE, Spread

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
RE_YAW_OFFSET_DEG = 15.0  # second view of the reprojection error: the learned pose turned by this yaw
RE_SAMPLES = 64  # latents for RE (two renders each)
# Learned poses (and sampler draws) for JS: only the mapping and pose learner run, so many are cheap,
# and the histogram noise floor of JS falls with the sample count (documented in the README metrics section).
JS_SAMPLES = 10000
# What `python -m pof3d.evaluate` reports unless told otherwise, plus fid (or fd_random without weights).
DEFAULT_GROUPS = ("pose", "js", "depth", "re")


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


def default_metrics(inception_path: str | None = None) -> list[str]:
    """The default groups: :data:`DEFAULT_GROUPS` and ``fid`` when the Inception file is there, else
    ``fd_random`` (saying so in one warning, with how to fetch the file)."""
    try:
        fidlib.find_inception(inception_path)
    except fidlib.WeightsError as exc:
        log.warning("fd_random instead of fid: %s", exc)
        return [*DEFAULT_GROUPS, "fd_random"]
    return [*DEFAULT_GROUPS, "fid"]


@torch.no_grad()
def _learned_poses(G: torch.nn.Module, n: int, z_dim: int, seed: int, device) -> np.ndarray:
    z = latents(n, z_dim, seed).to(device)
    poses = [G.eg3d_pose(G.predict_pose(G.map(b))) for b in batches(z, 256)]
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
    images = to_images(real["image"][keep.numpy()], "cpu")
    res = cfg.model.image_resolution

    def predictor(x: torch.Tensor) -> torch.Tensor:
        x = resize(x.to(device), res, antialias=True)
        return to_eg3d(D.predict_pose(D.features(x, real_raw_image(x, cfg))), cfg.model.pitch_output)

    return {
        "pose_error_deg": pose_error_deg(predict_poses(predictor, images), poses[keep]),
        "pose_error_guess_deg": constant_guess_error_deg(poses[keep]),
    }


@torch.no_grad()
def _reprojection(G, cfg: Config, n: int, seed: int, device) -> float:
    m = cfg.model
    errors = []
    for zb in batches(latents(n, m.z_dim, seed + 2)):
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
                foreground(views[0]["depth"], cfg),
                foreground(views[1]["depth"], cfg),
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
    spread: Spread = ALONE,
    inception_fallback: bool = False,
) -> dict[str, float]:
    """Compute the requested metrics of generator ``G`` (pass G_ema) and discriminator ``D``.

    ``data_uri``: shard set with the real images (and poses/depth where known); None means the
    built-in synthetic setting (JS against its true pose sampler; no image metrics). ``feature_fn``
    replaces the Inception network (its real-image features are then not cached); ``cache`` is the
    folder for real-image features and the depth estimator (default :func:`pof3d.cache.cache_dir`).

    ``spread``: the place of this process among the workers that share the evaluation; every one of them
    calls this with the same arguments, each renders its share of the image-metric samples, and rank 0
    returns the figures (the others return ``{}``). ``inception_fallback``: report ``fd_random``/
    ``kd_random`` instead of ``fid``/``kid`` when the Inception file is missing, rather than skipping.
    """
    groups = resolve_metrics(metrics)
    run = EvalRun(G, cfg, data_uri, num_samples, torch.device(device), seed, Path(cache or cache_dir()))
    results: dict[str, float] = {}
    started = time.perf_counter()
    modes = (G.training, D.training if D is not None else False)
    G.eval()
    if D is not None:
        D.eval()
    try:
        # First the spread part: every rank takes part in it, whatever fails later on rank 0.
        images, real = image_metrics(
            run,
            groups,
            inception_path=inception_path,
            feature_fn=feature_fn,
            spread=spread,
            inception_fallback=inception_fallback,
        )
        if not spread.leader:
            return {}
        if real is None and data_uri and "pose" in groups:
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
        results.update(images)
    finally:
        G.train(modes[0])
        if D is not None:
            D.train(modes[1])
    summary = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
    log.info("metrics (%d samples) %s in %.1f s", num_samples, summary, time.perf_counter() - started)
    return results
