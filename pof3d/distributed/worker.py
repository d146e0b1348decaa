"""The function every Ray Train worker runs: resume, stream batches, step, tick, snapshot, report.

Data parallelism lives in :class:`pof3d.loop.Trainer` (it broadcasts parameters and all-reduces
gradients when ``torch.distributed`` is initialised, which Ray's ``TorchTrainer`` does), so nothing is
wrapped in DDP here. Rank 0 alone writes files, logs progress lines and talks to MLflow; every rank calls
``ray.train.report`` at each tick because it is a barrier across workers.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pof3d.checkpoint import images_seen, load_checkpoint, save_checkpoint
from pof3d.compile_cache import CompiledGraphs
from pof3d.config import Config
from pof3d.console import quiet_train_worker
from pof3d.data.streaming import StepFeed
from pof3d.distributed.elastic import GroupChange
from pof3d.distributed.plan import RunPlan
from pof3d.distributed.preemption import Notice, NoticeWatch
from pof3d.distributed.progress import TickMeter, TimeLimit, device_memory, next_boundary, progress_line
from pof3d.distributed.snapshot_figures import pose_plot, sample_grid
from pof3d.errors import DataError, TrainingError
from pof3d.loop import Trainer
from pof3d.metrics import evaluate_generator
from pof3d.metrics.spread import distributed_spread
from pof3d.run_files import RunFiles
from pof3d.storage import Location, as_local_dir
from pof3d.tracking import Tracker

logger = logging.getLogger(__name__)

TRUE_POSE_LIMIT = 4096


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of each Ray Train worker; ``config["plan"]`` is the run's :class:`RunPlan`.

    Returns (rank 0's value reaches the driver) the counters reached; ``stop_reason`` when the run ended
    before its kimg target at ``train.time_limit_min`` (cleanly, as at the target), and, if training had
    to stop, ``training_error``: a non-finite loss or damaged data ends the workers cleanly instead of
    raising, because a raised error would be retried from the last checkpoint by Ray's FailureConfig and
    fail the same way again.
    """
    import ray.train

    begun = time.time()  # a restarted group's start-up time is measured from here (elastic.py)
    _configure_logging()
    quiet_train_worker(config.get("verbose", False))
    plan: RunPlan = config["plan"]
    cfg, files = plan.cfg, plan.files
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(cfg)
    torch.set_num_threads(_threads(cfg, context.get_local_world_size()))
    files.write_pid(rank, os.getpid())

    trainer = Trainer(cfg, device=device, seed=cfg.train.seed)
    progress = _resume(trainer, files, plan.resume_from, device)
    tick = int(progress.get("tick", 0))
    # Whether this group replaced another (a resize or a restart), read before the log drops old ticks.
    group_change = GroupChange.at_start(files, world, trainer.images_seen, begun) if rank == 0 else None
    group_figures: dict[str, float] = {}
    metrics_log = files.metrics_log(trainer.images_seen) if rank == 0 else None
    if rank == 0:
        logger.info(
            "worker rank 0/%d on %s (%d threads): starting at kimg %.3f (tick %d), target kimg %g",
            world,
            device,
            torch.get_num_threads(),
            trainer.images_seen / 1000,
            tick,
            cfg.train.kimg,
        )
    # After the metrics log dropped the ticks past the checkpoint: the back-fill reads what is left.
    tracker = Tracker.for_worker(plan.tracking.uri, plan.tracking.run_id, files, context, trainer.images_seen)

    target = int(round(cfg.train.kimg * 1000))
    # Whole micro-batches of the global batch (pof3d/batch_split.py): with an uneven deal, workers read
    # different numbers of images per step, turning with the step.
    feed = StepFeed(ray.train.get_dataset_shard("train"), trainer.share)
    true_poses: list[np.ndarray] = []
    meter = TickMeter(target_images=target)
    next_tick = next_boundary(trainer.images_seen, cfg.train.tick_kimg)
    next_snapshot = next_boundary(trainer.images_seen, cfg.train.snapshot_kimg)
    next_eval = next_boundary(trainer.images_seen, cfg.train.eval_kimg) if cfg.train.eval_kimg > 0 else None
    time_limit = TimeLimit(plan.deadline)
    notices = NoticeWatch(files, rank)
    stop_reason = None
    compiled = CompiledGraphs()

    while stop_reason is None and trainer.images_seen < target:
        started = time.perf_counter()
        try:
            batch, data_error = feed.take(trainer.share), None
        except DataError as exc:  # damaged data: retrying the worker would fail the same way again
            batch, data_error = None, str(exc)
        data_error = _first_data_error(data_error, world, device)
        if data_error is not None:
            return _stopped(data_error, trainer, tick, rank, tracker, notices)
        real = batch["image"].to(device, non_blocking=True)
        fetched = time.perf_counter()
        if rank == 0 and "pose" in batch and sum(len(p) for p in true_poses) < TRUE_POSE_LIMIT:
            true_poses.append(batch["pose"].cpu().numpy().reshape(-1, 2))
        before = trainer.images_seen
        try:
            figures = trainer.train_step(real)
        except TrainingError as exc:
            return _stopped(str(exc), trainer, tick, rank, tracker, notices)
        meter.update(
            figures,
            images=trainer.images_seen - before,
            data_wait=fetched - started,
            step_time=time.perf_counter() - started,
        )
        if group_change is not None:  # the first step since this group replaced another: say how it went
            group_figures, group_change = group_change.first_step(fetched - started), None
        # Every rank asks at every step (a collective when a limit is set); rank 0's clock decides.
        out_of_time = trainer.images_seen < target and time_limit.reached(rank, world, device)
        if out_of_time:
            stop_reason = f"time limit after {trainer.images_seen / 1000:.3f} kimg"
            if rank == 0:
                logger.info(
                    "train.time_limit_min=%g reached at kimg %.3f: final checkpoint and evaluation",
                    cfg.train.time_limit_min,
                    trainer.images_seen / 1000,
                )
        # Every rank asks at every step too: a preemption notice is acted on after this step.
        notice = notices.check(world, device)
        if trainer.images_seen >= target:
            notice = None  # the run ends here anyway, with its final snapshot
        if notice is not None and notice.stop and stop_reason is None:
            stop_reason = f"preemption notice ({notice.reason}) after {trainer.images_seen / 1000:.3f} kimg"
        done = trainer.images_seen >= target or stop_reason is not None
        if not (done or notice is not None or trainer.images_seen >= next_tick):
            continue
        tick += 1
        next_tick = next_boundary(trainer.images_seen, cfg.train.tick_kimg)
        metrics = meter.close(trainer.images_seen) | device_memory(device)
        metrics["perf/eta_sec"] = min(metrics["perf/eta_sec"], time_limit.remaining())
        snapshot = done or notice is not None or trainer.images_seen >= next_snapshot
        if snapshot:
            try:  # every rank: the replicas hold the same parameters
                trainer.check_finite_parameters()
            except TrainingError as exc:
                return _stopped(str(exc), trainer, tick, rank, tracker, notices)
            next_snapshot = next_boundary(trainer.images_seen, cfg.train.snapshot_kimg)
            if world > 1:  # how far the replicas drifted apart; nothing to compare with one
                metrics["ddp/param_spread"] = _replica_spread(trainer)
        if next_eval is not None and notice is None and (done or trainer.images_seen >= next_eval):
            next_eval = next_boundary(trainer.images_seen, cfg.train.eval_kimg)
            # Every rank renders a share of the samples; rank 0 gets the figures, the others {}.
            metrics.update(_evaluate(trainer, cfg, plan.data_uri, device))
        metrics.update({"images_seen": trainer.images_seen, "tick": tick, "world_size": world})
        metrics.update(group_figures)  # at the first tick after a group change only
        group_figures = {}
        if cfg.train.compile:  # graphs compiled and loaded from the cache so far in this launch
            compiled = _count_compiled(compiled, metrics, rank)
        if rank == 0:
            logger.info(progress_line(tick, trainer.images_seen, target, metrics))
            metrics_log.append(metrics)
            tracker.log_metrics(metrics, step=trainer.images_seen)
        _report(trainer, plan, metrics, tick, snapshot, done, rank, tracker, true_poses, notice)
        if notice is not None and rank == 0:
            notice.log_checkpoint(trainer.images_seen)
            notices.acknowledge(notice)
    if rank == 0:
        ended = f"stopped: {stop_reason}" if stop_reason else f"reached kimg {trainer.images_seen / 1000:.3f}"
        logger.info("training %s after %d ticks", ended, tick)
    tracker.close()
    notices.close()
    return {
        "images_seen": trainer.images_seen,
        "tick": tick,
        "training_error": None,
        "stop_reason": stop_reason,
    }


