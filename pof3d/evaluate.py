"""``python -m pof3d.evaluate``: all metrics of a checkpoint, as a table, metrics.json and MLflow.

    python -m pof3d.evaluate --checkpoint PATH [--data DIR] [--metrics pose,js,depth,re,fid,kid,fd_random,...]
                             [--out DIR] [--num-samples N] [--seed S] [--inception FILE] [--device D]
    python -m pof3d.evaluate --fetch-weights [--url URL]

The default metrics are pose, js, depth, re and fid, or fd_random in place of fid (with a line saying
so) when the Inception file is not there; ``--fetch-weights`` downloads it into the cache and verifies
its checksum.

When the checkpoint's ``progress.json`` names an MLflow run (``mlflow_run_id`` and
``mlflow_tracking_uri``, written by training), the figures are also logged to that run as
``eval/<name>`` at step = images seen. Exit codes: 0 success, 2 bad input, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from pof3d.checkpoint import load_checkpoint
from pof3d.config import Config
from pof3d.discriminator import Discriminator
from pof3d.errors import CheckpointError, Pof3dError
from pof3d.generator import Generator
from pof3d.metrics import GROUPS, default_metrics, evaluate_generator, resolve_metrics
from pof3d.metrics.fid import INCEPTION_URL, URL_ENV, fetch_inception, find_inception

log = logging.getLogger(__name__)


def load_models(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Config, Generator, Discriminator, dict]:
    """Config, G (the EMA weights when present), D and progress of a checkpoint directory."""
    cfg, state, progress = load_checkpoint(path, map_location="cpu")
    key = "G_ema" if "G_ema" in state else "G"
    if key not in state or "D" not in state:
        raise CheckpointError(f"{path}: state.pt has keys {sorted(state)}; expected G or G_ema, and D")
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    try:
        G.load_state_dict(state[key])
        D.load_state_dict(state["D"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the checkpoint's config.json: {exc}") from exc
    return cfg, G.to(device).eval(), D.to(device).eval(), progress


def log_to_mlflow(progress: dict, results: dict[str, float]) -> str | None:
    """Log ``eval/<name>`` metrics to the checkpoint's MLflow run; returns the run id used, if any."""
    run_id, uri = progress.get("mlflow_run_id"), progress.get("mlflow_tracking_uri")
    if not run_id or not uri:
        return None
    from mlflow.tracking import MlflowClient

    step = int(progress.get("images_seen", 0))
    client = MlflowClient(tracking_uri=uri)
    for name, value in results.items():
        if math.isfinite(value):
            client.log_metric(run_id, f"eval/{name}", float(value), step=step)
    return run_id


def format_table(results: dict[str, float]) -> str:
    width = max([len(k) for k in results] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{name:<{width}}  {value:.6g}" for name, value in results.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate and write the outputs; returns the metrics.json content."""
    if args.metrics is None:
        groups = default_metrics(args.inception)
    else:
        groups = resolve_metrics([m for m in args.metrics.split(",") if m.strip()])
    if args.num_samples < 2:
        raise Pof3dError(f"--num-samples={args.num_samples}: expected at least 2")
    if set(groups) & {"fid", "kid"}:
        find_inception(args.inception)  # fail before any work when the weights are missing
    if args.data and not Path(args.data).exists() and "://" not in args.data:
        raise Pof3dError(f"--data {args.data}: no such shard directory")
    device = torch.device(args.device)
    cfg, G, D, progress = load_models(args.checkpoint, device)
    results = evaluate_generator(
        G,
        D,
        cfg,
        args.data,
        groups,
        num_samples=args.num_samples,
        device=device,
        seed=args.seed,
        inception_path=args.inception,
    )
    out = Path(args.out) if args.out else Path("eval") / Path(args.checkpoint).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "data": args.data,
        "images_seen": progress.get("images_seen"),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "metrics": results,
        "mlflow_run_id": log_to_mlflow(progress, results),
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=True))
    record["out"] = str(out)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pof3d.evaluate", description="Evaluate a PoF3D checkpoint.")
    p.add_argument("--checkpoint", help="checkpoint directory (state.pt, config.json, ...)")
    p.add_argument("--data", default=None, help="shard directory/URI of real images (poses/depth if known)")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated, of {','.join(GROUPS)} (default pose,js,depth,re and fid, or fd_random"
        " when the Inception file is missing)",
    )
    p.add_argument("--out", default=None, help="output folder (default eval/<checkpoint name>)")
    p.add_argument("--num-samples", type=int, default=1000, help="generated (and at most real) images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", default=None, help="path of inception-2015-12-05.pt (FID/KID)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--fetch-weights",
        action="store_true",
        help="download the Inception file (FID/KID) into the cache, verify its sha256, and exit",
    )
    p.add_argument(
        "--url", default=None, help=f"where to fetch it (default ${URL_ENV}, else {INCEPTION_URL})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.fetch_weights and not args.checkpoint:
        parser.error("--checkpoint is required (or --fetch-weights to download the Inception file)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.fetch_weights:
            print(f"Inception weights (sha256 verified) at {fetch_inception(args.url)}")
            return 0
        record = run(args)
    except Pof3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("evaluation failed")
        return 1
    print(format_table(record["metrics"]))
    where = f"; logged to MLflow run {record['mlflow_run_id']}" if record["mlflow_run_id"] else ""
    print(f"metrics written to {Path(record['out']) / 'metrics.json'}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
