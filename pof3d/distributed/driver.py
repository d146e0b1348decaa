"""One training run from the driver's point of view: plan, prepare data, track, launch on Ray, summarise.

``python -m pof3d.train`` and every Tune trial go through :func:`run_training` with a plan from
:func:`pof3d.distributed.plan.plan_run`; a trial only adds overrides and MLflow tags to its request and
Tune's report callback here.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pof3d.data.shard_reader import check_shards
from pof3d.distributed.elastic import ensure_fits_nodes
from pof3d.distributed.launcher import connect, launch
from pof3d.distributed.plan import RunPlan, TrainRequest, plan_run, prepare_tracking_store, synthetic_data
from pof3d.distributed.preemption import notices_from_signals
from pof3d.distributed.resources import ensure_resources
from pof3d.errors import TrainingError
from pof3d.storage import Location
from pof3d.tracking import Tracker, ui_command

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Location
    images_seen: int
    tick: int
    checkpoint: Location | None
    mlflow_uri: str
    mlflow_run_id: str | None
    experiment: str
    stop_reason: str | None = None  # e.g. "time limit after 103.456 kimg"; None: the kimg target was reached

    @property
    def ui_command(self) -> str:
        return ui_command(self.mlflow_uri, self.mlflow_run_id)

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
    """Resolve the request and check it fits the cluster (waiting for an autoscaler to add nodes where
    one can); every user error surfaces here."""
    plan = plan_run(request)
    if plan.data_uri:  # a missing or truncated shard is a usage error (exit 2), found before Ray starts
        check_shards(plan.data_uri)
    connect(address)
    ensure_resources(plan.cfg)
    ensure_fits_nodes(plan.cfg)  # MIN workers, each whole on one node
    return plan


def train(request: TrainRequest, address: str | None = None) -> RunSummary:
    """Plan and run ``request`` (the library form of ``python -m pof3d.train``)."""
    return run_training(prepare(request, address))


def run_training(plan: RunPlan, callbacks: Sequence[Any] = ()) -> RunSummary:
    """Train as planned; raises ``TrainingError`` if training had to stop (e.g. a NaN loss).

    ``callbacks``: extra Ray Train callbacks (a Tune trial's report bridge)."""
    if plan.data_uri is None:
        plan = dataclasses.replace(plan, data_uri=synthetic_data(plan.cfg))
    files = plan.files
    files.write_config(plan.cfg)
    tracker = _open_tracker(plan)
    plan = dataclasses.replace(plan, tracking=dataclasses.replace(plan.tracking, run_id=tracker.run_id))
    logger.info(
        "run directory %s (%s); data %s; MLflow %s",
        plan.root,
        plan.start_line(),
        plan.data_uri,
        plan.tracking.uri,
    )
    try:
        with notices_from_signals(files):  # SIGTERM/SIGUSR1: checkpoint after the step, then stop
            result = launch(plan, list(callbacks))
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
        run_dir=plan.root,
        images_seen=result.images_seen,
        tick=result.tick,
        checkpoint=result.checkpoint,
        mlflow_uri=plan.tracking.uri,
        mlflow_run_id=tracker.run_id,
        experiment=plan.tracking.experiment,
        stop_reason=result.stop_reason,
    )


def _open_tracker(plan: RunPlan) -> Tracker:
    """Open (or continue) the MLflow run, keep its id in the run's storage, tag it, log the config."""
    t = plan.tracking
    prepare_tracking_store(t.uri)
    params = dict(plan.cfg.flat(), **{"run.data_uri": plan.data_uri, "run.run_dir": plan.root.uri})
    tracker = Tracker.open(t.uri, t.experiment, t.run_name, params=params, run_id=t.run_id, tags=dict(t.tags))
    if tracker.run_id:
        plan.files.write_tracking(t.uri, t.experiment, tracker.run_id)
    with tempfile.TemporaryDirectory(prefix="pof3d-config-") as tmp:
        local = Path(tmp) / "config.json"
        local.write_text(plan.cfg.to_json())
        tracker.log_artifact(local)
    return tracker
