"""Tables and figures of the synthetic-poses study from its run folders.

    python studies/synthetic_poses/report.py --full RUN_DIR [--ablation STUDY_DIR] [--compare NAME=RUN_DIR] \
        [--out studies/synthetic_poses]

Reads what the runs wrote (nothing is recomputed here): the full run's ``metrics.jsonl`` (training
figures and the ``eval/`` metrics of every evaluation), the ``metrics.json`` files that
``python -m pof3d.evaluate --out RUN/posthoc/NAME`` wrote for its checkpoints, its sample grids and
pose plots, and the ablation study's ``results.csv``. Writes ``figures/*.png`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pof3d.data.synthetic_scene import sample_poses

# The poster's FFHQ ablation (FID, depth, pose, RE, JS), row by row, for the side-by-side table.
POSTER_FFHQ = {
    "full": (4.99, 0.29, 0.11, 0.037, 0.20),
    "no_symmetry": (4.50, 0.41, 0.12, 0.030, 0.20),
    "no_pose_aware_d": (3.43, 1.30, 0.20, 0.046, 0.21),
    "pose_lr_x10": (122.07, 0.82, 0.74, 0.051, 0.56),
    "pose_lr_x0.1": (10.20, 0.70, 0.16, 0.173, 0.38),
}
POSTER_ROW = {
    "full": "Ours",
    "no_symmetry": "w/o symmetry loss",
    "no_pose_aware_d": "w/o pose-aware D",
    "pose_lr_x10": "lr = 2.5e-4",
    "pose_lr_x0.1": "lr = 2.5e-6",
}
PER_AXIS_JS_GOAL = 0.02  # nats: the per-axis goal of the long run
MEAN_GOAL_DEG = 5.0  # the learned mean of each axis within this of the truth
SPREAD_GOAL = 0.3  # the learned spread of each axis within 30 % of the truth's
EVAL_COLUMNS = (
    ("JS", "eval/js"),
    ("JS yaw", "eval/js_yaw"),
    ("JS pitch", "eval/js_pitch"),
    ("D pose error on reals (deg)", "eval/pose_error_deg"),
    ("mean-pose guess (deg)", "eval/pose_error_guess_deg"),
    ("D pose error on fakes (deg, batch)", "pose/D_error_deg"),
    ("depth error", "eval/depth_error"),
    ("RE", "eval/reprojection_error"),
    ("FD_random", "eval/fd_random"),
    ("KD_random", "eval/kd_random"),
    ("learned yaw mean (deg)", "eval/learned_yaw_mean_deg"),
    ("learned yaw std (deg)", "eval/learned_yaw_std_deg"),
    ("learned pitch mean (deg)", "eval/learned_pitch_mean_deg"),
    ("learned pitch std (deg)", "eval/learned_pitch_std_deg"),
    ("learned yaw std (deg, batch)", "pose/h_std_deg"),
    ("learned pitch std (deg, batch)", "pose/v_std_deg"),
)


def load_ticks(run: Path) -> list[dict]:
    """Every training tick of a run (its ``metrics.jsonl`` rows)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_full_run(run: Path) -> list[dict]:
    """One record per evaluation point: the training figures of that tick plus every eval metric."""
    by_step: dict[int, dict] = {}
    for row in load_ticks(run):
        if any(k.startswith("eval/") for k in row):
            by_step.setdefault(int(row["images_seen"]), {}).update(row)
    for path in sorted((run / "posthoc").glob("*/metrics.json")):
        record = json.loads(path.read_text())
        step = int(record["images_seen"])
        by_step.setdefault(step, {"images_seen": step}).update(
            {f"eval/{k}": v for k, v in record["metrics"].items()}
        )
    return [by_step[k] for k in sorted(by_step)]


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["images_seen"] / 1000, r[key]) for r in rows if _finite(r.get(key))]
    return (
        (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else (np.array([]),) * 2
    )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@functools.cache
def true_pose_std_deg(kind: str = "faces", n: int = 200_000) -> tuple[float, float]:
    poses = sample_poses(kind, n, np.random.default_rng(0))
    return tuple(float(s) for s in np.degrees(poses.std(axis=0)))  # type: ignore[return-value]


def curve(rows: list[dict], ticks: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Points of one curve: a training figure of the batch (``pose/...``) at every tick, an evaluated
    figure at every evaluation."""
    return _series(ticks if key.startswith("pose/") else rows, key)


def plot_curves(rows: list[dict], path: Path, ticks: list[dict] | None = None) -> Path:
    """Six panels over kimg: evaluations as points, the batch's pose figures of every tick (``ticks``,
    default: the evaluation rows only) as thin lines."""
    ticks = rows if ticks is None else ticks
    true_h, true_v = true_pose_std_deg()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        (
            "pose JS divergence (nats)",
            [("eval/js", "joint"), ("eval/js_yaw", "yaw"), ("eval/js_pitch", "pitch")],
            PER_AXIS_JS_GOAL,
        ),
        (
            "D pose error (deg)",
            [
                ("eval/pose_error_deg", "real images"),
                ("pose/D_error_deg", "fakes (batch)"),
                ("eval/pose_error_guess_deg", "mean-pose guess on reals"),
            ],
            None,
        ),
        (
            "learned pose mean (deg)",
            [
                ("eval/learned_yaw_mean_deg", "yaw"),
                ("eval/learned_pitch_mean_deg", "pitch"),
                ("pose/h_mean_deg", "yaw (batch)"),
                ("pose/v_mean_deg", "pitch (batch)"),
                ("eval/true_yaw_mean_deg", "true yaw"),
                ("eval/true_pitch_mean_deg", "true pitch"),
            ],
            None,
        ),
        (
            "learned pose spread (deg)",
            [
                ("eval/learned_yaw_std_deg", "yaw std"),
                ("eval/learned_pitch_std_deg", "pitch std"),
                ("pose/h_std_deg", "yaw std (batch)"),
                ("pose/v_std_deg", "pitch std (batch)"),
            ],
            None,
        ),
        ("depth error (normalised)", [("eval/depth_error", "generated")], None),
        ("FD_random (stand-in for FID)", [("eval/fd_random", "FD_random")], None),
    ]
    for ax, (title, keys, target) in zip(axes.flat, panels, strict=True):
        for key, label in keys:
            x, y = curve(rows, ticks, key)
            if len(x):
                style = {"linewidth": 1.0} if key.startswith("pose/") else {"marker": "o"}
                ax.plot(x, y, label=label, **style)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
        if title.startswith("D pose error"):
            x, y = _series(rows, "eval/pose_error_guess_deg")
            if len(x):
                ax.plot(x, y / 2, color="grey", linestyle="--", label="goal: half the guess")
        if title.startswith("learned pose spread"):
            ax.axhline(true_h, color="C0", linestyle=":", label=f"true yaw std {true_h:.1f}")
            ax.axhline(true_v, color="C1", linestyle=":", label=f"true pitch std {true_v:.1f}")
        ax.set_title(title)
        ax.set_xlabel("kimg")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def side_by_side(paths: list[Path], out: Path, gap: int = 4) -> Path | None:
    """Saved PNGs of one size (sample grids) next to each other at their own resolution (small files)."""
    if not paths:
        return None
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    width = sum(img.width for img in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(img.height for img in images)), (255, 255, 255))
    x = 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width + gap
    canvas.save(out, optimize=True)
    return out


def plot_trajectories(runs: dict[str, Path], path: Path) -> Path:
    """Mean and spread of the learned yaw and pitch (training batches) per tick, one line per run."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    keys = (
        ("pose/h_mean_deg", "yaw mean (deg)", 90.0),
        ("pose/h_std_deg", "yaw std (deg)", None),
        ("pose/v_mean_deg", "pitch mean (deg)", 90.0),
        ("pose/v_std_deg", "pitch std (deg)", None),
    )
    true_h, true_v = true_pose_std_deg()
    for ax, (key, title, truth) in zip(axes, keys, strict=True):
        for name, run in runs.items():
            x, y = _series(load_ticks(run), key)
            ax.plot(x, y, marker=".", label=name)
        truth = truth if truth is not None else (true_h if "yaw" in title else true_v)
        ax.axhline(truth, color="grey", linestyle="--", label=f"true {truth:.1f}")
        ax.set_title(title)
        ax.set_xlabel("kimg")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def stack_pictures(paths: list[Path], labels: list[str], out: Path, width: float = 9.0) -> Path | None:
    """Several saved PNGs (pose plots) one above the other, each with its label."""
    if not paths:
        return None
    images = [plt.imread(p) for p in paths]
    heights = [width * img.shape[0] / img.shape[1] for img in images]
    fig, axes = plt.subplots(len(images), 1, figsize=(width, sum(heights) + 0.3 * len(images)), squeeze=False)
    for ax, img, label in zip(axes[:, 0], images, labels, strict=True):
        ax.imshow(img)
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


