"""MLflow layout of a study: one parent run, one child run per trial.

The parent is created by the study driver and its id is kept in the study folder, so ``--resume``
keeps adding to the same parent. Trials do not open runs themselves: the training code's own MLflow
run (rank 0) becomes the child by carrying the tags from :func:`child_tags`, in particular
``mlflow.parentRunId``, which is how MLflow's UI nests runs. Only the MLflow client API is used, so
nothing here depends on a process-global active run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

logger = logging.getLogger(__name__)

STUDY_TAG = "pof3d.study"
VARIANT_TAG = "pof3d.variant"
TRIAL_TAG = "pof3d.trial"
ROLE_TAG = "pof3d.role"


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created on first use.

    With a local SQLite store, artifacts go next to the database (as for training runs), not into
    whatever directory the command happened to start in.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def open_parent(
    tracking_uri: str,
    experiment: str,
    study: str,
    params: dict[str, Any],
    existing_run_id: str | None = None,
) -> str:
    """Create the study's parent run (or reopen ``existing_run_id`` on resume); returns its id."""
    client = MlflowClient(tracking_uri)
    if existing_run_id:
        client.update_run(existing_run_id, status="RUNNING")
        logger.info("resuming MLflow parent run %s", existing_run_id)
        return existing_run_id
    run = client.create_run(
        experiment_id(client, experiment, tracking_uri),
        run_name=study,
        tags={STUDY_TAG: study, ROLE_TAG: "study", MLFLOW_RUN_NAME: study},
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    logger.info("MLflow parent run %s for study %s", run.info.run_id, study)
    return run.info.run_id


def child_tags(parent_run_id: str, study: str, variant: str, trial_id: str) -> dict[str, str]:
    """Tags that make a trial's training run a child of the study's parent run."""
    return {
        MLFLOW_PARENT_RUN_ID: parent_run_id,
        STUDY_TAG: study,
        VARIANT_TAG: variant,
        TRIAL_TAG: trial_id,
        ROLE_TAG: "trial",
    }


def close_parent(
    tracking_uri: str,
    run_id: str,
    artifacts: list[Path],
    summary: dict[str, float],
    status: str = "FINISHED",
) -> None:
    """Log the results table files and summary figures to the parent and mark it ended."""
    client = MlflowClient(tracking_uri)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    for key, value in summary.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status=status)
