"""A node drained for preemption in the middle of a run, on a Ray cluster of two nodes on one machine, in
a process of its own (run by tests/test_preemption.py; ray_cluster_scenarios.py says why):

    python tests/drain_scenario.py WORK_DIR OUT.json

The head has 1 CPU, a worker node 2; a Train worker takes 1.5 CPUs, so it runs on the worker node. After
two ticks that node is drained with reason PREEMPTION and a deadline minutes away, as ``ray start --block``
does when Kubernetes sends its pod SIGTERM (and ``ray drain-node`` does by hand). Ray Train's preemption
watcher marks the workers, rank 0 writes a checkpoint and training goes on to its target, which it
reaches before the deadline.
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

from ray.core.generated import autoscaler_pb2
from ray_cluster_scenarios import (
    CLUSTER_DID_NOT_START,
    ClusterDidNotStart,
    add_node,
    start_cluster,
    stop_cluster,
)

from pof3d.run_files import read_metrics_log
from pof3d.storage import Location
from pof3d.testing.micro import MICRO
from pof3d.train import main

DRAIN_DEADLINE_S = 300  # far beyond the run's end: the run finishes on the draining node


def drain(work: Path, out: Path) -> None:
    os.environ["POF3D_CACHE"] = str(work / "cache")
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray Train passes it to its controller
    run_dir = work / "run"
    cluster = start_cluster(head_cpus=1)
    node = add_node(cluster, num_cpus=2)
    cluster.wait_for_nodes()
    result: dict[str, Any] = {"drained_node": node.node_id}

    def drain_after_two_ticks() -> None:
        from ray._raylet import GcsClient

        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            ticks = read_metrics_log(Location.parse(run_dir / "metrics.jsonl"))
            if len(ticks) >= 2:
                accepted, why = GcsClient(address=cluster.address).drain_node(
                    node.node_id,
                    autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
                    "drain_scenario.py: a preemption",
                    int((time.time() + DRAIN_DEADLINE_S) * 1000),
                )
                drained = time.monotonic()
                result.update(drained_at_images=ticks[-1]["images_seen"], accepted=accepted, rejection=why)
                while time.monotonic() < deadline and not list(
                    (run_dir / "checkpoints").glob("checkpoint-*")
                ):
                    time.sleep(0.1)
                result["drain_to_checkpoint_s"] = time.monotonic() - drained
                return
            time.sleep(0.2)

    sets = [*MICRO, "train.cpus_per_worker=1.5", "train.snapshot_kimg=1"]
    args = ["--kimg", "0.06", "--batch", "4", "--run-dir", str(run_dir), "--address", cluster.address]
    drainer = threading.Thread(target=drain_after_two_ticks, daemon=True)
    try:
        drainer.start()
        result["exit_code"] = main([*args, *[a for s in sets for a in ("--set", s)]])
        drainer.join(timeout=5)
    finally:
        stop_cluster(cluster)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        drain(Path(sys.argv[1]), Path(sys.argv[2]))
    except ClusterDidNotStart as exc:
        print(f"cluster did not start: {exc}", file=sys.stderr)
        sys.exit(CLUSTER_DID_NOT_START)
