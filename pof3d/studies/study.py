"""A study from start to results: validate, plan resources, open the MLflow parent, run Ray Tune
(fresh or ``Tuner.restore``), then build the results table and close the parent.

Every check that can fail (variants, search space, config overrides, concurrency) runs before Tune
starts, so a bad request costs seconds and never leaves half a study behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pof3d.config import Config
from pof3d.distributed.elastic import workers_overrides
from pof3d.distributed.launcher import connect
from pof3d.distributed.plan import prepare_tracking_store, storage_base, synthetic_data
from pof3d.errors import ConfigError
from pof3d.metrics.suite import resolve_metrics
from pof3d.presets import load_config
from pof3d.storage import Location, check_reachable
from pof3d.studies import mlflow_wiring
from pof3d.studies.importance import SearchFindings, findings, ranked
from pof3d.studies.resources import TRIAL_DRIVER_CPU, TrialFootprint, plan_concurrency, trial_cpu_threads
from pof3d.studies.results import Table, TrialRecord, build_table, variant_metrics
from pof3d.studies.space import SearchSpace, load_space
from pof3d.studies.trainable import SEARCH_VARIANT, StudySetup, run_trial
from pof3d.studies.variants import VARIANTS, parse_variants, variant_overrides
from pof3d.tracking import ui_command

logger = logging.getLogger(__name__)

STUDY_FILE = "study.json"
STUDIES_DIR = "studies"  # default storage: $POF3D_STORAGE/studies, else runs/studies
DEFAULT_EXPERIMENT = "pof3d-studies"
DEFAULT_EVAL_METRICS = "pose,js,depth,re,fid"  # FID only where Inception weights are available
METRIC_PREFIXES = ("eval/", "loss/", "pose/", "scores/", "perf/")
# Trial length when --kimg is not given: the five tiny trials finish in about 10 minutes on 2 cores
# (measured: 0.2 kimg trains in about a minute, plus start-up and the end-of-trial evaluation).
DEFAULT_TRIAL_KIMG = {"tiny": 0.2}


@dataclass
class StudyRequest:
    """The sweep CLI's flags; ``None`` means "keep the preset's value"."""

    mode: str = "ablation"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    preset: str = "tiny"
    kimg: float | None = None
    batch: int | None = None
    workers: int | str | None = None  # N, or "MIN-MAX" for elastic trials
    gpus_per_worker: float | None = None
    data: str | None = None
    samples: int = 1  # seeds per variant (ablation) or number of trials (search)
    seed: int = 0
    concurrency: int | None = None
    storage: str | None = None  # a local path or URI; default default_storage()
    name: str | None = None
    mlflow_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    overrides: list[str] = field(default_factory=list)
    space: str | None = None
    params: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    directions: list[str] = field(default_factory=list)
    grace_ticks: int = 1
    reduction_factor: float = 2.0


@dataclass
class StudySummary:
    study_dir: Location
    table: Table
    files: list[Location]
    mlflow_uri: str
    parent_run_id: str
    finished: bool
    findings: SearchFindings | None = None  # search mode: best trial and parameter importances

    def line(self) -> str:
        state = "finished" if self.finished else "interrupted (continue with --resume)"
        return (
            f"study {self.study_dir.name} {state}: {len(self.table.rows)} row(s) in "
            f"{self.files[0] if self.files else self.study_dir}; MLflow parent run {self.parent_run_id}: "
            f"{ui_command(self.mlflow_uri, self.parent_run_id)}"
        )


# ---------------------------------------------------------------------------------------------
# Resolving the request


def base_overrides(request: StudyRequest) -> list[str]:
    """Flags as ``--set`` items (flags first, the user's own ``--set`` after, as in training)."""
    kimg = request.kimg if request.kimg is not None else DEFAULT_TRIAL_KIMG.get(request.preset)
    pairs = {
        "data.path": request.data,
        "train.kimg": kimg,
        "train.batch": request.batch,
        "train.gpus_per_worker": request.gpus_per_worker,
    }
    flags = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    if request.workers is not None:
        flags += workers_overrides(request.workers)
    return flags + list(request.overrides)


def _user_set(request: StudyRequest, path: str) -> bool:
    return any(item.split("=", 1)[0].strip() == path for item in request.overrides)


def evaluation_overrides(request: StudyRequest, cfg: Config, space: SearchSpace | None) -> list[str]:
    """Make trials report the figures the study needs.

    Ablations evaluate once, at the end of each trial, for the results table. Searches on an ``eval/``
    metric evaluate every tick, because ASHA and Optuna compare trials tick by tick.
    """
    out = []
    groups = [g.strip() for g in cfg.train.eval_metrics.split(",") if g.strip()]
    if not _user_set(request, "train.eval_metrics"):
        groups = [g.strip() for g in DEFAULT_EVAL_METRICS.split(",")]
    wanted = [m.split("/", 1)[1] for m in (space.metrics if space else ()) if m.startswith("eval/")]
    try:
        wanted_groups = resolve_metrics(wanted) if wanted else []
    except Exception as exc:  # the metrics module names what it knows
        raise ConfigError(f"--metric: {exc}") from exc
    groups += [g for g in wanted_groups if g not in groups]
    out.append(f"train.eval_metrics={','.join(groups)}")
    if not _user_set(request, "train.eval_kimg"):
        every = cfg.train.tick_kimg if wanted else cfg.train.kimg
        out.append(f"train.eval_kimg={every!r}")
    return out


