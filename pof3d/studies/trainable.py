"""The Tune function trainable: one trial = one ordinary training run of ``python -m pof3d.train``.

Ray 2.60 runs Train V2, where Tune trials do not wrap a trainer; instead each trial's function builds
the run exactly as the training CLI does (:func:`pof3d.distributed.plan.plan_run`, the MLflow tracker,
:func:`pof3d.distributed.launcher.launch`) and hands Ray Train a ``TuneReportCallback`` so that every
per-tick ``ray.train.report`` of rank 0 also reaches Tune (and so ASHA and Optuna). There is no second
training loop here: only which config the trial trains and how its MLflow run is tagged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pof3d.config import load_config
from pof3d.distributed.launcher import LaunchSpec, launch
from pof3d.distributed.plan import TrainRequest, plan_run, write_config
from pof3d.errors import TrainingError
from pof3d.studies.mlflow_wiring import child_tags
from pof3d.studies.variants import variant_overrides
from pof3d.tracking import Tracker

logger = logging.getLogger(__name__)

SEARCH_VARIANT = "search"
TRIALS_DIR = "trials"
RUN_ID_FILE = "mlflow_run_id"
ATTEMPTS_FILE = "attempts.jsonl"


@dataclass(frozen=True)
class StudySetup:
    """What every trial of a study shares (pickled into each trial actor)."""

    name: str
    study_dir: str
    preset: str
    overrides: tuple[str, ...]  # flags and --set items applied to the preset for every trial
    mlflow_uri: str
    experiment: str
    parent_run_id: str


def render_value(value: Any) -> str:
    """A sampled value as ``--set`` text (booleans as true/false, floats without loss)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def trial_overrides(config: dict[str, Any], setup: StudySetup) -> list[str]:
    """The full override list of a trial: study base, the variant's rows, the seed, sampled values."""
    variant = config.get("variant", SEARCH_VARIANT)
    overrides = list(setup.overrides)
    if variant != SEARCH_VARIANT:
        overrides += variant_overrides(variant, load_config(setup.preset, overrides))
    if "seed" in config:
        overrides.append(f"train.seed={int(config['seed'])}")
    overrides += [f"{k}={render_value(v)}" for k, v in sorted(config.items()) if "." in k]
    return overrides


def trial_run_dir(setup: StudySetup, config: dict[str, Any], trial_id: str) -> Path:
    variant = config.get("variant", SEARCH_VARIANT)
    seed = f"-s{int(config['seed'])}" if "seed" in config else ""
    return Path(setup.study_dir) / TRIALS_DIR / f"{variant}{seed}-{trial_id}"


def run_trial(config: dict[str, Any], setup: StudySetup) -> None:
    """Tune entry point (bind ``setup`` with ``functools.partial``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    variant = config.get("variant", SEARCH_VARIANT)
    run_dir = trial_run_dir(setup, config, trial_id)
    request = TrainRequest(
        preset=setup.preset,
        run_dir=run_dir,
        mlflow_uri=setup.mlflow_uri,
        experiment=setup.experiment,
        overrides=trial_overrides(config, setup),
    )
    plan = plan_run(request)
    write_config(plan.run_dir, plan.cfg)
    _record_attempt(plan.run_dir, trial_id, request.overrides)
    # A restarted trial (resumed study) continues its own MLflow run instead of opening a second one.
    id_file = plan.run_dir / RUN_ID_FILE
    known_run = id_file.read_text().strip() if id_file.exists() else None
    params = dict(plan.cfg.flat(), **{"run.data_uri": plan.data_uri, "run.run_dir": str(plan.run_dir)})
    tracker = Tracker.open(
        plan.mlflow_uri, plan.experiment, run_name=f"{variant}-{trial_id}", params=params, run_id=known_run
    )
    if tracker.run_id:
        id_file.write_text(tracker.run_id + "\n")
    for key, value in child_tags(setup.parent_run_id, setup.name, variant, trial_id).items():
        tracker.set_tag(key, value)
    tracker.log_artifact(plan.run_dir / "config.json")
    spec = LaunchSpec(
        cfg=plan.cfg,
        run_dir=plan.run_dir,
        data_uri=plan.data_uri,
        mlflow_uri=plan.mlflow_uri,
        mlflow_run_id=tracker.run_id,
        callbacks=[TuneReportCallback()],
    )
    logger.info("trial %s (%s): training in %s", trial_id, variant, plan.run_dir)
    try:
        result = launch(spec)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if result.training_error:
        tracker.finish("FAILED")
        raise TrainingError(f"trial {trial_id} ({variant}): {result.training_error}")
    tracker.finish("FINISHED")


def _record_attempt(run_dir: Path, trial_id: str, overrides: list[str]) -> None:
    """One line per start of this trial: shows (and lets tests check) that resumes skip finished trials."""
    with (run_dir / ATTEMPTS_FILE).open("a") as f:
        f.write(json.dumps({"trial_id": trial_id, "started": time.time(), "overrides": overrides}) + "\n")


def attempts(run_dir: Path) -> int:
    path = run_dir / ATTEMPTS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0
