"""Does the learned pitch drift to a pole? A fast check of the pose learner's dynamics.

    python studies/synthetic_poses/pitch_drift.py --pitch-output polar --out runs/drift-polar.jsonl

Trains the ``tiny`` preset on the built-in synthetic faces set in this process (no Ray, one thread) with
the pose learner's learning rate multiplied by ``--pose-lr-mult`` (default 100), so that 100 steps move
the pose learner about as far as 10,000 steps at the paper's rate. Every ``--every`` steps it writes the
learned pose distribution of the generator over 2,048 fixed latents, as EG3D's (h, v) in degrees: yaw
and pitch mean and spread, and the fraction of latents whose pitch output lies within 5 degrees of a
pole or past it. Then prints the table. The faces set's truth: yaw 90 +- 20, pitch 90 +- 8.6 degrees.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pof3d.data.shard_reader import load_arrays
from pof3d.data.synthetic import ensure_synthetic
from pof3d.loop import Trainer
from pof3d.presets import load_config

POLE_DEG = 5.0


@torch.no_grad()
def pose_state(trainer: Trainer, z: torch.Tensor) -> dict[str, float]:
    G = trainer.G
    ws = G.map(z)
    raw = G.pose_learner.out(G.pose_learner.hidden(ws[:, 0]))[:, 1] + G.pose_learner.pitch_center
    pose = torch.rad2deg(G.eg3d_pose(G.predict_pose(ws)).double())
    raw_deg = torch.rad2deg(raw.double())
    at_pole = (raw_deg < POLE_DEG) | (raw_deg > 180.0 - POLE_DEG)
    return {
        "yaw_mean": float(pose[:, 0].mean()),
        "yaw_std": float(pose[:, 0].std()),
        "pitch_mean": float(pose[:, 1].mean()),
        "pitch_std": float(pose[:, 1].std()),
        "near_or_past_pole": float(at_pole.double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pitch-output", choices=("polar", "eg3d"), default="polar")
    p.add_argument("--pose-lr-mult", type=float, default=100.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000, help="synthetic faces images (64 px)")
    p.add_argument("--cache", default="~/.cache/pof3d", help="where the synthetic set is kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per evaluation")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = load_config("tiny")
    cfg = load_config(
        "tiny",
        [
            "train.batch=8",
            f"model.pitch_output={args.pitch_output}",
            f"optim.pose_lr={base.optim.pose_lr * args.pose_lr_mult}",
            *args.overrides,
        ],
    )
    data = load_arrays(str(ensure_synthetic(args.cache, args.images, 64, "faces", 0)))
    real = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    trainer = Trainer(cfg, seed=args.seed)
    z = torch.randn(2048, cfg.model.z_dim, generator=torch.Generator().manual_seed(123))
    rng = np.random.default_rng(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    with args.out.open("w") as log:
        for step in range(args.steps + 1):
            if step % args.every == 0 or step == args.steps:
                row = {"step": step, "kimg": trainer.images_seen / 1000, **pose_state(trainer, z)}
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
            if step < args.steps:
                trainer.train_step(real[rng.integers(0, len(real), cfg.train.batch)])
    print(f"pitch output {args.pitch_output}, pose lr x{args.pose_lr_mult:g}, seed {args.seed}")
    print("| step | kimg | yaw mean | yaw std | pitch mean | pitch std | near/past a pole |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['kimg']:.2f} | {r['yaw_mean']:.1f} | {r['yaw_std']:.1f} | "
            f"{r['pitch_mean']:.1f} | {r['pitch_std']:.1f} | {100 * r['near_or_past_pole']:.1f} % |"
        )
    return 0 if all(math.isfinite(r["pitch_mean"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