def _check_metrics(metrics: tuple[str, ...]) -> None:
    for metric in metrics:
        if not metric.startswith(METRIC_PREFIXES):
            raise ConfigError(
                f"--metric {metric!r}: expected a figure the training reports, named with one of the "
                f"prefixes {', '.join(METRIC_PREFIXES)} (e.g. eval/js, eval/pose_error_deg, loss/G_adv)"
            )


def default_storage() -> str:
    """Where studies go by default: ``$POF3D_STORAGE/studies``, else ``runs/studies``."""
    return (storage_base() / STUDIES_DIR).uri


def study_dir_for(request: StudyRequest) -> Location:
    """The study to resume: ``--name``'s, else the one whose study.json was written last."""
    storage = Location.parse(request.storage or default_storage())
    if request.name:
        return storage / request.name
    studies = []
    for child in storage.children():
        info = (storage.child(child.path) / STUDY_FILE).info()
        if child.type == pafs.FileType.Directory and info.type == pafs.FileType.File:
            studies.append((info.mtime_ns or 0, storage.child(child.path)))
    if not studies:
        raise ConfigError(f"--resume: no study folder with {STUDY_FILE} under --storage {storage}")
    return max(studies, key=lambda s: (s[0], s[1].uri))[1]


# ---------------------------------------------------------------------------------------------
# Running


def run_study(
    request: StudyRequest, resume: bool = False, callbacks: list[Any] | None = None
) -> StudySummary:
    """Run (or resume) a study; ``callbacks`` are extra Ray Tune callbacks."""
    import ray

    saved: dict[str, Any] = {}
    request.storage = Location.parse(request.storage or default_storage()).uri
    check_reachable(Location.parse(request.storage), "--storage")
    if resume:
        study_dir = study_dir_for(request)
        if not (study_dir / STUDY_FILE).is_file():
            raise ConfigError(f"--resume: {study_dir} has no {STUDY_FILE}; expected a study folder")
        saved = json.loads((study_dir / STUDY_FILE).read_text())
        concurrency = request.concurrency
        request = StudyRequest(**saved["request"])
        request.concurrency = concurrency if concurrency is not None else request.concurrency
    else:
        name = request.name or f"{request.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        study_dir = Location.parse(request.storage) / name
        if study_dir.exists():
            raise ConfigError(f"study folder {study_dir} already exists; pass --resume to continue it")
        request.name = name
    if request.mode not in ("ablation", "search"):
        raise ConfigError(f"--mode {request.mode!r}: expected ablation or search")
    if request.samples < 1:
        raise ConfigError(f"--samples={request.samples}: expected at least 1")

    base = base_overrides(request)
    cfg = load_config(request.preset, base)
    space = None
    if request.mode == "search":
        space = load_space(
            request.space, cfg, request.params, request.metrics or None, request.directions or None
        )
        _check_metrics(space.metrics)
        variants = [SEARCH_VARIANT]
        trials = request.samples
    else:
        variants = parse_variants(request.variants)
        trials = len(variants) * request.samples
        for variant in variants:  # every variant must make a valid config before anything starts
            load_config(request.preset, base + variant_overrides(variant, cfg))
    base += evaluation_overrides(request, cfg, space)
    cfg = load_config(request.preset, base)

    connect(None)
    concurrency = plan_concurrency(
        TrialFootprint.of(cfg), ray.cluster_resources(), request.concurrency, trials
    )
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    if (threads := trial_cpu_threads(cfg, concurrency, node_cpus)) is not None:
        base.append(f"train.cpu_threads={threads}")
        logger.info("study %s: trials share nodes: %d thread(s) per trial worker", request.name, threads)
    if not cfg.data.path:  # generated once, before trials start (they would race for it)
        base.append(f"data.path={synthetic_data(cfg)}")

    mlflow_uri = mlflow_wiring.tracking_uri(request.mlflow_uri, saved.get("mlflow_uri"), study_dir)
    prepare_tracking_store(mlflow_uri)
    parent = mlflow_wiring.open_parent(
        mlflow_uri,
        request.experiment,
        request.name,
        {"mode": request.mode, "preset": request.preset, "variants": ",".join(variants), "trials": trials},
        existing_run_id=saved.get("parent_run_id"),
    )
    (study_dir / STUDY_FILE).write_text(
        json.dumps(
            {"request": dataclasses.asdict(request), "parent_run_id": parent, "mlflow_uri": mlflow_uri},
            indent=2,
        )
    )
    setup = StudySetup(
        name=request.name,
        study_dir=study_dir.uri,
        preset=request.preset,
        overrides=tuple(base),
        mlflow_uri=mlflow_uri,
        experiment=request.experiment,
        parent_run_id=parent,
    )
    logger.info("study %s: %d trial(s), %d at a time, in %s", request.name, trials, concurrency, study_dir)
    from pof3d.studies.progress import StudyProgress  # imports Ray Tune

    progress = StudyProgress(
        request.name,
        trials,
        int(round(cfg.train.kimg * 1000)),
        space.metrics[0] if space else "eval/js",
        space.modes[0] if space else "min",
    )
    callbacks = [*(callbacks or []), progress]
    tuner = _tuner(request, setup, space, variants, concurrency, study_dir, resume, callbacks, cfg)
    grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors == len(grid) and len(grid) >= trials
    records = _records(grid, cfg)
    table = build_table(records, by_variant=request.mode == "ablation")
    found = findings(records, space, seed=request.seed) if space is not None else None
    if found is not None:
        table = ranked(table, records, found)
    if finished:
        outcomes = {r.trial_id: r.status for r in records}
        mlflow_wiring.close_trial_runs(mlflow_uri, request.experiment, parent, outcomes)
    with tempfile.TemporaryDirectory(prefix="pof3d-study-") as tmp:
        local = list(table.write(Path(tmp)))
        if found is not None:
            local += found.table().write(Path(tmp), stem="importances")
        files = []
        for path in local:
            (study_dir / path.name).upload(path)
            files.append(study_dir / path.name)
        mlflow_wiring.close_parent(
            mlflow_uri,
            parent,
            table,
            local,
            {**variant_metrics(table), **(found.mlflow_metrics() if found else {})},
            status="FINISHED" if finished else "KILLED",
            tags=found.mlflow_tags() if found else None,
        )
    for line in found.lines() if found else []:
        logger.info("study %s: %s", request.name, line)
    return StudySummary(study_dir, table, files, mlflow_uri, parent, finished, found)


