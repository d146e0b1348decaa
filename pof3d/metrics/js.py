"""Jensen-Shannon divergence between pose distributions, on a fixed yaw/pitch histogram grid.

The grid is fixed (not fitted to the samples) so that numbers from different runs, checkpoints and
ablations are comparable. Yaw h is wrapped to [0, 2 pi) and pitch v clipped to [0, pi]; bins are
``bin_deg`` degrees wide (5 by default: 72 yaw bins, 36 pitch bins, 72 x 36 joint bins).

JS is in nats (natural log), so it lies in [0, ln 2]: 0 for identical histograms, ln 2 ~= 0.693 for
histograms with disjoint support. It is computed exactly with the convention 0 * log 0 = 0; no epsilon
is needed because the mixture M = (P + Q) / 2 is positive wherever P or Q is.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BIN_DEG = 5.0


def pose_bins(bin_deg: float = DEFAULT_BIN_DEG) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges in radians: yaw over [0, 2 pi], pitch over [0, pi]."""
    count = 180.0 / bin_deg if bin_deg > 0 else 0.0
    if count < 1 or abs(count - round(count)) > 1e-6:
        raise ValueError(f"bin_deg={bin_deg}: expected a positive divisor of 180")
    yaw = np.linspace(0.0, 2 * math.pi, 2 * round(count) + 1)
    pitch = np.linspace(0.0, math.pi, round(count) + 1)
    return yaw, pitch


def _canonical(poses: np.ndarray) -> np.ndarray:
    """Drop rows with NaN, wrap yaw into [0, 2 pi) and clip pitch into [0, pi]."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 2)
    poses = poses[np.isfinite(poses).all(axis=1)]
    return np.stack((np.mod(poses[:, 0], 2 * math.pi), np.clip(poses[:, 1], 0.0, math.pi)), axis=1)


def pose_histograms(poses: np.ndarray, bin_deg: float = DEFAULT_BIN_DEG) -> dict[str, np.ndarray]:
    """Normalised joint (yaw x pitch) and per-axis histograms of poses ``[N, 2]`` (h, v) in radians."""
    poses = _canonical(poses)
    if len(poses) == 0:
        raise ValueError("pose histogram needs at least one finite pose")
    yaw_edges, pitch_edges = pose_bins(bin_deg)
    joint, _, _ = np.histogram2d(poses[:, 0], poses[:, 1], bins=(yaw_edges, pitch_edges))
    joint /= joint.sum()
    return {"joint": joint, "yaw": joint.sum(axis=1), "pitch": joint.sum(axis=0)}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JS(P, Q) in nats between two histograms of the same shape (normalised here)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in size: {p.size} vs {q.size}")
    if p.sum() <= 0 or q.sum() <= 0 or (p < 0).any() or (q < 0).any():
        raise ValueError("histograms must be non-negative with positive mass")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl_to_m(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q))


def pose_js(learned: np.ndarray, true: np.ndarray, bin_deg: float = DEFAULT_BIN_DEG) -> dict[str, float]:
    """JS between learned and true pose samples: ``js`` (joint), ``js_yaw`` and ``js_pitch`` (marginals)."""
    a, b = pose_histograms(learned, bin_deg), pose_histograms(true, bin_deg)
    return {
        "js": js_divergence(a["joint"], b["joint"]),
        "js_yaw": js_divergence(a["yaw"], b["yaw"]),
        "js_pitch": js_divergence(a["pitch"], b["pitch"]),
        **pose_moments(learned, "learned"),
        **pose_moments(true, "true"),
    }


def pose_moments(poses: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean and spread of yaw and pitch in degrees: where a pose distribution sits and how wide it is.

    Yaw uses the circular mean and the circular standard deviation sqrt(-2 ln R) (R = mean resultant
    length), so that a distribution straddling the 0/360 degree wrap is not read as centred at 180;
    for a narrow distribution both equal the plain figures. Pitch lives in [0, 180] and uses the plain ones.
    """
    poses = np.asarray(poses, dtype=np.float64)
    poses = poses[np.isfinite(poses).all(axis=1)]
    h, v = poses[:, 0], poses[:, 1]
    resultant = np.mean(np.cos(h)) + 1j * np.mean(np.sin(h))
    length = min(max(abs(resultant), 1e-12), 1.0)
    return {
        f"{prefix}_yaw_mean_deg": float(np.degrees(np.angle(resultant)) % 360.0),
        f"{prefix}_yaw_std_deg": float(np.degrees(np.sqrt(-2.0 * np.log(length)))),
        f"{prefix}_pitch_mean_deg": float(np.degrees(v.mean())),
        f"{prefix}_pitch_std_deg": float(np.degrees(v.std())),
    }
