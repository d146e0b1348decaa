"""The synthetic data set with known poses and depth: the project's ground-truth benchmark.

Rows are rendered from the scene of :mod:`pof3d.data.synthetic_scene` at poses drawn from its true
distribution, written as a shard set, and cached per parameter set (:func:`ensure_synthetic`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pof3d.data.shard_reader import read_manifest
from pof3d.data.shards import DEFAULT_SHARD_MB, ShardWriter, encode_png
from pof3d.data.synthetic_scene import SUPERSAMPLE, label, make_instance, render, sample_poses, setting
from pof3d.errors import DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the scene (objects, renderer) changes: cached sets are regenerated
CHUNK_ROWS = 128  # rows per unit of parallel work
PARALLEL_MIN_ROWS = 4000  # below this, starting worker processes costs more than it saves


def _spec(n: int, resolution: int, kind: str, seed: int) -> dict:
    """What a generated set depends on, as it reads back from JSON (tuples become lists)."""
    spec = {
        "kind": kind,
        "n": n,
        "resolution": resolution,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "supersample": SUPERSAMPLE,
        "distribution": setting(kind).describe(),
    }
    return json.loads(json.dumps(spec))


def _render_rows(kind: str, seed: int, resolution: int, start: int, poses: np.ndarray) -> list[tuple]:
    """(png bytes, depth, label) of rows ``start ..`` at ``poses``: one unit of (parallel) work."""
    out = []
    for j, pose in enumerate(poses):
        image, depth = render(make_instance(kind, seed, start + j), pose, resolution, kind)
        out.append((encode_png(image), depth, label(pose, kind)))
    return out


def generate(
    out: str | Path,
    n: int,
    resolution: int,
    poses: str = "faces",
    seed: int = 0,
    shard_mb: float = DEFAULT_SHARD_MB,
    overwrite: bool = False,
    on_row: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Render ``n`` instances at poses from the setting's distribution into a shard set at ``out``.

    Row i is instance ``make_instance(poses, seed, i)`` seen from pose i of ``sample_poses`` with
    ``default_rng([seed, 0])``, stored as float32 and rendered from that float32 value, so re-rendering
    a stored row reproduces its image exactly. ``workers`` processes render in parallel (default: up to
    2 for large sets); the bytes do not depend on it.
    """
    setting(poses)
    if n <= 0 or resolution < 8:
        raise DataError(f"synthetic: got n={n}, resolution={resolution}; expected n >= 1 and resolution >= 8")
    pose_all = sample_poses(poses, n, np.random.default_rng([seed, 0])).astype(np.float32)
    extra = {"synthetic": _spec(n, resolution, poses, seed)}
    writer = ShardWriter(Path(out), resolution, shard_mb=shard_mb, overwrite=overwrite, extra=extra)
    if workers is None:
        workers = 1 if n < PARALLEL_MIN_ROWS else min(2, os.cpu_count() or 1)
    starts = range(0, n, CHUNK_ROWS)
    chunks = ((poses, seed, resolution, a, pose_all[a : a + CHUNK_ROWS]) for a in starts)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold Ray/torch threads
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # map() drops each chunk's result once it is consumed: memory stays at a few chunks.
            _write(writer, pool.map(_render_rows, *zip(*chunks, strict=True)), pose_all, poses, seed, on_row)
    else:
        _write(writer, (_render_rows(*c) for c in chunks), pose_all, poses, seed, on_row)
    writer.close()
    return Path(out)


def _write(writer: ShardWriter, chunks, pose_all: np.ndarray, kind: str, seed: int, on_row) -> None:
    i = 0
    for rows in chunks:
        for png, depth, lab in rows:
            r = depth.shape[0]
            writer.add(
                png, "png", r, r, f"synthetic/{kind}/{seed}/{i:07d}", label=lab, pose=pose_all[i], depth=depth
            )
            i += 1
        if on_row is not None:
            on_row(len(rows))


def ensure_synthetic(cache_dir: str | Path, n: int, resolution: int, poses: str, seed: int) -> Path:
    """The cached synthetic set for these parameters, generated on first use.

    A set is reused only when its manifest is present and describes exactly these parameters; it is
    generated in a temporary directory and renamed into place, so concurrent callers never see half a set.
    """
    spec = _spec(n, resolution, poses, seed)
    cache = Path(cache_dir).expanduser()
    path = cache / f"synthetic-{poses}-r{resolution}-n{n}-s{seed}-v{GENERATOR_VERSION}"
    if _matches(path, spec):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    log.info("generating the synthetic %s set (%d images at %d px) into %s", poses, n, resolution, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=cache))
    try:
        generate(tmp, n, resolution, poses, seed)
        if path.exists() and not _matches(path, spec):
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if not _matches(path, spec):  # another process won the race with a complete set otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _matches(path: Path, spec: dict) -> bool:
    if not (path / "manifest.json").exists():
        return False
    try:
        manifest = read_manifest(str(path))
    except DataError:
        return False
    return manifest.get("synthetic") == spec and manifest.get("rows") == spec["n"]
