"""Parquet shards: the on-disk format of every training set, its atomic writer and its readers.

One row per image. Images keep their encoded bytes (PNG/JPEG as given) so a round trip is bit-exact and
shards stay small; decoding happens where the pixels are needed (Ray Data tasks, evaluation). A shard
directory is only valid once ``manifest.json`` exists: shards are written under a temporary name and
renamed when complete, and the manifest (with every shard's checksum) is written last, so a crash at any
point leaves nothing that reads as a valid set. Every page carries a CRC checksum that readers verify, so
damaged bytes are an error naming the shard and row group rather than garbage pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pof3d.data.shard_io import (
    first_rows,
    open_parquet,
    read_group,
    read_with_retry,
    row_location,
    undecodable,
)
from pof3d.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT_NAME = "pof3d-shards"
MANIFEST = "manifest.json"
LABEL_DIM = 25
DEFAULT_SHARD_MB = 256.0
ROW_GROUP_ROWS = 64  # small row groups: Ray Data splits, decodes and shuffles at this grain

SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),  # row index over the whole set
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes, PNG or JPEG
        pa.field("format", pa.string(), nullable=False),  # "png" | "jpeg"
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        # Variable-size lists: pyarrow's dataset reader rejects null entries of fixed-size lists.
        pa.field("label", pa.list_(pa.float32())),  # 25 floats, EG3D: 16 cam2world + 9 intrinsics
        pa.field("pose", pa.list_(pa.float32())),  # 2 floats, ground-truth (h, v), radians
        pa.field("depth", pa.binary()),  # float32 little-endian [height, width]; inf = background
        pa.field("source", pa.string(), nullable=False),  # input file name (or synthetic id)
    ]
)
COLUMNS = tuple(SCHEMA.names)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W, 3] image (fast compression: shards favour decode speed)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] pixels of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardWriter:
    """Appends rows and cuts shards of about ``shard_mb``; :meth:`close` writes the manifest.

    The output directory must not hold another shard set unless ``overwrite``; its old manifest is
    removed first, so the directory is invalid until this writer completes.
    """

    out: Path
    resolution: int
    shard_mb: float = DEFAULT_SHARD_MB
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the manifest
    _rows: list[dict[str, Any]] = field(default_factory=list, init=False)
    _bytes: int = field(default=0, init=False)
    _shards: list[dict[str, Any]] = field(default_factory=list, init=False)
    _count: int = field(default=0, init=False)
    _skipped: list[dict[str, str]] = field(default_factory=list, init=False)
    _has: dict[str, bool] = field(default_factory=lambda: {"label": False, "pose": False, "depth": False})

    def __post_init__(self) -> None:
        if self.shard_mb <= 0:
            raise DataError(f"--shard-mb: got {self.shard_mb}, expected a positive size in MB")
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = self.out / MANIFEST
        if manifest.exists():
            if not self.overwrite:
                raise DataError(
                    f"{self.out}: already holds a shard set ({MANIFEST}); expected an empty --out"
                )
            manifest.unlink()
        for old in self.out.glob("part-*.parquet*"):
            old.unlink()

    def add(
        self,
        image: bytes,
        fmt: str,
        width: int,
        height: int,
        source: str,
        label: np.ndarray | None = None,
        pose: np.ndarray | None = None,
        depth: np.ndarray | None = None,
    ) -> None:
        row = {
            "id": self._count,
            "image": image,
            "format": fmt,
            "width": int(width),
            "height": int(height),
            "label": None
            if label is None
            else np.asarray(label, dtype=np.float32).reshape(LABEL_DIM).tolist(),
            "pose": None if pose is None else np.asarray(pose, dtype=np.float32).reshape(2).tolist(),
            "depth": None if depth is None else np.ascontiguousarray(depth, dtype="<f4").tobytes(),
            "source": source,
        }
        for key in self._has:
            self._has[key] |= row[key] is not None
        self._rows.append(row)
        self._count += 1
        self._bytes += len(image) + (len(row["depth"]) if row["depth"] else 0) + 160
        if self._bytes >= self.shard_mb * 2**20:
            self._flush()

    def skip(self, name: str, reason: str) -> None:
        """Record a bad input that was skipped (``--skip-bad``): nothing is dropped silently."""
        log.warning("skipped %s: %s", name, reason)
        self._skipped.append({"name": name, "reason": reason})

    @property
    def rows(self) -> int:
        return self._count

    def _flush(self) -> None:
        if not self._rows:
            return
        name = shard_name(len(self._shards))
        tmp = self.out / f".{name}.tmp"
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        pq.write_table(
            table, tmp, row_group_size=ROW_GROUP_ROWS, compression="none", write_page_checksum=True
        )
        _fsync(tmp)
        digest, size = _sha256(tmp), tmp.stat().st_size
        os.replace(tmp, self.out / name)
        self._shards.append({"file": name, "rows": len(self._rows), "bytes": size, "sha256": digest})
        self._rows, self._bytes = [], 0

    def close(self) -> Path:
        """Write the last shard and the manifest; returns the manifest path."""
        self._flush()
        if self._count == 0:
            raise DataError(
                f"{self.out}: no rows were written (every input was skipped or the source is empty)"
            )
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "rows": self._count,
            "resolution": self.resolution,
            "columns": list(COLUMNS),
            "has_label": self._has["label"],
            "has_pose": self._has["pose"],
            "has_depth": self._has["depth"],
            "shards": self._shards,
            "skipped": {"count": len(self._skipped), "items": self._skipped},
            **self.extra,
        }
        path = self.out / MANIFEST
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(tmp)
        os.replace(tmp, path)
        log.info("wrote %d rows in %d shards to %s", self._count, len(self._shards), self.out)
        return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading (local paths or any pyarrow filesystem URI, e.g. s3://bucket/set)


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
