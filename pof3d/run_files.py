"""The files of one run under its storage root (a local folder or an object-store prefix).

```
ROOT/config.json      the resolved config
ROOT/metrics.jsonl    one JSON object per tick (the same figures as MLflow)
ROOT/tracking.json    the MLflow tracking URI, experiment and run id, so a resume continues the run
ROOT/checkpoints/     Ray Train's storage: checkpoint-kimgNNN.NNN/
ROOT/samples/         sample grids and pose plots per snapshot
ROOT/workers/         rank-N.pid of each worker (an operator's handle on the processes)
```
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from pof3d.checkpoint import find_latest
from pof3d.config import Config
from pof3d.storage import Location

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TRACKING_FILE = "tracking.json"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
WORKERS_DIR = "workers"


@dataclass(frozen=True)
class RunFiles:
    root: Location

    @property
    def config(self) -> Location:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Location:
        return self.root / METRICS_FILE

    @property
    def tracking(self) -> Location:
        return self.root / TRACKING_FILE

    @property
    def checkpoints(self) -> Location:
        return self.root / CHECKPOINTS_DIR

    @property
    def samples(self) -> Location:
        return self.root / SAMPLES_DIR

    def latest_checkpoint(self) -> Location | None:
        return find_latest(self.checkpoints)

    def write_config(self, cfg: Config) -> None:
        self.config.write_text(cfg.to_json())

    def read_tracking(self) -> dict[str, Any]:
        """What :meth:`write_tracking` saved; ``{}`` when the run was never tracked."""
        if not self.tracking.is_file():
            return {}
        try:
            data = json.loads(self.tracking.read_text())
        except ValueError:
            logger.warning("%s is not valid JSON; the run continues in a new MLflow run", self.tracking)
            return {}
        return data if isinstance(data, dict) else {}

    def write_tracking(self, tracking_uri: str, experiment: str, run_id: str) -> None:
        record = {"tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id}
        self.tracking.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def write_pid(self, rank: int, pid: int) -> None:
        (self.root / WORKERS_DIR / f"rank-{rank}.pid").write_text(f"{pid}\n")

    def metrics_log(self, images_seen: int) -> MetricsLog:
        return MetricsLog(self.metrics, images_seen)


class MetricsLog:
    """``metrics.jsonl``, kept consistent with the checkpoint a run (re)starts from.

    Opening it drops the ticks logged after ``images_seen`` (they are redone after a restart) and lines
    cut short by a crash. Locally each tick is appended (``tail -f`` works); object stores cannot append,
    so the lines are kept in memory and the object is rewritten with one PUT per tick.
    """

    def __init__(self, location: Location, images_seen: int) -> None:
        self.location = location
        existing = location.read_text().splitlines() if location.is_file() else []
        self._lines = [line for line in existing if _tick_images(line) <= images_seen]
        if len(self._lines) != len(existing):
            self._flush()

    def append(self, metrics: dict[str, Any]) -> None:
        clean = {
            k: (v if isinstance(v, (int, str)) or math.isfinite(v) else None) for k, v in metrics.items()
        }
        line = json.dumps(clean, sort_keys=True)
        self._lines.append(line)
        if self.location.is_local:
            path = self.location.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(line + "\n")
        else:
            self._flush()

    def _flush(self) -> None:
        self.location.write_text("".join(line + "\n" for line in self._lines))


def _tick_images(line: str) -> float:
    """Images seen of a ``metrics.jsonl`` line; a line cut short by a crash sorts after everything."""
    try:
        return float(json.loads(line)["images_seen"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
