"""Where a run's figures go: the MLflow store (its client, health check, experiment) and how a user
opens it (the ``mlflow ui`` command and a link to the run in the UI's training view)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pof3d.cache import cache_dir
from pof3d.tracking.ui import run_url

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 3.0
SQLITE_PREFIX = "sqlite:///"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# What the experiment is, for MLflow versions whose UI reads it; 3.17's does not (see pof3d.tracking.ui).
EXPERIMENT_KIND = "custom_model_development"
# MLflow's own HTTP retries would hold a call for minutes; the sender retries instead (user values win).
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def default_tracking_uri(run_dir: Path) -> str:
    """A local SQLite store inside the run directory (MLflow 3 refuses plain file stores by default)."""
    return f"{SQLITE_PREFIX}{(run_dir / 'mlflow.db').resolve()}"


def ui_command(tracking_uri: str, run_id: str | None = None) -> str:
    """How to see the runs of ``tracking_uri``: the ``mlflow ui`` command for a local store and, given
    ``run_id``, the link that opens that run in the UI's training view (its experiment is looked up in
    the store; without an answer the link is left out)."""
    link = _run_link(tracking_uri, run_id) if run_id else None
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {link or tracking_uri} (MLflow server)"
    command = f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"{command}, then open {link}" if link else command


def _run_link(tracking_uri: str, run_id: str) -> str | None:
    if probe(tracking_uri) is not None:
        return None
    try:
        experiment = client_for(tracking_uri).get_run(run_id).info.experiment_id
    except Exception as exc:  # noqa: BLE001 - a hint without a link is still a hint
        logger.debug("no UI link for run %s: %s", run_id, exc)
        return None
    return run_url(tracking_uri, experiment, run_id)


def run_name(preset: str, seed: int, variant: str | None = None, started: float | None = None) -> str:
    """A run's name in the MLflow UI: preset, variant, seed and start time, e.g.
    ``tiny-no_symmetry-s3-20260101-1200``."""
    stamp = time.strftime("%Y%m%d-%H%M", time.localtime(started))
    return "-".join([preset, *([variant] if variant else []), f"s{seed}", stamp])


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created on first use as a model-training experiment.

    With a local SQLite store, artifacts go next to the database, not into whatever directory the
    command happened to start in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # an older experiment; a user's choice is kept
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith(SQLITE_PREFIX):
        location = artifact_root(Path(tracking_uri[len(SQLITE_PREFIX) :])).as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def client_for(tracking_uri: str) -> Any:
    """An ``MlflowClient`` whose HTTP calls fail fast (the sender does the retrying)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith(SQLITE_PREFIX):
        seed_sqlite_store(Path(tracking_uri[len(SQLITE_PREFIX) :]))
    if tracking_uri.startswith(("http://", "https://")):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        pool_logger = logging.getLogger("urllib3.connectionpool")
        if not any(isinstance(f, _QuietMlflowRetries) for f in pool_logger.filters):
            pool_logger.addFilter(_QuietMlflowRetries())
    return MlflowClient(tracking_uri=tracking_uri)


class _QuietMlflowRetries(logging.Filter):
    """urllib3 warns at each retry of each call; while a server is away that is a line every few
    seconds. The sender says once that the server is away and once that it is back instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Retrying") and "/api/2.0/mlflow/" in message)


def probe(tracking_uri: str) -> str | None:
    """None if an HTTP tracking server answers its health check, else the reason it does not."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as response:
            if response.status >= 400:
                return f"HTTP {response.status} from {url}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise  # the server is away: not a reason to open a second run
    return True


def artifact_root(db: Path) -> Path:
    """Where the experiments of the SQLite store ``db`` keep their artifacts: next to the database."""
    return (db.parent / "mlartifacts").resolve()


def seed_sqlite_store(db: Path) -> None:
    """Start a new SQLite store as a copy of an empty one, instead of letting MLflow build it.

    MLflow builds a new store by running its whole chain of schema migrations, about 3 s on a 2-core
    machine for every run directory (and every test run), while copying an empty store of the same
    MLflow version takes milliseconds. The empty store is made once per MLflow version by MLflow itself
    (in the cache folder). Its only contents, the "Default" experiment, gets the artifact folder and
    creation time that this store's own experiments would get. An existing ``db`` is left alone; if
    anything here fails, MLflow builds the store as it always would.
    """
    if db.exists():
        return
    try:
        template = _empty_store()
        db.parent.mkdir(parents=True, exist_ok=True)
        partial = db.with_name(f".{db.name}.{os.getpid()}.partial")
        try:  # a copy that failed half-way is removed too
            shutil.copyfile(template, partial)
            now = int(time.time() * 1000)
            with contextlib.closing(sqlite3.connect(partial)) as con, con:
                con.execute(
                    "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ?"
                    " WHERE experiment_id = 0",
                    ((artifact_root(db) / "0").as_uri(), now, now),
                )
            with contextlib.suppress(FileExistsError):
                os.link(partial, db)  # never over a store another process has just made
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, sqlite3.Error) as exc:
        logger.debug("MLflow builds the store %s itself: %s", db, exc)


def _empty_store() -> Path:
    import mlflow

    template = cache_dir() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # The store class itself, not a client: clients keep their stores (and an open database) per URI.
    store = SqlAlchemyStore(f"{SQLITE_PREFIX}{partial}", artifact_root(partial).as_uri())
    store.engine.dispose()
    os.replace(partial, template)
    return template