def _tuner(
    request: StudyRequest,
    setup: StudySetup,
    space: SearchSpace | None,
    variants: list[str],
    concurrency: int,
    study_dir: Location,
    resume: bool,
    callbacks: list[Any],
    cfg: Config,
) -> Any:
    from ray import tune

    trainable = tune.with_resources(functools.partial(run_trial, setup=setup), {"cpu": TRIAL_DRIVER_CPU})
    # Tune keeps its experiment state under the study folder, through the project's filesystem (pyarrow
    # alone would ignore AWS_ENDPOINT_URL for s3:// paths).
    fs, study_path = study_dir.fs()
    custom_fs = None if study_dir.is_local else fs
    if resume:
        return tune.Tuner.restore(
            study_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=custom_fs,
        )
    run_config = tune.RunConfig(
        name=study_dir.name,
        storage_path=study_dir.parent.fs()[1],
        storage_filesystem=custom_fs,
        callbacks=callbacks,
        verbose=1,
    )
    if space is None:
        seeds = [request.seed + i for i in range(request.samples)]
        param_space = {"variant": tune.grid_search(variants), "seed": tune.grid_search(seeds)}
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency)
        return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = list(space.metrics), list(space.modes)
    searcher = OptunaSearch(
        space=space,
        metric=metrics if space.multi_objective else metrics[0],
        mode=modes if space.multi_objective else modes[0],
        points_to_evaluate=[dict(p) for p in space.points] or None,
        seed=request.seed,
    )
    ticks = max(1, math.ceil(cfg.train.kimg / cfg.train.tick_kimg - 1e-9))
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        metric=metrics[0],
        mode=modes[0],
        # One past the last tick: ASHA must never be the one that ends a trial that reached its length
        # (a stop kills the trial mid-way through its final checkpoint and MLflow close).
        max_t=ticks + 1,
        grace_period=min(request.grace_ticks, ticks),
        reduction_factor=request.reduction_factor,
    )
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=request.samples,
        max_concurrent_trials=concurrency,
    )
    from pof3d.studies.rung_memory import RungMemory

    run_config.callbacks = [*callbacks, RungMemory(scheduler)]  # Tune would not save ASHA's rungs
    return tune.Tuner(
        trainable, param_space={"seed": request.seed}, tune_config=tune_config, run_config=run_config
    )


def _records(grid: Any, cfg: Config) -> list[TrialRecord]:
    target = int(round(cfg.train.kimg * 1000))
    records = []
    for result in grid:
        config = result.config or {}
        metrics = dict(result.metrics or {})
        seen = int(metrics.get("images_seen", 0) or 0)
        status = "error" if result.error else ("done" if seen >= target else "stopped early")
        records.append(
            TrialRecord(
                trial_id=str(metrics.get("trial_id", result.path.rsplit("/", 1)[-1])),
                variant=str(config.get("variant", SEARCH_VARIANT)),
                seed=int(config.get("seed", 0)),
                status=status,
                metrics=metrics,
                params={k: v for k, v in config.items() if "." in k},
            )
        )
    return sorted(records, key=lambda r: r.trial_id)  # creation order: a restored grid lists them reversed
