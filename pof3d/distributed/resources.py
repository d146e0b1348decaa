"""Does a run fit the Ray cluster, and if not yet, can an autoscaler make it fit?

Resource rule: Ray Data's read and decode tasks need CPU that the Train workers do not hold. Workers
default to half a CPU each (``train.cpus_per_worker``), and a request that would leave less than one
decode task's CPU (:data:`pof3d.data.streaming.DECODE_CPUS`) free for the data pipeline, or that asks
for more than the cluster has, is a ``ConfigError`` before anything starts: otherwise the run waits
forever ("backpressured") instead of failing.

Autoscaling clusters (``min_workers: 0`` on the cluster launcher, ``minReplicas: 0`` on KubeRay) start
without the nodes a run needs, and only a demand makes the autoscaler add them. So when the run does not
fit yet and an autoscaler can add nodes, the driver asks it for the run's bundles
(``ray.autoscaler.sdk.request_resources``) and waits up to ``train.resource_wait_min`` minutes, saying
every 30 s what it waits for; then the request is withdrawn (Train's placement group holds the resources
from there on; a standing request would keep the nodes up after the run). A cluster without an autoscaler
fails at once, as it cannot grow.

Ray 2.60 has no public call that says whether an autoscaler can add nodes; the driver reads what Ray's own
components read:

1. The cluster config in the GCS (``ray._private.state.state.get_cluster_config()``), the node groups
   with their min/max counts, which Ray Train and Ray Data consult for the same question. Autoscalers
   that publish it (newer Ray autoscalers, hosted Ray) answer here; Ray 2.60's own do not publish it.
2. Otherwise the node types the running autoscaler works with: autoscaler v2's cluster status, or v1's
   status record in the GCS key-value store (what ``ray status`` prints). A cluster started without an
   autoscaling config (``ray start`` by hand, SLURM, a local ``ray.init``) still runs an autoscaler, with
   a read-only provider that mirrors each running node as a node type named ``node_<node id>`` and can
   add none. With a config (cluster launcher, KubeRay) the node types are the config's.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from pof3d.config import Config
from pof3d.data.streaming import DECODE_CPUS
from pof3d.errors import ConfigError

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
REPORT_EVERY_S = 30.0
FIRST_STATUS_WAIT_S = 15.0  # a new cluster's autoscaler records its first status within a few seconds

# Ray's read-only provider names the node type of a running node after its 28-byte node id (autoscaler
# monitor.py and v2/utils.py, ``format_readonly_node_type``).
_READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")


@dataclass(frozen=True)
class Need:
    """What a run holds on the cluster: the Train workers' bundles plus CPU for one Ray Data task."""

    cpu: float
    gpu: float
    bundles: tuple[dict[str, float], ...]

    @classmethod
    def of(cls, cfg: Config) -> Need:
        t = cfg.train
        worker = {"CPU": t.cpus_per_worker}
        if t.gpus_per_worker > 0:
            worker["GPU"] = t.gpus_per_worker
        bundles = tuple(dict(worker) for _ in range(t.workers)) + ({"CPU": DECODE_CPUS},)
        cpu = t.workers * t.cpus_per_worker + DECODE_CPUS
        return cls(cpu=cpu, gpu=t.workers * t.gpus_per_worker, bundles=bundles)

    def awaited(self, available: dict[str, float]) -> str:
        """``8 GPU (have 0)``: the resources still missing, with what the cluster has of each."""
        have_cpu, have_gpu = float(available.get("CPU", 0.0)), float(available.get("GPU", 0.0))
        parts = [f"{self.gpu:g} GPU (have {have_gpu:g})"] if self.gpu > have_gpu else []
        if self.cpu > have_cpu:
            parts.append(f"{self.cpu:g} CPU (have {have_cpu:g})")
        return ", ".join(parts)