def pick_snapshots(run: Path, prefix: str, count: int = 4) -> list[Path]:
    """``count`` snapshots spread over training: the first, the last and evenly spaced ones between."""
    found = sorted((run / "samples").glob(f"{prefix}-*.png"))
    if len(found) <= count:
        return found
    index = np.linspace(0, len(found) - 1, count).round().astype(int)
    return [found[i] for i in dict.fromkeys(index.tolist())]


def _kimg(snapshot: Path) -> float:
    """kimg of a snapshot file named ``<kind>-<kimg>.png``."""
    return float(snapshot.stem.split("-")[1])


def _fmt(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if _finite(value) else "–"


def goals(row: dict) -> dict[str, bool]:
    """The study's goals that this evaluation's figures can judge, each met or not: per-axis JS, each
    axis's mean (within ``MEAN_GOAL_DEG``) and spread (within ``SPREAD_GOAL`` of the truth's), and D's
    pose error on reals at most half the mean-pose guess."""
    e = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/") and _finite(v)}
    verdict = {}
    for axis in ("yaw", "pitch"):
        if f"js_{axis}" in e:
            verdict[f"JS {axis}"] = e[f"js_{axis}"] <= PER_AXIS_JS_GOAL
        for stat in ("mean", "std"):
            learned, true = e.get(f"learned_{axis}_{stat}_deg"), e.get(f"true_{axis}_{stat}_deg")
            if learned is not None and true is not None:
                bound = MEAN_GOAL_DEG if stat == "mean" else SPREAD_GOAL * true
                verdict[f"{axis} {stat}"] = abs(learned - true) <= bound
    if "pose_error_deg" in e and "pose_error_guess_deg" in e:
        verdict["D error"] = e["pose_error_deg"] <= e["pose_error_guess_deg"] / 2
    return verdict


def _goals_cell(row: dict) -> str:
    verdict = goals(row)
    met = [name for name, ok in verdict.items() if ok]
    return f"{len(met)}/{len(verdict)}" + (f": {', '.join(met)}" if met else "") if verdict else "–"


def full_run_table(rows: list[dict]) -> str:
    present = [(name, key) for name, key in EVAL_COLUMNS if any(_finite(r.get(key)) for r in rows)]
    judged = any(goals(r) for r in rows)
    names = [n for n, _ in present] + (["goals met"] if judged else [])
    lines = ["| kimg | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [_fmt(r.get(key)) for _, key in present] + ([_goals_cell(r)] if judged else [])
        lines.append(f"| {r['images_seen'] / 1000:.1f} | " + " | ".join(cells) + " |")
    if judged:
        lines += [
            "",
            f"Goals: JS of each axis at most {PER_AXIS_JS_GOAL}, each axis's learned mean within "
            f"{MEAN_GOAL_DEG:g}° and spread within {SPREAD_GOAL:.0%} of the truth's, D's pose error on reals "
            "at most half the mean-pose guess.",
        ]
    return "\n".join(lines)


def ablation_table(results_csv: Path) -> str:
    rows = list(csv.DictReader(results_csv.open()))
    fd = any(r.get("FD_random") for r in rows)
    head = "| variant (poster row) | kimg | JS | Pose (deg) | Depth | RE |" + (" FD_random |" if fd else "")
    head += " poster JS | poster Pose | poster Depth | poster RE | poster FID |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        poster = POSTER_FFHQ.get(r["variant"])
        ours = [r.get(c) for c in ("kimg", "JS", "Pose", "Depth", "RE")] + (
            [r.get("FD_random")] if fd else []
        )
        cells = [_fmt(float(v)) if v not in (None, "") else "–" for v in ours]
        theirs = [poster[4], poster[2], poster[1], poster[3], poster[0]] if poster else ["–"] * 5
        name = f"{r['variant']} ({POSTER_ROW.get(r['variant'], '?')})"
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(str(v) for v in theirs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", type=Path, required=True, help="run folder of the full model")
    p.add_argument("--ablation", type=Path, help="study folder of the ablation (with results.csv)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="another run whose pose trajectory is drawn next to the full model's (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    if not (args.full / "metrics.jsonl").is_file():
        print(f"error: {args.full}/metrics.jsonl not found (is --full a run folder?)", file=sys.stderr)
        return 2
    others = dict(item.split("=", 1) for item in args.compare if "=" in item)
    if len(others) != len(args.compare):
        print(f"error: --compare expects NAME=RUN_DIR, got {args.compare}", file=sys.stderr)
        return 2
    for name, run in others.items():
        if not (Path(run) / "metrics.jsonl").is_file():
            print(f"error: --compare {name}={run}: metrics.jsonl not found", file=sys.stderr)
            return 2
    results = args.ablation / "results.csv" if args.ablation is not None else None
    if results is not None and not results.is_file():
        print(f"error: {results} not found (is --ablation a study folder?)", file=sys.stderr)
        return 2
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows = load_full_run(args.full)
    plot_curves(rows, figures / "curves.png", load_ticks(args.full))
    grids = pick_snapshots(args.full, "fakes")
    side_by_side(grids, figures / "samples.png")
    plots = pick_snapshots(args.full, "poses")
    stack_pictures(plots, [f"at {_kimg(p):.1f} kimg" for p in plots], figures / "pose-histograms.png")
    runs = {"full model": args.full} | {name: Path(run) for name, run in others.items()}
    plot_trajectories(runs, figures / "pose-trajectories.png")
    final = sorted((args.full / "samples").glob("poses-*.png"))
    if final:
        shutil.copyfile(final[-1], figures / "pose-histogram-final.png")
    kimgs = ", ".join(f"{_kimg(p):.1f}" for p in grids)
    parts = ["## Full model, every evaluation\n", full_run_table(rows), ""]
    parts += [f"Sample grids in figures/samples.png, left to right: {kimgs} kimg.", ""]
    if results is not None:
        parts += ["## Ablation (same budget for every row) next to the poster's FFHQ figures\n"]
        parts += [ablation_table(results), ""]
    (args.out / "results.md").write_text("\n".join(parts))
    print(f"wrote {figures} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
