"""What one short run costs around its training steps: whole launches of ``python -m pof3d.train``.

    python benchmarks/launch.py [--rounds 3] [--intervals 2,0.5] [--kimg 0.016] [--batch 4]
                                [--set SECTION.FIELD=VALUE ...] [--alternate SECTION.FIELD=V1,V2,...]

A run of a few steps spends most of its time starting and stopping: Ray Train's controller and worker
group, the data stream, the MLflow run. That fixed cost is what a short study trial, a smoke test or a
test of the suite pays on top of its steps. This script starts one local Ray, makes the synthetic set
with a warm-up launch, then runs ``--rounds`` rounds of one launch per value of ``--intervals`` (Ray
Train's ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, how often its controller looks at the workers; 2 s is
Ray's default, 0.5 s pof3d's), alternating so that every value sees the same machine; or, with
``--alternate``, one launch per value of one config field (at the last interval). Each launch trains a
new run directory (a new MLflow store) with the same small model: by default the micro model of the
end-to-end tests, 4 steps of 4 images on one thread. It prints each launch's wall seconds and the
machine's CPU seconds over it, then the medians. The CPU seconds are every process's but niced ones, so
that a background job at low priority does not count; the script's Ray runs its worker processes at
niceness 0 (``RAY_worker_niceness``, 15 by default) so that theirs do.
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
    parser.add_argument(
        "--alternate", metavar="SECTION.FIELD=V1,V2", help="launches alternate between these values"
    )
    args = parser.parse_args(argv)
    try:
        args.intervals = [float(v) for v in args.intervals.split(",")]
    except ValueError:
        parser.error(f"--intervals {args.intervals!r}: expected seconds separated by commas, e.g. 2,0.5")
    if args.rounds < 1 or any(v <= 0 for v in args.intervals):
        parser.error("--rounds must be >= 1 and every interval > 0")
    args.variants = [(f"{v:g}", v, []) for v in args.intervals]
    if args.alternate:
        field, _, values = args.alternate.partition("=")
        if not field or not values:
            parser.error(f"--alternate {args.alternate!r}: expected SECTION.FIELD=V1,V2,...")
        setting = [f"{field}={v}" for v in values.split(",")]
        args.variants = [(item, args.intervals[-1], [item]) for item in setting]
    return args


def launch(folder: Path, name: str, args: argparse.Namespace, extra: list[str] = ()) -> tuple[float, float]:
    from pof3d.train import main

    sets = [a for item in [*MICRO, *args.set, *extra] for a in ("--set", item)]
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
        os.environ.setdefault("RAY_worker_niceness", "0")  # the workers' CPU seconds count (see above)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            os.environ[HEALTH_CHECK_ENV] = str(args.intervals[-1])
            launch(folder, "warm-up", args)  # makes the synthetic set and the empty MLflow store
            rows: list[tuple[str, int, float, float]] = []
            for r in range(args.rounds):
                for v, (label, interval, extra) in enumerate(args.variants):
                    os.environ[HEALTH_CHECK_ENV] = str(interval)
                    rows.append((label, r, *launch(folder, f"v{v}-r{r}", args, extra)))
        finally:
            ray.shutdown()
    lines = [
        f"{args.kimg * 1000:g} images in steps of {args.batch}, {os.cpu_count()} CPUs, local Ray",
        f"{'alternating' if args.alternate else 'interval s':>20} {'round':>5} {'wall s':>7} {'cpu s':>6}",
    ]
    lines += [f"{label:>20} {r:>5} {wall:>7.1f} {cpu:>6.1f}" for label, r, wall, cpu in rows]
    lines.append("medians")
    for label, _, _ in args.variants:
        mine = [row for row in rows if row[0] == label]
        wall = statistics.median(row[2] for row in mine)
        cpu = statistics.median(row[3] for row in mine)
        lines.append(f"{label:>20} {'':>5} {wall:>7.1f} {cpu:>6.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    lines = run(parse_args(argv))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