def shortfall(cfg: Config, available: dict[str, float]) -> str | None:
    """Why ``train.workers`` x per-worker resources cannot run on ``available``; None if they can."""
    t = cfg.train
    cpus, gpus = t.workers * t.cpus_per_worker, t.workers * t.gpus_per_worker
    have_cpu, have_gpu = float(available.get("CPU", 0.0)), float(available.get("GPU", 0.0))
    if gpus > have_gpu:
        return (
            f"train.workers={t.workers} x train.gpus_per_worker={t.gpus_per_worker:g} = {gpus:g} GPUs, "
            f"but the Ray cluster has {have_gpu:g}; lower --workers/--gpus-per-worker"
        )
    if cpus + DECODE_CPUS > have_cpu:
        return (
            f"train.workers={t.workers} x train.cpus_per_worker={t.cpus_per_worker:g} = {cpus:g} CPUs for "
            f"training + {DECODE_CPUS:g} for Ray Data exceeds the cluster's {have_cpu:g} CPUs; "
            "lower --workers or train.cpus_per_worker (fractions such as 0.5 are fine)"
        )
    return None


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Raise ``ConfigError`` if ``train.workers`` x per-worker resources cannot run on ``available``."""
    problem = shortfall(cfg, available)
    if problem:
        raise ConfigError(problem)


def ensure_resources(
    cfg: Config, *, check_every_s: float = CHECK_EVERY_S, report_every_s: float = REPORT_EVERY_S
) -> None:
    """Return once the connected cluster fits the run, waiting for its autoscaler if it has one.

    Raises ``ConfigError`` at once where nothing can add nodes (or ``train.resource_wait_min`` is 0), and
    after ``train.resource_wait_min`` minutes when the autoscaler has not added enough.
    """
    import ray

    problem = shortfall(cfg, ray.cluster_resources())
    if problem is None:
        return
    if not autoscaler_can_add_nodes():
        raise ConfigError(f"{problem} (this cluster has no autoscaler that could add nodes)")
    wait_s = cfg.train.resource_wait_min * 60.0
    if wait_s <= 0:
        raise ConfigError(f"{problem} (an autoscaler could add nodes, but train.resource_wait_min=0)")
    from ray.autoscaler.sdk import request_resources

    need = Need.of(cfg)
    request_resources(bundles=[dict(b) for b in need.bundles])
    try:
        _wait(cfg, need, wait_s, check_every_s, report_every_s)
    finally:
        request_resources(bundles=[])


def _wait(cfg: Config, need: Need, wait_s: float, check_every_s: float, report_every_s: float) -> None:
    import ray

    started = time.monotonic()
    next_report = started
    while True:
        available = ray.cluster_resources()
        elapsed = time.monotonic() - started
        if shortfall(cfg, available) is None:
            logger.info("the cluster fits the run after %s: %s", _duration(elapsed), _summary(available))
            return
        if elapsed >= wait_s:
            raise ConfigError(
                f"still waiting for {need.awaited(available)} after train.resource_wait_min="
                f"{cfg.train.resource_wait_min:g} min: the autoscaler did not add the nodes; check the node "
                "types' max_workers (KubeRay: maxReplicas) and the cloud quota, lower --workers, or wait "
                "longer with --set train.resource_wait_min=..."
            )
        if time.monotonic() >= next_report:
            logger.info(
                "waiting for %s — autoscaler asked; %s of %s",
                need.awaited(available),
                _duration(elapsed),
                _duration(wait_s),
            )
            next_report += report_every_s
        time.sleep(max(0.0, min(check_every_s, wait_s - elapsed)))


def autoscaler_can_add_nodes() -> bool:
    """Whether the connected cluster has an autoscaler that can add nodes (see the module notes)."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        # The rule of Ray Data's ``is_autoscaling_enabled``: some node group may grow.
        return any(
            group.max_count == -1 or group.max_count > group.min_count
            for group in config.node_group_configs
            if group.resources and group.max_count != 0
        )
    deadline = time.monotonic() + FIRST_STATUS_WAIT_S
    types = _autoscaler_node_types()
    while types is None and time.monotonic() < deadline:
        time.sleep(1.0)
        types = _autoscaler_node_types()
    return any(not _READ_ONLY_NODE_TYPE.fullmatch(name) for name in types or [])


def _autoscaler_node_types() -> list[str] | None:
    """The node types of the running autoscaler's nodes (and pending launches); None before its first
    report."""
    import ray
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        nodes = [*status.active_nodes, *status.idle_nodes, *status.pending_launches]
        return [node.ray_node_type_name for node in nodes]
    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    # The first records of a new monitor may come before its first autoscaling round (no report yet).
    report = json.loads(raw).get("autoscaler_report")
    if not report:
        return None
    return list((report.get("node_type_mapping") or {}).values())


def _summary(available: dict[str, float]) -> str:
    return ", ".join(f"{available.get(key, 0.0):g} {key}" for key in ("CPU", "GPU"))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    if not minutes:
        return f"{secs}s"
    return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
