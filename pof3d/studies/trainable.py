"""The Tune function trainable: one trial = one ordinary training run of ``python -m pof3d.train``.

Ray 2.60 runs Train V2, where Tune trials do not wrap a trainer; instead each trial plans and runs its
training exactly as the training CLI does (:func:`pof3d.distributed.plan.plan_run`, then
:func:`pof3d.distributed.driver.run_training`). A trial only adds its overrides, the MLflow tags that
make its run a child of the study's, and a ``TuneReportCallback`` so that every per-tick
``ray.train.report`` of rank 0 also reaches Tune (and so ASHA and Optuna). Its run directory is resumed
with ``--resume auto`` semantics: a trial restarted by a resumed study continues from its own checkpoint
and MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pof3d.distributed.driver import run_training
from pof3d.distributed.plan import RESUME_AUTO, TrainRequest, plan_run
from pof3d.errors import TrainingError
from pof3d.presets import load_config
from pof3d.storage import Location
from pof3d.studies.mlflow_wiring import child_tags
from pof3d.studies.variants import variant_overrides
from pof3d.tracking import run_name

logger = logging.getLogger(__name__)

SEARCH_VARIANT = "search"
TRIALS_DIR = "trials"
ATTEMPTS_FILE = "attempts.jsonl"


@dataclass(frozen=True)
class StudySetup:
    """What every trial of a study shares (pickled into each trial actor)."""

    name: str
    study_dir: str  # a local path or a filesystem URI
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


def trial_run_dir(setup: StudySetup, config: dict[str, Any], trial_id: str) -> Location:
    variant = config.get("variant", SEARCH_VARIANT)
    seed = f"-s{int(config['seed'])}" if "seed" in config else ""
    return Location.parse(setup.study_dir) / TRIALS_DIR / f"{variant}{seed}-{trial_id}"


def run_trial(config: dict[str, Any], setup: StudySetup) -> None:
    """Tune entry point (bind ``setup`` with ``functools.partial``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    variant = config.get("variant", SEARCH_VARIANT)
    run_dir = trial_run_dir(setup, config, trial_id)
    request = TrainRequest(
        preset=setup.preset,
        run_dir=run_dir.uri,
        resume=RESUME_AUTO,
        mlflow_uri=setup.mlflow_uri,
        experiment=setup.experiment,
        overrides=trial_overrides(config, setup),
        tags=child_tags(setup.parent_run_id, setup.name, variant, trial_id),
    )
    plan = plan_run(request)
    # Named like a training run plus the variant; the seed is known once the overrides are resolved.
    name = run_name(plan.cfg.preset, plan.cfg.train.seed, variant)
    plan = dataclasses.replace(plan, tracking=dataclasses.replace(plan.tracking, run_name=name))
    _record_attempt(run_dir, trial_id, request.overrides)
    logger.info("trial %s (%s): training in %s (%s)", trial_id, variant, run_dir, plan.start_line())
    try:
        run_training(plan, callbacks=[TuneReportCallback()])
    except TrainingError as exc:
        raise TrainingError(f"trial {trial_id} ({variant}): {exc}") from exc


def _record_attempt(run_dir: Location, trial_id: str, overrides: list[str]) -> None:
    """One line per start of this trial: shows (and lets tests check) that resumes skip finished trials."""
    path = run_dir / ATTEMPTS_FILE
    before = path.read_text() if path.is_file() else ""
    line = json.dumps({"trial_id": trial_id, "started": time.time(), "overrides": overrides})
    path.write_text(before + line + "\n")


def attempts(run_dir: Location) -> int:
    path = run_dir / ATTEMPTS_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0
