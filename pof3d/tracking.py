"""MLflow tracking of a training run: params once, per-tick metrics, artifacts.

The driver opens (or re-opens, on resume) the run and logs the resolved config as params; rank 0 of
the training workers attaches to the same run id for metrics and artifacts. Tracking must never cost
training: if the tracking server cannot be reached, or stops answering mid-run, the tracker says so
once and every later call is a no-op.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_METRIC_BATCH = 1000
_PROBE_TIMEOUT_S = 3.0


def default_tracking_uri(run_dir: Path) -> str:
    """A local SQLite store inside the run directory (MLflow 3 refuses plain file stores by default)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def ui_command(tracking_uri: str) -> str:
    """The exact command that shows the runs of ``tracking_uri``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} (MLflow server)"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live next to the database, not in the current directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _probe(tracking_uri: str) -> str | None:
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


class Tracker:
    """One MLflow run; all methods are safe to call when tracking is disabled or has failed."""

    def __init__(self, tracking_uri: str, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: Any = None
        self._warned = False
        if run_id is not None:
            reason = _probe(tracking_uri)
            if reason is not None:
                self._disable(reason)
            else:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=tracking_uri)

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> Tracker:
        """Create a run (or continue ``run_id``) and log ``params``; a disabled tracker if unreachable."""
        reason = _probe(tracking_uri)
        if reason is not None:
            tracker = cls(tracking_uri, None)
            tracker._disable(reason)
            return tracker
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is None or not _run_exists(client, run_id):
                experiment_id = _experiment_id(client, experiment, tracking_uri)
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
            tracker = cls(tracking_uri, run_id)
            tracker._log_params(params)
            return tracker
        except Exception as exc:  # any tracking failure must leave training running
            tracker = cls(tracking_uri, None)
            tracker._disable(f"{type(exc).__name__}: {exc}")
            return tracker

    def _log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a continued run, values that changed (e.g. a longer kimg) become tags."""
        from mlflow.entities import Param, RunTag

        existing = self._client.get_run(self.run_id).data.params
        new = [Param(k, _param_text(v)) for k, v in params.items() if k not in existing]
        changed = [
            RunTag(f"resumed.{k}", _param_text(v))
            for k, v in params.items()
            if k in existing and existing[k] != _param_text(v)
        ]
        for start in range(0, len(new), _PARAM_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + _PARAM_BATCH])
        if changed:
            self._client.log_batch(self.run_id, tags=changed)

    # -- logging ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite metrics at ``step`` (images seen)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        self._call(
            lambda: [
                self._client.log_batch(self.run_id, metrics=batch[i : i + _METRIC_BATCH])
                for i in range(0, len(batch), _METRIC_BATCH)
            ]
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._call(lambda: self._client.log_artifacts(self.run_id, str(directory), artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self._call(lambda: self._client.set_tag(self.run_id, key, value))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``/``FAILED``/``KILLED``."""
        if self.active:
            self._call(lambda: self._client.set_terminated(self.run_id, status=status))

    # -- failure handling -------------------------------------------------------------------------

    def _call(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # the tracking backend failing must not stop training
            self._disable(f"{type(exc).__name__}: {exc}")

    def _disable(self, reason: str) -> None:
        self._client = None
        if not self._warned:
            self._warned = True
            logger.warning(
                "MLflow tracking at %s is unavailable (%s); training goes on without tracking",
                self.tracking_uri,
                reason.splitlines()[0][:300],
            )


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_local_artifact_root(tracking_uri))


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
