"""``pof3d-sweep`` (or ``python sweeps/ablation.py``): the poster's ablation (or an Optuna search) as Ray
Tune trials.

Each trial is an ordinary ``python -m pof3d.train`` run (same code, same run-directory layout) with
one variant's overrides; MLflow gets one parent run per study and one child run per trial. Exit codes:
0 done, 2 usage/config error (nothing started), 1 study failed or was interrupted (``--resume`` it).
"""

from __future__ import annotations

import argparse
import sys

from pof3d.console import configure_console
from pof3d.distributed.elastic import workers_flag
from pof3d.errors import ConfigError, Pof3dError
from pof3d.presets import PRESETS, presets_help
from pof3d.studies.study import DEFAULT_EXPERIMENT, StudyRequest, run_study
from pof3d.studies.variants import VARIANTS, parse_variants, variants_help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pof3d-sweep",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog=f"{variants_help()}\n\n{presets_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=("ablation", "search"), default="ablation", help="study kind (ablation)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated ablation rows (all: {','.join(VARIANTS)})",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="configuration preset (tiny)")
    p.add_argument("--kimg", type=float, help="training length of each trial, thousands of real images")
    p.add_argument("--batch", type=int, help="global batch of each trial")
    p.add_argument(
        "--workers", type=workers_flag, metavar="N|MIN-MAX",
        help="Ray Train workers per trial; MIN-MAX: elastic trials (see python -m pof3d.train --help)",
    )  # fmt: skip
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0 = CPU)")
    p.add_argument("--data", help="shard directory or URI (default: built-in synthetic set)")
    p.add_argument("--samples", type=int, default=1, help="seeds per variant (ablation) or trials (search)")
    p.add_argument("--seed", type=int, default=0, help="first seed (ablation) / sampler seed (search)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument(
        "--storage", metavar="DIR|URI",
        help="folder of study folders, a path or URI such as s3://bucket/studies "
        "(default $POF3D_STORAGE/studies, else runs/studies)",
    )  # fmt: skip
    p.add_argument("--name", help="study name (default <mode>-<time>; with --resume: the latest study)")
    p.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store in the study folder)",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (Tuner.restore)")
    p.add_argument("--space", help="search space file, YAML or JSON (search mode)")
    p.add_argument(
        "--param", dest="params", action="append", default=[], metavar="FIELD=KIND:LOW:HIGH",
        help="searched field, e.g. optim.g_lr=loguniform:1e-4:1e-2 or model.pose_aware_d=choice:true,false",
    )  # fmt: skip
    p.add_argument(
        "--metric", dest="metrics", action="append", default=[],
        help="objective reported by training, e.g. eval/js (repeat for multi-objective)",
    )  # fmt: skip
    p.add_argument(
        "--direction", dest="directions", action="append", default=[], choices=("min", "max"),
        help="min or max per --metric (default min)",
    )  # fmt: skip
    p.add_argument("--grace-ticks", type=int, default=1, help="ASHA: ticks every trial runs before a cut (1)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override any config field for every trial (repeatable)",
    )  # fmt: skip
    return p


def request_from_args(args: argparse.Namespace) -> StudyRequest:
    return StudyRequest(
        mode=args.mode,
        variants=parse_variants(args.variants),
        preset=args.preset,
        kimg=args.kimg,
        batch=args.batch,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        data=args.data,
        samples=args.samples,
        seed=args.seed,
        concurrency=args.concurrency,
        storage=args.storage,
        name=args.name,
        mlflow_uri=args.mlflow_uri,
        experiment=args.experiment,
        overrides=list(args.overrides),
        space=args.space,
        params=list(args.params),
        metrics=list(args.metrics),
        directions=list(args.directions),
        grace_ticks=args.grace_ticks,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_console(verbose_flag=False)  # POF3D_VERBOSE=1 shows Ray's and MLflow's notices
    try:
        summary = run_study(request_from_args(args), resume=args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Pof3dError as exc:
        print(f"study failed: {exc}", file=sys.stderr)
        return 1
    print(summary.table.to_markdown(), end="")
    if summary.findings is not None:
        print("\n".join(summary.findings.lines()))
    print(summary.line())
    return 0 if summary.finished else 1


if __name__ == "__main__":
    sys.exit(main())
