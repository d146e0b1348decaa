"""``python -m pof3d.train``: train PoF3D on Ray Train with MLflow tracking.

With no arguments: the ``tiny`` preset on the built-in synthetic set, on a local Ray, tracked in a local
MLflow store inside the run directory. Exit codes: 0 done, 2 usage/config error (nothing started),
1 training stopped (e.g. a non-finite loss) or failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pof3d.config_fields import config_fields, format_fields
from pof3d.console import configure_console
from pof3d.distributed.elastic import workers_flag
from pof3d.distributed.plan import DEFAULT_EXPERIMENT, DEFAULT_PRESET, TrainRequest, base_config, plan_run
from pof3d.errors import Pof3dError, TrainingError
from pof3d.presets import PRESETS, presets_help

logger = logging.getLogger("pof3d.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pof3d.train",
        description=__doc__.splitlines()[0],
        epilog=presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"configuration preset ({DEFAULT_PRESET})")
    p.add_argument(
        "--config", metavar="PATH|URI",
        help="start a new run from a saved config.json (the file, a run dir or a checkpoint dir)",
    )  # fmt: skip
    p.add_argument("--data", help="shard directory or URI (default: built-in synthetic set)")
    p.add_argument("--kimg", type=float, help="training length in thousands of real images")
    p.add_argument("--batch", type=int, help="global batch over all workers")
    p.add_argument(
        "--workers", type=workers_flag, metavar="N|MIN-MAX",
        help="Ray Train workers; MIN-MAX: elastic, as many as the cluster holds between the two (grows when "
        "nodes join, shrinks when they go, restarting from the latest checkpoint each time)",
    )  # fmt: skip
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0 = CPU)")
    p.add_argument(
        "--run-dir", metavar="DIR|URI",
        help="run directory, a path or URI such as s3://bucket/runs/a "
        "(default $POF3D_STORAGE/<preset>-<time>, else runs/<preset>-<time>)",
    )  # fmt: skip
    p.add_argument(
        "--resume", metavar="PATH|URI|latest|auto",
        help="continue from a checkpoint or run directory; auto: --run-dir's newest checkpoint if it has "
        "one, else start there",
    )  # fmt: skip
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or run dir)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set loss.symmetry_weight=0 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--print-config", action="store_true",
        help="resolve preset, resume point and overrides, print the plan as JSON and exit",
    )  # fmt: skip
    p.add_argument(
        "--list-fields", nargs="?", const="", metavar="SECTION",
        help="list the config fields (of one section) with type, the preset's value and doc, and exit",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="also show Ray's and MLflow's informational lines")
    return p


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    return TrainRequest(
        preset=args.preset,
        data=args.data,
        kimg=args.kimg,
        batch=args.batch,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        seed=args.seed,
        run_dir=args.run_dir,
        resume=args.resume,
        config=args.config,
        mlflow_uri=args.mlflow_uri,
        experiment=args.experiment,
        overrides=list(args.overrides),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_fields is not None:
        return list_fields(args, args.list_fields or None)
    configure_console(args.verbose)
    if args.print_config:  # before any data or Ray work
        try:
            plan = plan_run(request_from_args(args))
        except Pof3dError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(plan.describe(), indent=2, sort_keys=True))
        return 0
    from pof3d.distributed.driver import prepare, run_training

    try:
        plan = prepare(request_from_args(args), args.address)
    except Pof3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_training(plan)
    except TrainingError as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 1
    except Pof3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())  # ends with the `mlflow ui` command that shows the run
    return 0


def list_fields(args: argparse.Namespace, section: str | None) -> int:
    """``--list-fields [SECTION]``: print the fields with the values of the preset (or ``--config``), the
    flags and ``--set`` applied."""
    try:
        fields = config_fields(base_config(request_from_args(args)), section)
    except Pof3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = f"--config {args.config}" if args.config else f"preset {args.preset or DEFAULT_PRESET!r}"
    print(f"config fields with the values of {source}; change one with --set PATH=VALUE")
    print(format_fields(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
