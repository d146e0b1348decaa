"""Atomic, safe checkpoints: a directory with ``state.pt``, ``config.json``, ``progress.json``.

Safety: ``state.pt`` holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``, so loading a checkpoint can never run code from it. RNG states are
converted to tensors and lists for the same reason (:func:`rng_state`).

Atomicity: everything is written into a hidden temporary sibling directory (``.NAME.tmp-*``), flushed
to disk, and only then renamed to ``NAME``. A save interrupted at any point leaves the previous
checkpoint in place. ``manifest.json``, written last, records each file's size and SHA-256 so that a
directory copied only in part (e.g. an interrupted upload to Ray Train's storage) is recognised as
incomplete by :func:`latest_checkpoint` and as corrupt by :func:`load_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from pof3d.config import Config
from pof3d.errors import CheckpointError, ConfigError
from pof3d.storage import Location

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "pof3d-checkpoint"
FORMAT_VERSION = 1
_DATA_FILES = (STATE_FILE, CONFIG_FILE, PROGRESS_FILE)
_SCALARS = (int, float, bool, str, type(None))


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(path: str | os.PathLike, state: dict, config: Config, progress: dict) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an existing one) and return it.

    ``state``: nested dicts/lists of tensors, state dicts and plain scalars (checked before writing).
    ``progress``: JSON-serialisable counters (images seen, step, tick, seeds).
    """
    target = Path(path)
    _check_state(state, "state")
    try:
        progress_text = json.dumps(progress, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{target / PROGRESS_FILE}: progress must be plain JSON data: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config.to_json())
        (tmp / PROGRESS_FILE).write_text(progress_text)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                for name in _DATA_FILES
            },
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for name in (*_DATA_FILES, MANIFEST_FILE):
            _fsync(tmp / name)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", target)
    return target


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is moved aside first and removed after.

    POSIX cannot atomically swap two non-empty directories, so there is a short window in which
    ``target`` is absent; the old checkpoint then survives as the hidden ``.NAME.old-*`` directory.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_state(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back, naming where it is."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{where}: tensor subclass {type(value).__name__} cannot be checkpointed")
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(
                    f"{where}: key {key!r} of type {type(key).__name__}; expected str or int"
                )
            _check_state(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_state(item, f"{where}[{i}]")
        return
    if type(value) in _SCALARS:
        return
    raise CheckpointError(
        f"{where}: found {type(value).__module__}.{type(value).__qualname__}; expected tensors, state dicts, "
        "lists or plain scalars (convert numpy arrays with torch.from_numpy, RNG states with rng_state())"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Config, dict, dict]:
    """Read a checkpoint directory: ``(config, state, progress)``; :class:`CheckpointError` if unusable."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: checkpoint directory not found (expected a directory with {STATE_FILE})"
        )
    if not (root / MANIFEST_FILE).is_file() and (inner := latest_checkpoint(root)) is not None:
        raise CheckpointError(
            f"{root / MANIFEST_FILE}: missing; {root} looks like a run directory, "
            f"its newest checkpoint is {inner}"
        )
    manifest = _read_manifest(root)
    for name in _DATA_FILES:
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        expected = manifest["files"].get(name, {})
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(
                f"{file}: {size} bytes, manifest says {expected.get('bytes')}; truncated or corrupt"
            )
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{file}: SHA-256 differs from {MANIFEST_FILE}; the file is corrupt")
    try:
        config = Config.from_json((root / CONFIG_FILE).read_text())
    except ConfigError as exc:
        raise CheckpointError(
            f"{root / CONFIG_FILE}: does not fit this version's config schema: {exc}"
        ) from exc
    progress = _read_json(root / PROGRESS_FILE)
    state_file = root / STATE_FILE
    try:
        state = torch.load(state_file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(" Please use")[0]
        raise CheckpointError(
            f"{state_file}: cannot be read as a weights-only torch file ({detail}); it is corrupt or holds "
            "objects other than tensors and plain containers, which are refused because unpickling them "
            "could run code"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: holds a {type(state).__name__}; expected a dict of state")
    return config, state, progress


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc


def _read_manifest(root: Path) -> dict:
    file = root / MANIFEST_FILE
    manifest = _read_json(file)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(manifest).__name__}; expected an object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r}; expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format version {manifest.get('version')!r}; expected {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file}: has no 'files' table")
    return manifest


def is_complete(path: str | os.PathLike) -> bool:
    """Cheap completeness check (manifest present, every file of the listed size); no hashing."""
    root = Location.parse(path)
    return _complete_progress(root, {i.path: i for i in root.walk()}) is not None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint under the local folder ``run_dir``; see :func:`find_latest`."""
    found = find_latest(Location.parse(run_dir))
    return found.local_path if found is not None else None


def find_latest(root: Location) -> Location | None:
    """The most advanced complete checkpoint anywhere under ``root`` (e.g. Ray's ``checkpoint-*``), local
    or on an object store (one listing, then two small reads per candidate).

    Ordered by ``images_seen`` then ``step`` from ``progress.json``, ties broken by name (Ray's names
    sort by time). Hidden directories (our temporary and replaced saves) and incomplete copies, i.e. a
    manifest whose files are missing or of another size (an upload cut short), are skipped.
    """
    listing = {info.path: info for info in root.walk()}
    _, base = root.fs()
    best: tuple[tuple, Location] | None = None
    for path, info in listing.items():
        if info.base_name != MANIFEST_FILE or _hidden(path, base):
            continue
        candidate = root.child(posixpath.dirname(path))
        progress = _complete_progress(candidate, listing)
        if progress is None:
            continue
        key = (_number(progress.get("images_seen")), _number(progress.get("step")), candidate.name)
        if best is None or key > best[0]:
            best = (key, candidate)
    return best[1] if best else None


def images_seen(checkpoint: Location) -> int:
    """``images_seen`` of a checkpoint's ``progress.json``; -1 where it cannot be read."""
    try:
        return int(read_progress(checkpoint).get("images_seen", 0))
    except (CheckpointError, ValueError, TypeError):
        return -1


def read_progress(checkpoint: Location) -> dict:
    """``progress.json`` of a checkpoint (local or remote) without reading its state."""
    try:
        data = json.loads((checkpoint / PROGRESS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint / PROGRESS_FILE}: cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{checkpoint / PROGRESS_FILE}: expected a JSON object")
    return data


def _complete_progress(root: Location, listing: dict) -> dict | None:
    """The progress of the checkpoint at ``root`` if its manifest lists files that are all there at
    their recorded sizes (``listing``: file infos by filesystem path), else None."""
    _, base = root.fs()
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return None
        for name in _DATA_FILES:
            info = listing.get(posixpath.join(base, name)) or (root / name).info()
            if info.type != pafs.FileType.File or info.size != files.get(name, {}).get("bytes"):
                return None
        return read_progress(root)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError):
        return None


def _hidden(path: str, base: str) -> bool:
    rel = posixpath.relpath(path, base)
    return any(part.startswith(".") for part in rel.split("/")[:-1])


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1.0


# ---------------------------------------------------------------------------------------------
# RNG states in a weights_only-safe form


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and every CUDA device) generator states as tensors and lists."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices present on this machine)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        if count < len(cuda):
            logger.warning("checkpoint has RNG states for %d CUDA devices, restoring %d", len(cuda), count)
        for device, cuda_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
