"""Several Ray nodes on one machine: waiting for an autoscaler. (A run that loses a node and goes on from
its checkpoint on S3 is tests/test_elastic.py's shrink: the restart from the latest checkpoint is the same
for a fixed worker count, which tests/test_train_e2e.py restarts after a killed worker.)

The multi-node clusters are built in a process of their own (tests/ray_cluster_scenarios.py): a driver
cannot join them while the session's local Ray runs in this process. The fixed-cluster case uses that
session Ray, whose autoscaler has no config and so cannot add nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pof3d.distributed.resources import FIRST_STATUS_WAIT_S, autoscaler_can_add_nodes, ensure_resources
from pof3d.errors import ConfigError
from pof3d.presets import load_config

SCENARIOS = Path(__file__).with_name("ray_cluster_scenarios.py")
ROOT = Path(__file__).resolve().parents[1]


CLUSTER_DID_NOT_START = 75  # the scenario's exit code when Ray's 30 s node start bound passed


def _scenario(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a scenario; once more if its cluster did not start (a loaded machine, not the project)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(SCENARIOS), *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != CLUSTER_DID_NOT_START:
            break
    return done


def test_a_cluster_without_autoscaler_refuses_a_request_it_cannot_fit_at_once(ray_local) -> None:
    assert not autoscaler_can_add_nodes()
    cfg = load_config("tiny", ["train.workers=3", "train.batch=6", "train.cpus_per_worker=1"])
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"= 3 CPUs .* cluster's 2 CPUs.*no autoscaler that could add nodes"
    ):
        ensure_resources(cfg)
    # No wait for nodes (at most for a new cluster's first autoscaler report): nothing can add a node.
    assert time.monotonic() - started < FIRST_STATUS_WAIT_S + 5
    ensure_resources(load_config("tiny", ["train.workers=2"]))  # 1 CPU + 0.25 for data fits at once


@pytest.mark.slow  # a head node with a (fake) autoscaler: about 80 s on a loaded 2-core machine
def test_the_driver_waits_for_the_autoscaler_to_add_a_node_and_gives_up_when_it_cannot(tmp_path) -> None:
    out = tmp_path / "autoscale.json"
    done = _scenario("autoscale", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["autoscaler_can_add_nodes"] is True
    # 2 workers x 1 CPU + 0.25 for Ray Data on a 1-CPU head: the autoscaler added its 2-CPU node.
    assert result["cpus_before"] == 1.0 and result["cpus_after"] == 3.0
    log = result["log"]
    assert log[0] == "waiting for 2.25 CPU (have 1) — autoscaler asked; 0s of 5m", log
    assert any(line.startswith("the cluster fits the run after") for line in log), log
    # 8.25 CPUs is more than the head and the one node the autoscaler may add: bounded wait, clear error.
    assert 6 <= result["too_big_s"] < 30
    assert result["too_big_error"].startswith(
        "still waiting for 8.25 CPU (have 3) after train.resource_wait_min=0.1 min"
    )
