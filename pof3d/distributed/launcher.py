"""Driver side of a training run on Ray Train: connect, check resources, build and fit the TorchTrainer.

Resource rule: Ray Data's read and decode tasks need CPU that the Train workers do not hold. Workers
default to half a CPU each (``train.cpus_per_worker``), and a request that would leave less than one
decode task's CPU (:data:`pof3d.data.streaming.DECODE_CPUS`) free for the data pipeline, or that asks
for more than the cluster has, is a ``ConfigError`` before anything starts: otherwise the run waits
forever ("backpressured") instead of failing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pof3d.config import Config
from pof3d.console import quiet_dataset, train_logging_config, verbose
from pof3d.distributed.progress import deadline
from pof3d.errors import ConfigError, TrainingError
from pof3d.host_memory import retaining_env

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class LaunchSpec:
    """Everything the workers need, resolved on the driver (see :mod:`pof3d.distributed.plan`)."""

    cfg: Config
    run_dir: Path
    data_uri: str
    mlflow_uri: str
    mlflow_run_id: str | None
    resume_from: Path | None = None
    callbacks: list[Any] = field(default_factory=list)  # Ray Train callbacks, e.g. Tune's report bridge


@dataclass
class LaunchResult:
    images_seen: int
    tick: int
    checkpoint: Path | None
    training_error: str | None
    stop_reason: str | None = None  # set when train.time_limit_min ended the run before its kimg target


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (set for Ray job drivers), else start a new
    local Ray: a plain ``ray.init()`` would silently join whatever ``ray start`` cluster runs here."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    logger.info("connecting to Ray at %s", target)
    ray.init(address=target, log_to_driver=True)


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Raise ``ConfigError`` if ``train.workers`` x per-worker resources cannot run on ``available``."""
    from pof3d.data.streaming import DECODE_CPUS

    t = cfg.train
    cpus, gpus = t.workers * t.cpus_per_worker, t.workers * t.gpus_per_worker
    have_cpu, have_gpu = float(available.get("CPU", 0.0)), float(available.get("GPU", 0.0))
    if gpus > have_gpu:
        raise ConfigError(
            f"train.workers={t.workers} x train.gpus_per_worker={t.gpus_per_worker:g} = {gpus:g} GPUs, "
            f"but the Ray cluster has {have_gpu:g}; lower --workers/--gpus-per-worker"
        )
    if cpus + DECODE_CPUS > have_cpu:
        raise ConfigError(
            f"train.workers={t.workers} x train.cpus_per_worker={t.cpus_per_worker:g} = {cpus:g} CPUs for "
            f"training + {DECODE_CPUS:g} for Ray Data exceeds the cluster's {have_cpu:g} CPUs; "
            "lower --workers or train.cpus_per_worker (fractions such as 0.5 are fine)"
        )


def worker_runtime_env(cfg: Config) -> dict[str, Any] | None:
    """CPU workers start with glibc tunables that keep freed memory in the process (host_memory.py)."""
    if not cfg.train.retain_cpu_memory or cfg.train.gpus_per_worker > 0:
        return None
    return {"env_vars": retaining_env()}


def launch(spec: LaunchSpec) -> LaunchResult:
    """Fit the TorchTrainer; returns what rank 0 ended with. Ray must be connected (:func:`connect`)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pof3d.data.streaming import ingest_options, make_dataset
    from pof3d.distributed.worker import train_loop_per_worker

    cfg = spec.cfg
    check_resources(cfg, ray.cluster_resources())
    t = cfg.train
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker > 0:
        resources["GPU"] = t.gpus_per_worker
    # Several epochs per Ray Data execution on small sets (epochs=None), kept in order by ingest_options.
    dataset = make_dataset(
        spec.data_uri, xflip=cfg.data.xflip, seed=cfg.data.shuffle_seed, shuffle=True, epochs=None
    )
    quiet_dataset(dataset)  # keep the per-tick lines readable in job logs
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": str(spec.run_dir),
            "data_uri": spec.data_uri,
            "mlflow_uri": spec.mlflow_uri,
            "mlflow_run_id": spec.mlflow_run_id,
            "resume_from": str(spec.resume_from) if spec.resume_from else None,
            # Fixed here, so that workers restarted after a failure keep the launch's deadline.
            "deadline": deadline(t.time_limit_min, time.time()),
            "verbose": verbose(),
        },
        scaling_config=ScalingConfig(
            num_workers=t.workers, use_gpu=t.gpus_per_worker > 0, resources_per_worker=resources
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest_options()),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=str(spec.run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=max(t.keep_checkpoints, 1)),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=spec.callbacks,
            worker_runtime_env=worker_runtime_env(cfg),
            logging_config=train_logging_config(),
        ),
    )
    logger.info(
        "starting %d worker(s) x %s on Ray; checkpoints under %s",
        t.workers,
        resources,
        spec.run_dir / CHECKPOINTS_DIR,
    )
    result = trainer.fit()
    final: dict[str, Any] = result.return_value or {}
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return LaunchResult(
        images_seen=int(final.get("images_seen", 0)),
        tick=int(final.get("tick", 0)),
        checkpoint=checkpoint,
        training_error=final.get("training_error"),
        stop_reason=final.get("stop_reason"),
    )


def raise_if_failed(result: LaunchResult) -> None:
    if result.training_error:
        raise TrainingError(result.training_error)
