"""One training run from the driver's point of view: plan, track, launch on Ray, summarise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pof3d.distributed.launcher import LaunchSpec, check_resources, connect, launch
from pof3d.distributed.plan import RunPlan, TrainRequest, plan_run, write_config
from pof3d.errors import TrainingError
from pof3d.tracking import Tracker, run_name, ui_command

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    images_seen: int
    tick: int
    checkpoint: Path | None
    mlflow_uri: str
    mlflow_run_id: str | None
    experiment: str
    stop_reason: str | None = None  # e.g. "time limit after 103.456 kimg"; None: the kimg target was reached

    @property
    def ui_command(self) -> str:
        return ui_command(self.mlflow_uri)

    def line(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint"
        stopped = (
            f" (stopped at the {self.stop_reason}; --resume {self.run_dir} continues)"
            if self.stop_reason
            else ""
        )
        return (
            f"trained to kimg {self.images_seen / 1000:g} in {self.tick} ticks{stopped}; "
            f"results in {self.run_dir} "
            f"({where}); MLflow run {self.mlflow_run_id or '(tracking unavailable)'} of experiment "
            f"{self.experiment!r}: {self.ui_command}"
        )


def prepare(request: TrainRequest, address: str | None = None) -> RunPlan:
    """Resolve the request and check it fits the cluster; every user error surfaces here."""
    import ray

    plan = plan_run(request)
    connect(address)
    check_resources(plan.cfg, ray.cluster_resources())
    return plan


def train(request: TrainRequest, address: str | None = None) -> RunSummary:
    """Plan and run ``request`` (the library form of ``python -m pof3d.train``)."""
    return run_training(prepare(request, address))


def run_training(plan: RunPlan) -> RunSummary:
    """Train as planned; raises ``TrainingError`` if training had to stop (e.g. a NaN loss)."""
    write_config(plan.run_dir, plan.cfg)
    params = dict(plan.cfg.flat(), **{"run.data_uri": plan.data_uri, "run.run_dir": str(plan.run_dir)})
    name = run_name(plan.cfg.preset, plan.cfg.train.seed)
    tracker = Tracker.open(plan.mlflow_uri, plan.experiment, name, params=params, run_id=plan.mlflow_run_id)
    tracker.log_artifact(plan.run_dir / "config.json")
    logger.info("run directory %s; data %s; MLflow %s", plan.run_dir, plan.data_uri, plan.mlflow_uri)
    spec = LaunchSpec(
        cfg=plan.cfg,
        run_dir=plan.run_dir,
        data_uri=plan.data_uri,
        mlflow_uri=plan.mlflow_uri,
        mlflow_run_id=tracker.run_id,
        resume_from=plan.resume_from,
    )
    try:
        result = launch(spec)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if result.training_error:
        tracker.set_tag("training_error", result.training_error[:5000])
        tracker.finish("FAILED")
        raise TrainingError(f"{result.training_error} (last good checkpoint: {result.checkpoint or 'none'})")
    if result.stop_reason:
        tracker.set_tag("stop_reason", result.stop_reason)
    tracker.finish("FINISHED")
    return RunSummary(
        run_dir=plan.run_dir,
        images_seen=result.images_seen,
        tick=result.tick,
        checkpoint=result.checkpoint,
        mlflow_uri=plan.mlflow_uri,
        mlflow_run_id=tracker.run_id,
        experiment=plan.experiment,
        stop_reason=result.stop_reason,
    )
