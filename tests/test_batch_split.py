"""The global batch is the run's, not the workers': micro-batches are fixed slices of it, dealt to the
workers whole, and a step gives the same losses and weights with 1, 2, 3 or 4 real gloo workers."""

from __future__ import annotations

import itertools
import socket

import pytest
import torch

from pof3d.batch_split import MicroBatch, check_split, micro_batches, micro_size, share
from pof3d.errors import ConfigError
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.testing.micro import MICRO

STEPS = 2
# The first step's losses and gradients agree to float32 rounding (sums in another order: an all-reduce of
# per-worker sums against one worker's running sum). Adam's first steps are close to lr * sign(gradient),
# so an element whose gradient is a cancellation residue moves by up to +-lr either way: after two steps
# the weights agree to within 25 % of how far training moved them (the gradients, to 1e-4, are the
# strict check); the second step's figures differ by up to ~9 % (D's mean score), so only the first
# step's are compared.
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-4
PARAM_RTOL = 0.25  # measured 0.09 with 2 workers


def test_micro_batches_are_slices_of_the_global_batch_dealt_whole() -> None:
    assert micro_batches(8, 2, 1, 0) == [
        MicroBatch(0, 2),
        MicroBatch(2, 2),
        MicroBatch(4, 2),
        MicroBatch(6, 2),
    ]
    assert micro_batches(8, 2, 2, 1) == [MicroBatch(4, 2), MicroBatch(6, 2)]
    # Uneven: batch 8 over 3 workers in micro-batches of 3 -> 3, 3 and the last 2 images.
    assert [micro_batches(8, 3, 3, r) for r in range(3)] == [
        [MicroBatch(0, 3)],
        [MicroBatch(3, 3)],
        [MicroBatch(6, 2)],
    ]
    # Five micro-batches over two workers: the first worker takes one more.
    assert [share(10, 2, 2, r) for r in range(2)] == [6, 4]
    assert micro_size(8, 0, 3) == 3 and micro_size(8, 2, 3) == 2
    for world in (1, 2, 3, 4):
        every = [m for r in range(world) for m in micro_batches(8, 2, world, r)]
        assert every == micro_batches(8, 2, 1, 0)  # each image in exactly one micro-batch
    # The uneven deal turns with the step: at step 1 worker 0 takes what worker 1 took at step 0, ...;
    # every step still covers the batch once, and over 3 steps each worker reads 8 images.
    assert [micro_batches(8, 3, 3, r, step=1) for r in range(3)] == [
        [MicroBatch(3, 3)],
        [MicroBatch(6, 2)],
        [MicroBatch(0, 3)],
    ]
    for world, step in itertools.product((2, 3), range(4)):
        every = sorted((m for r in range(world) for m in micro_batches(10, 3, world, r, step)), key=str)
        assert every == sorted(micro_batches(10, 3, 1, 0), key=str)
    assert [sum(share(8, 3, 3, r, s) for s in range(3)) for r in range(3)] == [8, 8, 8]
    assert [sum(share(10, 2, 2, r, s) for s in range(2)) for r in range(2)] == [10, 10]


@pytest.mark.parametrize(
    ("batch", "batch_gpu", "workers", "message"),
    [
        (8, 9, 1, "train.batch_gpu=9 is larger than train.batch=8"),
        (8, -1, 1, "train.batch_gpu=-1: expected 0"),
        (8, 4, 3, "makes 2 micro-batch(es), fewer than the 3 worker(s)"),
        (2, 0, 4, "makes 2 micro-batch(es), fewer than the 4 worker(s)"),
    ],
)
def test_a_split_that_leaves_a_worker_idle_is_refused(batch, batch_gpu, workers, message) -> None:
    with pytest.raises(ConfigError) as info:
        check_split(batch, batch_gpu, workers, workers)
    assert message in str(info.value)


def _cfg(batch_gpu: int, workers: int):
    # Density regulariser and R1 on every step, so that all four phases accumulate micro-batches.
    return load_config(
        "tiny",
        [
            *MICRO,
            "train.batch=8",
            f"train.batch_gpu={batch_gpu}",
            f"train.workers={workers}",
            "loss.r1_interval=1",
            "loss.density_reg_interval=1",
        ],
    )


def _real() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1


