"""Training steps with ``train.compile`` on the micro model, in a process of its own (run by
tests/test_compile_cache.py, since compiled graphs and inductor's counters live as long as a process):

    python tests/compile_step.py CHECKPOINT OUT.json [--resume]

Without ``--resume`` it trains one step from scratch and saves a checkpoint at CHECKPOINT; with it, it
loads that checkpoint first, as a resumed run's worker does, and trains one step more. OUT.json: the
graphs compiled and loaded from the cache (pof3d.compile_cache), the cache folder used, the images seen
and the first step's seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from pof3d.checkpoint import load_checkpoint, save_checkpoint
from pof3d.compile_cache import CompiledGraphs
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.testing.micro import MICRO

BATCH = 4


def main(checkpoint: Path, out: Path, resume: bool) -> None:
    torch.set_num_threads(1)
    cfg = load_config("tiny", [*MICRO, "train.compile=true", f"train.batch={BATCH}"])
    trainer = Trainer(cfg, device="cpu", seed=0)
    if resume:
        _, state, _ = load_checkpoint(checkpoint)
        trainer.load_state_dict(state)
    real = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    started = time.perf_counter()
    trainer.train_step(real)
    first_step_s = time.perf_counter() - started
    if not resume:
        save_checkpoint(checkpoint, trainer.state_dict(), cfg, {"images_seen": trainer.images_seen})
    graphs = CompiledGraphs.so_far()
    out.write_text(
        json.dumps(
            {
                "new": graphs.new,
                "cached": graphs.cached,
                "folder": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                "images_seen": trainer.images_seen,
                "first_step_s": first_step_s,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), "--resume" in sys.argv[3:])