# ---------------------------------------------------------------------------------------------
# Start-up


def _configure_logging() -> None:
    """Ray workers start with bare logging; progress lines must reach ``ray job logs``."""
    root = logging.getLogger("pof3d")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _threads(cfg: Config, workers_on_node: int) -> int:
    """Torch threads for this worker: ``train.cpu_threads``, or the cores this process may run on shared
    evenly among the node's workers, less one core left to Ray Data and Ray's own processes where the
    share is more than two cores.

    Ray would set a worker's OMP_NUM_THREADS to the CPUs it holds: one thread for the default half-CPU
    worker on any node, however many cores it has. On a 2-core machine one worker takes both cores: in
    steady state the data pipeline waits 0 % of the time, and ``tiny`` trains at 10.3-11.1 img/s with two
    threads against 9.0-9.5 with one (docs/training-step.md).
    """
    if cfg.train.cpu_threads > 0:
        return cfg.train.cpu_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // max(1, workers_on_node))
    return share - 1 if share > 2 else share


def _count_compiled(before: CompiledGraphs, metrics: dict[str, float], rank: int) -> CompiledGraphs:
    now = CompiledGraphs.so_far()
    metrics.update(now.metrics())
    if rank == 0 and now != before:
        logger.info("compiled graphs so far: %d compiled, %d loaded from the cache", now.new, now.cached)
    return now


