"""Where G_main's time goes: each stage of the generator's main phase timed on its own, forward and backward.

    python benchmarks/profile_g_main.py [--preset anchor] [--precision fp32|bf16] [--iters 5] [--threads 2]
                                        [--set SECTION.FIELD=VALUE ...]

G_main renders each latent twice (its own camera and the mirrored one) from one set of tri-planes and
scores both renders with D. Each stage runs here on detached inputs that require gradients, so its
backward pass is timed alone: the mapping and pose learner, the tri-plane backbone, and per render the
camera rays, the tri-plane sampling (plane sum), the decoder MLP, the compositing, the super-resolution
and one D pass (D frozen, gradient to its input). A last row, outside the sum, times the sampling
through ``grid_sample`` in the same run, beside the CPU kernel. Medians over ``--iters`` after one
warm-up; the "x" column counts how often G_main runs the stage. The sum is close to, not equal to,
``benchmarks/step.py``'s G_main: the phase's optimiser step, its loss terms and allocator effects of one
graph spanning all stages are not in any row. Imports only torch and the model (runs on a bare machine);
on CPU it restarts itself with the host-memory setting of training workers, as step.py does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pof3d import precision
from pof3d.camera import intrinsics, pose_to_cam2world
from pof3d.host_memory import restart_retaining
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.renderer import importance_depths, interval_weights, make_rays, stratified_depths
from pof3d.triplane import RGB_AFFINE, channels_last, sample_plane_sum

Stage = Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]
COMPARISON = "(sampling with grid_sample instead)"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def time_stage(stage: Stage, iters: int, device: torch.device) -> tuple[float, float]:
    """Median forward and backward seconds of ``stage`` (which returns its output and its leaves)."""
    forward, backward = [], []
    for i in range(iters + 1):
        _sync(device)
        start = time.perf_counter()
        out, _ = stage()
        _sync(device)
        middle = time.perf_counter()
        out.backward(torch.ones_like(out) / out.numel())
        _sync(device)
        if i:  # the first run warms up
            forward.append(middle - start)
            backward.append(time.perf_counter() - middle)
    return statistics.median(forward), statistics.median(backward)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stages(trainer: Trainer) -> dict[str, tuple[int, Stage]]:
    """Each stage of G_main with the number of times one G_main runs it."""
    G, D, cfg = trainer.G, trainer.D, trainer.cfg
    m, renderer = cfg.model, G.renderer
    b, r = cfg.train.batch, m.neural_resolution
    device = trainer.device
    with torch.no_grad():
        z = torch.randn(b, m.z_dim, device=device)
        ws = G.map(z)
        pose = G.predict_pose(ws)
        planes = G.synthesize_planes(ws)
        cam = pose_to_cam2world(pose, m.camera_radius, m.pivot, m.pitch_output)
        origins, dirs = make_rays(cam, intrinsics(m.focal, b, device=device), r)
        coarse = stratified_depths(
            (b, r * r), m.depth_samples, m.ray_start, m.ray_end, True, device, ws.dtype
        )
        points = origins[:, :, None] + coarse[..., None] * dirs[:, :, None]
        plane_sum = sample_plane_sum(
            channels_last(planes), points.reshape(b, -1, 3), m.box_warp, m.triplane_quirk
        )
        sigma, features = G.decoder.decode(plane_sum)
        fine = importance_depths(
            coarse, interval_weights(sigma.view(b, r * r, -1), coarse), m.importance_samples, True
        )
        depths = torch.cat((coarse, fine), dim=-1)
        features2 = torch.cat([features.view(b, r * r, m.depth_samples, -1)] * 2, dim=2)
        sigma2 = torch.cat([sigma.view(b, r * r, -1)] * 2, dim=-1)
        rendered = G.render(planes, ws, pose)
    passes = 2 if m.importance_samples > 0 else 1
    mirrored = 2 if cfg.loss.symmetry_weight > 0 else 1

    def mapping() -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaf = _leaf(z)
        w = G.map(leaf)
        return torch.cat((w[:, 0], G.predict_pose(w)), dim=1), [leaf]

    def backbone():
        leaf = _leaf(ws)
        return G.synthesize_planes(leaf), [leaf]

    def rays():
        leaf = _leaf(pose)
        o, d = make_rays(
            pose_to_cam2world(leaf, m.camera_radius, m.pivot, m.pitch_output),
            intrinsics(m.focal, b, device=device),
            r,
        )
        return o + d, [leaf]

    def sampling(kernel: bool = True):
        p, x = _leaf(channels_last(planes)), _leaf(points.reshape(b, -1, 3))
        return sample_plane_sum(p, x, m.box_warp, m.triplane_quirk, kernel=kernel), [p, x]

    def decoder():
        leaf = _leaf(plane_sum)
        s, f = G.decoder.decode(leaf)
        return torch.cat((s[..., None], f), dim=-1), [leaf]

    def compositing():
        d, s, f = depths, _leaf(sigma2), _leaf(features2)
        order = torch.argsort(d, dim=-1)
        out = renderer._composite(d.gather(-1, order), s.gather(-1, order), [f], order, RGB_AFFINE)
        return out["features"], [s, f]

    def superres():
        feats = _leaf(rendered["image_raw"].new_zeros(b, m.decoder_features, r, r).normal_())
        return G.superres(feats[:, :3], feats, ws), [feats]

    def d_pass():
        image, raw = _leaf(rendered["image"]), _leaf(rendered["image_raw"])
        logits, _ = D(image, raw)
        return logits, [image, raw]

    return {
        "mapping + pose learner": (1, mapping),
        "tri-plane backbone": (1, backbone),
        "camera rays": (mirrored, rays),
        "tri-plane sampling (plane sum)": (mirrored * passes, sampling),
        "decoder MLP": (mirrored * passes, decoder),
        "compositing": (mirrored, compositing),
        "super-resolution": (mirrored, superres),
        "D pass (frozen, grad to input)": (mirrored, d_pass),
        # Not in the sum: the same sampling through grid_sample, timed in this run for comparison.
        COMPARISON: (mirrored * passes, lambda: sampling(kernel=False)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="anchor")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # glibc reads its tunables at process start: run again with them, as CPU training workers get.
        restart_retaining(__file__, sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    overrides = [
        f"train.precision={args.precision}",
        *(["model.num_fp16_res=0"] if args.precision == "fp32" else []),
    ]
    trainer = Trainer(load_config(args.preset, [*overrides, *args.set]), device=device, seed=0)
    trainer.D.requires_grad_(False)
    setting = f"{args.preset}, {args.precision}, {args.device}, {args.threads} threads"
    print(f"{setting}, medians of {args.iters} after 1 warm-up")
    print(f"{'stage':34} {'x':>2} {'forward s':>9} {'backward s':>10} {'per G_main s':>12} {'share':>6}")
    rows = []
    with torch.random.fork_rng(), precision.training(args.precision):
        for name, (times, stage) in stages(trainer).items():
            fwd, bwd = time_stage(stage, args.iters, device)
            rows.append((name, times, fwd, bwd, times * (fwd + bwd)))
    total = sum(row[-1] for row in rows if row[0] != COMPARISON)
    for name, times, fwd, bwd, per in rows:
        share = "" if name == COMPARISON else f"{100 * per / total:5.1f}%"
        print(f"{name:34} {times:2d} {fwd:9.3f} {bwd:10.3f} {per:12.3f} {share:>6}")
    print(f"{'sum':34} {'':2} {'':9} {'':10} {total:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
