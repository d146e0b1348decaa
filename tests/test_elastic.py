"""Elastic runs (``--workers MIN-MAX``): the range, its checks before anything starts, the data stream
restarted at a checkpoint, and a real run that grows and shrinks on a Ray cluster of several nodes
(tests/elastic_scenario.py). The record of each group's start: tests/test_group_watch.py."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pof3d.checkpoint import read_progress, save_checkpoint
from pof3d.data.synthetic import generate
from pof3d.distributed.elastic import (
    check_fits_nodes,
    parse_workers,
)
from pof3d.distributed.plan import TrainRequest, flag_overrides
from pof3d.errors import ConfigError
from pof3d.presets import load_config
from pof3d.run_files import RunFiles, read_metrics_log
from pof3d.storage import Location
from pof3d.studies.study import StudyRequest, base_overrides
from pof3d.train import main

SCENARIO = Path(__file__).with_name("elastic_scenario.py")
ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DID_NOT_START = 75


# ---------------------------------------------------------------------------------------------
# The range and its checks


def test_workers_takes_a_count_or_a_range_and_a_count_ends_an_elastic_run() -> None:
    assert parse_workers("4") == (4, 4) and parse_workers(3) == (3, 3) and parse_workers("2-8") == (2, 8)
    assert flag_overrides(TrainRequest(workers="2-8")) == ["train.workers=2", "train.max_workers=8"]
    # A fixed count clears the range, so that --resume of an elastic run with --workers 4 is fixed.
    assert flag_overrides(TrainRequest(workers=4)) == ["train.workers=4", "train.max_workers=0"]
    cfg = load_config("tiny", ["train.batch=8", *flag_overrides(TrainRequest(workers="1-4"))])
    assert cfg.train.worker_range() == (1, 4) and load_config("tiny").train.worker_range() == (1, 1)
    # Studies pass the same range to every trial.
    trial_flags = base_overrides(StudyRequest(workers="1-2", kimg=0.1))
    assert trial_flags[-2:] == ["train.workers=1", "train.max_workers=2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "3-2"], "argument --workers: MIN=3 is above MAX=2; expected MIN <= MAX"),
        (["--workers", "0-2"], "argument --workers: MIN=0; expected at least one worker"),
        (["--workers", "2-"], "expected a worker count N or a range MIN-MAX"),
        (
            ["--workers", "2", "--set", "train.max_workers=1"],
            "train.max_workers=1: expected 0 (a fixed train.workers) or at least train.workers=2",
        ),
        # 8 images in micro-batches of 4 are two micro-batches: a fourth worker would have none.
        (
            ["--workers", "1-4", "--batch", "8", "--set", "train.batch_gpu=4"],
            "makes 2 micro-batch(es), fewer than the 4 worker(s) the run may have",
        ),
    ],
)
def test_a_bad_range_is_a_usage_error_before_anything_starts(tmp_path, capsys, args, message) -> None:
    run_dir = tmp_path / "run"
    try:
        code = main([*args, "--run-dir", str(run_dir), "--print-config"])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_range_whose_workers_no_node_can_hold_is_refused_unless_an_autoscaler_may_add_nodes(caplog) -> None:
    cfg = load_config("tiny", ["train.workers=2", "train.max_workers=4", "train.cpus_per_worker=0.75"])
    one_cpu_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_fits_nodes(cfg, one_cpu_nodes, can_add_nodes=False)  # one worker per node: 2 = MIN
    three = load_config("tiny", ["train.workers=3", "train.max_workers=4", "train.cpus_per_worker=0.75"])
    # 3 x 0.75 CPU fit the cluster's 2.5 CPUs, yet its nodes hold only 2 whole workers.
    held = r"--workers 3-4: the cluster's nodes hold 2 worker\(s\) of 0.75 CPU"
    with pytest.raises(ConfigError, match=held):
        check_fits_nodes(three, one_cpu_nodes + [{"CPU": 0.5}], can_add_nodes=False)
    # The cluster's sums fit (2 GPUs), yet no node can hold one 2-GPU worker.
    gpus = load_config("tiny", ["train.workers=1", "train.max_workers=2", "train.gpus_per_worker=2"])
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="hold 0 worker.*no node can hold one worker"):
        check_fits_nodes(gpus, nodes, can_add_nodes=False)
    check_fits_nodes(gpus, nodes, can_add_nodes=True)  # the autoscaler may add larger nodes: a warning
    assert "waiting for the autoscaler" in caplog.text


# ---------------------------------------------------------------------------------------------
# The data stream restarted at a checkpoint


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "faces"
    return generate(out, 48, 16, "faces", seed=5, shard_mb=12 * 1500 / 2**20)


def _stream(uri: Path, start: int, executions: int) -> list[tuple[int, float]]:
    from pof3d.data.streaming import iter_train_batches, make_dataset

    ds = make_dataset(str(uri), seed=4, xflip=True, epochs=3, start=start)
    return [
        (i, yaw)
        for _ in range(executions)
        for batch in iter_train_batches(ds, 7)
        for i, yaw in zip(batch["id"].tolist(), batch["pose"][:, 0].tolist(), strict=True)
    ]


def test_a_stream_started_at_a_checkpoint_goes_on_where_the_unbroken_stream_was(ray_local, small_set) -> None:
    whole = _stream(small_set, 0, executions=2)  # epochs 0-5
    assert len(whole) == 6 * 48
    for start in (5, 48 + 20):  # inside the first epoch, and inside the second
        resumed = _stream(small_set, start, executions=1)
        # The same rows in the same order with the same flips (the mirrored yaw), to the end of the
        # execution's three epochs counted from the one the start falls in.
        assert len(resumed) == 3 * 48 - start % 48
        assert resumed == whole[start : start + len(resumed)]


def _recorded_group(plan, workers: int, steps: int) -> list[list[list[int]]]:
    """What a worker group of ``workers`` reads in ``steps`` steps, fed as a run's group is: its
    TrainStream split by Ray Train's own ``DataConfig.configure`` (what Train's dataset manager calls for
    every new group), each worker pulling its share of the batch per step in a thread of its own, the
    steps in lockstep as the gradient all-reduce keeps them. The ids per worker and step."""
    from ray.train import DataConfig

    from pof3d.batch_split import micro_size, share
    from pof3d.data.streaming import StepFeed, ingest_options
    from pof3d.distributed.launcher import TrainStream

    t = plan.cfg.train
    size = micro_size(t.batch, t.batch_gpu, t.worker_range()[1])
    splits = DataConfig(execution_options=ingest_options()).configure(
        {"train": TrainStream(plan)()}, world_size=workers, worker_handles=None, worker_node_ids=None
    )
    taken: list[list[list[int]]] = [[] for _ in range(workers)]
    lockstep = threading.Barrier(workers)

    def worker(rank: int) -> None:
        feed = StepFeed(splits[rank]["train"], share(t.batch, size, workers, rank))
        for step in range(steps):
            taken[rank].append(feed.take(share(t.batch, size, workers, rank, step))["id"].tolist())
            lockstep.wait()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return taken


def test_a_new_group_repeats_or_skips_only_the_images_the_old_one_had_in_flight(
    ray_local, small_set, tmp_path, capsys
) -> None:
    import torch

    from pof3d.data.streaming import iter_train_batches, make_dataset, stream_epochs
    from pof3d.distributed.plan import plan_run

    run = tmp_path / "run"
    plan = plan_run(
        TrainRequest(preset="tiny", data=str(small_set), batch=4, workers="1-2", run_dir=str(run))
    )
    steps = 4
    old = _recorded_group(plan, 2, steps)  # two workers, 2 images each per step
    seen = steps * plan.cfg.train.batch
    # The checkpoint the next group resumes from, at the images the old group had trained.
    save_checkpoint(
        run / "checkpoints" / "checkpoint-a", {"x": torch.zeros(1)}, plan.cfg, {"images_seen": seen}
    )
    new = _recorded_group(plan, 1, steps)  # one worker, the whole batch
    # The unbroken stream, as one reader sees it: positions 0, 1, ... of the run's data.
    rows = 48
    stream = make_dataset(str(small_set), seed=plan.cfg.data.shuffle_seed, epochs=stream_epochs(rows))
    first_epoch = itertools.islice(iter_train_batches(stream, 8), rows // 8)
    order = [i for b in first_epoch for i in b["id"].tolist()]
    trained_before = {i for rank in old for step in rank for i in step}
    trained_after = [i for step in new[0] for i in step]
    assert len(trained_before) == seen and len(trained_after) == seen
    # The new group reads the stream from the checkpoint's position on, not from its start.
    assert trained_after == order[seen : 2 * seen]
    skipped = set(order[:seen]) - trained_before  # before the checkpoint's position, never trained
    ahead = trained_before - set(order[:seen])  # trained early: taken from the old workers' later blocks
    # Only images the old workers held (dealt to them, not yet trained) are out of place, as many ahead
    # as skipped; those ahead come again when the new stream reaches them.
    assert len(skipped) == len(ahead)
    assert ahead <= set(order[seen:])
    with capsys.disabled():
        print(f"\nresplit 2 -> 1 worker(s) at {seen} images: {len(skipped)} skipped, {len(ahead)} repeated")


# ---------------------------------------------------------------------------------------------
# A run that grows and shrinks (tests/elastic_scenario.py): one scenario, two tests of what it did


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, s3_server) -> dict:
    import boto3

    bucket = "pof3d-elastic-run"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    work = tmp_path_factory.mktemp("elastic")
    out = work / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    for attempt in range(2):  # once more if Ray's 30 s node start bound passed (a loaded machine)
        done = subprocess.run(
            [sys.executable, str(SCENARIO), str(work), f"s3://{bucket}/run-{attempt}", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if done.returncode != CLUSTER_DID_NOT_START:
            break
    logs = done.stdout + done.stderr
    (work / "scenario.log").write_text(logs)  # kept with pytest's --basetemp, for a failure's story
    assert done.returncode == 0, logs[-4000:]
    result = json.loads(out.read_text())
    assert "grow_error" not in result and "shrink_error" not in result, (result, logs[-4000:])
    assert result["grow_exit_code"] == 0 and result["shrink_exit_code"] == 0, logs[-4000:]
    files = RunFiles(Location.parse(result["run_dir"]))
    ticks = read_metrics_log(files.metrics)
    changes = [t for t in ticks if "group/previous_workers" in t]
    # The workers' lines are read from their own log files: the driver's copy is best effort, and on a
    # loaded machine it once lacked a group change logged seconds before the cluster stopped.
    worker_lines = result["worker_logs"]
    resumes = [(u, float(k)) for u, k in re.findall(r"resumed from (\S+) at kimg ([\d.]+)", worker_lines)]
    took = time.monotonic() - started
    return {
        **result,
        "logs": logs,
        "files": files,
        "ticks": ticks,
        "changes": changes,
        "resumes": resumes,
        "s": took,
    }


# With the next test: one run in two launches on 3 nodes, 335 s on 2 cores at load 8-24 (680 s at 30-90).
@pytest.mark.slow
def test_an_elastic_run_grows_to_two_workers_when_a_node_joins(elastic_run) -> None:
    run = elastic_run
    grown_at = next(i for i, t in enumerate(run["ticks"]) if t["world_size"] == 2)
    first_launch = [t["world_size"] for t in run["ticks"] if t["images_seen"] <= run["resumed"]]
    # One worker until the node joined, then two; every tick says how many.
    assert [size for size, _ in itertools.groupby(first_launch)] == [1, 2], first_launch
    grown = run["changes"][0]
    assert grown == run["ticks"][grown_at]  # said at the grown group's first tick
    assert grown["group/previous_workers"] == 1 and grown["group/redone_images"] >= 0
    assert 0 < grown["group/start_s"] < grown["group/restart_s"]
    assert "worker group grew from 1 to 2 workers (resize): training again" in run["worker_logs"]
    # Before the resize stopped it, the single worker checkpointed after its step in progress (the
    # controller recorded how long that took), and the grown group resumed from that checkpoint, newer
    # than the first. The old worker's own log line of it may be lost: Ray stops its process right after.
    assert 0 < grown["group/save_s"] < 120
    grown_from = {k for _, k in run["resumes"] if 0 < k * 1000 < grown["images_seen"]}  # each rank says it
    assert len(grown_from) == 1 and min(grown_from) * 1000 > run["grow_after_checkpoint"], run["resumes"]
    notice = r"resize notice \(resize from 1 to 2 workers\): checkpoint at kimg ([\d.]+)"
    saved = re.findall(notice, run["logs"])
    assert {float(k) for k in saved} <= grown_from, (saved, run["resumes"])
    # The two workers ran on the two worker nodes.
    assert {w["node"] for w in run["two_workers"].values()} == {run["first_node"], run["second_node"]}


@pytest.mark.slow
def test_an_elastic_run_shrinks_to_one_worker_when_a_node_goes_and_finishes(elastic_run) -> None:
    run, ticks, files = elastic_run, elastic_run["ticks"], elastic_run["files"]
    second_launch = [t["world_size"] for t in ticks if t["images_seen"] > run["resumed"]]
    assert [size for size, _ in itertools.groupby(second_launch)] == [2, 1], second_launch
    shrunk = run["changes"][-1]
    assert len(run["changes"]) == 2 and shrunk["world_size"] == 1 and shrunk["group/previous_workers"] == 2
    assert "worker group shrank from 2 to 1 workers (failure): training again" in run["worker_logs"]
    # From the latest checkpoint of this launch when the group restarted, on the node that stayed: not
    # older than the one seen right after the removal, and not past the two workers' last tick (rank 0
    # logs a tick before it writes that tick's checkpoint).
    shrunk_from = list({round(k * 1000) for _, k in run["resumes"] if round(k * 1000) > run["resumed"]})
    assert len(shrunk_from) == 1, run["resumes"]
    last_of_two = max(t["images_seen"] for t in ticks if t["world_size"] == 2)
    assert run["shrink_after_checkpoint"] <= run["checkpoint_at_removal"] <= shrunk_from[0], run["resumes"]
    assert shrunk_from[0] <= last_of_two, (run["resumes"], second_launch)
    restarted = sorted(run["all_workers"].values(), key=lambda w: w["started"])[-1]
    assert restarted["node"] == run["first_node"]
    # images_seen continuous to the target over both launches, each tick once (the ticks fall every 8
    # images, and at the notice that ended the first launch).
    every, target = run["every"], run["target"]
    seen = [t["images_seen"] for t in ticks]
    assert seen[0] == every and seen[-1] == target, seen
    assert all(0 < b - a <= every for a, b in zip(seen, seen[1:], strict=False)), seen
    last = files.latest_checkpoint()
    assert last is not None and read_progress(last)["images_seen"] == target
    # One MLflow run for both launches, finished, with both group sizes and both restarts.
    client = MlflowClient(run["mlflow_uri"])
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert read_progress(last)["mlflow_run_id"] == mlflow_run.info.run_id
    sizes = {m.value for m in client.get_metric_history(mlflow_run.info.run_id, "world_size")}
    assert sizes == {1.0, 2.0}
    assert len(client.get_metric_history(mlflow_run.info.run_id, "group/restart_s")) == 2