def _device(cfg: Config) -> torch.device:
    if cfg.train.gpus_per_worker > 0:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _resume(trainer: Any, files: RunFiles, resume_from: Location | None, device: torch.device) -> dict:
    """Load the most advanced of: the newest complete checkpoint in the run's checkpoint folder and
    ``--resume``'s. Returns its progress (``{}`` for a fresh start).

    The folder holds every checkpoint Ray Train persisted (also the one it registered last, which
    ``ray.train.get_checkpoint()`` would return), and more: a worker can die after a checkpoint was
    persisted but before the controller registered the report; restarting from an older state would
    redo finished work. Only the chosen checkpoint is downloaded (and verified) when it is remote.
    """
    candidates = [c for c in (files.latest_checkpoint(), resume_from) if c is not None]
    if not candidates:
        return {}
    source = max(candidates, key=images_seen)  # ties keep the earlier candidate
    with tempfile.TemporaryDirectory(prefix="pof3d-resume-") as scratch:
        _, state, progress = load_checkpoint(as_local_dir(source, Path(scratch)), map_location=device)
    trainer.load_state_dict(state)
    logger.info("resumed from %s at kimg %.3f", source, trainer.images_seen / 1000)
    return progress


def _first_data_error(message: str | None, world: int, device: torch.device) -> str | None:
    """The data error of any rank at this step, the same on every rank (a collective when data
    parallel): a rank that stopped alone would leave the others waiting in the gradient all-reduce."""
    if world == 1:
        return message
    import torch.distributed as dist

    flag = torch.tensor([int(message is not None)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    messages: list[str | None] = [None] * world
    dist.all_gather_object(messages, message)
    return next(m for m in messages if m is not None)


# ---------------------------------------------------------------------------------------------
# Figures of a tick: replica spread and evaluation


@torch.no_grad()
def _replica_spread(trainer: Any) -> float:
    """Largest difference of any parameter between ranks (0 when data-parallel replicas agree)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    params = [p for net in (trainer.G, trainer.D) for p in net.parameters()]
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    high, low = flat.clone(), -flat
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return float((high + low).max())


def _evaluate(trainer: Any, cfg: Config, data_uri: str, device: torch.device) -> dict[str, float]:
    names = [m.strip() for m in cfg.train.eval_metrics.split(",") if m.strip()]
    try:
        results = evaluate_generator(
            trainer.G_ema,
            trainer.D,
            cfg,
            data_uri,
            names,
            num_samples=cfg.train.eval_samples,
            device=device,
            seed=cfg.train.seed,
            spread=distributed_spread(device),
            inception_fallback=True,  # fd_random where the Inception file is missing
        )
    except Exception:  # a broken metric must not cost the run; the next evaluation tries again
        logger.exception("evaluation at kimg %.3f failed; training goes on", trainer.images_seen / 1000)
        return {}
    return {f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------
# Reporting


def _stopped(
    message: str, trainer: Any, tick: int, rank: int, tracker: Tracker, notices: NoticeWatch
) -> dict:
    """End training on an error that a retry would meet again; the driver reports it and exits 1."""
    if rank == 0:
        logger.error("training stopped: %s", message)
    tracker.close()
    notices.close()
    return {"images_seen": trainer.images_seen, "tick": tick, "training_error": message}


def _report(
    trainer: Any,
    plan: RunPlan,
    metrics: dict[str, float],
    tick: int,
    snapshot: bool,
    done: bool,
    rank: int,
    tracker: Tracker,
    true_poses: list[np.ndarray],
    notice: Notice | None = None,
) -> None:
    """Every rank reports (a barrier); at snapshots rank 0 attaches a checkpoint and figures.

    Under a preemption notice the checkpoint goes alone: figures and the final model wait for a later
    snapshot, since the time before the node goes is short."""
    import ray.train

    if rank != 0:  # only rank 0's metrics are kept; the others just meet the barrier
        ray.train.report({"images_seen": trainer.images_seen, "tick": tick})
        return
    if not snapshot:
        ray.train.report(metrics)
        return
    kimg = f"{trainer.images_seen / 1000:07.3f}"
    cfg = plan.cfg
    progress = {
        "images_seen": trainer.images_seen,
        "step": trainer.step,
        "tick": tick,
        "seed": cfg.train.seed,
        "mlflow_run_id": plan.tracking.run_id,
        "mlflow_tracking_uri": plan.tracking.uri,
    }
    with tempfile.TemporaryDirectory(prefix="pof3d-ckpt-") as tmp:
        if notice is None:
            # Figures are drawn locally, then copied to the run's storage and logged to MLflow.
            grid = sample_grid(trainer.G_ema, Path(tmp) / f"fakes-{kimg}.png")
            poses = pose_plot(trainer.G_ema, Path(tmp) / f"poses-{kimg}.png", true_poses)
            # In MLflow both an image series (a step slider over images seen) and files on the run page.
            for figure, key in ((grid, "samples"), (poses, "poses")):
                (plan.files.samples / figure.name).upload(figure)
                tracker.log_figure(key, figure, step=trainer.images_seen)
        path = save_checkpoint(Path(tmp) / "checkpoint", trainer.state_dict(), cfg, progress)
        if done and notice is None:
            tracker.log_artifacts(path, "checkpoint")
            tracker.log_generator(trainer.G_ema, cfg, step=trainer.images_seen)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(path)),
            checkpoint_dir_name=f"checkpoint-kimg{kimg}",
        )
