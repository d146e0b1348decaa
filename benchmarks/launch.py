"""What one short run costs around its training steps: whole launches of ``python -m pof3d.train``.

    python benchmarks/launch.py [--rounds 3] [--intervals 2,0.5] [--kimg 0.016] [--batch 4]
                                [--set SECTION.FIELD=VALUE ...]

A run of a few steps spends most of its time starting and stopping: Ray Train's controller and worker
group, the data stream, the MLflow run. That fixed cost is what a short study trial, a smoke test or a
test of the suite pays on top of its steps. This script starts one local Ray, makes the synthetic set
with a warm-up launch, then runs ``--rounds`` rounds of one launch per value of ``--intervals`` (Ray
Train's ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, how often its controller looks at the workers; 2 s is
Ray's default, 0.5 s pof3d's), alternating so that every value sees the same machine. Each launch
trains a new run directory (a new MLflow store) with the same small model: by default the micro model
of the end-to-end tests, 4 steps of 4 images on one thread. It prints each launch's wall seconds and
the machine's CPU seconds over it (all processes, niced ones left out), then the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pof3d.distributed.launcher import HEALTH_CHECK_ENV
from pof3d.testing.micro import MICRO


def busy_cpu_s() -> float:
    """CPU seconds the machine has spent so far in user, system and interrupt time; niced time is left
    out, so a background job at low priority does not count."""
    with open("/proc/stat") as f:
        user, _nice, system, _idle, _iowait, irq, softirq, *_ = (int(v) for v in f.readline().split()[1:])
    return (user + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="launches per interval")
    parser.add_argument("--intervals", default="2,0.5", help="controller intervals (s), comma-separated")
    parser.add_argument("--kimg", type=float, default=0.016)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    try:
        args.intervals = [float(v) for v in args.intervals.split(",")]
    except ValueError:
        parser.error(f"--intervals {args.intervals!r}: expected seconds separated by commas, e.g. 2,0.5")
    if args.rounds < 1 or any(v <= 0 for v in args.intervals):
        parser.error("--rounds must be >= 1 and every interval > 0")
    return args


def launch(folder: Path, name: str, args: argparse.Namespace) -> tuple[float, float]:
    from pof3d.train import main

    sets = [a for item in [*MICRO, *args.set] for a in ("--set", item)]
    command = ["--kimg", str(args.kimg), "--batch", str(args.batch), "--run-dir", str(folder / name), *sets]
    cpu, wall = busy_cpu_s(), time.monotonic()
    if main(command) != 0:
        raise SystemExit(f"launch {name} failed; its run directory: {folder / name}")
    return time.monotonic() - wall, busy_cpu_s() - cpu


def run(args: argparse.Namespace) -> list[str]:
    import ray

    with tempfile.TemporaryDirectory(prefix="pof3d-launch-") as scratch:
        folder = Path(scratch)
        os.environ.setdefault("POF3D_CACHE", str(folder / "cache"))  # the set and MLflow's empty store
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            os.environ[HEALTH_CHECK_ENV] = str(args.intervals[-1])
            launch(folder, "warm-up", args)  # makes the synthetic set and the empty MLflow store
            rows: list[tuple[float, int, float, float]] = []
            for r in range(args.rounds):
                for interval in args.intervals:
                    os.environ[HEALTH_CHECK_ENV] = str(interval)
                    rows.append((interval, r, *launch(folder, f"i{interval:g}-r{r}", args)))
        finally:
            ray.shutdown()
    lines = [
        f"{args.kimg * 1000:g} images in steps of {args.batch}, {os.cpu_count()} CPUs, local Ray",
        f"{'interval s':>10} {'round':>5} {'wall s':>7} {'cpu s':>6}",
    ]
    lines += [f"{i:>10g} {r:>5} {wall:>7.1f} {cpu:>6.1f}" for i, r, wall, cpu in rows]
    lines.append("medians")
    for interval in args.intervals:
        mine = [row for row in rows if row[0] == interval]
        wall = statistics.median(row[2] for row in mine)
        cpu = statistics.median(row[3] for row in mine)
        lines.append(f"{interval:>10g} {'':>5} {wall:>7.1f} {cpu:>6.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    lines = run(parse_args(argv))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
