"""Ray Data streaming: decoded batches, per-epoch coverage (one or several epochs per execution, on the
driver and across 2 Ray Train workers), flips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pof3d.data.shard_reader import iter_rows
from pof3d.data.shard_source import _poses
from pof3d.data.streaming import ingest_options, iter_train_batches, make_dataset
from pof3d.data.synthetic import generate
from pof3d.errors import DataError

N_ROWS = 48


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    # Tiny shards so that the set has several files for the per-epoch file shuffle and the split.
    out = tmp_path_factory.mktemp("data") / "faces"
    return generate(out, N_ROWS, 16, "faces", seed=5, shard_mb=12 * 1500 / 2**20)


@pytest.fixture(scope="module")
def stored(shard_set: Path) -> dict[int, dict]:
    return {r["id"]: r for r in iter_rows(str(shard_set), ["id", "image", "pose"])}


def _expected_image(pixels: np.ndarray) -> np.ndarray:
    return pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


@pytest.mark.slow
def test_batches_are_decoded_images_and_poses_and_epochs_reshuffle(ray_local, shard_set, stored):
    ds = make_dataset(str(shard_set), seed=1)
    raw = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (4, 3, 16, 16)  # uint8 in the store
    orders = []
    for _ in range(2):
        ids = []
        for batch in iter_train_batches(ds, 10):
            assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
            for i, image, pose in zip(batch["id"].tolist(), batch["image"], batch["pose"], strict=True):
                np.testing.assert_allclose(image.numpy(), _expected_image(stored[i]["image"]), atol=1e-6)
                np.testing.assert_array_equal(pose.numpy(), stored[i]["pose"])
            ids.extend(batch["id"].tolist())
        assert sorted(ids) == list(range(N_ROWS))
        orders.append(ids)
    assert orders[0] != orders[1]  # a new order every epoch
    assert orders[0] != sorted(orders[0])


@pytest.mark.slow
def test_one_execution_streams_several_epochs_each_row_once_per_epoch(ray_local, shard_set):
    # One read task at a time, as a training run of one worker streams by default (data.decode_tasks).
    ds = make_dataset(str(shard_set), seed=4, epochs=3, max_tasks=1)
    assert ds._logical_plan.dag.compute.size == 1  # Ray Data's read operator runs at most one task
    orders = []
    for _ in range(2):  # the second execution continues with epochs 3..5
        ids = [i for batch in iter_train_batches(ds, 7) for i in batch["id"].tolist()]
        assert len(ids) == 3 * N_ROWS
        for epoch in range(3):
            assert sorted(ids[epoch * N_ROWS : (epoch + 1) * N_ROWS]) == list(range(N_ROWS))
            orders.append(ids[epoch * N_ROWS : (epoch + 1) * N_ROWS])
    assert len({tuple(o) for o in orders}) == len(orders)  # every epoch in a new order


@pytest.mark.slow
def test_flip_mirrors_the_image_and_negates_the_yaw_offset(ray_local, shard_set, stored):
    flipped = kept = 0
    for batch in iter_train_batches(make_dataset(str(shard_set), xflip=True, seed=2), 16):
        for i, image, pose in zip(
            batch["id"].tolist(), batch["image"].numpy(), batch["pose"].numpy(), strict=True
        ):
            original = _expected_image(stored[i]["image"])
            h0, v0 = stored[i]["pose"]
            if np.allclose(image, original, atol=1e-6) and np.isclose(pose[0], h0):
                kept += 1
            else:
                np.testing.assert_allclose(image, original[:, :, ::-1], atol=1e-6)
                assert pose[0] - math.pi / 2 == pytest.approx(-(h0 - math.pi / 2), abs=1e-6)
                flipped += 1
            assert pose[1] == v0
    assert flipped + kept == N_ROWS and flipped > 5 and kept > 5


def test_a_cap_of_no_read_task_is_refused(shard_set):
    with pytest.raises(ValueError, match="max_tasks=0: expected at least 1 read task at a time, or None"):
        make_dataset(str(shard_set), max_tasks=0)


def test_full_shuffle_keeps_one_epoch_per_execution(shard_set):
    with pytest.raises(DataError, match="would mix the epochs"):
        make_dataset(str(shard_set), full_shuffle=True, epochs=2)


def test_missing_poses_read_as_nan():
    column = pa.chunked_array(
        [pa.array([[1.0, 2.0], None], pa.list_(pa.float32())), pa.array([[3.0, 4.0]], pa.list_(pa.float32()))]
    )
    np.testing.assert_array_equal(_poses(column), np.array([[1, 2], [np.nan, np.nan], [3, 4]], np.float32))
    full = pa.chunked_array([pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))])
    np.testing.assert_array_equal(_poses(full), np.array([[1, 2], [3, 4]], np.float32))


@pytest.fixture(scope="module")
def two_worker_reads(ray_local, shard_set, tmp_path_factory) -> Path:
    """One Ray Train run of two workers that reads two datasets, one after the other, and writes the ids
    each worker read (a launch costs far more than its reads, so the tests below share it):

    - ``epochs``: the default data config, two epochs as two executions of the stream (seed 3);
    - ``multi``: as training runs it: 2 epochs per execution, Train's ingest options with
      preserve_order, and an uneven deal (batch 8 in micro-batches of 3: 6 and 2 images per step,
      turning with the step) read through the training loop's StepFeed (seed 6).
    """
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("two-worker-reads")

    # Defined here so that it is pickled by value (the workers cannot import this test module).
    def _train_loop(config: dict) -> None:
        import ray.train

        from pof3d.batch_split import share
        from pof3d.data.streaming import StepFeed, iter_train_batches

        rank = ray.train.get_context().get_world_rank()
        folder = Path(config["out"])
        shard = ray.train.get_dataset_shard("epochs")
        for epoch in range(2):
            ids = []
            for batch in iter_train_batches(shard, 8):
                assert batch["image"].shape[1:] == (3, 16, 16) and batch["pose"].shape[1:] == (2,)
                ids.extend(batch["id"].tolist())
            (folder / f"epochs-rank{rank}-epoch{epoch}.json").write_text(json.dumps(ids))
        feed = StepFeed(ray.train.get_dataset_shard("multi"), share(8, 3, 2, rank))
        ids = []
        for step in range(2 * config["rows"] // 8):  # the two epochs, 8 images a step
            ids.extend(feed.take(share(8, 3, 2, rank, step))["id"].tolist())
        (folder / f"multi-rank{rank}.json").write_text(json.dumps(ids))

    TorchTrainer(
        _train_loop,
        train_loop_config={"out": str(out), "rows": N_ROWS},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={
            "epochs": make_dataset(str(shard_set), seed=3),
            "multi": make_dataset(str(shard_set), seed=6, epochs=2),
        },
        dataset_config=DataConfig(execution_options={"multi": ingest_options()}),
        run_config=RunConfig(name="stream", storage_path=str(out / "storage")),
    ).fit()
    return out


@pytest.mark.slow
def test_two_train_workers_see_every_row_once_per_epoch(two_worker_reads) -> None:
    for epoch in range(2):
        per_rank = [
            json.loads((two_worker_reads / f"epochs-rank{r}-epoch{epoch}.json").read_text()) for r in range(2)
        ]
        assert all(per_rank), "each worker gets part of the data"
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_ROWS))


@pytest.mark.slow
def test_two_train_workers_share_a_multi_epoch_stream(two_worker_reads) -> None:
    """Ray deals each worker's split the same rows, so a worker that read 6 at every step would need a
    second execution that the other never starts, and wait forever (the run above would not end)."""
    per_rank = [json.loads((two_worker_reads / f"multi-rank{r}.json").read_text()) for r in range(2)]
    assert all(per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(list(range(N_ROWS)) * 2)  # each row once per epoch


def test_collation_starts_no_second_openmp_team() -> None:
    """Ray's prefetch thread collates batches beside the training thread. A torch op there would start a
    second OpenMP thread team (torch applies set_num_threads to every thread), and libgomp then stops
    spinning at the training team's barriers: a 2-thread CPU step measured 1.45x slower. The collation
    must give the same values without starting any thread; a subprocess keeps the count clean."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, threading, numpy as np, torch
        from pof3d.data.streaming import ImageCollate
        torch.set_num_threads(2)
        rng = np.random.default_rng(0)
        batch = {"image": rng.integers(0, 256, (8, 3, 64, 64), dtype=np.uint8),
                 "pose": rng.normal(size=(8, 2)).astype(np.float32)}
        batch["pose"].flags.writeable = False
        out = {}
        def collate():
            before = len(os.listdir("/proc/self/task"))
            out.update(ImageCollate()(batch))
            out["started"] = len(os.listdir("/proc/self/task")) - before
        thread = threading.Thread(target=collate)
        thread.start(); thread.join()
        expected = torch.from_numpy(batch["image"]).float() / 127.5 - 1.0
        assert out["image"].dtype == torch.float32 and torch.equal(out["image"], expected)
        assert torch.equal(out["pose"], torch.from_numpy(batch["pose"]))
        print("threads started", out["started"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "threads started 0" in result.stdout, result.stdout
