"""Checkpoint save and restore time to an S3-compatible server vs local disk, and the training step time
while a checkpoint uploads.

    python benchmarks/checkpoint.py [--presets anchor,ffhq512] [--repeats 2]
                                    [--step-preset tiny] [--step-batch 8] [--steps 4] [--threads 2]
                                    [--quick]

Checkpoints are the real thing: G, D, G_ema and both Adam optimisers of a preset (the moments filled by
one zero-gradient step, so that the optimiser bytes are those of a run) saved with
:func:`pof3d.checkpoint.save_checkpoint` and read back with :func:`~pof3d.checkpoint.load_checkpoint`.
A training worker writes its checkpoint to a local temporary folder and hands it to
``ray.train.report``, which copies it to the run's storage with ``pyarrow.fs.copy_files``; this script
times the same steps: "write" (save_checkpoint to a temporary folder), "persist" (copy_files to a
folder on local disk, or an upload to the S3 server), "restore" (load_checkpoint of the local copy, or
what a resuming worker does with a checkpoint on an object store: :func:`pof3d.storage.as_local_dir`,
a download into a temporary folder in reads of ``TRANSFER_CHUNK_BYTES``, then load_checkpoint). For
checkpoints up to ``OLD_READS_MAX_MB`` the restore is also timed with pyarrow's default 1 MiB reads,
which the project used before: one request per MiB.

The S3 server is moto's ThreadedMotoServer on 127.0.0.1, in a child process (as a real store is another
machine, it does not take this process's GIL), holding objects in memory. Its endpoint and dummy
credentials go into this process's standard AWS environment, where the project's storage code finds
them; nothing leaves the machine. On a small machine the server competes with the uploader and the
training step for the same cores, which the figures include.

Step time during an upload: Ray Train V2 uploads synchronously by default (``ray.train.report`` returns
after the copy; the project's workers use this) and asynchronously with
``checkpoint_upload_mode=CheckpointUploadMode.ASYNC`` (a thread in the worker uploads while training
goes on). The last table times training steps of ``--step-preset`` alone and with a thread that uploads
the first preset's checkpoint over and over, which is what an asynchronous upload costs the step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch

from pof3d.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from pof3d.loop import Trainer
from pof3d.presets import load_config
from pof3d.storage import S3_CONNECT_TIMEOUT_S, S3_REQUEST_TIMEOUT_S, Location, as_local_dir

BUCKET = "pof3d-bench"
OLD_READS_MAX_MB = 256  # 1 MiB reads slow down with the object's size on the test server: skip above


def _serve(port_out: multiprocessing.Queue) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port_out.put(server.get_host_and_port()[1])
    threading.Event().wait()  # serve until the parent terminates this process


def start_s3() -> tuple[multiprocessing.Process, pafs.S3FileSystem]:
    """moto's S3 server in a child process, and a pyarrow filesystem on it with the bucket created."""
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    port = ports.get(timeout=120)
    # The standard environment, as a user of an S3-compatible store sets it (pof3d.storage reads it).
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    fs = pafs.S3FileSystem(
        access_key="bench",
        secret_key="bench",
        region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        allow_bucket_creation=True,
        # Completing a multipart upload of a large checkpoint takes the in-memory server seconds; with
        # the S3 client's short default timeout the client retries the completion, which then fails on
        # the server (the upload is already completed). pof3d's own client waits as long.
        request_timeout=S3_REQUEST_TIMEOUT_S,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
    )
    fs.create_dir(BUCKET)
    return server, fs


def build_state(preset: str) -> tuple[Trainer, dict]:
    """A preset's trainer and its checkpoint state, Adam moments filled by one zero-gradient step."""
    trainer = Trainer(load_config(preset), device="cpu", seed=0)
    for opt in (trainer.opt_G, trainer.opt_D):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()  # zero gradients: parameters stay, exp_avg/exp_avg_sq get allocated
        opt.zero_grad(set_to_none=True)
    return trainer, trainer.state_dict()


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint_times(preset: str, s3: pafs.S3FileSystem, work: Path, repeats: int) -> dict[str, float]:
    """Median seconds of write, persist and restore, locally and on S3, and the state's size."""
    trainer, state = build_state(preset)
    cfg = trainer.cfg
    times: dict[str, list[float]] = {}
    size = 0
    for i in range(repeats):
        samples, size = _one_round(state, cfg, s3, work / str(i), f"{BUCKET}/{preset}/checkpoint-{i}")
        for key, value in samples.items():
            times.setdefault(key, []).append(value)
    out = {key: statistics.median(values) for key, values in times.items()}
    out["bytes"] = size
    out["params"] = sum(p.numel() for net in (trainer.G, trainer.D) for p in net.parameters())
    return out


def persist(checkpoint: Path, dest: str, fs: pafs.FileSystem) -> None:
    """What Ray Train does with a reported checkpoint folder: create the destination, copy the files."""
    fs.create_dir(dest)
    pafs.copy_files(str(checkpoint), dest, pafs.LocalFileSystem(), fs)


def restore_from_storage(uri: str, scratch: Path) -> None:
    """What a resuming worker does with a checkpoint on an object store."""
    load_checkpoint(as_local_dir(Location.parse(uri), scratch))


