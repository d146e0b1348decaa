"""What a run prints: the project's own lines (start, one progress line per tick, the summary, warnings
and errors), with Ray's and MLflow's informational chatter behind ``--verbose``.

Quiet is the default because in ``ray job logs`` of a long run the tick lines drowned in Ray's: a
``Reporting training result ... TrainingReport(...)`` line per report and worker, the controller's
worker-group notices and Ray Data's execution-plan lines. Each is switched off where Ray offers a switch,
and nothing at WARNING or above is hidden:

- Ray Train's ``ray.train`` loggers (controller and workers) print to the console at ``WARNING`` instead
  of ``INFO`` (``RunConfig(logging_config=LoggingConfig(log_level=...))``); Ray Train's log files under
  the Ray session directory (``logs/train/``) still get everything. The per-report line needs one more
  setting on the workers (:func:`quiet_train_worker`).
- Ray Data does not announce each execution and its plan (``DataContext.print_on_execution_start``);
  its ``ray-data.log`` file keeps the rest.
- MLflow's notices on creating a run's SQLite store tables are dropped.
- Output that is not a terminal gets Ray's worker prefixes without colour codes (``RAY_COLOR_PREFIX=0``).

The choice travels as the environment variable :data:`VERBOSE_ENV`, so that the Ray workers of a local
Ray started by this process (which inherit its environment) and Tune's trial processes see it too;
``POF3D_VERBOSE=1`` brings the chatter back for commands without a ``--verbose`` flag (the sweep).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

VERBOSE_ENV = "POF3D_VERBOSE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# MLflow's loggers that announce a new tracking store's tables at INFO (one run dir, one store).
MLFLOW_STORE_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def verbose() -> bool:
    """Whether Ray's and MLflow's informational lines are wanted (``--verbose`` / ``POF3D_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configure_console(verbose_flag: bool) -> None:
    """Set up a command's console: the project's log lines at INFO, the rest as :func:`verbose` says.

    Call before Ray is started, so that a local Ray's workers inherit the choice.
    """
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose():
        for name in MLFLOW_STORE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def train_logging_config() -> Any:
    """Ray Train's logging settings for ``RunConfig(logging_config=...)``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_train_worker(verbose_flag: bool) -> None:
    """In a Ray Train worker: drop Ray's ``Reporting training result ...`` line per report unless verbose.

    Ray 2.60 logs it from a logger named after its source file (``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py``), not under ``ray.train``, so the ``LoggingConfig``
    level does not reach it; the level is set on that logger itself (INFO lines only, warnings stay).
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose_flag else logging.WARNING)


def quiet_dataset(dataset: Any) -> None:
    """Ray Data settings of a training dataset: no progress bars (they garble log files) and, unless
    verbose, no per-execution announcement of the plan."""
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = verbose()


def listing(title: str, rows: dict[str, str]) -> str:
    """A ``--help`` epilog block: ``title:`` then one aligned ``name  text`` line per row."""
    width = max(map(len, rows), default=0)
    return f"{title}:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows.items())
