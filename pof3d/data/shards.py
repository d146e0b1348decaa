"""Parquet shards: the on-disk format of every training set and its atomic writer (readers:
:mod:`pof3d.data.shard_reader`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

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
