"""Convert a folder of images or an EG3D/StyleGAN-style zip (optionally with ``dataset.json`` labels).

Every file of the source is an input: a file that is not a readable image is an error naming it (or, with
``skip_bad``, a counted entry in the manifest), never silently dropped. Images keep their encoded bytes
unless a resize is asked for (centre crop to a square, then Lanczos resize, stored as PNG). EG3D camera
labels are kept bit-exactly (as float32) and each one's camera gives the row its ground-truth pose.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pof3d.camera import pose_from_label
from pof3d.data.shards import DEFAULT_SHARD_MB, LABEL_DIM, ShardWriter, encode_png
from pof3d.errors import DataError

log = logging.getLogger(__name__)

LABELS_FILE = "dataset.json"
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpeg"}


@dataclass(frozen=True)
class _Decoded:
    data: bytes
    fmt: str
    width: int
    height: int


class _Source:
    """The files of a folder (recursively) or a zip, by relative POSIX name."""

    def __init__(self, src: Path) -> None:
        self.src = src
        if src.is_dir():
            self.zip = None
            files = [p for p in src.rglob("*") if p.is_file()]
            self.names = sorted(p.relative_to(src).as_posix() for p in files)
        elif src.is_file() and zipfile.is_zipfile(src):
            self.zip = zipfile.ZipFile(src)
            self.names = sorted(i.filename for i in self.zip.infolist() if not i.is_dir())
        elif src.exists():
            raise DataError(
                f"{src}: expected a folder of images or a .zip archive, found another kind of file"
            )
        else:
            raise DataError(f"{src}: no such folder or zip")
        hidden = [n for n in self.names if any(part.startswith(".") for part in n.split("/"))]
        self.names = [n for n in self.names if n not in hidden]
        if hidden:
            log.info("%s: ignoring %d hidden files (e.g. %s)", src, len(hidden), hidden[0])

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        return (self.src / name).read_bytes()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _labels(source: _Source) -> dict[str, object] | None:
    if LABELS_FILE not in source.names:
        return None
    where = f"{source.src}/{LABELS_FILE}"
    try:
        doc = json.loads(source.read(LABELS_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: not valid JSON ({err})") from err
    entries = doc.get("labels") if isinstance(doc, dict) else None
    if entries is None:
        return None  # StyleGAN's unlabelled marker: {"labels": null}
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 for e in entries):
        raise DataError(f"{where}: 'labels' must be a list of [file name, 25 numbers] pairs")
    return {str(name): value for name, value in entries}


def _check_label(name: str, value: object) -> tuple[np.ndarray, np.ndarray]:
    """The label as stored (float32, bit-exact to float32 of the text) and the pose (h, v) of its camera.

    The pose is derived from the label's full-precision values, in the model's convention
    (:func:`pof3d.camera.pose_from_label`); a label that is not a rigid camera is a bad input.
    """
    arr = np.asarray(value, dtype=np.float64) if isinstance(value, list) else None
    if arr is None or arr.shape != (LABEL_DIM,) or not np.isfinite(arr).all():
        raise DataError(
            f"{LABELS_FILE}: label of {name} is {value!r:.80}; expected {LABEL_DIM} finite numbers"
        )
    try:
        pose = pose_from_label(torch.from_numpy(arr)).numpy()
    except ValueError as err:
        raise DataError(
            f"{LABELS_FILE}: label of {name} is not a rigid camera: {err}; expected a cam2world"
            " rotation and translation then 9 intrinsics"
        ) from err
    return arr.astype(np.float32), pose.astype(np.float32)


def _decode(name: str, data: bytes, resolution: int | None) -> _Decoded:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # raises on truncated data
            rgb = img.convert("RGB")
    except UnidentifiedImageError as err:
        raise DataError(
            f"{name}: not an image file; expected PNG or JPEG (or another format PIL reads)"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: unreadable or truncated image ({err})") from err
    if resolution is None:
        if fmt in KEPT_FORMATS:
            return _Decoded(data, KEPT_FORMATS[fmt], rgb.width, rgb.height)
        return _Decoded(encode_png(np.asarray(rgb)), "png", rgb.width, rgb.height)
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return _Decoded(encode_png(np.asarray(square)), "png", resolution, resolution)


def convert(
    src: str | Path,
    out: str | Path,
    resolution: int | None = None,
    skip_bad: bool = False,
    shard_mb: float = DEFAULT_SHARD_MB,
    overwrite: bool = False,
    on_item: Callable[[int], None] | None = None,
) -> Path:
    """Write the images of ``src`` as a shard set at ``out``; returns ``out``.

    Without ``resolution`` every image must be square and of the first image's size.
    """
    if resolution is not None and resolution < 8:
        raise DataError(f"--resolution: got {resolution}, expected at least 8")
    source = _Source(Path(src).expanduser())
    try:
        return _convert(source, Path(out), resolution, skip_bad, shard_mb, overwrite, on_item)
    finally:
        source.close()


def _convert(source, out, resolution, skip_bad, shard_mb, overwrite, on_item) -> Path:
    labels = _labels(source)
    names = [n for n in source.names if n != LABELS_FILE]
    if not names:
        raise DataError(f"{source.src}: no input files; expected images (PNG/JPEG) in the folder or zip")
    writer: ShardWriter | None = None
    skipped: list[tuple[str, str]] = []
    expected: tuple[int, int] | None = None

    def bad(name: str, err: DataError) -> None:
        if not skip_bad:
            raise err
        skipped.append((name, str(err)))

    if labels is not None:
        for missing in sorted(set(labels) - set(names)):
            bad(missing, DataError(f"{LABELS_FILE}: lists {missing}, which is not in {source.src}"))

    for name in _progress(names, on_item):
        where = f"{source.src}/{name}"
        try:
            label = pose = None
            if labels is not None:
                if name not in labels:
                    raise DataError(
                        f"{where}: has no entry in {LABELS_FILE}; expected a label for every image"
                    )
                label, pose = _check_label(name, labels[name])
            img = _decode(where, source.read(name), resolution)
            if resolution is None:
                if img.width != img.height:
                    raise DataError(
                        f"{where}: {img.width}x{img.height} is not square;"
                        " expected square images or --resolution"
                    )
                if expected is None:
                    expected = (img.width, img.height)
                elif (img.width, img.height) != expected:
                    raise DataError(
                        f"{where}: {img.width}x{img.height}, expected {expected[0]}x{expected[1]} like the"
                        " first image; pass --resolution to crop and resize"
                    )
        except DataError as err:
            bad(name, err)
            continue
        if writer is None:
            writer = ShardWriter(
                out, img.width, shard_mb=shard_mb, overwrite=overwrite, extra={"source": str(source.src)}
            )
        writer.add(img.data, img.fmt, img.width, img.height, source=name, label=label, pose=pose)
    if writer is None:
        raise DataError(f"{source.src}: every one of {len(names)} inputs was bad; nothing to write")
    for name, reason in skipped:
        writer.skip(name, reason)
    writer.close()
    return out


def _progress(names: list[str], on_item: Callable[[int], None] | None) -> Iterator[str]:
    for name in names:
        yield name
        if on_item is not None:
            on_item(1)
