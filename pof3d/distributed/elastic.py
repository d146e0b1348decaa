"""Elastic runs: ``--workers MIN-MAX`` trains on as many workers as the cluster holds, between the two.

Ray Train 2.60 does the resizing (``ScalingConfig(num_workers=(MIN, MAX))`` selects its
``ElasticScalingPolicy``):

- **Grow.** Every ``train.resize_interval_s`` (``elastic_resize_monitor_interval_s``) the controller of a
  healthy group asks Ray's ``AutoscalingCoordinator`` how many workers the resources it reserved to the
  run hold (per node, the node's share divided by one worker's resources, summed, at most MAX). When
  that differs from the group's size and is at least MIN, the controller stops the group and starts one
  of the new size. The coordinator refreshes its view of the nodes every 20 s (fixed in Ray), so a node
  that joins is used within about 20 s + ``train.resize_interval_s``.
- **Shrink.** A node that goes takes its workers with it: the group fails, and the controller starts a
  new one at once with as many workers as fit (waiting while fewer than MIN fit). Right after the loss
  the coordinator's view may still hold the lost node; a group sized on it waits for its placement group
  ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) and the controller tries again with a fresh count.
  The loss counts against ``train.max_failures`` unless Ray saw it as a preemption (a drained node),
  which counts against Ray's own unlimited preemption budget.
- **Every new group resumes from the run's newest checkpoint** (the worker's ``_resume``): what the old
  group trained after it is trained again. Ray would stop a group for a resize without warning it; the
  run's controller callback (``group_watch.py``) first asks it for a checkpoint after its step in
  progress and waits for it (``train.resize_save_timeout_s``), so a grow redoes nothing. A node that
  goes without notice cannot save (the work since the last snapshot is redone); a preemption notice
  (``preemption.py``) checkpoints first.

What the project adds: the global batch stays ``train.batch`` whatever the group's size
(:mod:`pof3d.batch_split`); the data stream restarts at the checkpoint's images seen, split among the new
group (:func:`pof3d.distributed.launcher.TrainStream`); and every change of the group is visible.
:class:`pof3d.distributed.group_watch.GroupWatch`, a controller callback, writes ``ROOT/workers/group.json``
before each group starts (its size, the size before, why, when the old group stopped); rank 0 of the new
group reads it (:class:`GroupChange`) and, after its first step, logs how the group changed and how long
the restart took, and puts the same figures into its next tick (``metrics.jsonl`` and MLflow, where
``world_size`` is the group's size at every tick).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pof3d.config import Config
from pof3d.errors import ConfigError
from pof3d.run_files import WORKERS_DIR, RunFiles, read_metrics_log
from pof3d.storage import Location

logger = logging.getLogger(__name__)

GROUP_FILE = "group.json"  # under ROOT/workers/: the latest start of a worker group (GroupWatch writes it)


# ---------------------------------------------------------------------------------------------
# The range


def parse_workers(text: str | int) -> tuple[int, int]:
    """``"4"`` -> (4, 4), ``"2-8"`` -> (2, 8); ``ConfigError`` naming what is wrong."""
    raw = str(text).strip()
    low_text, dash, high_text = raw.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise ConfigError(
            f"--workers {raw!r}: expected a worker count N or a range MIN-MAX, e.g. 2-8"
        ) from None
    if low < 1:
        raise ConfigError(f"--workers {raw}: MIN={low}; expected at least one worker")
    if low > high:
        raise ConfigError(f"--workers {raw}: MIN={low} is above MAX={high}; expected MIN <= MAX")
    return low, high


def workers_overrides(text: str | int) -> list[str]:
    """The ``--set`` items of ``--workers N|MIN-MAX``: a fixed count clears ``train.max_workers``."""
    low, high = parse_workers(text)
    return [f"train.workers={low}", f"train.max_workers={high if high > low else 0}"]


def workers_flag(text: str) -> int | str:
    """argparse ``type`` of ``--workers``: the count N as an int, a range as ``"MIN-MAX"``; a bad range is
    a usage error (exit 2) before anything runs."""
    try:
        low, high = parse_workers(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--workers {text.strip()}: ")) from None
    return low if "-" not in text else f"{low}-{high}"


def describe_range(cfg: Config) -> str:
    low, high = cfg.train.worker_range()
    return str(low) if low == high else f"{low}-{high}"


# ---------------------------------------------------------------------------------------------
# Does the range fit the nodes?


def worker_resources(cfg: Config) -> dict[str, float]:
    """One Train worker's Ray resources."""
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker > 0:
        resources["GPU"] = t.gpus_per_worker
    return {k: v for k, v in resources.items() if v > 0}


