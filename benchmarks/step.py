"""Seconds per training iteration, per phase, images/s and how far each phase is from the machine's peak.

    python benchmarks/step.py [--preset tiny,anchor] [--iters 5] [--warmup 1]
                              [--schedule shared|reference | --compare] [--precision fp32|bf16|fp16|auto]
                              [--device cpu|cuda] [--threads 2] [--set SECTION.FIELD=VALUE ...]
                              [--host-memory retain|default]

Each iteration runs every phase once (G_main, G_density, D_main, D_r1), timed on its own; the table
gives medians over ``--iters`` iterations after ``--warmup`` ones. "iteration, every phase once" is
the sum of the phase medians; "iteration, amortised" weights the lazy regularisers by 1/interval as
training runs them. ``--schedule reference`` times the official code's schedule (a generator
pass, D calls and a backward per term: pof3d/testing/reference_schedule.py) instead of the shared
passes; ``--compare`` runs both interleaved in one process, so that both see the same machine load.

``--precision`` sets ``train.precision``; the default, fp32, also keeps every block in fp32
(``model.num_fp16_res=0``); ``auto`` is the preset's own mixed precision on a GPU (what ``--amp`` did,
which it replaced).

Before timing, the script measures the machine's matrix-product peak in this process (``torch.mm`` of
2048 x 2048 operands, best of 5, at ``--threads`` on CPU) in fp32, bf16 and fp16 (on CUDA also TF32);
on CPU a type the processor has no instructions for is marked emulated and timed on a 256 x 256
product only. It then counts each phase's FLOPs once per preset and schedule: one run of every phase
on a separate trainer built the same way, under ``flops.FlopCounter`` (2 FLOPs per multiply-add of
matrix products and convolutions, R1's second derivative included; see benchmarks/flops.py).
"GFLOP" is one iteration with every phase once, "GFLOP/s" that over the "every phase once" seconds,
"% peak" its share of the peak of the run's precision (fp32 on CUDA: TF32's, since cuDNN runs fp32
convolutions on tensor cores by default). Below the table the same figures per phase; a phase faster
than the peak gets a warning line, since that means the count or the peak is wrong.

Imports only torch and the pof3d model modules (no Ray, MLflow or data pipeline), so that it runs on a
bare GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from flops import PEAK_N, PEAK_REPEATS, FlopCounter, Peak, measure_peaks, peak_for

from pof3d.checkpoint import rng_state, set_rng_state
from pof3d.config import Config
from pof3d.host_memory import is_retaining, restart_retaining
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.testing.reference_schedule import ReferenceSchedule

PHASE_ORDER = ("G_main", "G_density", "D_main", "D_r1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SCHEDULES = ("shared", "reference")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# A phase may seem to beat the measured peak by this much (timer and load noise) before it is flagged.
PEAK_MARGIN = 1.1


def precision_overrides(precision: str) -> list[str]:
    """Config overrides for ``--precision``; fp32 also keeps the preset's fp16 blocks in fp32."""
    overrides = [f"train.precision={precision}"]
    if precision == "fp32":
        overrides.append("model.num_fp16_res=0")
    return overrides


def build(preset: str, schedule: str, device: torch.device, precision: str, overrides: list[str]) -> Trainer:
    cfg: Config = load_config(preset, [*precision_overrides(precision), *overrides])
    trainer = Trainer(cfg, device=device, seed=0)
    if schedule == "reference":
        trainer.loss = ReferenceSchedule(trainer.G, trainer.D, cfg)
    return trainer


def fixed_real_batch(cfg: Config, device: torch.device) -> torch.Tensor:
    """The "real" images every timed iteration trains on: uniform noise in [-1, 1], the same each run."""
    batch, res = cfg.train.batch, cfg.model.image_resolution
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1


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


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's generators as they were (the timed runs draw from them)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def count_flops(
    preset: str, schedule: str, args: argparse.Namespace, real: torch.Tensor
) -> tuple[dict[str, int], set[str]]:
    """FLOPs of each phase run once, and any matrix ops the counter has no rule for.

    The phases run on a trainer of their own, built as the timed ones are (uncompiled: a compiled graph
    runs fused kernels that the counter does not see; the arithmetic is the same), at the images-seen
    count of the first timed iteration, so that D's input blur has the timed runs' width. The timed
    trainers, the generators' states and the CUDA peak-memory figure are untouched.
    """
    device = torch.device(args.device)
    with preserved_rng():
        trainer = build(preset, schedule, device, args.precision, [*args.set, "train.compile=false"])
        trainer.images_seen = args.warmup * real.shape[0]
        flops, uncounted = {}, set()
        for phase in trainer.phases:
            with FlopCounter() as counter:
                trainer.run_phase(phase, real)
            flops[phase.name] = counter.total
            uncounted |= counter.uncounted
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops, uncounted


