"""Training throughput on Ray Train with 1, 2, ... CPU workers on one machine, and the share of step time
spent waiting for data.

    python benchmarks/scaling.py [--preset tiny] [--workers 1,2] [--kimg 0.048] [--batch 8]
                                 [--tick-kimg 0.008] [--set SECTION.FIELD=VALUE ...] [--json PATH]

Each worker count is a real ``python -m pof3d.train`` run (same code path: Ray Data streaming of the
synthetic set, TorchTrainer, tracking to a throw-away MLflow store), read back from its
``metrics.jsonl``. The first tick is dropped as warm-up (process start, first-step allocations).
images/s is global (all workers); "data wait" is the share of a worker's step time blocked on the next
batch. The global batch stays fixed, so more workers means a smaller batch per worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pof3d.distributed import TrainRequest, train


def measure(preset: str, workers: int, kimg: float, batch: int, tick_kimg: float, sets: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="pof3d-scaling-") as tmp:
        run_dir = Path(tmp) / f"w{workers}"
        request = TrainRequest(
            preset=preset,
            kimg=kimg,
            batch=batch,
            workers=workers,
            run_dir=str(run_dir),
            overrides=[f"train.tick_kimg={tick_kimg}", f"train.snapshot_kimg={kimg}", *sets],
        )
        train(request)
        ticks = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = ticks[1:] or ticks
    images = timed[-1]["images_seen"] - (ticks[0]["images_seen"] if len(ticks) > 1 else 0)
    seconds = sum(t["perf/tick_sec"] for t in timed)
    wait = sum(t["perf/data_wait_share"] for t in timed) / len(timed)
    return {
        "preset": preset,
        "workers": workers,
        "batch": batch,
        "ticks_timed": len(timed),
        "images_per_sec": images / seconds,
        "sec_per_kimg": seconds * 1000 / images,
        "data_wait_share": wait,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--kimg", type=float, default=0.048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tick-kimg", type=float, default=0.008)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = [
        measure(args.preset, int(w), args.kimg, args.batch, args.tick_kimg, args.sets)
        for w in args.workers.split(",")
    ]
    ray.shutdown()
    print(f"\n{'preset':<8} {'workers':>7} {'batch':>5} {'images/s':>9} {'sec/kimg':>9} {'data wait':>9}")
    for r in rows:
        print(
            f"{r['preset']:<8} {r['workers']:>7d} {r['batch']:>5d} {r['images_per_sec']:>9.2f} "
            f"{r['sec_per_kimg']:>9.0f} {100 * r['data_wait_share']:>8.1f}%"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
