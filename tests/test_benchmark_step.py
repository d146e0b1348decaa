"""The step benchmark: its FLOP counter (against FlopCounterMode and hand counts) and a tiny run's rates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pof3d.checkpoint import rng_state
from pof3d.loop import Trainer
from pof3d.presets import load_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import each other as top-level modules

import step  # noqa: E402
from flops import FlopCounter  # noqa: E402

TINY = ["train.batch=4", "model.num_fp16_res=0"]


def _real(cfg) -> torch.Tensor:
    r = cfg.model.image_resolution
    return torch.rand(cfg.train.batch, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_counter_agrees_with_flop_counter_mode_where_that_runs() -> None:
    """G_main, G_density and D_main under both counters at once: the same FLOPs within 1 %."""
    cfg = load_config("tiny", TINY)
    trainer, real = Trainer(cfg, seed=0), _real(cfg)
    for phase in trainer.phases:
        if phase.name == "D_r1":
            continue  # FlopCounterMode raises there (benchmarks/flops.py says why)
        reference = FlopCounterMode(display=False)
        with FlopCounter() as counter, reference:
            trainer.run_phase(phase, real)
        assert counter.total > 0 and not counter.uncounted, (phase.name, counter.uncounted)
        assert counter.total == pytest.approx(reference.get_total_flops(), rel=0.01), phase.name


def test_counter_runs_r1_double_backward() -> None:
    cfg = load_config("tiny", TINY)
    trainer, real = Trainer(cfg, seed=0), _real(cfg)
    (r1,) = [p for p in trainer.phases if p.name == "D_r1"]
    with FlopCounter() as counter:
        trainer.run_phase(r1, real)
    assert not counter.uncounted
    # the second derivative runs convolutions of its own and backward ones beyond the first backward's
    assert counter.by_op["aten.convolution"] > 0 and counter.by_op["aten.convolution_backward"] > 0


@pytest.mark.parametrize(
    ("transposed", "groups"),
    [(False, 1), (False, 2), (True, 1), (True, 2)],
    ids=["conv", "grouped", "T", "T2"],
)
def test_double_backward_of_one_conv_layer_matches_hand_count(transposed: bool, groups: int) -> None:
    """R1's pattern on one 3x3 layer (stride 1, padding 1, so every output position sees all 9 taps).

    With M = N * C_in * C_out / groups * 9 * H * W multiply-adds for the forward convolution:
    forward M; first backward, input gradient only, M; the penalty's backward then runs the double
    backward of that input gradient, which needs the gradient for the first backward's grad_output (a
    convolution of the incoming gradient with the weight, M) and for the weight (M), and finally the
    backward of the forward convolution for the input and the weight (2 M). 6 M multiply-adds, 12 M FLOPs.
    """
    n, c_in, c_out, size = 2, 4, 6, 8
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    if transposed:
        w = torch.randn(c_in, c_out // groups, 3, 3, requires_grad=True)
        layer = lambda x: F.conv_transpose2d(x, w, padding=1, groups=groups)  # noqa: E731
    else:
        w = torch.randn(c_out, c_in // groups, 3, 3, requires_grad=True)
        layer = lambda x: F.conv2d(x, w, padding=1, groups=groups)  # noqa: E731
    m = n * c_in * c_out // groups * 9 * size * size
    with FlopCounter() as counter:
        y = layer(x)
        (grad,) = torch.autograd.grad(y.square().sum() / 2, x, create_graph=True)
        grad.square().sum().backward()
    assert counter.total == 12 * m
    assert not counter.uncounted


def test_counting_leaves_the_generators_alone() -> None:
    args = step.parse_args(["--preset", "tiny", "--warmup", "0", "--set", TINY[0], "--set", TINY[1]])
    cfg = load_config("tiny", TINY)
    before = rng_state()
    flops, uncounted = step.count_flops("tiny", "shared", args, _real(cfg))
    after = rng_state()
    assert set(flops) == {"G_main", "G_density", "D_main", "D_r1"} and all(v > 0 for v in flops.values())
    assert not uncounted
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]


def test_precision_flag_replaced_amp() -> None:
    assert step.parse_args([]).precision == "fp32"
    assert "model.num_fp16_res=0" in step.precision_overrides("fp32")
    assert "train.precision=bf16" in step.precision_overrides("bf16")
    with pytest.raises(SystemExit):
        step.parse_args(["--amp"])


def test_tiny_run_reports_flops_rates_and_peak() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step.py"), "--preset", "tiny", "--iters", "1", "--warmup", "0"]
        + ["--threads", "1", "--host-memory", "default"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    peak = re.search(r"torch\.mm, best of \d+, 1 threads\): fp32 ([\d.]+)", out)
    assert peak and float(peak.group(1)) > 0, out
    fp32_peak = float(peak.group(1))
    (row,) = [
        line.split() for line in out.splitlines() if line.startswith("tiny ") and len(line.split()) == 17
    ]
    gflop, rate, percent = map(float, row[11:14])
    assert gflop > 0 and rate > 0 and percent > 0, out
    phases = re.findall(
        r"^tiny\s+shared\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE
    )
    assert {p[0] for p in phases} == {"G_main", "G_density", "D_main", "D_r1"}, out
    for name, phase_gflop, seconds, phase_rate, phase_percent in phases:
        assert float(phase_gflop) > 0 and float(seconds) > 0, name
        assert 0 < float(phase_rate) <= fp32_peak and 0 < float(phase_percent) <= 100, (name, out)
    assert sum(float(p[1]) for p in phases) == pytest.approx(gflop, abs=0.02)
    assert "warning" not in out and "without a FLOP rule" not in out, out


def test_loop_benchmark_prints_train_step_against_the_phases_per_block() -> None:
    import loop

    args = loop.parse_args(["--iters", "2", "--block", "1", "--threads", "1", "--set", "train.batch=2"])
    lines = loop.run(args)
    assert lines[0].startswith("tiny, batch 2, 1 threads, fp32"), lines
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1-1", "2-2"], lines
    for _, step_s, phases_s, ratio in rows:
        assert float(step_s) > 0 and float(phases_s) > 0
        assert float(ratio) == pytest.approx(float(step_s) / float(phases_s), rel=0.05)
    with pytest.raises(SystemExit):
        loop.parse_args(["--iters", "4", "--block", "8"])
