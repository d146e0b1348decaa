"""What a search found: its best trial and how much each searched parameter mattered (Optuna's
importances), computed from the trials' own results.

Only trials that trained to the study's budget count: a trial stopped early by ASHA reported its
objective at a smaller budget, so it is neither comparable as "best" nor a fair sample of how the
objective depends on the parameters. The importances are rebuilt from the results table rather than
taken from Tune's searcher, so a resumed study (whose searcher was restored from a file) and a finished
one give the same answer for the same trials.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pof3d.studies.results import Table, TrialRecord
from pof3d.studies.space import Param, SearchSpace

logger = logging.getLogger(__name__)

BEST_TAG_PREFIX = "pof3d.best."


@dataclass
class SearchFindings:
    """The best finished trial (None if no trial finished) and the importance of each parameter."""

    metric: str
    mode: str
    best: TrialRecord | None
    importances: dict[str, float]
    counted: int  # trials that reached the budget with a finite objective
    note: str = ""  # why importances are missing, if they are

    def table(self) -> Table:
        rows = [{"parameter": k, "importance": v} for k, v in self.importances.items()]
        return Table(["parameter", "importance"], rows)

    def lines(self) -> list[str]:
        if self.best is None:
            return [f"no trial reached the budget with a finite {self.metric}"]
        params = ", ".join(f"{k}={_show(v)}" for k, v in sorted(self.best.params.items()))
        out = [
            f"best trial {self.best.trial_id}: {self.metric} {self.best.metrics[self.metric]:.4g} "
            f"({params}), of {self.counted} trial(s) at the budget"
        ]
        if self.importances:
            ranked = ", ".join(f"{k} {v:.2f}" for k, v in self.importances.items())
            out.append(f"parameter importances (Optuna, fANOVA): {ranked}")
        elif self.note:
            out.append(f"parameter importances: {self.note}")
        return out

    def mlflow_metrics(self) -> dict[str, float]:
        out = {f"importance/{k}": v for k, v in self.importances.items()}
        if self.best is not None:
            out[f"best/{self.metric}"] = float(self.best.metrics[self.metric])
        return out

    def mlflow_tags(self) -> dict[str, str]:
        if self.best is None:
            return {}
        tags = {"pof3d.best_trial": self.best.trial_id}
        tags.update({f"{BEST_TAG_PREFIX}{k}": _show(v) for k, v in self.best.params.items()})
        return tags


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _objective(record: TrialRecord, metric: str) -> float | None:
    value = record.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _distribution(param: Param) -> Any:
    import optuna

    if param.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(param.values))
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high))
    return optuna.distributions.FloatDistribution(param.low, param.high, log=param.kind == "loguniform")


def _within(space: SearchSpace, path: str, value: Any) -> bool:
    param = next((p for p in space.params if p.path == path), None)
    if param is None:
        return False
    if param.kind == "choice":
        return value in param.values
    return isinstance(value, (int, float)) and param.low <= value <= param.high


def findings(records: list[TrialRecord], space: SearchSpace, seed: int = 0) -> SearchFindings:
    """Best trial and parameter importances (objective: the space's first metric)."""
    metric, mode = space.metrics[0], space.modes[0]
    counted = [r for r in records if r.status == "done" and _objective(r, metric) is not None]
    sign = 1.0 if mode == "min" else -1.0
    best = min(counted, key=lambda r: sign * _objective(r, metric)) if counted else None
    importances, note = _importances(counted, space, metric, mode, seed)
    return SearchFindings(metric, mode, best, importances, len(counted), note)


def _importances(
    records: list[TrialRecord], space: SearchSpace, metric: str, mode: str, seed: int
) -> tuple[dict[str, float], str]:
    if len(records) < 2:
        return {}, f"need at least 2 trials at the budget, have {len(records)}"
    import optuna

    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    distributions = {p.path: _distribution(p) for p in space.params}
    for record in records:
        # A conditional parameter that was not sampled carries its fixed value, which may lie outside
        # its distribution: it is left out of that trial, as Optuna records define-by-run spaces.
        params = {k: v for k, v in record.params.items() if _within(space, k, v)}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=_objective(record, metric),
            )
        )
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to all trials
        logger.warning("parameter importances not computed: %s", exc)
        return {}, str(exc)
    return {k: float(v) for k, v in found.items()}, ""


def ranked(table: Table, records: list[TrialRecord], found: SearchFindings) -> Table:
    """The search's table with a ``rank`` column (1 = best objective among the trials at the budget;
    empty for trials stopped early or failed), rows in rank order, unranked trials last."""
    sign = 1.0 if found.mode == "min" else -1.0
    counted = [r for r in records if r.status == "done" and _objective(r, found.metric) is not None]
    order = sorted(counted, key=lambda r: sign * _objective(r, found.metric))
    rank = {r.trial_id: i + 1 for i, r in enumerate(order)}
    rows = [dict(row, rank=rank.get(str(row.get("trial")))) for row in table.rows]
    rows.sort(key=lambda row: (row["rank"] is None, row["rank"] or 0))
    columns = list(table.columns)
    columns.insert(columns.index("status") + 1 if "status" in columns else 0, "rank")
    return Table(columns, rows)
