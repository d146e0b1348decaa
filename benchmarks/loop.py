"""The trainer's whole step against the benchmark's phases, interleaved, over many iterations.

    python benchmarks/loop.py [--preset tiny] [--iters 96] [--block 16] [--threads 2]
                              [--precision fp32|bf16|fp16|auto] [--set SECTION.FIELD=VALUE ...]

``benchmarks/step.py`` times each phase on its own for a few iterations after a warm-up. Training calls
``Trainer.train_step`` instead: the phases due at that step, the EMA update, the step's figures. This
script builds two trainers the same way (same preset, seed and batch), and alternates one ``train_step``
of the first with one iteration of ``step.py``'s phase timing on the second, so both see the same
machine load; per block of ``--block`` iterations it prints the mean seconds of ``train_step`` and of
the phases amortised as training runs them (a lazy regulariser's seconds over its interval). Means, not
medians: ``train_step`` runs a regulariser only every few steps, so over a block that is a multiple of
the intervals (16 by default) its mean is the amortised figure. Two questions it answers: does the loop
around the phases cost anything, and does the step get slower as training moves on. Like ``step.py`` it
imports only torch and the model modules, and on CPU it restarts itself with the host-memory tunables
that training workers get.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from step import PRECISIONS, build, fixed_real_batch, time_iteration

from pof3d.host_memory import restart_retaining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--iters", type=int, default=96, help="iterations of each trainer")
    parser.add_argument("--block", type=int, default=16, help="iterations per printed mean")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    if args.block < 1 or args.iters < args.block:
        parser.error(f"--block must be >= 1 and --iters >= --block, got {args.block} and {args.iters}")
    return args


def run(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    stepped = build(args.preset, "shared", device, args.precision, args.set)
    phased = build(args.preset, "shared", device, args.precision, args.set)
    cfg = stepped.cfg
    real = fixed_real_batch(cfg, device)
    intervals = {p.name: p.interval for p in phased.phases}
    lines = [
        f"{args.preset}, batch {cfg.train.batch}, {args.threads} threads, {args.precision}; "
        f"means per block of {args.block} iterations",
        f"{'iterations':>12} {'train_step s':>13} {'phases s':>9} {'ratio':>6}",
    ]
    steps: list[float] = []
    phases: list[float] = []
    for i in range(args.iters):
        start = time.perf_counter()
        stepped.train_step(real)
        steps.append(time.perf_counter() - start)
        times = time_iteration(phased, real)
        phases.append(sum(times[name] / every for name, every in intervals.items()))
        if (i + 1) % args.block == 0:
            s, p = statistics.fmean(steps[-args.block :]), statistics.fmean(phases[-args.block :])
            lines.append(f"{i + 2 - args.block:>5}-{i + 1:<6} {s:13.3f} {p:9.3f} {s / p:6.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    restart_retaining(__file__, sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()[0]
    for line in run(args):
        print(line, flush=True)
    print(f"machine load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
