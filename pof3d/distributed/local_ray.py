"""The Ray a command starts on this machine when it is given no cluster to join.

Its processes (GCS, raylet, and every worker the raylet starts) inherit the environment this process
has while ``ray.init`` runs, so what they must know is set for that moment only (:func:`local_ray_env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def start_local_ray() -> None:
    """``ray.init`` of a new one-node Ray, even where another Ray runs on the machine."""
    import ray

    logger.info("starting a local Ray")
    with scoped_environ(local_ray_env(free_port())):
        ray.init(address="local", log_to_driver=True)


def local_ray_env(gcs_port: int) -> dict[str, str]:
    """The environment of the local Ray's processes.

    - Its own address. Ray processes that look their cluster up without being told (Ray Train's
      ``PlacementGroupCleaner`` asks the state API for the controller with no address) take
      ``RAY_ADDRESS``, else search the machine for a Ray; with a second Ray on the machine that search
      fails ("Found multiple active Ray instances"), a 30-line traceback, and the cleaner stops watching
      the run. So the GCS port is chosen here (``RAY_GCS_SERVER_PORT``) and the address handed down
      before anything starts.
    - No preemption watcher. Ray Train's controller starts one per worker group so that a run waits out
      the drain of a node before it restarts; here the only node is the driver's own, which no run
      outlives, so it has nothing to watch. Starting it makes Ray log an error line: the watcher gets the
      worker actors' handles as constructor arguments and may restart, which Ray flags as a restart that
      could lose its arguments (ray-project/ray#53727). Clusters that a run joins keep it.
    - Fewer Python workers, and Ray's count of them set to what a run needs. The raylet warns ("8 PYTHON
      worker processes have been started ... 4x the maximum expected startup concurrency") once a node has
      more than 8 Python workers beyond 4 times its start-up concurrency, which is the CPU count: 16 on two
      cores. Runs there kept 15 to 18 without leaking any: Ray Train's and Ray Data's eight
      actors (controller, worker, synchronisation, placement-group cleaner, autoscaling coordinator,
      dataset manager, split coordinator, statistics), Ray Data's read tasks, one process each and up to
      six at once at 0.25 CPU each (``pof3d.data.streaming.DECODE_CPUS``), and two workers the raylet
      starts for the first driver. Those two never run anything (every task and actor of a run carries
      Ray Train's runtime environment, which they lack) and are not started (``prestart``). The start-up
      concurrency is at least 4, so that the warning comes at 24 workers, above that steady set; the raylet
      then starts up to 4 worker processes at once instead of 2. (Fewer read tasks at once would need
      fewer processes; how many the data pipeline runs is its own choice.)
    """
    return {
        "RAY_GCS_SERVER_PORT": str(gcs_port),
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_prestart_worker_first_driver": "0",
        "RAY_worker_maximum_startup_concurrency": str(max(4, os.cpu_count() or 1)),
    }


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; the GCS binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` inside the block only: afterwards this process holds no address of a
    Ray it may shut down, and a later ``ray.init`` here starts afresh."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
