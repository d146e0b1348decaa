"""The known-pose scene behind the synthetic set: pose distributions, procedural objects and their
analytic renderer.

Each instance is a union of ellipsoids forming a head-like ("faces") or car-like ("cars") object,
bilaterally symmetric but with a clear front (eyes, nose and mouth; headlights and tail lights), varying
in shape and colour. Images are ray cast analytically in numpy (ray-ellipsoid intersection, Lambert
shading with a light in the symmetry plane), independently of the model's tri-plane renderer, so that
pose, depth and JS errors measured on this set do not share a bug with the model. Cameras come from
:mod:`pof3d.camera`, so stored poses are in the model's own (h, v) convention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pof3d.camera import intrinsics, pose_to_cam2world, to_label
from pof3d.config import CARS_FOCAL, FFHQ_FOCAL
from pof3d.errors import DataError

SUPERSAMPLE = 2  # rays per pixel side; colours are averaged (anti-aliasing), depth see `render`


@dataclass(frozen=True)
class PoseSetting:
    """Camera (as the model's matching preset) and the true pose distribution of one setting.

    Yaw h = h_mean + offset with offset ~ N(0, h_std) clipped to +-h_clip, or uniform over [0, 2 pi)
    when ``h_uniform``. Pitch v = pi/2 + N(0, v_std) clipped to +-v_clip (v < pi/2 looks from above).
    """

    name: str
    radius: float
    pivot: tuple[float, float, float]
    focal: float
    box_warp: float
    h_mean: float
    h_std: float
    h_clip: float
    h_uniform: bool
    v_std: float
    v_clip: float
    background: tuple[int, int, int]
    light: tuple[float, float, float]  # direction towards the light, in the symmetry plane

    def describe(self) -> dict:
        return asdict(self)


SETTINGS: dict[str, PoseSetting] = {
    "faces": PoseSetting(
        name="faces",
        radius=2.7,
        pivot=(0.0, 0.0, 0.2),
        focal=FFHQ_FOCAL,
        box_warp=1.0,
        h_mean=math.pi / 2,
        h_std=0.35,
        h_clip=1.2,
        h_uniform=False,
        v_std=0.15,
        v_clip=0.45,
        background=(0, 0, 0),
        light=(0.0, 0.45, 1.0),
    ),
    "cars": PoseSetting(
        name="cars",
        radius=1.7,
        pivot=(0.0, 0.0, 0.0),
        focal=CARS_FOCAL,
        box_warp=1.6,
        h_mean=math.pi,
        h_std=0.0,
        h_clip=math.pi,
        h_uniform=True,
        v_std=0.15,
        v_clip=0.45,
        background=(255, 255, 255),
        light=(0.35, 1.0, 0.0),
    ),
}


def setting(kind: str) -> PoseSetting:
    if kind not in SETTINGS:
        raise DataError(f"--poses: got {kind!r}, expected one of {sorted(SETTINGS)}")
    return SETTINGS[kind]


def sample_poses(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 2]`` float64 poses (h, v) drawn from the setting's true distribution."""
    s = setting(kind)
    if s.h_uniform:
        h = rng.uniform(0.0, 2 * math.pi, n)
    else:
        h = s.h_mean + np.clip(rng.normal(0.0, s.h_std, n), -s.h_clip, s.h_clip)
    v = math.pi / 2 + np.clip(rng.normal(0.0, s.v_std, n), -s.v_clip, s.v_clip)
    return np.stack((h, v), axis=1)


# ---------------------------------------------------------------------------------------------
# Procedural objects


@dataclass(frozen=True)
class Instance:
    """A union of K axis-aligned ellipsoids with flat colours."""

    centers: np.ndarray  # [K, 3]
    radii: np.ndarray  # [K, 3]
    colors: np.ndarray  # [K, 3] in [0, 1]


class _Builder:
    def __init__(self) -> None:
        self.parts: list[tuple[tuple[float, ...], tuple[float, ...], np.ndarray]] = []

    def add(self, center, radii, color, mirror_axis: int | None = None) -> None:
        self.parts.append((tuple(center), tuple(radii), np.asarray(color, dtype=np.float64)))
        if mirror_axis is not None:
            c = list(center)
            c[mirror_axis] = -c[mirror_axis]
            self.parts.append((tuple(c), tuple(radii), np.asarray(color, dtype=np.float64)))

    def build(self, scale: float = 1.0) -> Instance:
        return Instance(
            centers=np.array([p[0] for p in self.parts], dtype=np.float64) * scale,
            radii=np.array([p[1] for p in self.parts], dtype=np.float64) * scale,
            colors=np.clip(np.array([p[2] for p in self.parts], dtype=np.float64), 0.0, 1.0),
        )


def _surface(center, radii, axis: int, others: dict[int, float], depth: float = 0.0) -> float:
    """Coordinate along ``axis`` (positive side) of the ellipsoid's surface at the other coordinates."""
    q = 1.0 - sum(((others[i] - center[i]) / radii[i]) ** 2 for i in others)
    return center[axis] + radii[axis] * math.sqrt(max(q, 0.0)) - depth


def _head(rng: np.random.Generator) -> Instance:
    u = rng.uniform
    skin = np.array([u(0.55, 0.95), u(0.4, 0.75), u(0.3, 0.6)])
    hair = np.array([u(0.05, 0.6), u(0.03, 0.4), u(0.02, 0.3)])
    shirt = rng.uniform(0.1, 0.9, 3)
    head_c, head_r = (0.0, u(0.0, 0.04), u(0.0, 0.04)), (u(0.17, 0.22), u(0.23, 0.27), u(0.21, 0.25))
    b = _Builder()
    b.add(head_c, head_r, skin)
    b.add(
        (0.0, head_c[1] + u(0.04, 0.08), head_c[2] - u(0.03, 0.07)),
        (head_r[0] * 1.06, head_r[1] * 0.95, head_r[2] * 1.0),
        hair,
    )
    ey, ex = head_c[1] + u(0.03, 0.06), u(0.06, 0.085)
    ez = _surface(head_c, head_r, 2, {0: ex, 1: ey}, depth=0.01)
    b.add((ex, ey, ez), (0.033, 0.024, 0.03), (0.95, 0.95, 0.95), mirror_axis=0)
    pupil = rng.uniform(0.0, 0.35, 3)
    b.add((ex, ey, ez + 0.024), (0.016, 0.016, 0.012), pupil, mirror_axis=0)
    ny = head_c[1] - u(0.0, 0.03)
    nz = _surface(head_c, head_r, 2, {0: 0.0, 1: ny}, depth=0.03)
    b.add((0.0, ny, nz), (u(0.025, 0.04), u(0.05, 0.07), u(0.05, 0.07)), skin * 0.85)
    my = head_c[1] - u(0.1, 0.13)
    mz = _surface(head_c, head_r, 2, {0: 0.0, 1: my}, depth=0.012)
    b.add((0.0, my, mz), (u(0.045, 0.07), 0.014, 0.025), (u(0.6, 0.85), 0.15, 0.2))
    b.add((head_r[0] * 0.97, head_c[1] - 0.01, head_c[2] - 0.01), (0.03, 0.06, 0.04), skin * 0.9, 0)
    b.add((0.0, -0.26, -0.02), (0.1, 0.12, 0.1), skin * 0.8)
    b.add((0.0, -0.41, -0.03), (u(0.28, 0.33), 0.08, 0.16), shirt)
    return b.build()


def _car(rng: np.random.Generator) -> Instance:
    u = rng.uniform
    paint = rng.uniform(0.05, 0.95, 3)
    body_c, body_r = (0.0, u(-0.08, -0.03), 0.0), (u(0.56, 0.64), u(0.14, 0.19), u(0.27, 0.32))
    b = _Builder()
    b.add(body_c, body_r, paint)
    cab_c = (u(-0.12, 0.0), body_c[1] + body_r[1] * u(0.7, 0.9), 0.0)
    b.add(cab_c, (u(0.28, 0.36), u(0.12, 0.16), body_r[2] * 0.85), paint * 0.35 + 0.1)
    wx, wy, wz = body_r[0] * u(0.58, 0.68), body_c[1] - body_r[1] * 0.8, body_r[2] * 0.88
    for sx in (1.0, -1.0):
        b.add((sx * wx, wy, wz), (0.1, 0.1, 0.05), (0.05, 0.05, 0.05), mirror_axis=2)
    ly, lz = body_c[1] + 0.02, body_r[2] * 0.55
    lx = _surface(body_c, body_r, 0, {1: ly, 2: lz}, depth=0.02)
    b.add((lx, ly, lz), (0.035, 0.03, 0.055), (1.0, 0.95, 0.6), mirror_axis=2)
    b.add((-lx, ly, lz), (0.035, 0.03, 0.055), (0.85, 0.05, 0.05), mirror_axis=2)
    gx = _surface(body_c, body_r, 0, {1: body_c[1] - 0.04, 2: 0.0}, depth=0.025)
    b.add((gx, body_c[1] - 0.04, 0.0), (0.03, 0.04, 0.12), (0.15, 0.15, 0.15))
    return b.build(scale=u(1.1, 1.2))  # the longest car stays inside the model's box (side 1.6)


def make_instance(kind: str, seed: int, index: int) -> Instance:
    """Instance ``index`` of the set generated with ``seed``: reproducible on its own."""
    rng = np.random.default_rng([seed, index, 1])
    return _head(rng) if setting(kind).name == "faces" else _car(rng)


# ---------------------------------------------------------------------------------------------
# Analytic renderer


def camera(pose: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(cam2world [4, 4], intrinsics [3, 3]) of one pose, from :mod:`pof3d.camera`."""
    s = setting(kind)
    p = torch.as_tensor(np.asarray(pose, dtype=np.float64).reshape(1, 2))
    c2w = pose_to_cam2world(p, s.radius, torch.tensor(s.pivot, dtype=torch.float64))[0]
    return c2w.numpy(), intrinsics(s.focal, 1)[0].double().numpy()


def render(instance: Instance, pose: np.ndarray, resolution: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Ray cast one instance: rgb uint8 [R, R, 3] and depth float32 [R, R].

    Depth is the distance from the camera centre to the first surface along the ray through the pixel
    centre (the model's depth unit; rays as in :func:`pof3d.renderer.make_rays`), ``inf`` where that
    ray misses the object (background). Colours are anti-aliased: pixels on a silhouette or a part
    boundary average ``SUPERSAMPLE`` x ``SUPERSAMPLE`` sub-rays; the others keep the centre ray's colour.
    """
    s = setting(kind)
    c2w, k = camera(pose, kind)
    r = resolution
    rows, cols = np.meshgrid(np.arange(r) + 0.5, np.arange(r) + 0.5, indexing="ij")
    rgb, depth, part = _cast(instance, s, c2w, k, rows.ravel() / r, cols.ravel() / r)
    rgb, part = rgb.reshape(r, r, 3), part.reshape(r, r)

    padded = np.pad(part, 1, mode="edge")
    edge = (
        (padded[:-2, 1:-1] != part)
        | (padded[2:, 1:-1] != part)
        | (padded[1:-1, :-2] != part)
        | (padded[1:-1, 2:] != part)
    )
    er, ec = np.nonzero(edge)
    if len(er):
        ss = SUPERSAMPLE
        offsets = (np.arange(ss) + 0.5) / ss
        oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
        sub_rows = (er[:, None] + oy.ravel()[None]) / r
        sub_cols = (ec[:, None] + ox.ravel()[None]) / r
        sub_rgb, _, _ = _cast(instance, s, c2w, k, sub_rows.ravel(), sub_cols.ravel())
        rgb[er, ec] = sub_rgb.reshape(len(er), ss * ss, 3).mean(axis=1)
    image = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return image, depth.reshape(r, r).astype(np.float32)


def _cast(
    instance: Instance, s: PoseSetting, c2w: np.ndarray, k: np.ndarray, v: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour [P, 3] in [0, 1], depth [P] and part index [P] (-1: background) of rays through the
    normalised image points (u, v)."""
    cam = np.stack(((u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)), -1)
    dirs = np.einsum("pi,ji->pj", cam, c2w[:3, :3])  # einsum, not BLAS: no thread pool contention
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = c2w[:3, 3]
    depth, part = _intersect(origin, dirs, instance)
    fg = np.isfinite(depth)
    points = origin + dirs * np.where(fg, depth, 0.0)[:, None]
    normals = (points - instance.centers[part]) * instance.radii[part] ** -2
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.asarray(s.light, dtype=np.float64)
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(np.einsum("pi,i->p", normals, light), 0.0, 1.0)
    rgb = instance.colors[part] * shade[:, None]
    rgb = np.where(fg[:, None], rgb, np.asarray(s.background, dtype=np.float64) / 255.0)
    return rgb, depth, np.where(fg, part, -1)


def _intersect(origin: np.ndarray, dirs: np.ndarray, instance: Instance) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit distance [P] (inf on a miss) and the ellipsoid hit [P], for unit rays ``dirs`` [P, 3].

    |(o + t d - c) / a| = 1 is a quadratic in t whose coefficients are matrix products over the K
    ellipsoids, so no [P, K, 3] array is formed; float32 halves the memory traffic. (einsum rather than
    ``@``: BLAS thread pools slow these small products down on a busy machine.)
    """
    inv_a2 = (instance.radii**-2).astype(np.float32)  # [K, 3]
    oc = (origin[None] - instance.centers).astype(np.float32)  # [K, 3]
    d = dirs.astype(np.float32)
    qa = np.einsum("pi,ki->pk", d * d, inv_a2)  # [P, K]
    qb = np.einsum("pi,ki->pk", d, oc * inv_a2)
    qc = np.einsum("ki,ki->k", oc * inv_a2, oc) - np.float32(1.0)
    disc = qb * qb - qa * qc
    miss = disc <= 0
    np.maximum(disc, 0, out=disc)
    t = (-qb - np.sqrt(disc)) / qa
    t[miss | (t <= 0)] = np.inf
    part = np.argmin(t, axis=1)
    depth = np.take_along_axis(t, part[:, None], axis=1)[:, 0].astype(np.float64)
    return depth, part


def label(pose: np.ndarray, kind: str) -> np.ndarray:
    """EG3D's 25-float camera label of a pose."""
    c2w, k = camera(pose, kind)
    return to_label(torch.as_tensor(c2w)[None], torch.as_tensor(k)[None])[0].numpy().astype(np.float32)
