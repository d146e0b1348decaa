"""``train.compile`` on the micro model, in a process of its own (run by tests/test_compile_cache.py, since
compiled graphs and inductor's counters live as long as a process):

    python tests/compile_step.py CHECKPOINT OUT.json [--resume]

Builds a compiled and an eager trainer from the same seed and runs every phase of one step on both from
the same RNG state, to compare their losses and gradients; then one training step of the compiled
trainer. Without ``--resume`` it starts from scratch and saves a checkpoint at CHECKPOINT; with it, it
loads that checkpoint first, as a resumed run's worker does. OUT.json: each phase's relative errors, the
graphs compiled and loaded from the cache (pof3d.compile_cache), the cache folder and the images seen.

Inductor draws random numbers its own way in compiled graphs (the backbone's noise inputs) unless
``fallback_random`` is set; it is set here in both runs, so that the two trainers draw the same noise.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
import torch._inductor.config

from pof3d.checkpoint import load_checkpoint, save_checkpoint
from pof3d.compile_cache import CompiledGraphs
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.testing.micro import MICRO

BATCH = 4


def _phase(trainer: Trainer, name: str, real: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """One phase from a fixed RNG state: its losses and the flattened gradient of the trained network."""
    phase = next(p for p in trainer.phases if p.name == name)
    network = trainer.networks[phase.network]
    for p in network.parameters():
        p.grad = None
    random.seed(0)
    torch.manual_seed(0)
    figures = trainer.loss.accumulate_gradients(phase, real)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in network.parameters()]
    for p in network.parameters():
        p.grad = None
    return {k: float(v) for k, v in figures.items() if k.startswith("loss/")}, torch.cat(
        [g.flatten() for g in grads]
    )


def errors(compiled: Trainer, eager: Trainer, real: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per phase: the largest relative error of its losses and the relative L2 error of its gradient."""
    out = {}
    for phase in compiled.phases:
        losses, grad = _phase(compiled, phase.name, real)
        ref_losses, ref_grad = _phase(eager, phase.name, real)
        loss_error = max(abs(losses[k] - ref_losses[k]) / abs(ref_losses[k]) for k in ref_losses)
        out[phase.name] = {"loss": loss_error, "grad": float((grad - ref_grad).norm() / ref_grad.norm())}
    return out


def main(checkpoint: Path, out: Path, resume: bool) -> None:
    torch.set_num_threads(1)
    torch._inductor.config.fallback_random = True
    trainers = {}
    for compiled in (True, False):
        cfg = load_config("tiny", [*MICRO, f"train.compile={str(compiled).lower()}", f"train.batch={BATCH}"])
        trainers[compiled] = Trainer(cfg, device="cpu", seed=0)
        if resume:
            _, state, _ = load_checkpoint(checkpoint)
            trainers[compiled].load_state_dict(state)
    real = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    phase_errors = errors(trainers[True], trainers[False], real)
    trainer = trainers[True]
    trainer.train_step(real)
    if not resume:
        save_checkpoint(checkpoint, trainer.state_dict(), trainer.cfg, {"images_seen": trainer.images_seen})
    graphs = CompiledGraphs.so_far()
    result = {"errors": phase_errors, "new": graphs.new, "cached": graphs.cached}
    result |= {"folder": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "images_seen": trainer.images_seen}
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), "--resume" in sys.argv[3:])
