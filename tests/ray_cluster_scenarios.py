"""Multi-node scenarios on one machine, each in a process of its own (run by tests/test_multinode.py).

A Ray cluster of several nodes (``ray.cluster_utils.Cluster``, as Ray's own tests build it) cannot share
a process with the test session's local Ray, so each scenario builds its cluster here, drives the
project's library against ``cluster.address`` and writes what it observed to a JSON file:

    python tests/ray_cluster_scenarios.py autoscale OUT.json
    python tests/ray_cluster_scenarios.py node-loss WORK_DIR RUN_URI OUT.json

Object-store endpoints and credentials come from the standard AWS environment of this process, which the
Ray nodes it starts inherit.

Ray gives a starting node 30 s to register (not configurable); on a loaded machine that can pass, and
the scenario then exits with ``CLUSTER_DID_NOT_START`` so that the test may run it again (the failed
node's processes end with this process, through Ray's exit hooks).

Every process this starts is ended by its id at the end (never ``ray stop``, which would end every Ray
on the machine): the nodes of the cluster, and the nodes the fake autoscaler started, which are children
of its monitor process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# The fake autoscaler's provider only runs with these, read by the head's monitor process at its start.
os.environ["RAY_FAKE_CLUSTER"] = "1"
os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pof3d.distributed.resources import autoscaler_can_add_nodes, ensure_resources  # noqa: E402
from pof3d.errors import ConfigError  # noqa: E402
from pof3d.presets import load_config
from pof3d.run_files import RunFiles  # noqa: E402
from pof3d.storage import Location  # noqa: E402
from pof3d.testing.local_cluster import ClusterDidNotStart, add_node, train_workers  # noqa: E402
from pof3d.testing.local_cluster import stop_cluster as stop_local_cluster  # noqa: E402
from pof3d.testing.micro import MICRO  # noqa: E402
from pof3d.train import main  # noqa: E402

CLUSTER_DID_NOT_START = 75  # EX_TEMPFAIL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_autoscaling_config(gcs_address: str, head_cpus: int, worker_types: dict[str, Any]) -> str:
    """A cluster-launcher config for Ray's fake multi-node provider (nodes are local processes)."""
    config = {
        "cluster_name": "pof3d-test",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "auth": {},
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{
            key: []
            for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    fd, path = tempfile.mkstemp(suffix=".json", prefix="pof3d-autoscaling-")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


def start_cluster(head_cpus: int, worker_types: dict[str, Any] | None = None) -> Cluster:
    """A head node, with an autoscaler that can add ``worker_types`` nodes when given."""
    port = _free_port()
    head: dict[str, Any] = {"num_cpus": head_cpus, "gcs_server_port": port, "include_dashboard": False}
    if worker_types:
        gcs = f"{ray._private.services.get_node_ip_address()}:{port}"
        head["autoscaling_config"] = _fake_autoscaling_config(gcs, head_cpus, worker_types)
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head)
        cluster.autoscaling_config = head.get("autoscaling_config")  # removed by stop_cluster
        return cluster
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
        raise ClusterDidNotStart(str(exc)) from exc


def stop_cluster(cluster: Cluster) -> None:
    """pof3d.testing.local_cluster's stop, and the fake autoscaler's config file removed."""
    stop_local_cluster(cluster)
    if getattr(cluster, "autoscaling_config", None):
        os.unlink(cluster.autoscaling_config)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def autoscale(out: Path) -> None:
    """A 1-CPU head whose autoscaler may add one 2-CPU node: a run needing 2.25 CPUs waits for it; one
    needing more than the cluster can ever have gives up after its (short) wait."""
    worker = {"cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}}
    started = time.monotonic()
    cluster = start_cluster(head_cpus=1, worker_types=worker)
    result: dict[str, Any] = {"cluster_start_s": time.monotonic() - started}
    try:
        ray.init(address=cluster.address)
        lines = _Lines()
        logging.getLogger("pof3d.distributed.resources").addHandler(lines)
        logging.getLogger("pof3d.distributed.resources").setLevel(logging.INFO)
        result["autoscaler_can_add_nodes"] = autoscaler_can_add_nodes()
        result["cpus_before"] = ray.cluster_resources().get("CPU", 0.0)
        fits = ["train.workers=2", "train.batch=4", "train.cpus_per_worker=1", "train.resource_wait_min=5"]
        started = time.monotonic()
        ensure_resources(load_config("tiny", fits), check_every_s=1, report_every_s=5)
        result["scale_up_s"] = time.monotonic() - started
        result["cpus_after"] = ray.cluster_resources().get("CPU", 0.0)
        too_big = [
            "train.workers=4",
            "train.batch=4",
            "train.cpus_per_worker=2",
            "train.resource_wait_min=0.1",
        ]
        started = time.monotonic()
        try:
            ensure_resources(load_config("tiny", too_big), check_every_s=1, report_every_s=2)
        except ConfigError as exc:
            result["too_big_error"] = str(exc)
        result["too_big_s"] = time.monotonic() - started
        result["log"] = lines.lines
    finally:
        stop_cluster(cluster)
    out.write_text(json.dumps(result, indent=2))


def node_loss(work: Path, run_uri: str, out: Path) -> None:
    """A head and two worker nodes of 2 CPUs each; workers of 1.5 CPUs cannot share a node. The run is
    stored at ``run_uri`` (an object store). Right after the first checkpoint (8 of 16 images) is there,
    the node of one Train worker is removed (its processes killed); the run goes on from that checkpoint
    on the head and the other node."""
    os.environ["POF3D_CACHE"] = str(work / "cache")
    # Ray Train gives a new worker group 60 s to start; on a loaded 2-core machine that can pass before
    # the actors are up, and each such attempt costs a minute (it does not count against max_failures).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "600"
    files, mlflow_uri = RunFiles(Location.parse(run_uri)), f"sqlite:///{work / 'mlflow.db'}"
    started = time.monotonic()
    cluster = start_cluster(head_cpus=2)
    others = [add_node(cluster, num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    result: dict[str, Any] = {
        "cluster_start_s": time.monotonic() - started,
        "head": cluster.head_node.node_id,
    }

    def remove_a_train_workers_node() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            # One listing per look until the checkpoint is there (the run's own requests share the
            # S3 server and the two cores); the run needs several seconds beyond it to reach its target.
            checkpoint = files.latest_checkpoint()
            ticks = files.metrics.read_text().splitlines() if checkpoint is not None else []
            if ticks:
                alive = {k: v for k, v in train_workers(cluster).items() if v["state"] == "ALIVE"}
                victim = next(n for n in others if any(w["node"] == n.node_id for w in alive.values()))
                result.update(
                    before=alive,
                    victim=victim.node_id,
                    removed_at_images=json.loads(ticks[-1])["images_seen"],
                    checkpoint_at_removal=str(checkpoint),
                    removed_after_s=time.monotonic() - train_started,
                )
                cluster.remove_node(victim, allow_graceful=False)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=remove_a_train_workers_node, daemon=True)
    sets = [*MICRO, "train.cpus_per_worker=1.5"]
    args = ["--kimg", "0.016", "--batch", "4", "--workers", "2", "--run-dir", str(files.root)]
    args += ["--mlflow-uri", mlflow_uri, "--address", cluster.address]
    try:
        train_started = time.monotonic()
        watcher.start()
        result["exit_code"] = main([*args, *[a for s in sets for a in ("--set", s)]])
        result["train_s"] = time.monotonic() - train_started
        watcher.join(timeout=5)
        result["all_workers"] = train_workers(cluster)
    finally:
        stop_cluster(cluster)
    result.update(run_dir=str(files.root), mlflow_uri=mlflow_uri)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if sys.argv[1] == "autoscale":
            autoscale(Path(sys.argv[2]))
        elif sys.argv[1] == "node-loss":
            node_loss(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        else:
            sys.exit(f"unknown scenario {sys.argv[1]!r}")
    except ClusterDidNotStart as exc:
        print(f"cluster did not start: {exc}", file=sys.stderr)
        sys.exit(CLUSTER_DID_NOT_START)
