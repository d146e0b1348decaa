"""An evaluation spread over a 2-process gloo group on CPU gives what one process gives on the same
samples: same features in the same order, same kept images, same distances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pof3d.data.shards import ShardWriter, encode_png
from pof3d.generator import Generator
from pof3d.metrics import evaluate_generator
from pof3d.metrics.image_metrics import generate
from pof3d.metrics.random_features import random_feature_fn
from pof3d.metrics.samples import EvalRun
from pof3d.metrics.spread import Spread, distributed_spread
from pof3d.presets import load_config

SMALL = [
    "model.triplane_resolution=16",
    "model.depth_samples=4",
    "model.importance_samples=4",
    "model.neural_resolution=16",
    "model.image_resolution=32",
    "data.resolution=32",
]
SAMPLES = 20  # batches of 16: rank 0 renders 16 samples, rank 1 the last 4
METRICS = ["fd_random", "kd_random"]


def _model() -> tuple:
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    return cfg, Generator(cfg.model).eval()


def _evaluate(root: Path, spread: Spread) -> tuple[dict, dict[str, np.ndarray]]:
    """The metrics, and the gathered features and kept samples of :func:`generate`."""
    cfg, G = _model()
    results = evaluate_generator(
        G, None, cfg, str(root / "shards"), METRICS, num_samples=SAMPLES, cache=root / "cache", spread=spread
    )
    run = EvalRun(G, cfg, None, SAMPLES, torch.device("cpu"), 0, root / "cache")
    features, kept = generate(run, {"random": random_feature_fn()}, keep=SAMPLES, spread=spread)
    return results, {"features": features["random"], "images": kept[0].numpy(), "depth": kept[1].numpy()}


def _rank(rank: int, root: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=2)
    try:
        spread = distributed_spread("cpu")
        assert (spread.rank, spread.world) == (rank, 2)
        results, arrays = _evaluate(root, spread)
        (root / f"results-{rank}.json").write_text(json.dumps(results))
        np.savez(root / f"arrays-{rank}.npz", **arrays)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path / "shards", resolution=32)
    for i in range(24):
        writer.add(encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "png", 32, 32, f"r{i}")
    writer.close()
    return tmp_path


def test_shares_cover_the_samples_in_whole_batches():
    for count, world in ((20, 2), (100, 3), (5, 4), (64, 4)):
        shares = [Spread(rank, world).share(count, 16) for rank in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
        assert all(start % 16 == 0 for start, stop in shares if stop > start)


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_result(root: Path):
    torch.set_num_threads(1)
    alone, arrays = _evaluate(root, Spread())
    mp.spawn(_rank, args=(root,), nprocs=2, join=True)
    assert json.loads((root / "results-1.json").read_text()) == {}  # rank 0 reports
    spread = json.loads((root / "results-0.json").read_text())
    assert set(spread) == {"fd_random", "kd_random"} and spread["fd_random"] > 0
    assert spread == pytest.approx(alone, rel=1e-12)
    for rank in (0, 1):  # every rank holds the gathered arrays, equal to the single process's
        gathered = np.load(root / f"arrays-{rank}.npz")
        for name, expected in arrays.items():
            np.testing.assert_array_equal(gathered[name], expected, err_msg=name)


@pytest.mark.parametrize("preset", ["ffhq256", "ffhq512", "cats256", "cars128"])
def test_paper_presets_evaluate_at_every_snapshot(preset: str):
    from pof3d.metrics import resolve_metrics

    t = load_config(preset).train
    assert t.eval_kimg == t.snapshot_kimg > 0
    assert resolve_metrics(t.eval_metrics.split(",")) == ["pose", "js", "re", "fid"]
