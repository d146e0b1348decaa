"""Restart cost of one resize of an elastic run, at ``tiny`` and ``anchor``, with the run on an S3 server.

    python benchmarks/resize.py [--presets tiny,anchor] [--gpus-per-worker 1] [--steps-per-snapshot 2]
                                [--grow-only] [--json FILE]

For each preset: a real elastic run (``python -m pof3d.train --workers 1-2``, its library form) on a Ray
cluster of nodes on this machine (pof3d/testing/local_cluster.py: a head without CPUs, worker nodes of
one worker each), its run directory on moto's S3 server (in a child process, as benchmarks/checkpoint.py
runs it). It starts on one node. After its first checkpoint a second node joins, and the group grows at
the next look (``train.resize_interval_s=1``); once the grown group has a tick and a checkpoint, the
second node is removed (its processes killed), and the group shrinks; after the shrunk group's first tick
the notice a scheduler's SIGTERM writes (pof3d/distributed/preemption.py) stops the run with a
checkpoint. ``--grow-only`` stops it after the grown group's first tick.

Each restart's figures are those rank 0 of the new group records (``group/*`` in ``metrics.jsonl``,
pof3d/distributed/elastic.py), from the moment Ray Train's controller stopped (or lost) the old group:
"group start" (the old group's shutdown, the placement group, the worker processes, the process group
and the data iterators), "model + checkpoint" (the model built, the checkpoint downloaded and loaded),
"first batch" (the data stream's start), "first step", and "redone", the images the old group had
trained past the checkpoint it restarted from (its last tick; they are trained again).

Checkpoint save on the way down: before Ray Train stops a healthy group for a resize (the grow), the
run's controller callback asks it for a checkpoint after its step in progress and waits for it
(``group/save_s``: from the request to the complete checkpoint in storage, a step and a save); the grown
group resumes from it. A killed node (the shrink here) cannot save: that restart loses the work since the
last snapshot (``redone``), as a preemption without notice does. "checkpoint save" is one save alone,
timed as a worker makes it (``save_checkpoint`` to a local folder, then the files' upload to the S3
server) on the preset's state: what a preemption notice costs.

On CPU, nodes have 1 CPU and workers 0.75; with ``--gpus-per-worker 1`` each node has one GPU (two nodes
on a one-GPU machine share it) and 2 CPUs. The machine's other load enters every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from checkpoint import BUCKET, build_state, persist, start_s3, time_once  # benchmarks/checkpoint.py

from pof3d.checkpoint import STATE_FILE, read_progress, save_checkpoint
from pof3d.distributed.preemption import write_notice
from pof3d.presets import load_config
from pof3d.run_files import RunFiles, read_metrics_log
from pof3d.storage import Location
from pof3d.testing.local_cluster import (
    add_node,
    start_cluster,
    start_quick_coordinator,
    stop_cluster,
    wait_during,
)
from pof3d.train import main

COLUMNS = ("group/start_s", "group/resume_s", "group/first_batch_s", "group/first_step_s", "group/restart_s")


def _wait(what: str, ready, training: threading.Thread) -> Any:
    return wait_during(training, what, ready, 3600.0)


def resize_run(
    preset: str, work: Path, gpus: float, steps_per_snapshot: int, grow_only: bool = False
) -> list[dict[str, Any]]:
    """One elastic run that grows and shrinks once (or only grows); the ticks that recorded a restart."""
    files = RunFiles(Location.parse(f"s3://{BUCKET}/{preset}-resize-{int(time.time())}"))
    batch = load_config(preset).train.batch
    every = f"{steps_per_snapshot * batch / 1000:g}"
    node = {"num_cpus": 2, "num_gpus": 1} if gpus else {"num_cpus": 1}
    sets = [
        f"train.tick_kimg={every}",
        f"train.snapshot_kimg={every}",
        "train.eval_kimg=0",
        "train.resize_interval_s=1",
        "data.synthetic_n=1024",  # a small set to generate; the stream's start does not depend on its size
        f"train.gpus_per_worker={gpus:g}",
        f"train.cpus_per_worker={1 if gpus else 0.75}",
    ]
    cluster = start_cluster()
    nodes = [add_node(cluster, **node)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    start_quick_coordinator()

    def ticks_with(**match: float) -> list[dict[str, Any]]:
        return [t for t in read_metrics_log(files.metrics) if all(t.get(k) == v for k, v in match.items())]

    def checkpoint_images() -> int:
        latest = files.latest_checkpoint()
        return int(read_progress(latest)["images_seen"]) if latest is not None else 0

    def drive() -> None:  # in the main thread: Ray starts a node only there (it installs a signal handler)
        _wait("the first checkpoint", checkpoint_images, training)
        nodes.append(add_node(cluster, **node))
        (grown,) = _wait(
            "the grown group's tick", lambda: ticks_with(**{"group/previous_workers": 1.0}), training
        )
        if grow_only:
            return
        # Its checkpoint too: a restart from an older one would drop the tick, and its figures, again.
        _wait("the grown group's checkpoint", lambda: checkpoint_images() >= grown["images_seen"], training)
        cluster.remove_node(nodes.pop(), allow_graceful=False)
        _wait(
            "the shrunk group's first tick", lambda: ticks_with(**{"group/previous_workers": 2.0}), training
        )

    args = ["--preset", preset, "--kimg", "1000", "--workers", "1-2", "--run-dir", files.root.uri]
    args += ["--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}", "--address", cluster.address]
    codes: list[int] = []
    training = threading.Thread(
        target=lambda: codes.append(main([*args, *[a for s in sets for a in ("--set", s)]])), daemon=True
    )
    try:
        training.start()
        try:
            drive()
        finally:
            write_notice(files, "benchmarks/resize.py")  # stop the run: the figures are in
            training.join()
    finally:
        stop_cluster(cluster)
    code = codes[0] if codes else 1
    if code != 0:
        raise RuntimeError(f"the {preset} run ended with exit code {code}")
    return [t for t in read_metrics_log(files.metrics) if "group/previous_workers" in t]


def checkpoint_save(preset: str, s3, work: Path) -> tuple[float, float]:
    """Seconds of one checkpoint save (local write, then upload to the S3 server), and its MB."""
    trainer, state = build_state(preset)
    local = work / "checkpoint"
    write = time_once(lambda: save_checkpoint(local, state, trainer.cfg, {"images_seen": 0, "step": 0}))
    upload = time_once(lambda: persist(local, f"{BUCKET}/{preset}-save/checkpoint", s3))
    return write + upload, (local / STATE_FILE).stat().st_size / 2**20


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | restart | group start s | model + checkpoint s | first batch s | first step s | "
        "stop to first step s | redone images | save on the way down s | checkpoint MB | checkpoint save s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        figures = " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
        saved = f"{r['group/save_s']:.1f}" if "group/save_s" in r else "none (killed)"
        lines.append(
            f"| {r['preset']} | {r['restart']} | {figures} | {r['group/redone_images']:.0f} | {saved} | "
            f"{r['mb']:.0f} | {r['save_s']:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    server, s3 = start_s3()
    rows = []
    try:
        for preset in args.presets.split(","):
            with tempfile.TemporaryDirectory(prefix="pof3d-resize-bench-") as tmp:
                work = Path(tmp)
                os.environ["POF3D_CACHE"] = str(work / "cache")
                save_s, mb = checkpoint_save(preset, s3, work)
                ticks = resize_run(
                    preset, work, args.gpus_per_worker, args.steps_per_snapshot, args.grow_only
                )
                for tick in ticks:
                    was, now = int(tick["group/previous_workers"]), int(tick["world_size"])
                    kind = "grow" if now > was else "shrink" if now < was else "restart"
                    rows.append(
                        {
                            **tick,
                            "preset": preset,
                            "restart": f"{kind} {was}->{now}",
                            "mb": mb,
                            "save_s": save_s,
                        }
                    )
    finally:
        server.terminate()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,anchor", help="comma-separated presets (tiny,anchor)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="1 on a GPU machine (0: CPU)")
    p.add_argument("--steps-per-snapshot", type=int, default=2, help="steps between checkpoints (and ticks)")
    p.add_argument("--grow-only", action="store_true", help="stop after the grow (a shorter smoke run)")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    arguments = parse_args()
    results = run(arguments)
    print(table(results))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2))
    sys.exit(0)
