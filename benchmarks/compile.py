"""What ``train.compile`` costs once and gains per step, and when it pays back: eager against compiled.

    python benchmarks/compile.py [--preset tiny,anchor] [--iters 16] [--threads 2] [--batch N]
                                 [--set SECTION.FIELD=VALUE ...]

Per preset, three processes one after the other, each training steps of the same trainer (the whole
``Trainer.train_step``, phases on their intervals, the same fixed batch):

- **eager**: ``train.compile=false``; its first step, then the mean of ``--iters`` steps after it;
- **compiled, empty cache**: ``train.compile=true`` with inductor's cache in a new empty folder: the
  first step pays the whole compilation;
- **compiled, warm cache**: the same again with that folder, as a restarted or resumed run on the same
  node finds it (pof3d/compile_cache.py): the first step loads the graphs.

A step's time is the mean over ``--iters`` steps (16 covers one round of the lazy regularisers at their
default intervals). "one-off" is a first step's excess over the steady step; "pays back after" is the
one-off cost over the gain per step (compiled faster than eager), or "never" when the compiled step is
not faster. Every process sets ``--threads`` torch threads; nothing else should run on the machine
(the load average is printed at the start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child-json"


def child(preset: str, compile_: bool, iters: int, threads: int, overrides: list[str], out: Path) -> None:
    """In a process of its own (compiled graphs and inductor's counters last as long as the process)."""
    import torch
    from step import fixed_real_batch  # benchmarks/step.py: the same batch every benchmark trains on

    from pof3d.compile_cache import CompiledGraphs
    from pof3d.loop import Trainer
    from pof3d.presets import load_config

    torch.set_num_threads(threads)
    cfg = load_config(preset, [*overrides, f"train.compile={str(compile_).lower()}"])
    trainer = Trainer(cfg, device="cpu", seed=0)
    real, batch = fixed_real_batch(cfg, torch.device("cpu")), cfg.train.batch
    times = []
    for _ in range(iters + 1):
        started = time.perf_counter()
        trainer.train_step(real)
        times.append(time.perf_counter() - started)
    graphs = CompiledGraphs.so_far()
    result = {"first_s": times[0], "step_s": statistics.mean(times[1:]), "batch": batch}
    out.write_text(json.dumps(result | {"graphs_new": graphs.new, "graphs_cached": graphs.cached}))


def run_child(args: argparse.Namespace, preset: str, compile_: bool, cache: Path, scratch: Path) -> dict:
    from pof3d.host_memory import retaining_env

    out = scratch / f"{preset}-{compile_}-{time.monotonic_ns()}.json"
    # As a training worker runs: freed memory kept in the process (pof3d/host_memory.py).
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), **retaining_env())
    overrides = [*args.set, *([f"train.batch={args.batch}"] if args.batch else [])]
    command = [sys.executable, __file__, CHILD, str(out), "--preset", preset, "--iters", str(args.iters)]
    command += ["--threads", str(args.threads), *[a for s in overrides for a in ("--set", s)]]
    if compile_:
        command.append("--compile")
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def pays_back(one_off: float, eager_s: float, compiled_s: float) -> str:
    gain = eager_s - compiled_s
    return f"{one_off / gain:.0f} steps" if gain > 0 else "never"


def rows(args: argparse.Namespace, preset: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="pof3d-compile-bench-") as scratch:
        cache = Path(scratch) / "inductor"
        eager = run_child(args, preset, False, cache, Path(scratch))
        cold = run_child(args, preset, True, cache, Path(scratch))
        warm = run_child(args, preset, True, cache, Path(scratch))
    lines = []
    for name, r in (("eager", eager), ("compiled, empty cache", cold), ("compiled, warm cache", warm)):
        one_off = r["first_s"] - r["step_s"]
        back = "" if name == "eager" else pays_back(one_off, eager["step_s"], r["step_s"])
        graphs = "" if name == "eager" else f"{r['graphs_new']} / {r['graphs_cached']}"
        lines.append(
            f"| {preset} | {name} | {r['first_s']:.2f} | {r['step_s']:.3f} | {r['batch'] / r['step_s']:.1f} "
            f"| {one_off:.1f} | {graphs} | {back} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny,anchor", help="comma-separated presets")
    parser.add_argument("--iters", type=int, default=16, help="steps after the first (mean)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch", type=int, default=0, help="train.batch (0: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument(CHILD, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.threads < 1:
        parser.error(f"--iters and --threads must be >= 1, got {args.iters} and {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_json is not None:
        child(args.preset, args.compile, args.iters, args.threads, args.set, args.child_json)
        return 0
    import torch

    print(
        f"torch {torch.__version__}, CPU, {args.threads} threads, mean of {args.iters} steps after the first"
    )
    print(f"machine load average (1 min) at start {os.getloadavg()[0]:.1f}")
    columns = ["preset", "step", "first step (s)", "step (s)", "img/s", "one-off (s)", "graphs new / cached"]
    print("| " + " | ".join([*columns, "pays back after"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.preset.split(","):
        for line in rows(args, preset):
            print(line, flush=True)
    print(f"machine load average (1 min) at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
