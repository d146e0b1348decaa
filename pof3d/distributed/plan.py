"""Resolve a training request on the driver: config, run directory, data, resume point, MLflow.

Everything that can be wrong with a request (unknown preset or field, missing data, a resume path
without a checkpoint) is found here and raised as a project error before any worker starts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pof3d.checkpoint import latest_checkpoint, load_checkpoint
from pof3d.config import Config, apply_overrides, load_config
from pof3d.data.synthetic import ensure_synthetic
from pof3d.errors import CheckpointError, ConfigError
from pof3d.metrics.suite import resolve_metrics
from pof3d.tracking import default_tracking_uri

logger = logging.getLogger(__name__)

RUNS_ENV = "POF3D_RUNS"  # where default run directories go (default ./runs)
CACHE_ENV = "POF3D_CACHE"  # where the built-in synthetic set is generated (default ~/.cache/pof3d)
DEFAULT_EXPERIMENT = "pof3d"
SYNTHETIC_SEED = 0  # one cached synthetic set per size, shared by all runs


@dataclass
class TrainRequest:
    """What the user asked for; ``None`` means "not given" (keep the preset's or checkpoint's value)."""

    preset: str = "tiny"
    data: str | None = None
    kimg: float | None = None
    batch: int | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    seed: int | None = None
    run_dir: Path | None = None
    resume: str | None = None
    mlflow_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunPlan:
    cfg: Config
    run_dir: Path
    data_uri: str
    mlflow_uri: str
    experiment: str
    mlflow_run_id: str | None  # the run to continue, when resuming
    resume_from: Path | None


def flag_overrides(request: TrainRequest) -> list[str]:
    """The explicit flags as ``--set`` items; they apply before the user's own ``--set`` items."""
    pairs = {
        "data.path": request.data,
        "train.kimg": request.kimg,
        "train.batch": request.batch,
        "train.workers": request.workers,
        "train.gpus_per_worker": request.gpus_per_worker,
        "train.seed": request.seed,
    }
    return [f"{path}={value}" for path, value in pairs.items() if value is not None]


def default_runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs")).resolve()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "pof3d")).expanduser().resolve()


def resolve_resume(resume: str, run_dir: Path | None) -> tuple[Path, Path]:
    """``(checkpoint, run_dir)`` for ``--resume PATH|latest``.

    ``latest``: the newest checkpoint of ``--run-dir``, or of the most recently changed run under the
    runs root. ``PATH``: a checkpoint directory, or a run directory (its newest checkpoint). Training
    continues in the run directory the checkpoint belongs to unless ``--run-dir`` says otherwise.
    """
    if resume == "latest":
        if run_dir is None:
            root = default_runs_root()
            runs = sorted((p for p in root.glob("*") if (p / "config.json").is_file()), key=_mtime)
            if not runs:
                raise ConfigError(f"--resume latest: no run directory with config.json under {root}")
            run_dir = runs[-1]
        source = run_dir
    else:
        source = Path(resume).expanduser().resolve()
        if not source.exists():
            raise ConfigError(f"--resume {resume}: no such path; expected a checkpoint or run directory")
    checkpoint = source if (source / "manifest.json").is_file() else latest_checkpoint(source)
    if checkpoint is None:
        raise ConfigError(f"--resume {resume}: no complete checkpoint under {source}")
    if run_dir is None:
        run_dir = _owning_run_dir(checkpoint)
    return checkpoint, run_dir


def _owning_run_dir(checkpoint: Path) -> Path:
    """``RUN/checkpoints/checkpoint-*`` belongs to RUN; a stray checkpoint starts a new run."""
    for parent in checkpoint.parents:
        if (parent / "config.json").is_file() and (parent / "checkpoints").is_dir():
            return parent
    return new_run_dir("resumed")


def new_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = default_runs_root() / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def plan_run(request: TrainRequest) -> RunPlan:
    """Resolve config, directories and tracking for ``request``; ``ConfigError`` if it cannot run."""
    overrides = flag_overrides(request) + list(request.overrides)
    resume_from, run_id, tracked_uri = None, None, None
    if request.resume:
        resume_from, run_dir = resolve_resume(request.resume, request.run_dir)
        try:
            saved, _, progress = load_checkpoint(resume_from)
        except CheckpointError as exc:
            raise ConfigError(f"--resume {request.resume}: {exc}") from exc
        cfg = apply_overrides(saved, overrides)
        run_id, tracked_uri = progress.get("mlflow_run_id"), progress.get("mlflow_tracking_uri")
        images_seen = int(progress.get("images_seen", 0))
        if cfg.train.kimg * 1000 <= images_seen:
            raise ConfigError(
                f"--kimg {cfg.train.kimg:g}: the checkpoint {resume_from} is already at kimg "
                f"{images_seen / 1000:g}; expected a longer --kimg to continue"
            )
    else:
        cfg = load_config(request.preset, overrides)
        run_dir = request.run_dir or new_run_dir(cfg.preset)
    run_dir = Path(run_dir).expanduser().resolve()
    _check_eval_metrics(cfg)
    data_uri = cfg.data.path or _synthetic_data(cfg)
    mlflow_uri = (
        request.mlflow_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or tracked_uri
        or default_tracking_uri(run_dir)
    )
    return RunPlan(
        cfg=cfg,
        run_dir=run_dir,
        data_uri=data_uri,
        mlflow_uri=mlflow_uri,
        experiment=request.experiment,
        mlflow_run_id=run_id,
        resume_from=resume_from,
    )


def _check_eval_metrics(cfg: Config) -> None:
    """Unknown metric names would otherwise fail on rank 0 at the first evaluation, mid-run."""
    if cfg.train.eval_kimg <= 0:
        return
    try:
        resolve_metrics([m for m in cfg.train.eval_metrics.split(",") if m.strip()])
    except ConfigError as exc:
        raise ConfigError(f"train.eval_metrics={cfg.train.eval_metrics!r}: {exc}") from exc


def _synthetic_data(cfg: Config) -> str:
    """The built-in synthetic set, generated into the cache on first use."""
    d = cfg.data
    path = ensure_synthetic(
        default_cache_dir(),
        n=d.synthetic_n,
        resolution=d.resolution,
        poses=d.synthetic_poses,
        seed=SYNTHETIC_SEED,
    )
    return str(path)


def write_config(run_dir: Path, cfg: Config) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(cfg.to_json())
    return path


def _mtime(path: Path) -> float:
    return path.stat().st_mtime
