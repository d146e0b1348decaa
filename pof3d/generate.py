"""``python -m pof3d.generate``: samples, rotating-camera videos, pose plot and meshes of a checkpoint.

    python -m pof3d.generate --checkpoint PATH [--seeds 0-7] [--trunc 0.7] [--out DIR] [--video] [--mesh]

Writes ``samples.png`` (one image per seed, G_ema with truncation), ``poses.png`` (the learned pose
distribution), ``seedNNNN.gif`` per seed with ``--video`` and ``seedNNNN.ply`` per seed with ``--mesh``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pof3d.config import Config
from pof3d.data.synthetic_scene import sample_poses
from pof3d.errors import ConfigError, Pof3dError
from pof3d.evaluate import load_models
from pof3d.generator import Generator
from pof3d.mesh import density_grid, extract_mesh, write_ply
from pof3d.plots import plot_pose_distribution, save_image_grid, to_uint8

log = logging.getLogger(__name__)

POSE_PLOT_SAMPLES = 2000
# Camera path of the videos: yaw/pitch swing around the seed's learned pose (EG3D-style), or a full
# turn of yaw for full-circle data (cars).
VIDEO_YAW_SWING, VIDEO_PITCH_SWING = 0.35, 0.15


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                start, stop = int(lo), int(hi)
                if stop < start:
                    raise ValueError
                seeds.extend(range(start, stop + 1))
            elif part:
                seeds.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--seeds {text!r}: expected integers and ranges like 0-7,12") from exc
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds {text!r}: expected non-negative integers and ranges like 0-7,12")
    return seeds


def seed_latent(seed: int, z_dim: int) -> torch.Tensor:
    """The latent of a seed: the same seed gives the same z on every machine."""
    return torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed))


def camera_path(pose: torch.Tensor, frames: int, full_turn: bool) -> torch.Tensor:
    """``frames`` poses ``[F, 2]`` around ``pose [2]``: a loop that starts and ends at the same view."""
    t = torch.arange(frames, dtype=torch.float32) / frames * 2 * math.pi
    if full_turn:
        return torch.stack((pose[0] + t, pose[1].expand(frames)), -1)
    return torch.stack(
        (pose[0] + VIDEO_YAW_SWING * torch.sin(t), pose[1] + VIDEO_PITCH_SWING * torch.cos(t)), -1
    )


@torch.no_grad()
def render_video(
    G: Generator, z: torch.Tensor, trunc: float, frames: int, full_turn: bool, path: Path
) -> Path:
    ws, learned = G.map_with_pose(z, truncation_psi=trunc)
    planes = G.synthesize_planes(ws, noise_mode="const")
    images = []
    for pose in camera_path(learned[0].cpu(), frames, full_turn):
        out = G.render(planes, ws, pose[None].to(z.device), noise_mode="const")
        images.append(Image.fromarray(to_uint8(out["image"])[0]))
    images[0].save(path, save_all=True, append_images=images[1:], duration=80, loop=0)
    return path


@torch.no_grad()
def export_mesh(
    G: Generator, cfg: Config, z: torch.Tensor, trunc: float, resolution: int, path: Path
) -> Path:
    ws = G.map(z, truncation_psi=trunc)
    planes = G.synthesize_planes(ws, noise_mode="const")
    grid = density_grid(lambda pts: G.density(planes, pts.to(z.device)), resolution, cfg.model.box_warp)
    verts, faces = extract_mesh(grid, cfg.model.box_warp)
    log.info("%s: %d vertices, %d faces", path.name, len(verts), len(faces))
    return write_ply(path, verts, faces)


def true_poses(cfg: Config, n: int) -> np.ndarray | None:
    """True poses to overlay on the pose plot: the synthetic setting's sampler when training used it."""
    if cfg.data.path:
        return None
    return np.asarray(sample_poses(cfg.data.synthetic_poses, n, np.random.default_rng(0)))


def run(args: argparse.Namespace) -> dict[str, list[Path]]:
    seeds = parse_seeds(args.seeds)
    if args.frames < 2 or args.mesh_resolution < 8:
        raise ConfigError(
            f"--frames={args.frames} must be >= 2 and --mesh-resolution={args.mesh_resolution} >= 8"
        )
    device = torch.device(args.device)
    cfg, G, _, _ = load_models(args.checkpoint, device)
    out = Path(args.out) if args.out else Path("generated") / Path(args.checkpoint).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"samples": [], "poses": [], "videos": [], "meshes": []}
    with torch.no_grad():
        images = [
            G(seed_latent(s, cfg.model.z_dim).to(device), args.trunc, noise_mode="const")["image"]
            for s in seeds
        ]
        written["samples"].append(save_image_grid(torch.cat(images), out / "samples.png"))
        z = torch.randn(POSE_PLOT_SAMPLES, cfg.model.z_dim, generator=torch.Generator().manual_seed(0)).to(
            device
        )
        learned = G.eg3d_pose(G.predict_pose(G.map(z))).cpu().numpy()
    written["poses"].append(
        plot_pose_distribution(learned, out / "poses.png", true_poses(cfg, POSE_PLOT_SAMPLES))
    )
    for s in seeds:
        z = seed_latent(s, cfg.model.z_dim).to(device)
        if args.video:
            path = out / f"seed{s:04d}.gif"
            written["videos"].append(render_video(G, z, args.trunc, args.frames, cfg.model.pose_clamp, path))
        if args.mesh:
            written["meshes"].append(
                export_mesh(G, cfg, z, args.trunc, args.mesh_resolution, out / f"seed{s:04d}.ply")
            )
    return written | {"out": [out]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pof3d.generate", description="Samples, videos and meshes.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--seeds", default="0-7", help="seeds and ranges, e.g. 0-7,12 (default %(default)s)")
    p.add_argument("--trunc", type=float, default=0.7, help="truncation psi (default %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default generated/<checkpoint name>)")
    p.add_argument("--video", action="store_true", help="a rotating-camera GIF per seed")
    p.add_argument("--frames", type=int, default=24, help="frames per video (default %(default)s)")
    p.add_argument("--mesh", action="store_true", help="a PLY mesh per seed (marching cubes on density)")
    p.add_argument("--mesh-resolution", type=int, default=64, help="density grid size (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        written = run(args)
    except Pof3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("generation failed")
        return 1
    counts = ", ".join(f"{len(v)} {k}" for k, v in written.items() if k != "out" and v)
    print(f"wrote {counts} to {written['out'][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
