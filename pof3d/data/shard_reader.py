"""Reading shard sets from local paths or any pyarrow filesystem URI (e.g. ``s3://bucket/set``): the
manifest, rows, whole arrays, the cheap pre-flight check against the manifest and the full verification.

Object-store reads retry transient errors (:mod:`pof3d.data.shard_io`); damaged bytes and undecodable
rows are a :class:`~pof3d.errors.DataError` naming the shard, row group and row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pof3d.data.shard_io import (
    first_rows,
    open_parquet,
    read_group,
    read_with_retry,
    row_location,
    undecodable,
)
from pof3d.data.shards import COLUMNS, FORMAT_NAME, LABEL_DIM, MANIFEST, SCHEMA_VERSION, decode_image
from pof3d.errors import DataError


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a pyarrow filesystem URI."""
    uri = str(uri)
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{uri}: cannot open this data URI ({err})") from err
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def shard_paths(uri: str, manifest: dict | None = None) -> list[str]:
    """Full URIs (or local paths) of the shards listed in the manifest, in order."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    base = str(uri).rstrip("/")
    if "://" not in base:
        base = str(Path(base).expanduser().resolve())
    return [f"{base}/{s['file']}" for s in manifest["shards"]]


def shard_files(uri: str, manifest: dict) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """The set's filesystem and, per shard in manifest order, (URI or local path for messages, path on
    that filesystem)."""
    fs, root = resolve(uri)
    return fs, [
        (p, f"{root.rstrip('/')}/{s['file']}")
        for p, s in zip(shard_paths(uri, manifest), manifest["shards"], strict=True)
    ]


def read_manifest(uri: str) -> dict:
    """The manifest of a complete shard set; :class:`DataError` if it is absent or of another format."""
    fs, path = resolve(uri)
    target = f"{path.rstrip('/')}/{MANIFEST}"

    def read() -> str:
        try:
            with fs.open_input_stream(target) as f:
                return f.read().decode()
        except FileNotFoundError as err:
            raise DataError(
                f"{uri}: no {MANIFEST}; expected a complete shard directory written by"
                " `python -m pof3d.data` (an interrupted write leaves none)"
            ) from err

    text = read_with_retry(f"{str(uri).rstrip('/')}/{MANIFEST}", read)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{target}: not valid JSON ({err})") from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION or manifest.get("format") != FORMAT_NAME:
        raise DataError(
            f"{target}: format {manifest.get('format')!r} schema_version {version!r};"
            f" expected {FORMAT_NAME!r} version {SCHEMA_VERSION}"
        )
    return manifest


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Arrow row dict -> decoded arrays (only the columns present are decoded)."""
    out = dict(row)
    if "image" in row:
        out["image"] = decode_image(row["image"])
    if "pose" in row:
        out["pose"] = None if row["pose"] is None else np.asarray(row["pose"], dtype=np.float32)
    if "label" in row:
        out["label"] = None if row["label"] is None else np.asarray(row["label"], dtype=np.float32)
    if "depth" in row:
        out["depth"] = (
            None
            if row["depth"] is None
            else np.frombuffer(row["depth"], dtype="<f4").reshape(row["height"], row["width"]).copy()
        )
    return out


