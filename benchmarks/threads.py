"""Seconds per training step with 1 or more CPU threads, alone and beside other trainers on the machine.

    python benchmarks/threads.py [--preset tiny] [--set SECTION.FIELD=VALUE ...] [--batch 4]
                                 [--threads 1,2] [--copies 1,2] [--steps 8] [--warmup 2]

For every (copies, threads) pair, ``copies`` processes start at once, each building the preset's
trainer and timing ``--steps`` iterations of ``Trainer.train_step`` on a fixed batch after ``--warmup``
untimed ones, on ``threads`` torch threads. The table gives each pair's median seconds per step over the
processes (and the slowest process). A run with more OpenMP threads than free cores shows how far the
step falls when its threads must wait for each other at every parallel region: what happens to a
training worker beside concurrent trials, other Ray nodes on the same machine or any busy process.
Run it on an otherwise idle machine: whatever else runs joins the crowd.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from pof3d.loop import Trainer
from pof3d.presets import load_config


def _time_steps(preset: str, sets: list[str], batch: int, threads: int, steps: int, warmup: int, start, out):
    torch.set_num_threads(threads)
    cfg = load_config(preset, [*sets, f"train.batch={batch}"])
    trainer = Trainer(cfg, device="cpu", seed=0)
    res = cfg.data.resolution
    real = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    start.wait()  # every copy times its steps at the same time
    for _ in range(warmup):
        trainer.train_step(real)
    began = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(real)
    out.put((time.perf_counter() - began) / steps)


def measure(preset: str, sets: list[str], batch: int, threads: int, copies: int, steps: int, warmup: int):
    """Seconds per step of each of ``copies`` concurrent processes."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(copies), ctx.Queue()
    procs = [
        ctx.Process(target=_time_steps, args=(preset, sets, batch, threads, steps, warmup, start, out))
        for _ in range(copies)
    ]
    for proc in procs:
        proc.start()
    times = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--copies", default="1,2", help="comma-separated numbers of concurrent trainers")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"preset {args.preset}, batch {args.batch}, {cores} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'copies':>6} {'threads':>7} {'threads/core':>12} {'s/step (median)':>15} {'slowest':>8}")
    for copies in (int(c) for c in args.copies.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            times = measure(args.preset, args.set, args.batch, threads, copies, args.steps, args.warmup)
            ratio, median = copies * threads / cores, statistics.median(times)
            print(f"{copies:>6} {threads:>7} {ratio:>12.2f} {median:>15.3f} {max(times):>8.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
