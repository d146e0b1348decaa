"""The CPU tri-plane sampling kernel alone, forward and backward, on the inputs of a real render.

    python benchmarks/plane_kernel.py [--preset anchor] [--against OTHER.cpp ...] [--iters 11]
                                      [--threads 2] [--set SECTION.FIELD=VALUE ...]

One ``G_main`` phase of the preset runs first, to record what the kernel is handed in training: the
tri-planes, the sample positions of the first render and the gradient that comes back to its output
(real positions matter: how often neighbouring samples share texels decides how much the kernel reads
from cache). Then this checkout's kernel (``pof3d/plane_sampler.cpp``) and each ``--against`` source,
for instance an earlier version (``git show REV:pof3d/plane_sampler.cpp > old.cpp``), run forward and
backward on those inputs, taking turns every iteration, so a drift of the machine reaches every version
alike. Prints the median milliseconds of each pass and, for each other version, the largest difference
from this checkout's results. CPU only; needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pof3d import plane_kernel
from pof3d.host_memory import restart_retaining
from pof3d.loop import Trainer
from pof3d.presets import load_config


def record_inputs(preset: str, overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planes, grid and output gradient of the first plane-sum call of one ``G_main`` phase."""
    cfg = load_config(preset, overrides)
    trainer = Trainer(cfg, device="cpu", seed=0)
    res = cfg.data.resolution
    real = torch.rand(cfg.train.batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls: list[dict[str, torch.Tensor]] = []
    kernel_sum = plane_kernel.plane_sum

    def recording(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = kernel_sum(planes, grid)
        call = {"planes": planes.detach().clone(), "grid": grid.detach().contiguous()}
        calls.append(call)
        out.register_hook(lambda grad: call.setdefault("grad", grad.detach().contiguous()))
        return out

    plane_kernel.plane_sum = recording
    try:
        phase = next(p for p in trainer.phases if p.name == "G_main")
        trainer.loss.accumulate_gradients(phase, real)
    finally:
        plane_kernel.plane_sum = kernel_sum
    if not calls or "grad" not in calls[0]:
        raise RuntimeError(f"G_main of preset {preset!r} made no plane-sum call with a gradient")
    return calls[0]["planes"], calls[0]["grid"], calls[0]["grad"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="anchor")
    parser.add_argument("--against", action="append", default=[], metavar="OTHER.cpp", type=Path)
    parser.add_argument("--iters", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    for source in args.against:
        if not source.is_file():
            parser.error(f"--against {source}: no such file")
    restart_retaining(__file__, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if not plane_kernel.available():
        raise SystemExit(
            "the CPU tri-plane sampling kernel is not available on this machine (see the warning)"
        )
    sources = [plane_kernel.SOURCE, *args.against]
    libraries = [plane_kernel.open_library(plane_kernel.build(source)) for source in sources]

    planes, grid, grad = record_inputs(args.preset, args.set)
    b, _, h, w, c = planes.shape
    print(
        f"preset {args.preset}: planes {b} x 3 x {h} x {w} x {c}, {grid.shape[1]} points per image, "
        f"{args.threads} threads"
    )
    seconds: list[tuple[list[float], list[float]]] = [([], []) for _ in sources]
    results: list[tuple[torch.Tensor, ...]] = [() for _ in sources]
    for i in range(args.iters + 1):
        for k, library in enumerate(libraries):
            start = time.perf_counter()
            out = plane_kernel.run_forward(library, planes, grid)
            middle = time.perf_counter()
            grad_planes, grad_grid = plane_kernel.run_backward(library, grad, planes, grid, (True, True))
            if i:  # the first turn warms up
                seconds[k][0].append(middle - start)
                seconds[k][1].append(time.perf_counter() - middle)
            results[k] = (out, grad_planes, grad_grid)

    print(f"{'source':40s} {'forward ms':>10s} {'backward ms':>11s}  largest difference (out, planes, grid)")
    for source, (fwd, bwd), result in zip(sources, seconds, results, strict=True):
        diff = (
            "-"
            if result is results[0]
            else " ".join(
                f"{(a - r).abs().max().item():.1e}" for a, r in zip(result, results[0], strict=True)
            )
        )
        name = str(source.relative_to(Path.cwd())) if source.is_relative_to(Path.cwd()) else str(source)
        print(f"{name:40s} {statistics.median(fwd) * 1e3:10.2f} {statistics.median(bwd) * 1e3:11.2f}  {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
