"""FID and KID: the maths over any feature function, plus the standard Inception feature network.

The feature network is NVIDIA's TorchScript export of the TensorFlow Inception-v3 graph
``inception-2015-12-05``, the one StyleGAN2-ADA, StyleGAN3 and EG3D use for their published FIDs. It
is called as ``net(images_uint8, return_features=True)`` and returns the 2048-d pool features; it
resizes to 299 x 299 itself. The file is never downloaded implicitly: it is looked up in order at the
path given by the caller, at ``$POF3D_INCEPTION``, and in the cache folder (``$POF3D_CACHE`` or
``~/.cache/pof3d``), and its SHA-256 is verified before it is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pof3d.errors import Pof3dError

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_ENV = "POF3D_INCEPTION"
CACHE_ENV = "POF3D_CACHE"

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images [B,3,H,W] in [-1,1] -> features [B,D]


class WeightsError(Pof3dError):
    """A feature-network weights file that is missing or does not match its checksum."""


def cache_dir() -> Path:
    """Folder for weights and cached real-image statistics (``$POF3D_CACHE`` or ``~/.cache/pof3d``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pof3d")


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
        f"(looked at: {looked}). Download it from {INCEPTION_URL} and put it at "
        f"{cache_dir() / INCEPTION_FILE}, "
        f"or point ${INCEPTION_ENV} or --inception at it."
    )


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


def compute_features(feature_fn: FeatureFn, images: Iterable[torch.Tensor]) -> np.ndarray:
    """Concatenate the features of image batches ([B,3,H,W] in [-1,1]) as float64 ``[N, D]``."""
    with torch.no_grad():
        parts = [feature_fn(batch).detach().double().cpu().numpy() for batch in images]
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
    feature_fn: FeatureFn, images: Callable[[], Iterable[torch.Tensor]], key: str, folder: Path | None
) -> np.ndarray:
    """Features of the real set, cached as ``real-features-<key>.npy`` in ``folder`` (None: no cache).

    ``key`` must identify the image set and the feature network (e.g. shard checksums + detector hash
    + image count) so that a stale cache is never read.
    """
    target = folder / f"real-features-{key}.npy" if folder is not None else None
    if target is not None and target.is_file():
        log.info("real-image features from cache %s", target)
        return np.load(target)
    features = compute_features(feature_fn, images())
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, features)
        os.replace(tmp, target)
    return features
