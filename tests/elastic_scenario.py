"""An elastic run that grows and then shrinks on a Ray cluster of several nodes on one machine, in a
process of its own (run by tests/test_elastic.py, as tests/ray_cluster_scenarios.py runs its scenarios):

    python tests/elastic_scenario.py WORK_DIR RUN_URI OUT.json

The head holds no CPU; worker nodes have 1 CPU and Train workers take 0.75, so that a node holds one
worker and one 0.25-CPU decode task (pof3d/testing/local_cluster.py). The run is stored at ``RUN_URI``
(the S3 server's endpoint and credentials come from the standard AWS environment, which the Ray nodes
inherit) and asks for ``--workers 1-2``; it is launched twice, as a job that is stopped and submitted
again would be:

- **Grow.** One worker node is up: the run starts on one worker. After its first checkpoint a second
  node joins, and the group grows to two workers at the next look (``train.resize_interval_s=1``). Once
  the grown group has logged a tick, the notice a scheduler's SIGTERM writes (preemption.py) stops the
  launch with a checkpoint: how many images one worker trains while the node starts depends on the
  machine's speed, and a fixed target would make this test as long as the machine is slow.
- **Shrink.** ``--resume auto`` continues the run on both nodes, with a target 40 images past its
  checkpoint. After the first checkpoint of this launch the second node is removed (its Ray daemons
  killed); the group restarts on one worker from the latest checkpoint and the run finishes at its
  target. The node's worker process ends only when it notices its raylet is gone, and until then the
  two workers may go on training and checkpointing (on a loaded machine they once reached the old
  target of 24 images): the target leaves them room, so that the one worker always has images left.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from pof3d.checkpoint import read_progress
from pof3d.distributed.preemption import write_notice
from pof3d.run_files import RunFiles, read_metrics_log
from pof3d.storage import Location
from pof3d.testing.local_cluster import (
    ClusterDidNotStart,
    add_node,
    start_cluster,
    start_quick_coordinator,
    stop_cluster,
    train_workers,
    wait_during,
    worker_logs,
)
from pof3d.testing.micro import MICRO
from pof3d.train import main

CLUSTER_DID_NOT_START = 75  # EX_TEMPFAIL: the test runs the scenario once more

BATCH = 4
EVERY = 2 * BATCH  # images between ticks and checkpoints
SETS = [
    *MICRO,
    "train.cpus_per_worker=0.75",
    "train.resize_interval_s=1",
    f"train.tick_kimg={EVERY / 1000}",
    f"train.snapshot_kimg={EVERY / 1000}",
]
TIMEOUT_S = 600.0  # for each awaited event


def _wait(what: str, ready, training: threading.Thread) -> Any:
    return wait_during(training, what, ready, TIMEOUT_S)


def _launch(files: RunFiles, cluster, mlflow_uri: str, kimg: float, drive) -> int:
    """One ``python -m pof3d.train`` (its library form) in a thread while ``drive`` acts on the cluster
    from this, the main, thread: Ray starts a node only from the main thread (it installs a signal
    handler)."""
    args = ["--kimg", f"{kimg:g}", "--batch", str(BATCH), "--workers", "1-2", "--run-dir", files.root.uri]
    args += ["--resume", "auto", "--mlflow-uri", mlflow_uri, "--address", cluster.address]
    codes: list[int] = []
    training = threading.Thread(
        target=lambda: codes.append(main([*args, *[a for s in SETS for a in ("--set", s)]])), daemon=True
    )
    training.start()
    drive(training)
    training.join()
    return codes[0] if codes else 1


def grow_then_shrink(work: Path, run_uri: str, out: Path) -> None:
    os.environ["POF3D_CACHE"] = str(work / "cache")
    # Right after the loss Ray Train may size the new group on the node just lost, and waits for that
    # group's placement this long (60 s by default) before it counts again; a placement that can be made
    # is ready at once.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    files, mlflow_uri = RunFiles(Location.parse(run_uri)), f"sqlite:///{work / 'mlflow.db'}"
    started = time.monotonic()
    cluster = start_cluster()
    first = add_node(cluster, num_cpus=1)
    cluster.wait_for_nodes()
    result: dict[str, Any] = {"cluster_start_s": time.monotonic() - started, "first_node": first.node_id}
    ray.init(address=cluster.address)
    start_quick_coordinator()
    nodes = {}

    def checkpoint_images() -> int:
        latest = files.latest_checkpoint()
        return int(read_progress(latest)["images_seen"]) if latest is not None else 0

    def two_worker_ticks() -> list[int]:
        return [t["images_seen"] for t in read_metrics_log(files.metrics) if t.get("world_size") == 2]

    def grow(training: threading.Thread) -> None:
        try:
            result["grow_after_checkpoint"] = _wait("first checkpoint", checkpoint_images, training)
            nodes["second"] = add_node(cluster, num_cpus=1)
            result["second_node"] = nodes["second"].node_id
            _wait("tick of two workers", two_worker_ticks, training)
            result["two_workers"] = {k: v for k, v in train_workers(cluster).items() if v["state"] == "ALIVE"}
        except Exception as exc:  # reported; the notice below ends the launch either way
            result["grow_error"] = repr(exc)
        write_notice(files, "tests/elastic_scenario.py")

    def shrink(training: threading.Thread) -> None:
        try:
            resumed = result["resumed"]
            result["shrink_after_checkpoint"] = _wait(
                "checkpoint of this launch",
                lambda: (n := checkpoint_images()) > resumed and n,
                training,
            )
            cluster.remove_node(nodes["second"], allow_graceful=False)
            # At least this one: the group may have written more between the look above and the removal,
            # and may write more until its worker on the removed node ends.
            result["checkpoint_at_removal"] = checkpoint_images()
        except Exception as exc:  # reported; the notice ends the launch
            result["shrink_error"] = repr(exc)
            write_notice(files, "tests/elastic_scenario.py")

    try:
        launched = time.monotonic()
        result["grow_exit_code"] = _launch(files, cluster, mlflow_uri, 100.0, grow)
        result["grow_s"] = time.monotonic() - launched
        if "second_node" not in result:
            raise ClusterDidNotStart(result.get("grow_error", "the second node did not start"))
        result["resumed"] = checkpoint_images()
        result["target"] = result["resumed"] + 5 * EVERY
        launched = time.monotonic()
        result["shrink_exit_code"] = _launch(files, cluster, mlflow_uri, result["target"] / 1000, shrink)
        result["shrink_s"] = time.monotonic() - launched
        result["all_workers"] = train_workers(cluster)
    finally:
        result["worker_logs"] = worker_logs(cluster)
        stop_cluster(cluster)
    result.update(run_dir=files.root.uri, mlflow_uri=mlflow_uri, every=EVERY)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grow_then_shrink(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    except ClusterDidNotStart as exc:
        print(f"cluster did not start: {exc}", file=sys.stderr)
        sys.exit(CLUSTER_DID_NOT_START)