def fetch_in_1mib_reads(source: str, dest: Path, fs: pafs.FileSystem) -> Path:
    """The download as the project did it before: pyarrow's default chunk, one request per MiB."""
    dest.mkdir(parents=True)
    pafs.copy_files(source, str(dest), fs, pafs.LocalFileSystem())
    return dest


def _one_round(state: dict, cfg, s3: pafs.S3FileSystem, work: Path, remote: str) -> tuple[dict, int]:
    checkpoint, stored, fetched = work / "tmp" / "checkpoint", work / "storage", work / "fetched"
    progress = {"images_seen": 0, "step": 0, "tick": 0, "seed": 0}
    samples = {
        "write": time_once(lambda: save_checkpoint(checkpoint, state, cfg, progress)),
        "persist local": time_once(lambda: persist(checkpoint, str(stored), pafs.LocalFileSystem())),
        "persist s3": time_once(lambda: persist(checkpoint, remote, s3)),
        "restore local": time_once(lambda: load_checkpoint(stored)),
        "restore s3": time_once(lambda: restore_from_storage(f"s3://{remote}", fetched)),
    }
    size = (checkpoint / STATE_FILE).stat().st_size
    if size <= OLD_READS_MAX_MB * 2**20:
        old = work / "fetched-1mib"
        samples["restore s3 1mib"] = time_once(lambda: load_checkpoint(fetch_in_1mib_reads(remote, old, s3)))
    s3.delete_dir(remote)
    shutil.rmtree(work, ignore_errors=True)
    return samples, size


def step_times(preset: str, batch: int, steps: int, upload=None) -> list[float]:
    """Seconds of ``steps`` training steps after one warm-up step, with ``upload`` looping in a thread."""
    trainer = Trainer(load_config(preset, [f"train.batch={batch}"]), device="cpu", seed=0)
    res = trainer.cfg.model.image_resolution
    real = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.train_step(real)
    done, uploads = threading.Event(), []

    def loop() -> None:
        while not done.is_set():
            uploads.append(time_once(upload))

    thread = threading.Thread(target=loop, daemon=True)
    if upload is not None:
        thread.start()
        while not uploads and thread.is_alive():  # the first upload is under way: time steps now
            time.sleep(0.05)
    result = [time_once(lambda: trainer.train_step(real)) for _ in range(steps)]
    done.set()
    if upload is not None:
        thread.join()
    return result


def run(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(args.threads)
    server, s3 = start_s3()
    lines = []
    try:
        with tempfile.TemporaryDirectory(prefix="pof3d-ckpt-bench-") as tmp:
            work = Path(tmp)
            lines.append(
                f"{'preset':8} {'params G+D':>11} {'state MB':>9} {'write s':>8} {'persist local s':>16} "
                f"{'persist S3 s':>13} {'restore local s':>16} {'restore S3 s':>13} {'(1 MiB reads) s':>16}"
            )
            for preset in args.presets.split(","):
                t = checkpoint_times(preset, s3, work, args.repeats)
                old = f"{t['restore s3 1mib']:16.2f}" if "restore s3 1mib" in t else f"{'-':>16}"
                lines.append(
                    f"{preset:8} {t['params']:11,d} {t['bytes'] / 2**20:9.1f} {t['write']:8.2f} "
                    f"{t['persist local']:16.2f} {t['persist s3']:13.2f} "
                    f"{t['restore local']:16.2f} {t['restore s3']:13.2f} {old}"
                )
            source = work / "upload" / "checkpoint"
            trainer, state = build_state(args.presets.split(",")[0])
            save_checkpoint(source, state, trainer.cfg, {"images_seen": 0})
            del trainer, state
            alone = step_times(args.step_preset, args.step_batch, args.steps)
            during = step_times(
                args.step_preset,
                args.step_batch,
                args.steps,
                lambda: persist(source, f"{BUCKET}/upload", s3),
            )
            a, d = statistics.median(alone), statistics.median(during)
            lines.append("")
            lines.append(
                f"{'step preset':11} {'batch':>5} {'step s alone':>13} "
                f"{'step s during upload':>21} {'slowdown':>9}"
            )
            lines.append(f"{args.step_preset:11} {args.step_batch:5d} {a:13.3f} {d:21.3f} {d / a:8.2f}x")
    finally:
        server.terminate()
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="anchor,ffhq512", help="comma-separated checkpoint presets")
    parser.add_argument("--repeats", type=int, default=2, help="timed saves/restores per preset (median)")
    parser.add_argument("--step-preset", default="tiny", help="preset of the timed training steps")
    parser.add_argument("--step-batch", type=int, default=8, help="batch of the timed training steps")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny checkpoints, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.repeats, args.step_preset, args.step_batch, args.steps = "tiny", 1, "tiny", 2, 2
    if min(args.repeats, args.steps, args.step_batch) < 1:
        parser.error(
            f"--repeats, --steps, --step-batch must be >= 1: {args.repeats}, {args.steps}, {args.step_batch}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, CPU, {args.threads} threads, {os.cpu_count()} cores; "
        f"{args.repeats} repeat(s) per checkpoint (median); S3: moto on 127.0.0.1 (in memory); "
        f"niceness {os.nice(0)}, load average (1 min) {load:.1f}: figures include other users' load"
    )
    for line in run(args):
        print(line, flush=True)
    print(f"load average (1 min) at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
