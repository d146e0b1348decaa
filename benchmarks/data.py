"""Images/s delivered to one consumer: the Ray Data shard pipeline vs. a PyTorch DataLoader over PNG files.

Both decode the same PNG bytes into float32 [B, 3, R, R] tensors in [-1, 1] with 2 parallel workers
(Ray: a local Ray with 2 CPUs and one-CPU read/decode tasks, uint8 blocks turned into float by the
consumer's collate, as in training; DataLoader: ``num_workers=2``, ``shuffle=True``), on the synthetic
set at 64 and 256 px. The Ray path streams all epochs in one execution (``make_dataset(epochs=E)``, each
epoch every row once in a new order), the way training streams small sets; an epoch ends when its last
row has been delivered. An extra row, "ray-data, 1 epoch per execution", starts a new execution every
epoch instead, and "ray-data, N read task(s) at once" caps the stream's read tasks (``--max-tasks``, 1
by default: what a training run of one worker streams with, ``data.decode_tasks``). Epoch 1 includes
start-up (Ray's first tasks, the DataLoader's worker processes); the DataLoader restarts its workers
every epoch (its default); a last row keeps them alive (``persistent_workers=True``). Ray's worker
processes are started by a throwaway read before timing. The ratio column compares whole runs (all
epochs, epoch 1 included): a pipeline that decodes ahead can make its later epochs look faster, but not
the whole run. The 1-minute load average is printed at the start and the end: on a shared machine
compare the ratios of one run, not absolute rates.

    python benchmarks/data.py [--n64 4096] [--n256 768] [--batch 32] [--epochs 3] [--workdir DIR]
                              [--task-rows 512] [--block-rows 128] [--max-tasks 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pof3d.data.shard_reader import iter_rows, read_manifest, shard_paths
from pof3d.data.shard_source import DECODE_BATCH, TASK_ROWS
from pof3d.data.streaming import iter_train_batches, make_dataset
from pof3d.data.synthetic import generate


class PngFolder(Dataset):
    """The plain baseline: one PNG file per image."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            pixels = np.asarray(img.convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def _epoch(batches) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum((b["image"] if isinstance(b, dict) else b).shape[0] for b in batches)
    return count, time.perf_counter() - start


def _rates(spans: list[tuple[int, float]]) -> tuple[int, float, float, float]:
    """(images per epoch, img/s of epoch 1, img/s of the later epochs, img/s over all epochs).

    "All epochs" is the figure that nothing can flatter: a pipeline that decodes ahead moves work from
    later epochs into epoch 1, but not out of the whole run.
    """
    first, later = spans[0], spans[1:]
    rest = sum(c for c, _ in later) / max(sum(t for _, t in later), 1e-9)
    total = sum(c for c, _ in spans) / max(sum(t for _, t in spans), 1e-9)
    return first[0], first[0] / first[1], rest, total


def warm_up_ray(uri: str, batch: int) -> None:
    """Start Ray's worker processes with a throwaway read, so that no timed run pays for process start-up
    (the DataLoader's workers, in contrast, start inside its timed epochs: that is how it works)."""
    for _ in iter_train_batches(make_dataset(uri, seed=1, decode_cpus=1.0, epochs=1), batch):
        pass


