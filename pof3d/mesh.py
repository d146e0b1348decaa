"""Meshes from a density field: sample it on a grid in the box, marching cubes, write PLY.

Marching cubes is scikit-image's maintained implementation. The grid is padded with one layer of
empty space so that surfaces cut by the box are closed and the mesh is watertight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage import measure

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 10.0  # density iso-level used for EG3D-style shape extraction

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # points [1, N, 3] -> density [1, N, 1]


@torch.no_grad()
def density_grid(density_fn: DensityFn, resolution: int, box_side: float, chunk: int = 65536) -> np.ndarray:
    """Density on a ``resolution^3`` grid of cell centres spanning the cube [-side/2, side/2]^3.

    Axis order of the result is (x, y, z).
    """
    half = box_side / 2
    coords = torch.linspace(-half, half, resolution)
    x, y, z = torch.meshgrid(coords, coords, coords, indexing="ij")
    points = torch.stack((x, y, z), -1).reshape(1, -1, 3)
    values = [
        density_fn(points[:, i : i + chunk]).reshape(-1).float().cpu()
        for i in range(0, points.shape[1], chunk)
    ]
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


def extract_mesh(
    grid: np.ndarray, box_side: float, level: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``[V, 3]`` (world units) and triangles ``[F, 3]`` of the ``level`` iso-surface.

    With ``level=None`` the EG3D iso-level 10 is used when the field crosses it, else the midpoint of
    the field's range (an untrained model's field rarely reaches 10). An empty mesh is returned when
    the field is constant.
    """
    lo, hi = float(grid.min()), float(grid.max())
    if level is None:
        level = DEFAULT_LEVEL if lo < DEFAULT_LEVEL < hi else (lo + hi) / 2
        if level != DEFAULT_LEVEL:
            log.warning(
                "density range [%.3g, %.3g] does not cross %g; using iso-level %.3g",
                lo,
                hi,
                DEFAULT_LEVEL,
                level,
            )
    if not lo < level < hi:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    padded = np.pad(grid, 1, mode="constant", constant_values=min(lo, level) - 1.0)
    n = grid.shape[0]
    spacing = box_side / (n - 1)
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, spacing=(spacing,) * 3)
    verts = verts - spacing - box_side / 2  # undo the padding offset; grid index 0 sits at -side/2
    # Caps through the padding layer close the surface at the box faces (the field ends there).
    verts = np.clip(verts, -box_side / 2, box_side / 2)
    return verts.astype(np.float32), faces.astype(np.int64)


def write_ply(path: str | Path, verts: np.ndarray, faces: np.ndarray, binary: bool = True) -> Path:
    """Write a triangle mesh as PLY (binary little-endian by default, or ASCII)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    verts = np.asarray(verts, dtype="<f4").reshape(-1, 3)
    faces = np.asarray(faces, dtype="<i4").reshape(-1, 3)
    fmt = "binary_little_endian" if binary else "ascii"
    header = (
        f"ply\nformat {fmt} 1.0\ncomment pof3d density iso-surface\n"
        f"element vertex {len(verts)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            f.write(verts.tobytes())
            records = np.zeros(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
            records["n"], records["idx"] = 3, faces
            f.write(records.tobytes())
        else:
            np.savetxt(f, verts, fmt="%.6f")
            np.savetxt(f, np.column_stack((np.full(len(faces), 3), faces)), fmt="%d")
    return path


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read back a triangle mesh written by :func:`write_ply` (either format)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element")}
    nv, nf = counts["vertex"], counts["face"]
    body = data[end:]
    if "format ascii 1.0" in header:
        rows = body.decode("ascii").split("\n")
        verts = np.array([r.split() for r in rows[:nv]], dtype=np.float32).reshape(-1, 3)
        faces = np.array([r.split()[1:] for r in rows[nv : nv + nf]], dtype=np.int64).reshape(-1, 3)
        return verts, faces
    verts = np.frombuffer(body[: nv * 12], dtype="<f4").reshape(-1, 3)
    records = np.frombuffer(body[nv * 12 :], dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=nf)
    return verts.copy(), records["idx"].astype(np.int64)