def workers_that_fit(per_worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers the nodes hold, each whole on one node: Ray's own count for an elastic group
    (``ElasticScalingPolicy._count_possible_workers``: per node, its resources divided by one worker's,
    rounded down), and what a placement group of whole bundles can reach."""
    total = 0
    for node in nodes:
        total += int(min(node.get(name, 0.0) // amount for name, amount in per_worker.items()))
    return total


def check_fits_nodes(cfg: Config, nodes: list[dict[str, float]], can_add_nodes: bool) -> None:
    """``ConfigError`` when the nodes cannot hold MIN workers (each on one node) and nothing can add
    nodes; a warning when an autoscaler might. Sums over the cluster (resources.py) miss this: two
    1-GPU nodes have the 2 GPUs of one 2-GPU worker, yet neither node can run it, and the run would
    wait forever."""
    low, high = cfg.train.worker_range()
    per_worker = worker_resources(cfg)
    fit = workers_that_fit(per_worker, nodes)
    if fit >= low:
        if fit < high:
            logger.info(
                "the cluster holds %d of the run's %d-%d workers now; it grows as nodes join", fit, low, high
            )
        return
    shape = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    largest = max(nodes, key=lambda n: tuple(n.get(k, 0.0) for k in per_worker), default={})
    problem = (
        f"--workers {describe_range(cfg)}: the cluster's nodes hold {fit} worker(s) of {shape} each, each "
        f"whole on one node (largest node: {', '.join(f'{largest.get(k, 0.0):g} {k}' for k in per_worker)})"
    )
    if fit == 0:
        problem += "; no node can hold one worker"
    if can_add_nodes:
        logger.warning("%s; waiting for the autoscaler to add nodes that can", problem)
        return
    raise ConfigError(
        f"{problem}; expected at most {fit} as MIN, smaller workers (train.cpus_per_worker, "
        "--gpus-per-worker) or larger nodes"
    )


def ensure_fits_nodes(cfg: Config) -> None:
    """:func:`check_fits_nodes` on the connected cluster's live nodes."""
    import ray

    from pof3d.distributed.resources import autoscaler_can_add_nodes

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    if workers_that_fit(worker_resources(cfg), nodes) >= cfg.train.workers:
        return
    check_fits_nodes(cfg, nodes, autoscaler_can_add_nodes())


# ---------------------------------------------------------------------------------------------
# The record of a group's start, and what rank 0 of the new group makes of it


def group_location(files: RunFiles) -> Location:
    return files.root / WORKERS_DIR / GROUP_FILE


def write_group_record(files: RunFiles, record: dict[str, Any]) -> None:
    group_location(files).write_text(json.dumps(record, sort_keys=True) + "\n")


def read_group_record(files: RunFiles) -> dict[str, Any] | None:
    location = group_location(files)
    try:
        record = json.loads(location.read_text()) if location.is_file() else None
    except (OSError, ValueError) as exc:  # a record that cannot be read costs the line, not the run
        logger.warning("cannot read %s: %s", location, exc)
        return None
    return record if isinstance(record, dict) else None


@dataclass
class GroupChange:
    """A worker group that replaced another in the same launch, as rank 0 of the new group sees it."""

    workers: int
    previous: int
    cause: str  # "resize", "failure" or "preemption"
    stopped_at: float  # time.time() when the controller stopped (or lost) the old group
    begun_at: float  # when this worker's training function started
    restored_at: float  # when it had built the model and loaded the checkpoint
    resumed_images: int  # images seen at that checkpoint
    old_images: int  # images seen at the old group's last tick (the ticks after the checkpoint are redone)
    saved_s: float | None = None  # the old group's checkpoint on its way down (a resize), notice to done

    @classmethod
    def at_start(cls, files: RunFiles, world: int, images_seen: int, begun_at: float) -> GroupChange | None:
        """Called by rank 0 after the resume, before the metrics log drops the ticks past the checkpoint;
        None for the launch's first group."""
        record = read_group_record(files)
        if not record or record.get("previous") is None or record.get("stopped_at") is None:
            return None
        ticks = read_metrics_log(files.metrics)
        return cls(
            workers=world,
            previous=int(record["previous"]),
            cause=str(record.get("cause") or "restart"),
            stopped_at=float(record["stopped_at"]),
            begun_at=begun_at,
            restored_at=time.time(),
            resumed_images=images_seen,
            old_images=max([int(t["images_seen"]) for t in ticks] + [images_seen]),
            saved_s=float(record["saved_s"]) if isinstance(record.get("saved_s"), (int, float)) else None,
        )

    @property
    def verb(self) -> str:
        if self.workers > self.previous:
            return f"grew from {self.previous} to {self.workers} workers"
        if self.workers < self.previous:
            return f"shrank from {self.previous} to {self.workers} workers"
        return f"restarted with {self.workers} workers"

    def first_step(self, data_wait: float) -> dict[str, float]:
        """Log the change once the new group's first step is done; its figures for the next tick."""
        now = time.time()
        first_batch_at = self.restored_at + data_wait
        figures = {
            "group/previous_workers": float(self.previous),
            "group/restart_s": now - self.stopped_at,  # the old group's stop to the new group's first step
            "group/start_s": self.begun_at - self.stopped_at,  # stop, placement, actors, process group
            "group/resume_s": self.restored_at - self.begun_at,  # model built, checkpoint loaded
            "group/first_batch_s": data_wait,  # the data stream's start (and the first batch's wait)
            "group/first_step_s": now - first_batch_at,
            "group/redone_images": float(self.old_images - self.resumed_images),
        }
        saved = ""
        if self.saved_s is not None:
            figures["group/save_s"] = self.saved_s
            saved = f"; the old group checkpointed on its way down in {self.saved_s:.1f} s"
        logger.info(
            "worker group %s (%s): training again %.1f s after the old group stopped (group start %.1f s, "
            "model and checkpoint %.1f s, first batch %.1f s, first step %.1f s); resumed at kimg %.3f, "
            "%d images the old group trained after that checkpoint (as far as its ticks show) are "
            "trained again%s",
            self.verb,
            self.cause,
            figures["group/restart_s"],
            figures["group/start_s"],
            figures["group/resume_s"],
            figures["group/first_batch_s"],
            figures["group/first_step_s"],
            self.resumed_images / 1000,
            self.old_images - self.resumed_images,
            saved,
        )
        return figures