def rate_lines(rows: list[tuple[str, str, dict[str, float], dict[str, int]]], peak: Peak) -> list[str]:
    """Per phase: GFLOP, median seconds, GFLOP/s and % of ``peak``; warnings for rates above it."""
    lines = [
        f"per phase: GFLOP of one run (counted once), median seconds, GFLOP/s, % of the {peak.precision} "
        f"peak ({peak.gflops:.1f} GFLOP/s)",
        f"{'preset':8} {'schedule':9} {'phase':9} {'GFLOP':>9} {'s':>8} {'GFLOP/s':>9} {'% peak':>7}",
    ]
    warnings = []
    for preset, schedule, med, flops in rows:
        for phase, n in flops.items():
            rate = n / 1e9 / med[phase]
            lines.append(
                f"{preset:8} {schedule:9} {phase:9} {n / 1e9:9.3f} {med[phase]:8.3f} {rate:9.2f} "
                f"{100 * rate / peak.gflops:7.1f}"
            )
            if rate > PEAK_MARGIN * peak.gflops:
                warnings.append(
                    f"warning: {preset} {schedule} {phase} ran at {rate:.1f} GFLOP/s, above the measured "
                    f"{peak.precision} peak of {peak.gflops:.1f}: the FLOP count or the peak is wrong"
                )
    return lines + warnings


def run(args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    schedules = list(SCHEDULES) if args.compare else [args.schedule]
    peaks = measure_peaks(device)
    lines = [
        f"matrix-product peak, GFLOP/s ({PEAK_N} x {PEAK_N} torch.mm, best of {PEAK_REPEATS}"
        + (f", {args.threads} threads): " if device.type == "cpu" else "): ")
        + ", ".join(p.describe() for p in peaks.values())
    ]
    lines.append(
        f"{'preset':8} {'schedule':9} {'G_main':>7} {'G_dens':>7} {'D_main':>7} {'D_r1':>7} {'once s':>7} "
        f"{'img/s':>7} {'amort s':>7} {'img/s':>7} {'cpu s':>7} {'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>6} "
        f"{'G params':>10} {'D params':>10} {'GiB':>6}"
    )
    rate_rows, uncounted = [], set()
    for preset in args.preset.split(","):
        cfg = load_config(preset, [*precision_overrides(args.precision), *args.set])
        batch, real = cfg.train.batch, fixed_real_batch(cfg, device)
        flops = {}
        for s in schedules:
            flops[s], missed = count_flops(preset, s, args, real)
            uncounted |= missed
        trainers = {s: build(preset, s, device, args.precision, args.set) for s in schedules}
        samples: dict[str, list[dict[str, float]]] = {s: [] for s in schedules}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup + args.iters):
            for s in schedules:  # interleaved, so every schedule sees the same load
                times = time_iteration(trainers[s], real)
                if i >= args.warmup:
                    samples[s].append(times)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        peak = peak_for(args.precision, peaks, device)
        for s in schedules:
            t = trainers[s]
            med = summarise(t, samples[s])
            gflop = sum(flops[s].values()) / 1e9
            rate = gflop / med["every_phase_once"]
            lines.append(
                f"{preset:8} {s:9} {med['G_main']:7.3f} "
                f"{med.get('G_density', 0.0):7.3f} {med['D_main']:7.3f} {med.get('D_r1', 0.0):7.3f} "
                f"{med['every_phase_once']:7.3f} {batch / med['every_phase_once']:7.3f} "
                f"{med['amortised']:7.3f} {batch / med['amortised']:7.3f} {med['cpu']:7.2f} "
                f"{gflop:8.2f} {rate:8.2f} {100 * rate / peak.gflops:6.1f} "
                f"{count(t.G):10,d} {count(t.D):10,d} {memory:6.2f}"
            )
            rate_rows.append((preset, s, med, flops[s]))
        del trainers
    lines += rate_lines(rate_rows, peak_for(args.precision, peaks, device))
    if uncounted:
        lines.append(f"note: matrix ops without a FLOP rule, not counted: {', '.join(sorted(uncounted))}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny,anchor", help="comma-separated presets")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--schedule", choices=SCHEDULES, default="shared", help="which loss schedule")
    parser.add_argument("--compare", action="store_true", help="time shared and reference schedules")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="train.precision of the run (fp32 also sets model.num_fp16_res=0; auto: the preset's "
        "mixed precision on a GPU, which --amp selected)",
    )
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
    if args.device == "cpu" and args.host_memory == "retain":
        # glibc reads its tunables at process start: run again with them, as CPU training workers get.
        restart_retaining(__file__, sys.argv[1:] if argv is None else argv)
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if args.device.startswith("cuda")
            else f", {args.threads} threads"
        )
        + f", precision {args.precision}, {args.warmup} warm-up + {args.iters} timed iterations"
        + "; seconds are medians"
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
