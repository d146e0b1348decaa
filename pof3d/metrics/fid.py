"""FID and KID: the maths over any feature function, plus the standard Inception feature network.

The feature network is NVIDIA's TorchScript export of the TensorFlow Inception-v3 graph
``inception-2015-12-05``, the one StyleGAN2-ADA, StyleGAN3 and EG3D use for their published FIDs. It
is called as ``net(images_uint8, return_features=True)`` and returns the 2048-d pool features; it
resizes to 299 x 299 itself. The file is never downloaded implicitly: it is looked up in order at the
path given by the caller, at ``$POF3D_INCEPTION``, and in the cache folder (``$POF3D_CACHE`` or
``~/.cache/pof3d``), and its SHA-256 is verified before it is loaded. :func:`fetch_inception`
(``python -m pof3d.evaluate --fetch-weights``) downloads it into the cache on request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pof3d.cache import cache_dir
from pof3d.errors import Pof3dError
from pof3d.metrics.progress import ProgressLog

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_ENV = "POF3D_INCEPTION"
URL_ENV = "POF3D_INCEPTION_URL"  # a mirror to fetch from instead of INCEPTION_URL
FETCH_COMMAND = "python -m pof3d.evaluate --fetch-weights"
DOWNLOAD_CHUNK = 1 << 20
DOWNLOAD_LOG_EVERY_S = 10.0

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images [B,3,H,W] in [-1,1] -> features [B,D]


class WeightsError(Pof3dError):
    """A feature-network weights file that is missing or does not match its checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """Locate and verify the Inception weights; raises :class:`WeightsError` naming what is needed."""
    candidates: list[tuple[str, Path]] = []
    if path:
        candidates.append(("given path", Path(path)))
    if os.environ.get(INCEPTION_ENV):
        candidates.append((f"${INCEPTION_ENV}", Path(os.environ[INCEPTION_ENV])))
    candidates.append(("cache folder", cache_dir() / INCEPTION_FILE))
    for where, candidate in candidates:
        if candidate.is_file():
            found = sha256_file(candidate)
            if found != INCEPTION_SHA256:
                raise WeightsError(
                    f"Inception weights {candidate} ({where}) have sha256 {found}; "
                    f"expected {INCEPTION_SHA256} (the file {INCEPTION_FILE} from {INCEPTION_URL})"
                )
            return candidate
    looked = ", ".join(str(c) for _, c in candidates)
    raise WeightsError(
        f"FID/KID need the Inception weights file {INCEPTION_FILE} (sha256 {INCEPTION_SHA256}); none found "
        f"(looked at: {looked}). Fetch it into the cache with `{FETCH_COMMAND}` (from {INCEPTION_URL}, "
        f"or a mirror given by --url or ${URL_ENV}), or point ${INCEPTION_ENV} or --inception at a copy."
    )


def fetch_inception(
    url: str | None = None,
    dest: str | os.PathLike | None = None,
    sha256: str = INCEPTION_SHA256,
    timeout_s: float = 60.0,
) -> Path:
    """Download the Inception weights to ``dest`` (default the cache folder) and verify their SHA-256.

    ``url`` defaults to ``$POF3D_INCEPTION_URL``, then NVIDIA's address. A file already at ``dest``
    with the right checksum is kept (nothing is downloaded); one with another checksum is removed
    first. The download goes to a temporary name beside ``dest`` and is renamed only once its checksum
    matches, so ``dest`` never holds a partial or wrong file; a wrong download is deleted and the
    error names the URL, both checksums and the size. Returns ``dest``.
    """
    url = url or os.environ.get(URL_ENV) or INCEPTION_URL
    target = Path(dest) if dest else cache_dir() / INCEPTION_FILE
    if target.is_file():
        found = sha256_file(target)
        if found == sha256:
            log.info("%s is already there (sha256 verified)", target)
            return target
        log.warning("%s has sha256 %s, expected %s: removing it and fetching again", target, found, sha256)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.part{os.getpid()}")
    try:
        found, size = _download(url, partial, timeout_s)
    except (urllib.error.URLError, OSError) as exc:  # HTTP errors, refused connections, timeouts
        partial.unlink(missing_ok=True)
        raise WeightsError(f"fetching {url}: {exc}; expected the file {INCEPTION_FILE}") from exc
    if found != sha256:
        partial.unlink()
        raise WeightsError(
            f"{url} served {size} bytes with sha256 {found}; expected sha256 {sha256} ({INCEPTION_FILE}). "
            f"The download was deleted; point --url or ${URL_ENV} at a copy of {INCEPTION_FILE}."
        )
    os.replace(partial, target)
    log.info("fetched %s (%d bytes, sha256 verified) to %s", url, size, target)
    return target


def _download(url: str, path: Path, timeout_s: float) -> tuple[str, int]:
    """Stream ``url`` into ``path``; returns (sha256, size). Logs progress every few seconds."""
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(path, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        last = time.monotonic()
        while chunk := response.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)
            if time.monotonic() - last >= DOWNLOAD_LOG_EVERY_S:
                last = time.monotonic()
                of = f" of {total / 2**20:.1f}" if total else ""
                log.info("fetching %s: %.1f%s MiB", url, size / 2**20, of)
    return digest.hexdigest(), size


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FeatureFn:
    """Feature function over the verified TorchScript Inception (2048-d features)."""
    weights = find_inception(path)
    net = torch.jit.load(str(weights), map_location=device).eval()
    log.info("loaded Inception features from %s", weights)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        # The same quantisation as StyleGAN's metrics: [-1, 1] -> uint8 before the network.
        pixels = (images.to(device) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        return net(pixels, return_features=True)

    return features


def compute_features(
    feature_fn: FeatureFn, images: Iterable[torch.Tensor], progress: ProgressLog | None = None
) -> np.ndarray:
    """Concatenate the features of image batches ([B,3,H,W] in [-1,1]) as float64 ``[N, D]``."""
    parts = []
    with torch.no_grad():
        for batch in images:
            parts.append(feature_fn(batch).detach().double().cpu().numpy())
            if progress is not None:
                progress.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

    Uses the symmetric form of the cross term, which has the same trace as sqrtm(S1 S2) and needs only
    symmetric eigen-decompositions (stable, no complex parts).
    """
    root1 = _sqrt_psd(sigma1)
    cross = _sqrt_psd(root1 @ sigma2 @ root1)
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross))
    return max(value, 0.0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of features ``[N, D]``."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def kid_from_features(
    real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """Kernel Inception distance: unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, averaged over
    random subsets (as in StyleGAN's metrics)."""
    d = real.shape[1]
    m = min(len(real), len(fake), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def cached_features(
    feature_fn: FeatureFn,
    images: Callable[[], Iterable[torch.Tensor]],
    key: str,
    folder: Path | None,
    count: int = 0,
) -> np.ndarray:
    """Features of the real set, cached as ``real-features-<key>.npy`` in ``folder`` (None: no cache).

    ``key`` must identify the image set and the feature network (e.g. shard checksums + detector hash
    + image count) so that a stale cache is never read. ``count``: the number of images, for the
    progress lines.
    """
    target = folder / f"real-features-{key}.npy" if folder is not None else None
    if target is not None and target.is_file():
        log.info("real-image features from cache %s", target)
        return np.load(target)
    features = compute_features(feature_fn, images(), ProgressLog("real-image features", count, log))
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, features)
        os.replace(tmp, target)
    return features
