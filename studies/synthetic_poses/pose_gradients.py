"""Which loss terms move the pose learner, and which way? Read from training checkpoints.

    python studies/synthetic_poses/pose_gradients.py runs/long-faithful/checkpoints/checkpoint-kimg*

For each checkpoint (the training G, not the EMA) and ``--batches`` fresh latent batches: the norm of
the gradient that each G term sends to the pose learner's weights, the mean gradient on the learned
pitch and yaw (per degree; negative means a gradient step raises the angle), and how each term pulls on
the spread of each angle: d loss / d log(spread), the change of the loss when every sample's deviation
from the batch mean grows by a factor (1 + eps), per eps (positive means a gradient step narrows the
spread; the batch-mean pulls above cancel between samples on either side of the mean, this does not).
How strongly the renders depend on each angle bounds all of these: the mean absolute change of the
neural-resolution image (values in [-1, 1]) per degree of yaw and of pitch, by central differences of
5 degrees about the learned poses, is printed per checkpoint, and for the data's own renders (the
synthetic set's objects at its true poses, at the same resolution) above the table.
Terms: the adversarial
loss, the mirrored-camera loss for each mirror (each weighted by its probability, one half, as the
coin per batch makes it in expectation) and the pose regulariser. Also D's pose error on those fakes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pof3d.camera import angular_error, mirror_pose
from pof3d.checkpoint import load_checkpoint
from pof3d.config import Config
from pof3d.data.synthetic_scene import make_instance, render, sample_poses
from pof3d.discriminator import Discriminator
from pof3d.generator import Generator
from pof3d.loss import PoF3DLoss


def spread_pull(grad: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """d loss / d eps per column at eps = 0, where every angle becomes mean + (1 + eps) * (angle - mean):
    the chain rule over the samples, given the loss's gradient ``grad`` [B, 2] at ``angles`` [B, 2]."""
    return (grad * (angles - angles.mean(dim=0))).sum(dim=0)


VIEW_STEP_DEG = 5.0


def view_sensitivity(G: Generator, n: int = 16) -> dict[str, float]:
    """Mean |image change| per degree of yaw and of pitch of G's renders about its own learned poses."""
    step = math.radians(VIEW_STEP_DEG)
    with torch.no_grad():
        ws = G.map(torch.randn(n, G.cfg.z_dim))
        pose, planes = G.predict_pose(ws), G.synthesize_planes(ws, noise_mode="const")
        out = {}
        for axis, name in ((0, "yaw"), (1, "pitch")):
            delta = torch.zeros(2)
            delta[axis] = step
            up = G.render(planes, ws, pose + delta, noise_mode="const")["image_raw"]
            down = G.render(planes, ws, pose - delta, noise_mode="const")["image_raw"]
            out[f"image change per deg of {name}"] = float((up - down).abs().mean()) / (2 * VIEW_STEP_DEG)
    return out


def data_view_sensitivity(cfg: Config, n: int = 16) -> dict[str, float]:
    """The same for the synthetic set's own renders (its objects at its true poses), on [-1, 1]."""
    kind, resolution = cfg.data.synthetic_poses, cfg.model.neural_resolution
    poses = sample_poses(kind, n, np.random.default_rng(0))
    out = {}
    for axis, name in ((0, "yaw"), (1, "pitch")):
        delta = np.zeros(2)
        delta[axis] = math.radians(VIEW_STEP_DEG)
        change = 0.0
        for i, pose in enumerate(poses):
            instance = make_instance(kind, 0, i)
            up = render(instance, pose + delta, resolution, kind)[0].astype(np.float64) / 127.5
            down = render(instance, pose - delta, resolution, kind)[0].astype(np.float64) / 127.5
            change += float(np.abs(up - down).mean())
        out[f"image change per deg of {name}"] = change / n / (2 * VIEW_STEP_DEG)
    return out


def pose_gradients(
    G: Generator, D: Discriminator, cfg: Config, images_seen: int, batches: int = 8, batch: int = 8
) -> dict[str, float]:
    """Mean over ``batches`` of each term's pose-learner gradient norm and pitch/yaw gradients."""
    loss = PoF3DLoss(G, D, cfg, noise_mode="const")
    sigma = loss.blur_sigma(images_seen)
    params = list(G.pose_learner.parameters())
    sums: dict[str, float] = {}
    for _ in range(batches):
        z = loss.latents(batch, next(G.parameters()).device)
        ws = G.map(z)
        pose = G.predict_pose(ws)
        planes = G.synthesize_planes(ws, noise_mode="const")
        fake = G.render(planes, ws, pose, noise_mode="const")
        logits, pred = loss.run_D(fake["image"], fake["image_raw"], sigma, pose_grad=False)
        terms = {"adversarial": (F.softplus(-logits).mean(), pose)}
        if loss.symmetry_on:
            axes = ["left_right"] if cfg.loss.symmetry_mode == "left_right" else ["left_right", "up_down"]
            for axis in axes:
                mirrored = mirror_pose(pose, axis, cars=cfg.loss.symmetry_mode == "flip_both_cars")
                flipped = G.render(planes, ws, mirrored, noise_mode="const")
                flip_logits, _ = loss.run_D(flipped["image"], flipped["image_raw"], sigma, pose_grad=False)
                weight = cfg.loss.symmetry_weight / len(axes)
                terms[f"mirror {axis}"] = (weight * F.softplus(-flip_logits).mean(), pose)
        if loss.pose_gd_on and pred is not None:
            own = G.predict_pose(ws.detach())
            # The regulariser acts on the learner's own pass from the detached w: its pitch is ``own``.
            terms["pose regulariser"] = (cfg.loss.pose_gd_weight * F.mse_loss(own, pred.detach()), own)
            error = angular_error(pred.detach(), pose.detach(), cfg.model.pitch_output)
            sums["D pose error on fakes (deg)"] = sums.get("D pose error on fakes (deg)", 0.0) + float(
                torch.rad2deg(error).mean()
            )
        for name, (term, angles) in terms.items():
            grads = torch.autograd.grad(term, [*params, angles], retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.square().sum() for g in grads[:-1] if g is not None), torch.zeros(())))
            on_pose = grads[-1] if grads[-1] is not None else torch.zeros_like(angles)
            per_degree = on_pose.mean(dim=0) * math.pi / 180
            pull = spread_pull(on_pose, angles.detach())
            for key, value in (
                (f"{name}: ‖grad‖ on pose learner", float(norm)),
                (f"{name}: d/d pitch (per deg)", float(per_degree[1])),
                (f"{name}: d/d yaw (per deg)", float(per_degree[0])),
                (f"{name}: d/d log pitch spread", float(pull[1])),
                (f"{name}: d/d log yaw spread", float(pull[0])),
            ):
                sums[key] = sums.get(key, 0.0) + value
    return {k: v / batches for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for path in args.checkpoints:
        cfg, state, progress = load_checkpoint(path, map_location="cpu")
        G, D = Generator(cfg.model).eval(), Discriminator(cfg.model).eval()
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        torch.manual_seed(args.seed)
        seen = int(progress.get("images_seen", 0))
        rows.append((seen / 1000, {**view_sensitivity(G), **pose_gradients(G, D, cfg, seen, args.batches)}))
    truth = data_view_sensitivity(cfg)
    print("the data's own renders: " + ", ".join(f"{k} {v:.3g}" for k, v in truth.items()) + "\n")
    keys = list(rows[0][1])
    print("| kimg | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for kimg, values in rows:
        print(f"| {kimg:g} | " + " | ".join(f"{values.get(k, float('nan')):.3g}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
