"""Seconds per training iteration, per phase and images/s at a preset (default: tiny and anchor).

    python benchmarks/step.py [--preset tiny,anchor] [--iters 5] [--warmup 1]
                              [--schedule shared|reference | --compare]
                              [--device cpu|cuda] [--amp] [--threads 2] [--set SECTION.FIELD=VALUE ...]
                              [--host-memory retain|default]

Each iteration runs every phase once (G_main, G_density, D_main, D_r1), timed on its own; the table
gives medians over ``--iters`` iterations after ``--warmup`` ones. "iteration, every phase once" is
the sum of the phase medians; "iteration, amortised" weights the lazy regularisers by 1/interval as
training runs them. ``--schedule reference`` times the official code's schedule (a generator
pass, D calls and a backward per term: pof3d/testing/reference_schedule.py) instead of the shared
passes; ``--compare`` runs both interleaved in one process, so that both see the same machine load.

Imports only torch and the pof3d model modules (no Ray, MLflow or data pipeline), so that it runs on a
bare GPU machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pof3d.config import Config, load_config
from pof3d.host_memory import is_retaining, retaining_env
from pof3d.loop import Trainer
from pof3d.testing.reference_schedule import ReferenceSchedule

PHASE_ORDER = ("G_main", "G_density", "D_main", "D_r1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SCHEDULES = ("shared", "reference")


def build(preset: str, schedule: str, device: torch.device, amp: bool, overrides: list[str]) -> Trainer:
    cfg: Config = load_config(preset, overrides)
    if not amp:
        cfg.model.num_fp16_res = 0
    trainer = Trainer(cfg, device=device, seed=0)
    if schedule == "reference":
        trainer.loss = ReferenceSchedule(trainer.G, trainer.D, cfg)
    return trainer


def time_iteration(trainer: Trainer, real: torch.Tensor) -> dict[str, float]:
    """Run every phase once, each timed on its own (counters advance as in training).

    Also records the process CPU seconds of the whole iteration: on a shared machine wall-clock time
    depends on other users' load, CPU time much less so.
    """
    times: dict[str, float] = {}
    cpu = time.process_time()
    for phase in trainer.phases:
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.run_phase(phase, real)
        _sync(trainer.device)
        times[phase.name] = time.perf_counter() - start
    times["cpu"] = time.process_time() - cpu
    trainer.images_seen += real.shape[0]
    trainer.step += 1
    return times


def summarise(trainer: Trainer, samples: list[dict[str, float]]) -> dict[str, float]:
    med = {name: statistics.median(s[name] for s in samples) for name in samples[0]}
    intervals = {p.name: p.interval for p in trainer.phases}
    med["every_phase_once"] = sum(med[n] for n in intervals)
    med["amortised"] = sum(med[n] / intervals[n] for n in intervals)
    return med


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    schedules = list(SCHEDULES) if args.compare else [args.schedule]
    lines = []
    lines.append(
        f"{'preset':8} {'schedule':9} {'G_main':>7} {'G_dens':>7} {'D_main':>7} {'D_r1':>7} {'once s':>7} "
        f"{'img/s':>7} {'amort s':>7} {'img/s':>7} {'cpu s':>7} {'G params':>10} {'D params':>10} {'GiB':>6}"
    )
    for preset in args.preset.split(","):
        trainers = {s: build(preset, s, device, args.amp, args.set) for s in schedules}
        batch = trainers[schedules[0]].cfg.train.batch
        res = trainers[schedules[0]].cfg.model.image_resolution
        real = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        samples: dict[str, list[dict[str, float]]] = {s: [] for s in schedules}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup + args.iters):
            for s in schedules:  # interleaved, so every schedule sees the same load
                times = time_iteration(trainers[s], real)
                if i >= args.warmup:
                    samples[s].append(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        for s in schedules:
            t = trainers[s]
            med = summarise(t, samples[s])
            lines.append(
                f"{preset:8} {s:9} {med['G_main']:7.3f} "
                f"{med.get('G_density', 0.0):7.3f} {med['D_main']:7.3f} {med.get('D_r1', 0.0):7.3f} "
                f"{med['every_phase_once']:7.3f} {batch / med['every_phase_once']:7.3f} "
                f"{med['amortised']:7.3f} {batch / med['amortised']:7.3f} {med['cpu']:7.2f} "
                f"{count(t.G):10,d} {count(t.D):10,d} {peak:6.2f}"
            )
        del trainers
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny,anchor", help="comma-separated presets")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--schedule", choices=SCHEDULES, default="shared", help="which loss schedule")
    parser.add_argument("--compare", action="store_true", help="time shared and reference schedules")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision as the preset's num_fp16_res")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument(
        "--host-memory",
        choices=("retain", "default"),
        default="retain",
        help="CPU: keep freed memory in the process as training workers do (pof3d/host_memory.py), "
        "or glibc's default of unmapping large blocks",
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and args.host_memory == "retain" and not is_retaining():
        # glibc reads its tunables at process start: run again with them, as CPU training workers do.
        args_again = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, __file__, *args_again], {**os.environ, **retaining_env()})
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if args.device.startswith("cuda")
            else f", {args.threads} threads"
        )
        + f", amp {args.amp}, {args.warmup} warm-up + {args.iters} timed iterations; seconds are medians"
        + (f"; host memory {'retained' if is_retaining() else 'default'}" if args.device == "cpu" else "")
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for line in run(args):
        print(line, flush=True)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine load average (1 min) at start {load:.1f}, at end {end_load:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
