"""MLflow layout of a study: one parent run, one child run per trial.

The parent is created by the study driver and its id is kept in the study folder, so ``--resume``
keeps adding to the same parent. Trials do not open runs themselves: the training code's own MLflow
run (rank 0) becomes the child by carrying the tags from :func:`child_tags`, in particular
``mlflow.parentRunId``, which is how MLflow's UI nests runs. Only the MLflow client API is used, so
nothing here depends on a process-global active run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pof3d.distributed.plan import default_tracking_uri_for
from pof3d.storage import Location
from pof3d.studies.results import Table
from pof3d.tracking import client_for, experiment_id
from pof3d.tracking.ui import command_line, source_tags, study_description

logger = logging.getLogger(__name__)

STUDY_TAG = "pof3d.study"
VARIANT_TAG = "pof3d.variant"
TRIAL_TAG = "pof3d.trial"
ROLE_TAG = "pof3d.role"
TABLE_FILE = "results_table.json"


def tracking_uri(flag: str | None, saved: str | None, study_dir: Location) -> str:
    """The study's tracking URI: ``--mlflow-uri``, else the URI a resumed study used (its parent run
    lives there), else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the study folder (in the local
    cache when the study folder is on an object store)."""
    return flag or saved or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri_for(study_dir)


def open_parent(
    tracking_uri: str,
    experiment: str,
    study: str,
    params: dict[str, Any],
    existing_run_id: str | None = None,
) -> str:
    """Create the study's parent run (or reopen ``existing_run_id`` on resume); returns its id."""
    client = client_for(tracking_uri)
    if existing_run_id:
        client.update_run(existing_run_id, status="RUNNING")
        logger.info("resuming MLflow parent run %s", existing_run_id)
        return existing_run_id
    run = client.create_run(
        experiment_id(client, experiment, tracking_uri),
        run_name=study,
        tags={STUDY_TAG: study, ROLE_TAG: "study", MLFLOW_RUN_NAME: study}
        | source_tags(study_description(study, command_line())),
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
    table: Table,
    files: list[Path],
    summary: dict[str, float],
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> None:
    """Log the results table (its files, and as an MLflow table), the per-variant figures (or a
    search's best objective and parameter importances), ``tags`` (a search's best trial), and mark the
    parent run ended."""
    client = client_for(tracking_uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path))
    _log_table(client, run_id, table)
    for key, value in summary.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status=status)


# What a trial's record says (pof3d.studies.results.TrialRecord.status) -> the status of its MLflow run.
TRIAL_RUN_STATUS = {"done": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}


def close_trial_runs(uri: str, experiment: str, parent: str, outcomes: dict[str, str]) -> None:
    """Give each trial's run the status of what the trial did (``outcomes``: trial id -> its record's
    status), and a ``stop_reason`` to the runs of trials the scheduler stopped early; a child with no
    record that is still ``RUNNING`` (its process is gone) becomes ``KILLED``.

    A run's own end is not enough: when Tune stops a trial, its run ends ``FAILED`` if the stop reaches
    the training code as an exception first, or stays ``RUNNING`` if the process ends first, and a trial
    that trained to its budget can be ended the same way before it closes its run (the 4-kimg search
    had 4 stopped trials ``FAILED`` and two finished ones ``RUNNING``).
    """
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000
    )
    for run in runs:
        outcome = outcomes.get(run.data.tags.get(TRIAL_TAG, ""))
        status = TRIAL_RUN_STATUS.get(outcome, "KILLED" if run.info.status == "RUNNING" else None)
        if outcome == "stopped early":
            client.set_tag(run.info.run_id, "stop_reason", "stopped early by the study's scheduler (ASHA)")
        if status is not None and status != run.info.status:
            client.set_terminated(run.info.run_id, status=status)


def _log_table(client: MlflowClient, run_id: str, table: Table) -> None:
    """``results_table.json``, which the UI shows as a table (and can line up across runs).

    MLflow's ``log_table`` appends to an existing table; a resumed study's table replaces the first
    one's instead (same file, same format), so its rows are not listed twice.
    """
    import pandas as pd

    frame = pd.DataFrame(
        [{c: row.get(c) for c in table.columns} for row in table.rows], columns=table.columns
    )
    if TABLE_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        client.log_table(run_id, frame, TABLE_FILE)
        return
    with tempfile.TemporaryDirectory(prefix="pof3d-table-") as tmp:
        path = Path(tmp) / TABLE_FILE
        frame.to_json(path, orient="split", index=False)
        client.log_artifact(run_id, str(path))
