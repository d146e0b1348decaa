"""MLflow tracking of a training run: params, who ran what, per-tick metrics, figures (stepped image
series and files), system metrics, the final generator as an MLflow model.

The driver opens (or re-opens, on resume) the run and logs the resolved config as params; rank 0 of
the training workers attaches to the same run id for metrics, images and the model, and one worker per
node samples that node's system metrics. Tracking must never cost training and must never go dark:
every call after the run is opened goes through a background :class:`~pof3d.tracking.sender.Sender`
that retries with backoff while the server is away and sends what it kept when it is back, and
``metrics.jsonl`` (the source of truth) back-fills into MLflow whatever ticks the run lacks, when a run
(re)starts and when the server comes back after calls were dropped.

Only a run that cannot be opened at all (the server is away when training starts) goes untracked; a
later ``--resume`` of that run opens one and back-fills every tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pof3d.run_files import RunFiles
from pof3d.storage import Location
from pof3d.tracking import system_metrics
from pof3d.tracking.backfill import backfill, metric_entities, send_metrics
from pof3d.tracking.sender import MAX_PENDING, Call, Sender
from pof3d.tracking.store import client_for, experiment_id, probe, run_exists
from pof3d.tracking.ui import (
    FIGURES_ARTIFACT_DIR,
    SOURCE_NAME,
    command_line,
    figure_key,
    inherited_tags,
    run_description,
    source_tags,
)

logger = logging.getLogger(__name__)

_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
FLUSH_TIMEOUT_S = 120.0  # how long the end of a run waits for unsent calls (a server restarting)


class Tracker:
    """One MLflow run seen from one process; every method returns at once and never raises.

    ``primary`` processes (the driver, rank 0) log the run's figures; others only sample their node's
    system metrics. With no run id, every method is a no-op.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str | None,
        metrics_file: Location | None = None,
        backfill_up_to: int | None = None,
        primary: bool = True,
        node_id: str | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        """Attach to run ``run_id``. With ``metrics_file`` (the run's ``metrics.jsonl``, local or on an
        object store), the ticks there (at or before step ``backfill_up_to``) that MLflow lacks are sent
        first; with ``node_id``, this node's system metrics are sampled until :meth:`close`."""
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.primary = primary
        self._metrics_file = metrics_file
        self._client: Any = None
        self._sender: Sender | None = None
        self._monitor: system_metrics.NodeMonitor | None = None
        self._staging = Path(tempfile.mkdtemp(prefix="pof3d-tracking-")) if run_id and primary else None
        if run_id is None:
            return
        self._client = client_for(tracking_uri)
        self._sender = Sender(tracking_uri, on_recovered=self._backfill_dropped, max_pending=max_pending)
        if metrics_file is not None and primary:
            self._submit(
                "backfill", lambda: backfill(self._client, run_id, metrics_file, up_to=backfill_up_to)
            )
        if node_id is not None and system_metrics.enabled():
            self._monitor = self._start_monitor(node_id)

    @property
    def active(self) -> bool:
        return self._sender is not None

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Tracker:
        """Create a run (or continue ``run_id``) and log ``params`` and ``tags``; the opening itself
        waits for the server (the run id is needed to go on); a tracker with no run if it is away.

        The run also gets MLflow's standard tags of who ran what (:func:`_opening_tags`); ``tags`` win
        over them, and a continued run keeps the ones it has (e.g. a description edited in the UI)."""
        tags = dict(tags or {})
        reason = probe(tracking_uri)
        if reason is None:
            try:
                client = client_for(tracking_uri)
                opening = _opening_tags(client, params, tags)
                if run_id is None or not run_exists(client, run_id):
                    exp = experiment_id(client, experiment, tracking_uri)
                    run_id = client.create_run(exp, run_name=run_name, tags=opening | tags).info.run_id
                    existing: dict[str, str] = {}
                else:
                    client.update_run(run_id, status="RUNNING")
                    run = client.get_run(run_id)
                    existing = run.data.params
                    tags = {k: v for k, v in opening.items() if k not in run.data.tags} | tags
            except Exception as exc:  # noqa: BLE001 - any tracking failure must leave training running
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if reason is not None:
            logger.warning(
                "MLflow tracking at %s is unavailable (%s); this run goes on untracked, and resuming it "
                "later with the server up back-fills its metrics from metrics.jsonl",
                tracking_uri,
                reason,
            )
            return cls(tracking_uri, None)
        tracker = cls(tracking_uri, run_id)
        tracker._log_params(params, existing, tags)
        return tracker

    @classmethod
    def for_worker(
        cls, tracking_uri: str, run_id: str | None, files: RunFiles, context: Any, images_seen: int
    ) -> Tracker:
        """The tracker of a Ray Train worker: rank 0 logs the run's figures (first back-filling the
        ticks of ``metrics.jsonl`` up to ``images_seen`` that MLflow lacks); local rank 0 of each node
        samples the node's system metrics."""
        primary = context.get_world_rank() == 0
        node = f"node_{context.get_node_rank()}" if context.get_local_rank() == 0 else None
        if not primary and node is None:
            return cls(tracking_uri, None)
        return cls(
            tracking_uri,
            run_id,
            metrics_file=files.metrics if primary else None,
            backfill_up_to=images_seen,
            primary=primary,
            node_id=node,
        )

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str], tags: dict) -> None:
        """Log params; on a continued run, values that changed (e.g. a longer kimg) become tags."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, _param_text(v)) for k, v in params.items() if k not in existing]
        changed = [
            RunTag(f"resumed.{k}", _param_text(v))
            for k, v in params.items()
            if k in existing and existing[k] != _param_text(v)
        ]
        run_tags = changed + [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(new), _PARAM_BATCH):
            chunk = new[start : start + _PARAM_BATCH]
            self._submit("params", lambda c=chunk: self._client.log_batch(self.run_id, params=c))
        if run_tags:
            self._submit("tags", lambda: self._client.log_batch(self.run_id, tags=run_tags))

    # -- logging ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Finite metrics at ``step`` (images seen), sent as one batch."""
        if not (self.active and self.primary):
            return
        batch = metric_entities(metrics, step)
        self._submit("metrics", lambda: send_metrics(self._client, self.run_id, batch), step=int(step))

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """An image file as step ``step`` of the image series ``key`` (the UI's step slider)."""
        if not (self.active and self.primary):
            return
        staged = self._stage(Path(path))

        def send() -> None:
            from PIL import Image

            with Image.open(staged) as image:
                self._client.log_image(self.run_id, image.convert("RGB"), key=key, step=int(step))

        self._submit("image", send, cleanup=lambda: staged.unlink(missing_ok=True))

    def log_figure(self, name: str, path: str | Path, step: int) -> None:
        """A figure (``samples``, ``poses``) where the UI shows it: step ``step`` of the image series
        ``Figures/<name>`` (the chart view's first section, with a step slider), and the file itself
        under ``samples/`` of the run's artifacts (the run's page previews it)."""
        self.log_image(figure_key(name), path, step)
        self.log_artifact(path, FIGURES_ARTIFACT_DIR)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and self.primary:
            staged = self._stage(Path(path))
            self._submit(
                "artifact",
                lambda: self._client.log_artifact(self.run_id, str(staged), artifact_path),
                cleanup=lambda: staged.unlink(missing_ok=True),
            )

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """A directory's files (copied first: the caller may delete it before the upload)."""
        if self.active and self.primary:
            staged = self._stage(Path(directory))
            self._submit(
                "artifact",
                lambda: self._client.log_artifacts(self.run_id, str(staged), artifact_path),
                cleanup=lambda: shutil.rmtree(staged, ignore_errors=True),
            )

    def log_generator(self, generator: Any, cfg: Any, step: int) -> None:
        """``generator`` (G_ema) as the run's MLflow model, loadable with ``mlflow.pyfunc.load_model``."""
        if not (self.active and self.primary):
            return
        from pof3d.tracking import logged_model

        artifacts = logged_model.stage_generator(generator, cfg, Path(tempfile.mkdtemp(dir=self._staging)))
        self._submit(
            "model",
            lambda: logged_model.log_generator(self.tracking_uri, self.run_id, artifacts, step),
            cleanup=lambda: logged_model.remove_staged(artifacts),
        )

    def set_tag(self, key: str, value: str) -> None:
        if self.active and self.primary:
            self._submit("tags", lambda: self._client.set_tag(self.run_id, key, value))

    def finish(self, status: str = "FINISHED", timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Mark the run ``FINISHED``/``FAILED``/``KILLED`` and send what is left (bounded wait)."""
        if self.active and self.primary:
            self._submit("status", lambda: self._client.set_terminated(self.run_id, status=status))
        self.close(timeout_s)

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Stop sampling and send what is queued, waiting at most ``timeout_s`` seconds."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self._sender is not None:
            self._sender.close(timeout_s)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    # -- internals --------------------------------------------------------------------------------

    def _submit(self, kind: str, fn: Any, cleanup: Any = None, step: int | None = None) -> bool:
        assert self._sender is not None
        return self._sender.submit(Call(kind, fn, cleanup, step))

    def _stage(self, path: Path) -> Path:
        """A private copy (hard links where possible) that lives until its call is sent."""
        assert self._staging is not None
        target = Path(tempfile.mkdtemp(dir=self._staging)) / path.name
        if path.is_dir():
            shutil.copytree(path, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(path), str(target))
        return target

    def _backfill_dropped(self, up_to: int) -> None:
        if self._metrics_file is not None and self.run_id is not None:
            backfill(self._client, self.run_id, self._metrics_file, up_to=up_to)

    def _start_monitor(self, node_id: str) -> system_metrics.NodeMonitor | None:
        offset: list[int] = []  # where this node's steps continue; read on the sender thread

        def log(figures: dict[str, float], index: int, sampled_ms: int) -> None:
            def send() -> None:
                if not offset:
                    offset.append(system_metrics.next_step(self._client, self.run_id, f"system/{node_id}/"))
                # Stamped when sampled, not when sent: samples kept while the server was away keep
                # their place on the time axis.
                step = offset[0] + index
                send_metrics(
                    self._client, self.run_id, metric_entities(figures, step, timestamp_ms=sampled_ms)
                )

            self._submit("system", send)

        try:
            return system_metrics.NodeMonitor(node_id, log)
        except Exception as exc:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
            logger.warning("system metrics of %s are not logged: %s", node_id, exc)
            return None


def _opening_tags(client: Any, params: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, str]:
    """Who ran what: the command as the run's source, the user, the git commit, and a description
    that says where the run's files and figures are. A study's trial runs in a Ray worker, so it takes
    its source and user from its parent run (the study's command)."""
    inherited = inherited_tags(client, tags)
    command = inherited.get(SOURCE_NAME) or command_line()
    return source_tags(run_description(params, command)) | inherited


def _link_or_copy(src: str, dst: str) -> str:
    with contextlib.suppress(OSError):
        os.link(src, dst)
        return dst
    return shutil.copy2(src, dst)


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
