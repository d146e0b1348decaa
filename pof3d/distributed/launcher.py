"""Driver side of a training run on Ray Train: connect, build and fit the TorchTrainer.

Whether the run fits the cluster (and waiting for an autoscaler) is :mod:`pof3d.distributed.resources`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from pof3d.checkpoint import images_seen
from pof3d.config import Config
from pof3d.console import quiet_dataset, train_logging_config, verbose
from pof3d.data.streaming import ingest_options, make_dataset
from pof3d.distributed.elastic import describe_range, worker_resources
from pof3d.distributed.local_ray import start_local_ray
from pof3d.distributed.plan import RunPlan
from pof3d.distributed.progress import deadline
from pof3d.distributed.resources import check_resources
from pof3d.distributed.worker import train_loop_per_worker
from pof3d.host_memory import retaining_env
from pof3d.run_files import CHECKPOINTS_DIR, RunFiles
from pof3d.storage import Location

logger = logging.getLogger(__name__)

# How often Ray Train's controller looks at its workers (Ray's default: every 2 s). Each look is one
# status call per worker; a launch waits for up to one interval to see its workers started, each report
# and the workers finished, so the default adds seconds to every launch (on 2 cores, from the workers'
# end to the group's shutdown: 3.9-4.3 s at 2 s, 1.2-2.0 s at 0.5 s; benchmarks/launch.py times whole
# launches). Ray hands the driver's value to the controller; a value the user sets wins.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


@dataclass
class LaunchResult:
    images_seen: int
    tick: int
    checkpoint: Location | None
    training_error: str | None
    stop_reason: str | None = None  # set when train.time_limit_min ended the run before its kimg target


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (set for Ray job drivers), else start a new
    local Ray: a plain ``ray.init()`` would silently join whatever ``ray start`` cluster runs here."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        start_local_ray()
        return
    logger.info("connecting to Ray at %s", target)
    ray.init(address=target, log_to_driver=True)


def worker_runtime_env(cfg: Config) -> dict[str, Any] | None:
    """CPU workers start with glibc tunables that keep freed memory in the process (host_memory.py)."""
    if not cfg.train.retain_cpu_memory or cfg.train.gpus_per_worker > 0:
        return None
    return {"env_vars": retaining_env()}


def launch(plan: RunPlan, callbacks: list[Any] = ()) -> LaunchResult:
    """Fit the TorchTrainer as ``plan`` says; returns what rank 0 ended with. Ray must be connected
    (:func:`connect`) and the plan's data and MLflow run resolved (:mod:`pof3d.distributed.driver`).
    ``callbacks``: Ray Train callbacks, e.g. Tune's report bridge."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pof3d.distributed.group_watch import GroupWatch

    cfg = plan.cfg
    check_resources(cfg, ray.cluster_resources())
    t = cfg.train
    resources = worker_resources(cfg)
    low, high = t.worker_range()
    # Fixed here, so that workers restarted after a failure keep the launch's deadline.
    plan = dataclasses.replace(plan, deadline=deadline(t.time_limit_min, time.time()))
    # Ray Train writes checkpoints to ROOT/checkpoints through the same filesystem as the project's own
    # files (pyarrow would otherwise ignore AWS_ENDPOINT_URL for an s3:// storage path).
    fs, root_path = plan.root.fs()
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The console choice travels with the plan's launch, for workers on nodes of a joined cluster.
        train_loop_config={"plan": plan, "verbose": verbose()},
        scaling_config=ScalingConfig(
            # A (MIN, MAX) pair selects Ray Train's elastic scaling policy (pof3d/distributed/elastic.py).
            num_workers=low if low == high else (low, high),
            use_gpu=t.gpus_per_worker > 0,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.resize_interval_s,
        ),
        # Built anew for every worker group, from where the group's checkpoint left the stream.
        datasets={"train": TrainStream(plan, verbose())},
        dataset_config=DataConfig(execution_options=ingest_options()),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=root_path,
            storage_filesystem=None if plan.root.is_local else fs,
            checkpoint_config=CheckpointConfig(num_to_keep=max(t.keep_checkpoints, 1)),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[*callbacks, GroupWatch(plan.files, t.resize_save_timeout_s)],
            worker_runtime_env=worker_runtime_env(cfg),
            logging_config=train_logging_config(),
        ),
    )
    logger.info(
        "starting %s worker(s) x %s on Ray%s; checkpoints under %s",
        describe_range(cfg),
        resources,
        f" (elastic, looking for room every {t.resize_interval_s:g} s)" if low < high else "",
        plan.files.checkpoints,
    )
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    result = trainer.fit()
    final: dict[str, Any] = result.return_value or {}
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = plan.files.checkpoints / posixpath.basename(result.checkpoint.path.rstrip("/"))
    return LaunchResult(
        images_seen=int(final.get("images_seen", 0)),
        tick=int(final.get("tick", 0)),
        checkpoint=checkpoint,
        training_error=final.get("training_error"),
        stop_reason=final.get("stop_reason"),
    )


@dataclass(frozen=True)
class TrainStream:
    """The training data of a run, as Ray Train builds it for each worker group (a callable in
    ``TorchTrainer(datasets=...)``, called in the controller before the group starts).

    Every group resumes from the run's newest checkpoint, so its stream starts at that checkpoint's images
    seen (``make_dataset(start=...)``): the data goes on where the model's state is, split among the
    workers of the group that starts, instead of from the first epoch again. Several epochs per Ray Data
    execution on small sets (``epochs=None``), kept in order by ``ingest_options``.
    """

    plan: RunPlan
    verbose: bool = False

    def __call__(self) -> Any:
        cfg = self.plan.cfg
        start = resume_images(self.plan.files, self.plan.resume_from)
        dataset = make_dataset(
            self.plan.data_uri,
            xflip=cfg.data.xflip,
            seed=cfg.data.shuffle_seed,
            shuffle=True,
            epochs=None,
            max_tasks=decode_task_cap(cfg),
            start=start,
        )
        quiet_dataset(dataset)  # keep the per-tick lines readable in job logs
        dataset.context.print_on_execution_start = self.verbose  # the driver's choice, not this process's
        return dataset


def decode_task_cap(cfg: Config) -> int | None:
    """Read tasks the run's stream may run at once: ``data.decode_tasks`` for each of the most workers the
    run may have (an elastic run's stream is made once per group, for the largest); None: no cap."""
    return cfg.data.decode_tasks * cfg.train.worker_range()[1] if cfg.data.decode_tasks else None


def resume_images(files: RunFiles, resume_from: Location | None) -> int:
    """Images seen at the checkpoint a starting worker group resumes from: the most advanced of the run's
    newest checkpoint and ``--resume``'s, the rule of the worker's ``_resume``; 0 for a fresh start."""
    candidates = [c for c in (files.latest_checkpoint(), resume_from) if c is not None]
    return max([0] + [images_seen(c) for c in candidates])
