"""A Ray cluster of several nodes on one machine, for elastic runs that grow and shrink (the elastic
test scenario and ``benchmarks/resize.py``).

Nodes are ``ray.cluster_utils.Cluster`` nodes (separate raylets, as Ray's own tests build them); a node
that goes is removed with its processes killed, as a spot node goes. Two of Ray's periods are shortened,
as Ray's own tests do, so that a change is seen in about a second: the GCS declares a killed node dead
after about 2 s instead of 15 s (``health_check_*``), and Ray's ``AutoscalingCoordinator``, which Ray
Train's elastic policy asks how many workers fit, refreshes its view of the nodes every second instead of
every 20 s, a constant of its class. :func:`start_quick_coordinator` starts it under the name by which
Ray Train and Ray Data look it up, from a subclass that changes only that constant.

Every process this starts is ended by its id (never ``ray stop``, which would end every Ray on the
machine).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.cluster_utils import Cluster
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    _AutoscalingCoordinatorActor,
)

FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


class ClusterDidNotStart(RuntimeError):
    """Ray gives a starting node 30 s to register; on a loaded machine that can pass."""


class _QuickCoordinator(_AutoscalingCoordinatorActor):
    TICK_INTERVAL_S = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_cluster(head_cpus: float = 0, head_gpus: float = 0) -> Cluster:
    """A head node (by default without CPUs: the driver, Ray Train's controller and Ray Data's
    coordinator hold none, so Train workers and data tasks go to the worker nodes)."""
    head = {
        "num_cpus": head_cpus,
        "num_gpus": head_gpus,
        "gcs_server_port": _free_port(),
        "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS,
    }
    try:
        return Cluster(initialize_head=True, head_node_args=head)
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
        raise ClusterDidNotStart(str(exc)) from exc


def add_node(cluster: Cluster, **args: Any) -> Any:
    try:
        return cluster.add_node(**args)
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
        raise ClusterDidNotStart(str(exc)) from exc


def start_quick_coordinator() -> None:
    """Ray's coordinator with a 1 s refresh, created as Ray's ``get_or_create_autoscaling_coordinator``
    creates it (on this, the driver's, node). Call after ``ray.init`` and before the run starts."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = (
        ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_QuickCoordinator)
        .options(
            name="AutoscalingCoordinator",
            namespace="AutoscalingCoordinator",
            get_if_exists=True,
            lifetime="detached",
            scheduling_strategy=here,
        )
        .remote()
    )
    ray.get(actor.get_reserved_resources.remote("pof3d-start"))  # it runs before anyone asks it


def train_workers(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Ray Train's worker actors: node, state and start time of each."""
    actors = cluster.global_state.actor_table(None)
    return {
        actor_id: {"node": info["Address"]["NodeID"], "state": info["State"], "started": info["StartTime"]}
        for actor_id, info in actors.items()
        if info["ActorClassName"] == "RayTrainWorker"
    }


def _nodes(cluster: Cluster) -> list[Any]:
    """The cluster's nodes still in it, the head first (if it started)."""
    return [cluster.head_node, *cluster.worker_nodes] if cluster.head_node else list(cluster.worker_nodes)


def worker_logs(cluster: Cluster) -> str:
    """What the cluster's worker processes wrote to their log files (``worker-*.out`` and ``.err`` in the
    session folder of every node still in the cluster, which the nodes on one machine share). The driver's
    copy of these lines (``log_to_driver``) is best effort: on a loaded machine it lags, and lines written
    shortly before the cluster stops can be missing from it."""
    folders = sorted({Path(node.get_logs_dir_path()) for node in _nodes(cluster)})
    return "".join(
        path.read_text(errors="replace") for folder in folders for path in sorted(folder.glob("worker-*.*"))
    )


def stop_cluster(cluster: Cluster) -> None:
    """Shut the cluster down, and end the processes its nodes started (by their ids)."""
    started: list[psutil.Process] = []
    for node in _nodes(cluster):
        for infos in getattr(node, "all_processes", {}).values():  # none on a node that failed to start
            for info in infos:
                try:
                    started += psutil.Process(info.process.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
    ray.shutdown()
    cluster.shutdown()
    for process in started:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def wait_during(training: threading.Thread, what: str, ready: Callable[[], Any], timeout_s: float) -> Any:
    """``ready()``'s first true value while ``training`` runs (looked at twice a second); a
    ``TimeoutError`` naming ``what`` when the run ended without it or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and training.is_alive():
        value = ready()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"no {what} ({'the run ended' if not training.is_alive() else f'{timeout_s:.0f} s'})")
