"""Several Ray nodes on one machine: waiting for an autoscaler, and a run that loses a node.

The multi-node clusters are built in a process of their own (tests/ray_cluster_scenarios.py): a driver
cannot join them while the session's local Ray runs in this process. The fixed-cluster case uses that
session Ray, whose autoscaler has no config and so cannot add nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pof3d.checkpoint import load_checkpoint, read_progress
from pof3d.distributed.resources import FIRST_STATUS_WAIT_S, autoscaler_can_add_nodes, ensure_resources
from pof3d.errors import ConfigError
from pof3d.presets import load_config
from pof3d.run_files import RunFiles
from pof3d.storage import Location, as_local_dir

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


@pytest.mark.slow  # three nodes, a 2-worker run on S3, a node loss: 9-10 min on a (very) loaded 2-core box
def test_a_run_survives_the_loss_of_a_workers_node_and_resumes_from_its_checkpoint(
    tmp_path, s3_bucket
) -> None:
    # The run lives on the session's S3 server; its endpoint and credentials reach the scenario's process
    # and the Ray nodes it starts through the AWS environment that the s3_server fixture set.
    run_uri = f"s3://{s3_bucket}/node-loss"
    out = tmp_path / "node-loss.json"
    done = _scenario("node-loss", str(tmp_path), run_uri, str(out), timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    logs = done.stderr + done.stdout
    assert result["exit_code"] == 0, logs[-4000:]
    # The two Train workers started on two different nodes; one of those (not the head) was removed.
    before = result["before"]
    assert len(before) == 2 and len({w["node"] for w in before.values()}) == 2
    assert result["victim"] != result["head"] and result["victim"] in {w["node"] for w in before.values()}
    assert 8 <= result["removed_at_images"] < 16  # after the first checkpoint, before the target
    # Every worker started after the loss is on a node that is still there; the group that finished the
    # run (the last two started) spans two nodes again.
    restarted = sorted(
        (w for k, w in result["all_workers"].items() if k not in before), key=lambda w: w["started"]
    )
    assert len(restarted) >= 2 and result["victim"] not in {w["node"] for w in restarted}
    assert len({w["node"] for w in restarted[-2:]}) == 2
    # The restarted workers resumed from the checkpoint on S3 that was there when the node went (the
    # first one, 8 images), not from anything on a node's disk.
    files = RunFiles(Location.parse(result["run_dir"]))
    assert str(files.checkpoints).startswith(f"s3://{s3_bucket}/node-loss/")
    first = Location.parse(result["checkpoint_at_removal"])
    assert first.parent == files.checkpoints and read_progress(first)["images_seen"] == 8
    resumes = set(re.findall(r"resumed from (\S+) at kimg ([\d.]+)", logs))  # each rank logs it
    assert resumes == {(str(first), "0.008")}, logs[-4000:]
    # Every image counted once, to the target, with one MLflow run; the last checkpoint is on S3 too.
    ticks = [json.loads(line) for line in files.metrics.read_text().splitlines() if line.strip()]
    assert [t["tick"] for t in ticks] == [1, 2, 3, 4]
    assert [t["images_seen"] for t in ticks] == [4, 8, 12, 16]
    assert {t["world_size"] for t in ticks} == {2}
    last = files.latest_checkpoint()
    assert last is not None and last.parent == files.checkpoints
    with tempfile.TemporaryDirectory() as scratch:
        _, _, progress = load_checkpoint(as_local_dir(last, Path(scratch)))
    assert progress["images_seen"] == 16 and progress["step"] == 4
    client = MlflowClient(result["mlflow_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert run.info.status == "FINISHED" and progress["mlflow_run_id"] == run.info.run_id
    # A tick that the lost group had logged past the checkpoint is logged again when the new group redoes
    # it (MLflow keeps both points: it cannot delete one); nothing at or before the checkpoint repeats.
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss/G_adv")]
    assert sorted(set(logged)) == [4, 8, 12, 16] and logged[:2] == [4, 8], logged
    assert all(step > 8 for step in logged[2:]) and len(logged) <= 5, logged