def iter_rows(uri: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Decoded rows of every shard in manifest order: image uint8 [H,W,3], pose/label/depth or None."""
    manifest = read_manifest(uri)
    wanted = list(COLUMNS) if columns is None else list(columns)
    unknown = sorted(set(wanted) - set(COLUMNS))
    if unknown:
        raise DataError(f"columns {unknown} are not in the shard schema; expected some of {list(COLUMNS)}")
    read = list(dict.fromkeys(wanted + (["width", "height"] if "depth" in wanted else [])))
    fs, files = shard_files(uri, manifest)
    for path, local in files:
        parquet = open_parquet(fs, local, path)
        for group, first in enumerate(first_rows(parquet.metadata)):
            for i, row in enumerate(read_group(parquet, path, group, read).to_pylist()):
                try:
                    decoded = decode_row(row)
                except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for undecodable bytes
                    raise DataError(f"{row_location(path, group, first + i)}: {undecodable(err)}") from err
                yield {k: decoded[k] for k in wanted}


def check_shards(uri: str, manifest: dict | None = None) -> list[tuple[str, int, int]]:
    """The cheap check before training starts: every shard the manifest lists exists with its size and
    a readable footer whose row counts match. Returns ``(shard, row group, rows)`` of every row group in
    manifest order; :class:`DataError` names the first shard that does not fit.

    Damaged bytes inside a shard of the right size are found when they are read (page checksums, image
    decoding); only ``verify`` compares whole-shard checksums, which reads every byte.
    """
    manifest = manifest if manifest is not None else read_manifest(uri)
    fs, files = shard_files(uri, manifest)
    infos = read_with_retry(str(uri), lambda: fs.get_file_info([local for _, local in files]))
    groups = []
    for entry, (path, local), info in zip(manifest["shards"], files, infos, strict=True):
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        if entry.get("bytes") is not None and info.size != entry["bytes"]:
            raise DataError(
                f"{path}: {info.size} bytes, {MANIFEST} says {entry['bytes']}; the shard is truncated or"
                " was replaced"
            )
        meta = open_parquet(fs, local, path).metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        if sum(rows) != entry["rows"]:
            raise DataError(f"{path}: {sum(rows)} rows in its footer, {MANIFEST} says {entry['rows']}")
        groups += [(path, g, n) for g, n in enumerate(rows)]
    return groups


def load_arrays(uri: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """The first ``limit`` rows as stacked arrays (evaluation sets; not for training streams).

    ``image`` uint8 [N,H,W,3]; ``pose`` float32 [N,2] with NaN rows where absent; ``depth`` float32
    [N,H,W] only when every loaded row has one.
    """
    images, poses, depths = [], [], []
    for row in iter_rows(uri, ["image", "pose", "depth"]):
        if limit is not None and len(images) >= limit:
            break
        images.append(row["image"])
        poses.append(row["pose"] if row["pose"] is not None else np.full(2, np.nan, np.float32))
        depths.append(row["depth"])
    if not images:
        raise DataError(f"{uri}: the shard set has no rows")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{uri}: images of different sizes {sorted(shapes)}; expected one resolution")
    out = {"image": np.stack(images), "pose": np.stack(poses).astype(np.float32)}
    if all(d is not None for d in depths):
        out["depth"] = np.stack(depths)
    return out


def verify(uri: str) -> dict[str, int]:
    """Re-read every shard and row: checksums, row counts, decodable images of the manifest's size,
    label/pose/depth shapes. Returns counts; raises :class:`DataError` naming the first problem."""
    manifest = read_manifest(uri)
    fs, files = shard_files(uri, manifest)
    r = manifest["resolution"]
    total = 0
    for entry, (path, local) in zip(manifest["shards"], files, strict=True):

        def read(local: str = local) -> bytes:
            with fs.open_input_stream(local) as f:
                return f.read()

        data = read_with_retry(path, read)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(
                f"{path}: sha256 differs from the manifest's; the shard is corrupt or was replaced"
            )
        table = pq.read_table(pa.BufferReader(data))
        if table.schema.names != list(COLUMNS) or table.num_rows != entry["rows"]:
            raise DataError(
                f"{path}: {table.num_rows} rows with columns {table.schema.names};"
                f" expected {entry['rows']} rows with {list(COLUMNS)}"
            )
        groups = first_rows(pq.ParquetFile(pa.BufferReader(data)).metadata)
        for index, row in enumerate(table.to_pylist()):
            group = int(np.searchsorted(groups, index, side="right")) - 1
            where = f"{row_location(path, group, index)} (id {row['id']}, {row['source']})"
            try:
                d = decode_row(row)
            except (OSError, ValueError, SyntaxError) as err:
                raise DataError(f"{where}: {undecodable(err)}") from err
            if d["image"].shape != (r, r, 3) or (row["width"], row["height"]) != (r, r):
                raise DataError(f"{where}: image {d['image'].shape}, expected ({r}, {r}, 3)")
            if d["pose"] is not None and (d["pose"].shape != (2,) or not np.isfinite(d["pose"]).all()):
                raise DataError(f"{where}: pose {d['pose']}, expected 2 finite floats")
            if d["label"] is not None and d["label"].shape != (LABEL_DIM,):
                raise DataError(f"{where}: label of {d['label'].shape[0]} floats, expected {LABEL_DIM}")
            total += 1
    if total != manifest["rows"]:
        raise DataError(f"{uri}: {total} rows in the shards, the manifest says {manifest['rows']}")
    return {"rows": total, "shards": len(manifest["shards"]), "skipped": manifest["skipped"]["count"]}
