"""Turns an EC2 spot interruption notice into a drain of this machine's Ray node, as a preemption.

AWS announces the interruption of a spot instance two minutes ahead in its instance metadata
(``/latest/meta-data/spot/instance-action``: ``{"action": "terminate", "time": "2026-12-06T19:30:00Z"}``;
404 until then). On EKS the node termination handler turns it into a pod SIGTERM, which
``ray start --block`` turns into a drain of the node; Ray's own cluster launcher does nothing with it, so
the node would just vanish with its workers. This watcher closes that gap on a VM node: at the notice it
drains its own Ray node with reason PREEMPTION and the notice's time as the deadline, which is what
``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` does. Ray Train then marks the workers on the
node, and rank 0 writes a checkpoint after the step in progress (``pof3d/distributed/preemption.py``),
so an elastic run restarts on the nodes left from there instead of from the last snapshot.

    python -m pof3d.distributed.spot_notice [--address ADDRESS] [--poll-s 5]

Started in the background after ``ray start`` on each spot node (``cluster/aws-gpu.yaml``). It exits 0
once it has drained the node, and at once (exit 0, one line) on a machine without instance metadata.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"  # EC2's instance metadata service (IMDSv2: token first)
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600
TIMEOUT_S = 2.0
POLL_S = 5.0  # AWS's advice for the notice: look every five seconds
DEFAULT_NOTICE_S = 120.0  # the warning AWS gives, used where a notice's time cannot be read


@dataclass(frozen=True)
class SpotNotice:
    action: str  # "terminate", "stop" or "hibernate"
    time: dt.datetime  # when AWS acts (UTC)

    def seconds_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return max(0.0, (self.time - now).total_seconds())


class NoMetadata(RuntimeError):
    """No instance metadata service answers: not an EC2 instance (or metadata is turned off)."""


class InstanceMetadata:
    """IMDSv2 reads: a session token first, renewed when the service refuses it."""

    def __init__(self, base_url: str = METADATA_URL, timeout_s: float = TIMEOUT_S) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._token: str | None = None

    def _fetch_token(self) -> str:
        request = urllib.request.Request(
            self.base_url + TOKEN_PATH,
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read().decode()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise NoMetadata(f"no instance metadata at {self.base_url} ({exc})") from exc

    def notice(self) -> SpotNotice | None:
        """The interruption notice, or None while there is none."""
        for attempt in range(2):
            if self._token is None:
                self._token = self._fetch_token()
            request = urllib.request.Request(
                self.base_url + NOTICE_PATH, headers={"X-aws-ec2-metadata-token": self._token}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return parse_notice(response.read().decode())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:  # the token expired: take a new one, once
                    self._token = None
                    continue
                raise
        return None


def parse_notice(body: str) -> SpotNotice:
    """``{"action": ..., "time": "YYYY-MM-DDTHH:MM:SSZ"}``; a time that does not parse counts as AWS's
    two minutes from now (the drain must not be lost to a format change)."""
    data = json.loads(body)
    if not isinstance(data, dict) or "action" not in data:
        raise ValueError(
            f"spot instance-action: expected a JSON object with 'action' and 'time', got {body!r}"
        )
    try:
        when = dt.datetime.strptime(str(data.get("time")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=DEFAULT_NOTICE_S)
    return SpotNotice(action=str(data["action"]), time=when)


def drain_ray_node(address: str, node_id: str, notice: SpotNotice) -> tuple[bool, str]:
    """Drain ``node_id`` as a preemption with the notice's time as its deadline; (accepted, why not)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int(notice.time.timestamp() * 1000)
    return GcsClient(address=address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
        f"spot interruption notice: {notice.action} at {notice.time:%H:%M:%S} UTC",
        deadline_ms,
    )


def watch(
    metadata: InstanceMetadata,
    drain: Callable[[SpotNotice], tuple[bool, str]],
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> SpotNotice:
    """Look for a notice every ``poll_s`` until there is one, drain once, return it. Read errors are
    logged and the watch goes on (the notice must not be missed)."""
    while True:
        try:
            notice = metadata.notice()
        except (NoMetadata, urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning("spot notice: reading the instance metadata failed (%s); trying again", exc)
            notice = None
        if notice is not None:
            accepted, why = drain(notice)
            left = notice.seconds_left()
            if accepted:
                logger.info(
                    "spot notice (%s in %.0f s): this Ray node is draining as a preemption",
                    notice.action,
                    left,
                )
            else:
                logger.error(
                    "spot notice (%s in %.0f s): Ray refused to drain this node: %s", notice.action, left, why
                )
            return notice
        sleep(poll_s)


def _this_node(address: str) -> tuple[str, str]:
    """(GCS address, node id) of the Ray node on this machine."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return ray.get_runtime_context().gcs_address, ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pof3d.distributed.spot_notice", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--address", default="auto", help="the Ray cluster this machine's node is in (default: auto)"
    )
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="seconds between looks (default: 5)")
    parser.add_argument("--metadata-url", default=METADATA_URL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = InstanceMetadata(args.metadata_url)
    try:
        metadata.notice()
    except NoMetadata as exc:
        print(f"spot notice watcher: {exc}; nothing to watch on this machine")
        return 0
    gcs, node_id = _this_node(args.address)
    logger.info("watching for a spot interruption notice every %g s (Ray node %s)", args.poll_s, node_id)
    watch(metadata, lambda notice: drain_ray_node(gcs, node_id, notice), args.poll_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
