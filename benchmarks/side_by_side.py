"""Two checkouts' step benchmarks at the same moment: one thread each, each on a core of its own.

    python benchmarks/side_by_side.py BEFORE_DIR AFTER_DIR [--rounds 4] [--cores 0,1] \
        -- --preset anchor --iters 3 --warmup 1 --set loss.blur_init_sigma=0

Each round runs ``benchmarks/step.py`` of both checkouts at once (each with its own ``pof3d``: the
checkout is the working directory and ``PYTHONPATH``), pinned to one core each, one thread each; the cores
and which side starts first are swapped every round, so that either difference counts against each side
equally (use an even number of rounds).
Prints both sides' seconds per phase and per iteration, round by round, with the ratio after / before, and
the median ratio over the rounds.

Why: on the shared 2-core cloud machines this project is measured on, the speed of the same code drifts by
10 % and more from one minute to the next (docs/training-step.md), so two runs one after the other cannot
resolve a change of a few percent. Run at once, both sides see the same drift. One thread each is what
two cores allow; a change whose gain depends on the thread count is measured with ``step.py`` directly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Columns of step.py's result row (its table prints 17 per preset and schedule).
COLUMNS = ("G_main", "G_dens", "D_main", "D_r1", "once s", "img/s", "amort s")
ROW_FIELDS = 17
SHOWN = ("G_main", "G_dens", "D_main", "D_r1", "once s", "amort s")


def parse_rows(out: str) -> dict[tuple[str, str], dict[str, float]]:
    """step.py's result rows: (preset, schedule) -> seconds per phase, per iteration and images/s."""
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == ROW_FIELDS and fields[1] in ("shared", "reference"):
            rows[(fields[0], fields[1])] = dict(zip(COLUMNS, map(float, fields[2:9]), strict=True))
    return rows


def run_pair(checkouts: list[Path], cores: list[int], step_args: list[str], first: int = 0) -> list[str]:
    """Both checkouts' step.py at once, checkout i on ``cores[i]``, checkout ``first`` started first;
    their outputs in the order of ``checkouts``."""
    procs = {}
    for i in (first, 1 - first):
        checkout, core = checkouts[i], cores[i]
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
        procs[i] = subprocess.Popen(
            [sys.executable, str(checkout / "benchmarks" / "step.py"), "--threads", "1", *step_args],
            cwd=checkout,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
        )
    outs = [procs[i].communicate()[0] for i in (0, 1)]
    for checkout, proc, out in zip(checkouts, [procs[0], procs[1]], outs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"step.py of {checkout} exited {proc.returncode}:\n{out[-3000:]}")
    return outs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="checkout of the code before the change")
    parser.add_argument("after", type=Path, help="checkout of the code after it")
    parser.add_argument("--rounds", type=int, default=4, help="runs of both at once (cores swapped each)")
    parser.add_argument("--cores", default="0,1", help="the two cores to pin to, e.g. 0,1")
    parser.epilog = "Arguments after -- go to step.py (default: --preset anchor)."
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.step_args = argv[split + 1 :] or ["--preset", "anchor"]
    for name in ("before", "after"):
        checkout = getattr(args, name).resolve()
        if not (checkout / "benchmarks" / "step.py").is_file() or not (checkout / "pof3d").is_dir():
            parser.error(f"{name}={checkout}: expected a pof3d checkout (with pof3d/ and benchmarks/step.py)")
        setattr(args, name, checkout)
    try:
        args.cores = [int(c) for c in args.cores.split(",")]
    except ValueError:
        parser.error(f"--cores {args.cores!r}: expected two core numbers, e.g. 0,1")
    allowed = os.sched_getaffinity(0)
    if len(args.cores) != 2 or args.cores[0] == args.cores[1] or not set(args.cores) <= allowed:
        parser.error(f"--cores {args.cores}: expected two different cores of {sorted(allowed)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if "--threads" in args.step_args or "--compare" in args.step_args:
        parser.error("step.py's --threads and --compare are set here (one thread, one schedule per side)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkouts = [args.before, args.after]
    print(f"before: {args.before}\nafter:  {args.after}\nstep.py {' '.join(args.step_args)}, 1 thread each")
    ratios: dict[tuple[str, str], dict[str, list[float]]] = {}
    header = f"{'round':>5} {'preset':8} {'side':6} {'core':>4} " + " ".join(f"{c:>8}" for c in SHOWN)
    print(header)
    for r in range(args.rounds):
        # Odd rounds swap the cores and which side starts first: with the same code on both sides
        # (2026-12-07, anchor, two rounds), the side started second was 0.8-4 % faster on either core.
        cores = args.cores if r % 2 == 0 else args.cores[::-1]
        before, after = (parse_rows(out) for out in run_pair(checkouts, cores, args.step_args, first=r % 2))
        if not before or before.keys() != after.keys():
            raise RuntimeError(f"step.py's rows differ or are missing: {sorted(before)} / {sorted(after)}")
        for key in before:
            for side, figures, core in (("before", before[key], cores[0]), ("after", after[key], cores[1])):
                cells = " ".join(f"{figures[c]:8.3f}" for c in SHOWN)
                print(f"{r + 1:5d} {key[0]:8} {side:6} {core:4d} {cells}")
            ratio = {c: after[key][c] / before[key][c] for c in SHOWN}  # step.py's seconds are never 0
            print(f"{r + 1:5d} {key[0]:8} {'ratio':6} {'':>4} " + " ".join(f"{ratio[c]:8.3f}" for c in SHOWN))
            for c, v in ratio.items():
                ratios.setdefault(key, {}).setdefault(c, []).append(v)
    print("median ratio after / before over the rounds (below 1: the after side is faster)")
    for key, by_column in ratios.items():
        cells = " ".join(f"{statistics.median(by_column[c]):8.3f}" for c in SHOWN)
        print(f"{'':5} {key[0]:8} {'median':6} {'':>4} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
