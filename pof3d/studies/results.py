"""The study's results table: one row per variant (mean over seeds, and the seeds' spread), the paper's
columns we measure.

Trials report per-tick figures under the names the training loop and the evaluation functions use;
this module picks the last reported value of each, maps them to the poster's columns (FID, depth,
pose, RE, JS) plus the final losses, and writes the table as CSV and Markdown. Missing figures (e.g.
FID, which needs an Inception network) are left empty rather than guessed. Where a variant ran with
several seeds, each measured poster column gets a ``<column> ±`` column beside it: half the range of the
seeds' figures, so that mean ± spread covers every seed and a difference between two rows can be held
against it.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Poster column -> metric names a trial may report it under (first match wins).
PAPER_COLUMNS: dict[str, tuple[str, ...]] = {
    "FID": ("eval/fid", "fid"),
    "KID": ("eval/kid", "kid"),
    # Stand-in for FID without the Inception file (pof3d.metrics.random_features); not on FID's scale.
    "FD_random": ("eval/fd_random", "fd_random"),
    "Depth": ("eval/depth_error", "depth_error"),
    "Pose": ("eval/pose_error_deg", "pose_error_deg"),
    "RE": ("eval/reprojection_error", "reprojection_error"),
    "JS": ("eval/js", "js"),
}
LOSS_PREFIXES = ("loss/", "loss_", "Loss/")


@dataclass
class TrialRecord:
    """What a finished (or stopped) trial left behind."""

    trial_id: str
    variant: str
    seed: int
    status: str
    metrics: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: _fmt(row.get(c), csv_mode=True) for c in self.columns})
        return out.getvalue()

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, stem: str = "results") -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = folder / f"{stem}.csv", folder / f"{stem}.md"
        csv_path.write_text(self.to_csv())
        md_path.write_text(self.to_markdown())
        return csv_path, md_path


def _fmt(value: Any, csv_mode: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if csv_mode else "–"
    if isinstance(value, float):
        return repr(value) if csv_mode else f"{value:.4g}"
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def paper_figures(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The poster's columns from a trial's last metrics (None where not measured)."""
    out: dict[str, float | None] = {}
    for column, names in PAPER_COLUMNS.items():
        out[column] = next((_number(metrics[n]) for n in names if _number(metrics.get(n)) is not None), None)
    return out


def loss_names(records: Iterable[TrialRecord]) -> list[str]:
    names = {
        k
        for r in records
        for k, v in r.metrics.items()
        if k.startswith(LOSS_PREFIXES) and _number(v) is not None
    }
    return sorted(names)


def _progress(metrics: dict[str, Any]) -> float | None:
    for name in ("kimg", "images_seen"):
        value = _number(metrics.get(name))
        if value is not None:
            return value if name == "kimg" else value / 1000.0
    return None


def build_table(records: list[TrialRecord], by_variant: bool = True) -> Table:
    """One row per variant (mean over its trials' seeds), or one row per trial in search mode."""
    losses = loss_names(records)
    measured = [c for c in PAPER_COLUMNS if any(paper_figures(r.metrics)[c] is not None for r in records)]
    # Always show the poster's main columns, even when empty, so tables line up with the paper.
    paper = [c for c in PAPER_COLUMNS if c in measured or c in ("FID", "Depth", "Pose", "JS")]
    if by_variant:
        variants = dict.fromkeys(r.variant for r in records)
        groups = {v: [r for r in records if r.variant == v] for v in variants}
        spread = [c for c in paper if any(_spread(g, c) is not None for g in groups.values())]
        with_spread = [name for c in paper for name in ((c, f"{c} ±") if c in spread else (c,))]
        columns = ["variant", "trials", "status", "kimg", *with_spread, *losses]
        rows = []
        for variant, group in groups.items():
            row: dict[str, Any] = {
                "variant": variant,
                "trials": len(group),
                "status": ",".join(sorted({r.status for r in group})),
                "kimg": _mean(_progress(r.metrics) for r in group),
            }
            for column in paper:
                row[column] = _mean(paper_figures(r.metrics)[column] for r in group)
            for column in spread:
                row[f"{column} ±"] = _spread(group, column)
            for name in losses:
                row[name] = _mean(_number(r.metrics.get(name)) for r in group)
            rows.append(row)
        return Table(columns, rows)
    params = sorted({k for r in records for k in r.params})
    columns = ["trial", "status", "kimg", *params, *paper, *losses]
    rows = []
    for r in records:
        row = {"trial": r.trial_id, "status": r.status, "kimg": _progress(r.metrics), **r.params}
        row.update({c: paper_figures(r.metrics)[c] for c in paper})
        row.update({n: _number(r.metrics.get(n)) for n in losses})
        rows.append(row)
    return Table(columns, rows)


def _spread(group: list[TrialRecord], column: str) -> float | None:
    """Half the range of a column over a variant's seeds; None with fewer than two measured."""
    values = [v for v in (paper_figures(r.metrics)[column] for r in group) if v is not None]
    return (max(values) - min(values)) / 2 if len(values) >= 2 else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def variant_metrics(table: Table) -> dict[str, float]:
    """The poster's figures of an ablation table as one metric per variant and column, named
    ``<column>/<variant>`` (``JS/full``, ``JS/no_symmetry``): MLflow groups a run's charts by the part
    before the slash, so each column's chart lines the variants up."""
    out: dict[str, float] = {}
    if "variant" not in table.columns:
        return out
    for row in table.rows:
        for column in PAPER_COLUMNS:
            value = row.get(column)
            if isinstance(value, float) and math.isfinite(value):
                out[f"{column}/{row['variant']}"] = value
    return out
