"""``metrics.jsonl`` as the source of truth of a run's figures, and the back-fill of MLflow from it.

Rank 0 writes one JSON object per tick to the run's ``metrics.jsonl`` (:class:`pof3d.run_files.MetricsLog`,
on a local disk or an object store) before handing the same figures to MLflow, so the file holds every
tick even when the tracking server was away. Back-filling reads it with
:func:`pof3d.run_files.read_metrics_log`, compares
the steps MLflow has for ``images_seen`` (logged with every tick, step = images seen) with the file's
lines and sends the ticks that are missing, each as one batch (a tick's figures arrive whole or not at
all, so a step that is present is complete).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from pof3d.run_files import TICK_KEY, read_metrics_log
from pof3d.storage import Location

logger = logging.getLogger(__name__)

PRESENCE_KEY = TICK_KEY  # a figure every tick has; its steps say which ticks MLflow holds
METRIC_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def metric_entities(values: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> list[Any]:
    """MLflow ``Metric`` entities of the finite numbers in ``values`` (None, NaN, strings skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [
        Metric(key=k, value=float(v), timestamp=now, step=int(step))
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]


def send_metrics(client: Any, run_id: str, metrics: list[Any]) -> None:
    for start in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + METRIC_BATCH])


def steps_in_mlflow(client: Any, run_id: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, PRESENCE_KEY)}


def backfill(client: Any, run_id: str, metrics_file: Location, up_to: int | None = None) -> int:
    """Send the ticks of ``metrics_file`` (those at or before step ``up_to``, if given) that run
    ``run_id`` lacks; returns how many were sent. ``up_to`` keeps the back-fill off ticks that are
    queued for sending anyway."""
    ticks = [t for t in read_metrics_log(metrics_file) if up_to is None or t[PRESENCE_KEY] <= up_to]
    if not ticks:
        return 0
    have = steps_in_mlflow(client, run_id)
    missing = [t for t in ticks if int(t[PRESENCE_KEY]) not in have]
    for tick in missing:
        send_metrics(client, run_id, metric_entities(tick, step=int(tick[PRESENCE_KEY])))
    if missing:
        logger.info(
            "MLflow run %s: back-filled %d of %d tick(s) from %s",
            run_id,
            len(missing),
            len(ticks),
            metrics_file,
        )
    return len(missing)
