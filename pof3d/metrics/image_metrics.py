"""The metrics over many generated images: FID/KID, their random-network stand-ins and the depth error.

The samples are rendered once for all of them. In a spread evaluation (:mod:`pof3d.metrics.spread`)
every rank renders its share and the features are gathered; rank 0 alone reads the real images and
computes the distances. Before anything is rendered the ranks agree, through one gather, on what can
run everywhere (a rank without the Inception file, or whose setup failed, changes what all do), so that
no rank waits forever in a collective the others skip.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pof3d.data.shard_reader import load_arrays
from pof3d.layers import resize
from pof3d.metrics import depth as depthlib
from pof3d.metrics import fid as fidlib
from pof3d.metrics import random_features
from pof3d.metrics.progress import ProgressLog
from pof3d.metrics.samples import BATCH, EvalRun, batches, data_key, foreground, latents, to_images
from pof3d.metrics.spread import ALONE, Spread

log = logging.getLogger(__name__)

INCEPTION_GROUPS = ("fid", "kid")
RANDOM_GROUPS = ("fd_random", "kd_random")
STAND_IN = {"fid": "fd_random", "kid": "kd_random"}  # what replaces an Inception metric without weights
DEPTH_SAMPLES = 256  # generated images for the depth error
REAL_CHUNK = 64  # real images per feature batch


@dataclass
class _Setup:
    """What this rank could prepare: feature networks by name, and on rank 0 the real images and depth
    estimator."""

    networks: dict[str, fidlib.FeatureFn] = field(default_factory=dict)
    inception_error: str | None = None
    real: dict | None = None
    estimator: torch.nn.Module | None = None
    estimator_error: float | None = None


def image_metrics(
    run: EvalRun,
    groups: list[str],
    *,
    inception_path: str | None,
    feature_fn: fidlib.FeatureFn | None,
    spread: Spread,
    inception_fallback: bool,
) -> tuple[dict[str, float], dict | None]:
    """Figures of the requested image groups (rank 0; ``{}`` on the others) and rank 0's real arrays
    (None elsewhere, or when no image metric was asked for).

    Every rank of ``spread`` must call this with the same arguments. ``inception_fallback``: when the
    Inception file is missing on some rank, report ``fd_random``/``kd_random`` instead of ``fid``/``kid``
    (one warning) rather than skipping them.
    """
    wanted = [g for g in groups if g in INCEPTION_GROUPS + RANDOM_GROUPS]
    depth = "depth" in groups
    if not run.data_uri:
        if spread.leader and wanted:
            log.warning("%s skipped: needs data with real images", "/".join(wanted))
        if spread.leader and depth:
            log.warning("depth error skipped: needs data with ground-truth depth")
        return {}, None
    if not wanted and not depth:
        return {}, None
    setup, failure = _Setup(), None
    try:
        _prepare(run, wanted, depth, inception_path, feature_fn, spread, setup)
    except Exception as exc:  # reported after the agreement, so that no rank is left waiting
        failure = exc
    flags = np.array([[failure is None, "inception" in setup.networks, setup.estimator is not None]])
    agreed = spread.concat(flags.astype(np.int64))
    if not agreed[:, 0].all():
        if failure is not None:
            raise failure
        if spread.leader:
            log.warning("image metrics skipped: another rank could not prepare them (see its log)")
        return {}, setup.real
    inception = [g for g in wanted if g in INCEPTION_GROUPS]
    if inception and not agreed[:, 1].all():
        setup.networks.pop("inception", None)
        reason = setup.inception_error or "the Inception file is missing on another rank"
        if inception_fallback:
            if spread.leader:
                log.warning(
                    "%s instead of %s: %s",
                    "/".join(STAND_IN[g] for g in inception),
                    "/".join(inception),
                    reason,
                )
            wanted = list(dict.fromkeys(STAND_IN.get(g, g) for g in wanted))
        elif spread.leader:
            log.warning("%s skipped: %s", "/".join(inception), reason)
        inception = []
    if any(g in RANDOM_GROUPS for g in wanted):
        setup.networks["random"] = random_features.random_feature_fn(run.device)
    served = {"inception": inception, "random": [g for g in wanted if g in RANDOM_GROUPS]}
    networks = {name: fn for name, fn in setup.networks.items() if served[name]}
    keep = min(run.num_samples, DEPTH_SAMPLES) if agreed[0, 2] else 0
    if not networks and not keep:
        return {}, setup.real
    fake_features, fakes = generate(run, networks, keep, spread)
    if not spread.leader:
        return {}, None
    results: dict[str, float] = {}
    if setup.estimator is not None:
        results["depth_estimator_error"] = setup.estimator_error
        per_image = depthlib.generated_depth_error(
            setup.estimator, fakes[0], fakes[1], foreground(fakes[1], run.cfg)
        )
        finite = per_image[torch.isfinite(per_image)]
        results["depth_error"] = float(finite.mean()) if len(finite) else float("nan")
    results.update(_distances(run, setup, networks, served, fake_features, feature_fn is not None))
    return results, setup.real


def _prepare(run, wanted, depth, inception_path, feature_fn, spread: Spread, setup: _Setup) -> None:
    """Load what this rank needs: the Inception network (every rank, when asked for), and on rank 0 the
    real images and the depth estimator."""
    if any(g in INCEPTION_GROUPS for g in wanted):
        try:
            fn = feature_fn or fidlib.load_inception(inception_path, run.device)
            setup.networks["inception"] = fn
        except fidlib.WeightsError as exc:
            setup.inception_error = str(exc)
    if not spread.leader:
        return
    setup.real = load_arrays(run.data_uri, limit=run.num_samples)
    if depth:
        if "depth" not in setup.real:
            log.warning("depth error skipped: needs data with ground-truth depth")
        else:
            r = run.cfg.model.neural_resolution
            key = data_key(run.data_uri, "depth", r)
            real = setup.real
            setup.estimator, setup.estimator_error = depthlib.load_or_train_estimator(
                real["image"], real["depth"], r, key, run.cache / "depth", device=run.device
            )


def _distances(run, setup: _Setup, networks, served, fake_features, custom: bool) -> dict[str, float]:
    """Fréchet and kernel distances between the real features (cached) and the gathered fakes."""
    results: dict[str, float] = {}
    real = setup.real["image"]
    for name, fn in networks.items():
        if name == "inception":
            folder = None if custom else run.cache / "stats"  # a custom network's features are not cached
            key = data_key(run.data_uri, "inception", fidlib.INCEPTION_SHA256, len(real))
        else:
            folder = run.cache / "stats"
            key = data_key(run.data_uri, "random", random_features.SEED, random_features.VERSION, len(real))
        real_features = fidlib.cached_features(fn, lambda: _chunks(real, run.device), key, folder, len(real))
        for distance in served[name]:
            if distance in ("fid", "fd_random"):
                results[distance] = fidlib.fid_from_features(real_features, fake_features[name])
            else:
                results[distance] = fidlib.kid_from_features(
                    real_features, fake_features[name], seed=run.seed
                )
    return results


def _chunks(pixels: np.ndarray, device: torch.device) -> Iterator[torch.Tensor]:
    for i in range(0, len(pixels), REAL_CHUNK):
        yield to_images(pixels[i : i + REAL_CHUNK], device)


@torch.no_grad()
def generate(
    run: EvalRun, feature_fns: dict[str, fidlib.FeatureFn], keep: int, spread: Spread = ALONE
) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor, torch.Tensor] | None]:
    """Render this rank's share of the samples once; returns, gathered over the ranks in sample order,
    the features of all samples per feature network and (images at the neural resolution, depth) of the
    first ``keep`` samples (None when ``keep`` is 0)."""
    z = latents(run.num_samples, run.cfg.model.z_dim, run.seed + 1)
    start, stop = spread.share(run.num_samples, BATCH)
    features: dict[str, list[np.ndarray]] = {name: [] for name in feature_fns}
    kept_images, kept_depth = [], []
    r = run.cfg.model.neural_resolution
    where = (
        f" on rank 0 (its share of {run.num_samples} over {spread.world} ranks)" if spread.world > 1 else ""
    )
    progress = ProgressLog(
        f"evaluation: rendered{where}", stop - start, log if spread.leader else None, "samples"
    )
    for offset, zb in zip(range(start, stop, BATCH), batches(z[start:stop]), strict=True):
        out = run.G(zb.to(run.device), noise_mode="const")
        for name, fn in feature_fns.items():
            features[name].append(fn(out["image"]).double().cpu().numpy())
        if offset < keep:
            kept_images.append(resize(out["image"], r, antialias=True).float().cpu())
            kept_depth.append(out["depth"].float().cpu())
        progress.update(len(zb))
    gathered = {
        name: spread.concat(np.concatenate(parts) if parts else np.zeros(0))
        for name, parts in features.items()
    }
    if not keep:
        return gathered, None
    return gathered, (_gathered(kept_images, spread)[:keep], _gathered(kept_depth, spread)[:keep])


def _gathered(parts: list[torch.Tensor], spread: Spread) -> torch.Tensor:
    """This rank's float32 tensors concatenated, then gathered over the ranks in rank order."""
    mine = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
    return torch.from_numpy(spread.concat(mine))
