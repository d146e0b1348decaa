"""System metrics of one node (CPU, memory, disk, network, GPU utilisation and memory) into the run.

The figures are MLflow's own (its system-metrics monitors, the same names under ``system/``, so the
run page's *System metrics* tab shows them), with the node in the name
(``system/node_0/gpu_0_utilization_percentage``) so that a multi-node run keeps one curve per node.
MLflow's own monitor thread stops for good at the first failed call; here each sample goes through the
run's :class:`pof3d.tracking.sender.Sender`, so samples taken while the server is away are sent when it
is back, each stamped with the time it was taken (the time axis shows no gap and burst).

One worker per node samples (local rank 0). The step continues the run's earlier samples of the node,
as MLflow's monitor does on a resumed run. ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off;
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default 10) and
``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` (default 1) set how often it samples and logs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "system/"
DEFAULT_INTERVAL_S = 10.0
MIN_LAST_WINDOW_S = 1.0  # the last sample measures CPU use over at least this long


def enabled() -> bool:
    """On unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says false (MLflow's own switch)."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in (
        "false",
        "0",
        "no",
        "off",
    )


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        monitors.append(GPUMonitor())  # needs nvidia-ml-py and an NVIDIA driver
    except Exception as exc:  # noqa: BLE001 - no GPU (or no driver) is normal on CPU nodes
        logger.debug("no GPU metrics on this node: %s", exc)
    return monitors


class NodeMonitor:
    """Samples this node every interval on a daemon thread; ``log(figures, index, sampled_ms)`` hands on
    each sample with its index in this process (0, 1, ...), which the sender turns into the run's step,
    and the time it was taken (ms since the epoch), which stays its time however late it is sent.

    :meth:`stop` has the thread take one last sample, so even a short run has one.

    psutil measures CPU use between two calls *of the same thread*, and a thread's first call has
    nothing to compare with and says 0 %. So the thread primes the counter before its first interval
    and takes every sample itself, the last one included (taken on the stopping thread, it read 0 %).
    """

    def __init__(
        self,
        node_id: str,
        log: Callable[[dict[str, float], int, int], None],
        interval_s: float | None = None,
        samples_per_log: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.prefix = f"{PREFIX}{node_id}/"
        self._log = log
        env_interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        env_samples = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING")
        self.interval_s = float(env_interval or interval_s or DEFAULT_INTERVAL_S)
        self.samples_per_log = max(int(env_samples or samples_per_log or 1), 1)
        self._monitors = _monitors()
        self._stop = threading.Event()
        self._samples = 0
        self._published = 0
        self._last_sample = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"pof3d-system-metrics {node_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        psutil.cpu_percent()  # this thread's starting point for the first sample's CPU figure
        self._last_sample = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self._sample(publish_every=self.samples_per_log)
        # A window of a few milliseconds would read 0 % or noise: the last one lasts at least a second.
        time.sleep(max(0.0, MIN_LAST_WINDOW_S - (time.monotonic() - self._last_sample)))
        try:
            self._sample(publish_every=1)
        except Exception as exc:  # noqa: BLE001 - a failed last sample must not fail the run's end
            logger.debug("last system-metrics sample failed: %s", exc)

    def _sample(self, publish_every: int) -> None:
        for monitor in self._monitors:
            monitor.collect_metrics()
        self._last_sample = time.monotonic()
        sampled_ms = int(time.time() * 1000)
        self._samples += 1
        if self._samples < publish_every:
            return
        figures: dict[str, float] = {}
        for monitor in self._monitors:
            figures.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self._samples = 0
        index, self._published = self._published, self._published + 1
        self._log({self.prefix + k: float(v) for k, v in figures.items()}, index, sampled_ms)

    def stop(self) -> None:
        """Stop sampling after one last sample (waits for it, at most a few seconds)."""
        self._stop.set()
        self._thread.join(timeout=MIN_LAST_WINDOW_S + 5.0)


def next_step(client: Any, run_id: str, prefix: str) -> int:
    """One past the largest step of the run's ``<prefix>cpu_utilization_percentage`` (0 if none): where
    a resumed run's samples of this node continue."""
    history = client.get_metric_history(run_id, f"{prefix}cpu_utilization_percentage")
    return max((m.step for m in history), default=-1) + 1