def bench_ray(
    uri: str, batch: int, epochs: int, per_execution: int, sizes: dict[str, int], max_tasks: int | None = None
) -> tuple[int, float, float, float]:
    """``per_execution`` epochs per Ray Data execution: ``epochs`` (one stream, as training streams small
    sets) or 1 (a new execution every epoch); ``max_tasks`` read tasks at once (None: as CPUs allow)."""
    ds = make_dataset(uri, seed=0, decode_cpus=1.0, epochs=per_execution, max_tasks=max_tasks, **sizes)
    ds.context.enable_progress_bars = False
    rows = read_manifest(uri)["rows"]
    ends, count, start = [], 0, time.perf_counter()
    for _ in range(epochs // per_execution):
        for b in iter_train_batches(ds, batch):
            assert b["image"].dtype == torch.float32
            count += b["image"].shape[0]
            while count >= rows * (len(ends) + 1):  # the batch that completes an epoch ends it
                ends.append(time.perf_counter())
    assert count == rows * epochs, (count, rows, epochs)
    spans = [end - begin for begin, end in zip([start, *ends], ends, strict=False)]
    return _rates([(rows, t) for t in spans])


def bench_loader(
    folder: Path, batch: int, epochs: int, persistent: bool = False
) -> tuple[int, float, float, float]:
    loader = DataLoader(
        PngFolder(folder), batch_size=batch, shuffle=True, num_workers=2, persistent_workers=persistent
    )
    return _rates([_epoch(iter(loader)) for _ in range(epochs)])


def prepare(root: Path, n: int, resolution: int) -> tuple[str, Path]:
    shards = root / f"shards-{resolution}"
    if not (shards / "manifest.json").exists():
        generate(shards, n, resolution, "faces", seed=0, overwrite=True, workers=2 if n >= 1000 else 1)
    folder = root / f"png-{resolution}"
    if not folder.exists():
        folder.mkdir()
        for row in iter_rows(str(shards), ["id", "image"]):
            Image.fromarray(row["image"]).save(folder / f"{row['id']:07d}.png", compress_level=1)
    return str(shards), folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n64", type=int, default=4096)
    p.add_argument("--n256", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    p.add_argument("--task-rows", type=int, default=TASK_ROWS, help="rows per Ray read task")
    p.add_argument("--block-rows", type=int, default=DECODE_BATCH, help="rows per Ray block")
    p.add_argument(
        "--max-tasks", type=int, default=1, help="a row with at most this many read tasks at once (0: none)"
    )
    args = p.parse_args()
    sizes = {"task_rows": args.task_rows, "block_rows": args.block_rows}

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pof3d-databench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    load_start = os.getloadavg()[0]
    try:
        for resolution, n in ((64, args.n64), (256, args.n256)):
            uri, folder = prepare(root, n, resolution)
            shard_mb = sum(Path(s).stat().st_size for s in shard_paths(uri)) / 2**20
            warm_up_ray(uri, args.batch)
            stream = bench_ray(uri, args.batch, args.epochs, args.epochs, sizes)
            rows.append((resolution, "ray-data", *stream))
            if args.max_tasks:
                capped = bench_ray(uri, args.batch, args.epochs, args.epochs, sizes, args.max_tasks)
                rows.append((resolution, f"ray-data, {args.max_tasks} read task(s) at once", *capped))
            rows.append((resolution, "dataloader", *bench_loader(folder, args.batch, args.epochs)))
            once = bench_ray(uri, args.batch, args.epochs, 1, sizes)
            rows.append((resolution, "ray-data, 1 epoch per execution", *once))
            warm = bench_loader(folder, args.batch, args.epochs, persistent=True)
            rows.append((resolution, "dataloader, persistent workers", *warm))
            print(f"# {resolution} px: {n} images, {shard_mb:.1f} MB of shards", flush=True)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"\nload average (1 min) {load_start:.1f} at the start, {load:.1f} at the end,"
        f" on {os.cpu_count()} CPUs; {args.epochs} epochs per row;"
        f" Ray read tasks of {args.task_rows} rows in blocks of {args.block_rows}"
    )
    print(
        "| res | loader | images/epoch | img/s epoch 1 | img/s later epochs | img/s all epochs "
        "| ray/dataloader, all epochs |"
    )
    print("|---|---|---|---|---|---|---|")
    total_of = {(res, name): total for res, name, _, _, _, total in rows}
    for res, name, count, first, later, total in rows:
        ratio = f"{total / total_of[(res, 'dataloader')]:.2f}" if name.startswith("ray") else ""
        print(f"| {res} | {name} | {count} | {first:.0f} | {later:.0f} | {total:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