def _run(trainer: Trainer) -> dict:
    """Two steps on this worker's slices of the same global batch: figures weighted by the share, the
    first step's averaged gradients (the last G and D phases'), the weights before and after."""
    real = _real()
    start = _weights(trainer)
    figures, grads = [], None
    for _ in range(STEPS):
        mine, share = torch.cat([real[m.offset : m.offset + m.size] for m in trainer.micro]), trainer.share
        step = trainer.train_step(mine)
        figures.append({k: v * share for k, v in step.items() if k.startswith(("loss/", "scores/"))})
        if grads is None:  # a parameter without a gradient counts as zeros, as the all-reduce counts it
            nets = (trainer.G, trainer.D)
            grads = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                    for n in nets
                    for p in n.parameters()
                ]
            )
    return {
        "figures": figures,
        "grads": grads,
        "start": start,
        "params": _weights(trainer),
        "seen": trainer.images_seen,
    }


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = {f"G.{n}": p.detach().clone() for n, p in trainer.G.named_parameters()}
    params.update({f"D.{n}": p.detach().clone() for n, p in trainer.D.named_parameters()})
    return params


def _worker(rank: int, world: int, batch_gpu: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(_run(Trainer(_cfg(batch_gpu, world), seed=3)), f"{out}/{world}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, batch_gpu: int, tmp_path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(world, batch_gpu, port, str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"{world}-{r}.pt", weights_only=True) for r in range(world)]
    for part in parts[1:]:  # the workers hold one model
        for name, value in part["params"].items():
            assert torch.equal(value, parts[0]["params"][name]), name
    figures = [
        {k: sum(p["figures"][s].get(k, 0.0) for p in parts) for k in parts[0]["figures"][s]}
        for s in range(STEPS)
    ]
    return {**parts[0], "figures": figures}


def _single(batch_gpu: int) -> dict:
    torch.set_flush_denormal(True)
    return _run(Trainer(_cfg(batch_gpu, 1), seed=3))


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)])


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got["seen"] == want["seen"] == 8 * STEPS, what
    g, w = got["figures"][0], want["figures"][0]  # later steps' figures carry Adam's sign noise
    assert g.keys() == w.keys(), what
    for name in w:
        assert g[name] == pytest.approx(w[name], rel=LOSS_RTOL, abs=1e-6), (what, name)
    grad_error = ((got["grads"] - want["grads"]).norm() / want["grads"].norm()).item()
    assert grad_error <= GRAD_RTOL, (what, grad_error)
    moved = (_flat(want["params"]) - _flat(want["start"])).norm()
    param_error = ((_flat(got["params"]) - _flat(want["params"])).norm() / moved).item()
    assert param_error <= PARAM_RTOL, (what, param_error)


def test_micro_batch_losses_are_weighted_by_their_share_of_the_batch() -> None:
    """The gradient of a step in micro-batches of 3, 3 and 2 is the sum of each micro-batch's mean-loss
    gradient times its share of the batch (3/8, 3/8, 2/8), each computed here on its own; equal weights
    (a mean of the means) would give another gradient."""
    torch.set_flush_denormal(True)
    trainer = Trainer(_cfg(batch_gpu=3, workers=1), seed=3)
    real = _real()
    phase = next(p for p in trainer.phases if p.name == "D_main")

    def grads() -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in trainer.D.parameters() if p.grad is not None])

    def by_hand(weights: list[float]) -> torch.Tensor:
        trainer.D.zero_grad(set_to_none=True)
        for micro, weight in zip(trainer.micro, weights, strict=True):
            torch.manual_seed(trainer._micro_seed(phase, micro.offset))
            chunk = real[micro.offset : micro.offset + micro.size]
            trainer.loss.accumulate_gradients(phase, chunk, gain=weight, images_seen=0)
        return grads()

    trainer.D.zero_grad(set_to_none=True)
    trainer._accumulate(phase, real)
    accumulated = grads()
    assert [m.size for m in trainer.micro] == [3, 3, 2]
    torch.testing.assert_close(accumulated, by_hand([3 / 8, 3 / 8, 2 / 8]), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(accumulated, by_hand([1 / 3, 1 / 3, 1 / 3]), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_one_step_is_the_same_on_any_number_of_workers(tmp_path) -> None:
    """1 worker with 4 micro-batches of 2, 2 workers with 2 and 4 workers with 1 train the same; so do 1
    worker with micro-batches of 3, 3 and 2 and 3 workers with one each (an uneven split)."""
    even = _single(batch_gpu=2)
    moved = [n for n, p in even["params"].items() if not torch.equal(p, even["start"][n])]
    assert len(moved) > 0.7 * len(even["params"])  # the two steps trained most tensors
    for world in (2, 4):
        _assert_same(_spawn(world, 2, tmp_path), even, f"{world} workers")
    _assert_same(_spawn(3, 3, tmp_path), _single(batch_gpu=3), "3 workers, uneven")
