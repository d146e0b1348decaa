"""Studies end to end: real Ray Tune trials of the real training, real Optuna, real MLflow, the study's
state on a real S3-compatible server (slow).

Each study here costs about a minute of trial start-up on 2 cores, so one study checks as much as it
can: the ablation on S3 is interrupted after its first trial and resumed, and its tracking and table are
checked on the resumed study; the search runs on local storage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scoped_env import isolated_run_env

from pof3d.errors import ConfigError
from pof3d.testing.micro import MICRO as MICRO_MODEL

# The training tests' micro model: a few seconds per trial on 2 cores.
MICRO = [*MICRO_MODEL, "train.eval_metrics=pose,js"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_env(tmp_path_factory):
    """Synthetic-set cache and run root of these tests in a temporary folder."""
    root = tmp_path_factory.mktemp("study-env")
    with isolated_run_env(root):
        yield root


def _request(root: Path, name: str, **kwargs):
    from pof3d.studies.study import StudyRequest

    kwargs.setdefault("overrides", list(MICRO))
    return StudyRequest(batch=4, storage=str(root / "studies"), name=name, **kwargs)


def _children(uri: str, experiment: str, parent: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_interrupted_ablation_on_s3_resumes_and_tracks_parent_children_and_table(
    ray_local, study_env, s3_bucket
) -> None:
    """The study keeps all its state on the object store (Tune's and the project's own files); resumed
    from there, it finishes without starting the finished trial again, with one parent run, one child
    per variant and the table in the parent's artifacts."""
    import os
    import signal

    import pyarrow.fs as pafs
    from ray import tune

    from pof3d.studies.study import run_study
    from pof3d.studies.trainable import TRIALS_DIR, attempts

    class CtrlCAfterFirstTrial(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; Tune saves its state and returns

    storage = f"s3://{s3_bucket}/studies"
    request = _request(study_env, "abl", variants=["full", "no_symmetry"], kimg=0.008)
    request.storage = storage
    first = run_study(request, callbacks=[CtrlCAfterFirstTrial()])
    assert not first.finished and first.study_dir.uri == f"{storage}/abl"
    trials = first.study_dir / TRIALS_DIR
    runs = [trials.child(i.path) for i in trials.children() if i.type == pafs.FileType.Directory]

    def ticks(run) -> int:
        metrics = run / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    done = [r for r in runs if ticks(r) == 2]
    assert len(done) == 1
    lines_before = (done[0] / "metrics.jsonl").read_text()

    again = _request(study_env, "abl")
    again.storage = storage
    summary = run_study(again, resume=True)
    assert summary.finished and summary.parent_run_id == first.parent_run_id
    # The finished trial was not started again; its files are untouched.
    assert attempts(done[0]) == 1
    assert (done[0] / "metrics.jsonl").read_text() == lines_before

    # The table: one row per variant, measured at the end of each trial.
    assert [r["variant"] for r in summary.table.rows] == ["full", "no_symmetry"]
    for row in summary.table.rows:
        assert row["status"] == "done" and row["kimg"] == pytest.approx(0.008)
        assert row["JS"] > 0  # the untrained poses are off the data's
        assert math.isfinite(row["loss/G_adv"]) and math.isfinite(row["loss/D_real"])
    assert row["loss/G_sym"] is None  # the no_symmetry trial has no symmetry term at all
    assert summary.table.rows[0]["loss/G_sym"] is not None
    assert (summary.study_dir / "results.csv").is_file() and (summary.study_dir / "results.md").is_file()
    # Resuming the finished study runs nothing and rebuilds the same table, rows in the variants' order.
    rebuilt = run_study(again, resume=True)
    assert rebuilt.finished and [r["variant"] for r in rebuilt.table.rows] == ["full", "no_symmetry"]
    assert rebuilt.table.rows == summary.table.rows

    # Tracking: the parent holds the table, each child its variant's parameters and per-tick metrics.
    client = MlflowClient(summary.mlflow_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pof3d.study"] == "abl"
    assert {a.path for a in client.list_artifacts(summary.parent_run_id)} == {
        "results.csv",
        "results.md",
        "results_table.json",
    }
    table = client.download_artifacts(summary.parent_run_id, "results_table.json", str(study_env))
    assert [row[0] for row in json.loads(Path(table).read_text())["data"]] == ["full", "no_symmetry"]
    assert {"JS/full", "JS/no_symmetry"} <= set(parent.data.metrics)
    children = _children(summary.mlflow_uri, "pof3d-studies", summary.parent_run_id)
    assert sorted(c.data.tags["pof3d.variant"] for c in children) == ["full", "no_symmetry"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert "loss/G_adv" in child.data.metrics and "eval/js" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "loss/G_adv")
        assert [m.step for m in history] == [4, 8]  # one point per tick, step = images seen
    sym = {c.data.tags["pof3d.variant"]: c.data.params["loss.symmetry_weight"] for c in children}
    assert sym == {"full": "1.0", "no_symmetry": "0.0"}


def test_unschedulable_concurrency_is_refused_before_any_trial(ray_local, study_env) -> None:
    from pof3d.studies.study import run_study

    with pytest.raises(ConfigError, match="--concurrency=2 cannot be scheduled"):
        run_study(
            _request(study_env, "too-many", variants=["full", "no_symmetry"], kimg=0.004, concurrency=2)
        )
    assert not (study_env / "studies" / "too-many").exists()


def test_invalid_search_space_fails_before_any_trial(ray_local, study_env, tmp_path) -> None:
    from pof3d.studies.study import run_study

    space = tmp_path / "space.yaml"
    space.write_text("params: {optim.g_lr: {type: loguniform, low: 0.01, high: 0.001}}\n")
    with pytest.raises(ConfigError, match="low=0.01 is greater than high=0.001"):
        run_study(_request(study_env, "bad-space", mode="search", space=str(space), samples=2, kimg=0.004))
    with pytest.raises(ConfigError, match="optim.glr.*unknown"):
        run_study(
            _request(study_env, "bad-param", mode="search", params=["optim.glr=uniform:0:1"], samples=2)
        )
    assert not (study_env / "studies" / "bad-space").exists()
    assert not (study_env / "studies" / "bad-param").exists()


def test_search_with_asha_stops_a_clearly_worse_trial_early_and_resumes_with_its_history(
    ray_local, study_env, tmp_path, caplog
) -> None:
    """The objective is the R1 term, which is proportional to R1 gamma by construction. The second start
    point has 100x less gamma than the first, so it beats the first rung's median (the first trial);
    the third has 1e5 times the first's gamma, so ASHA's first rung must stop it after one tick.

    The study is interrupted after two trials and resumed: the third trial must be the third start
    point (Optuna's history survived) and be stopped by the rung results recorded before the interruption
    (ASHA's history survived), and the two finished trials must not start again. The best trial, the
    importances and the progress line come from all three."""
    import logging
    import os
    import signal

    from ray import tune

    from pof3d.studies.study import run_study
    from pof3d.studies.trainable import TRIALS_DIR, attempts

    class CtrlCAfterTwoTrials(tune.Callback):
        completed = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed += 1
            if self.completed == 2:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; Tune saves its state and returns

    space = tmp_path / "space.yaml"
    space.write_text(
        "metric: loss/D_r1\nmode: min\n"
        "params: {loss.r1_gamma: {type: loguniform, low: 1.0e-6, high: 1.0e+3}}\n"
        "points: [{loss.r1_gamma: 1.0e-2}, {loss.r1_gamma: 1.0e-4}, {loss.r1_gamma: 1.0e+3}]\n"
    )
    overrides = [*MICRO, "loss.r1_interval=1"]
    request = _request(
        study_env, "search", mode="search", space=str(space), samples=3, kimg=0.008, overrides=overrides
    )
    first = run_study(request, callbacks=[CtrlCAfterTwoTrials()])
    assert not first.finished
    trials = first.study_dir / TRIALS_DIR
    finished_runs = [trials.child(i.path) for i in trials.children()]
    assert len(finished_runs) == 2

    caplog.set_level(logging.INFO, logger="pof3d.studies")
    summary = run_study(_request(study_env, "search"), resume=True)
    assert summary.finished and summary.study_dir.uri == str(study_env / "studies" / "search")
    assert summary.parent_run_id == first.parent_run_id
    # The command's last line (sweeps/ablation.py prints it): where the table is and how to see the parent.
    line = summary.line()
    assert line.startswith("study search finished: 3 row(s) in ") and "mlflow ui --backend-store-uri" in line
    assert f"runs/{summary.parent_run_id}" in line, line
    assert all(attempts(run) == 1 for run in finished_runs)
    rows = {row["loss.r1_gamma"]: row for row in summary.table.rows}
    assert sorted(rows) == [1e-4, 1e-2, 1000.0]
    stopped = [r for r in summary.table.rows if r["status"] == "stopped early"]
    assert [r["loss.r1_gamma"] for r in stopped] == [1000.0]
    assert stopped[0]["kimg"] < 0.008
    assert all(rows[g]["status"] == "done" and rows[g]["kimg"] == pytest.approx(0.008) for g in (1e-2, 1e-4))
    children = _children(summary.mlflow_uri, "pof3d-studies", summary.parent_run_id)
    assert len(children) == 3
    assert sorted(c.info.status for c in children).count("KILLED") == 1

    # Best trial and importances: ranked among the trials at the budget only, in the table, the files,
    # the parent run and the study's log.
    assert [(r["rank"], r["loss.r1_gamma"]) for r in summary.table.rows] == [
        (1, 1e-4),
        (2, 1e-2),
        (None, 1000.0),
    ]
    found = summary.findings
    assert found.best.params == {"loss.r1_gamma": 1e-4} and found.counted == 2
    assert found.importances == {"loss.r1_gamma": pytest.approx(1.0)}
    assert (summary.study_dir / "importances.csv").read_text().startswith("parameter,importance\n")
    parent = MlflowClient(summary.mlflow_uri).get_run(summary.parent_run_id)
    assert parent.data.tags["pof3d.best.loss.r1_gamma"] == "0.0001"
    assert parent.data.tags["pof3d.best_trial"] == found.best.trial_id
    assert parent.data.metrics["importance/loss.r1_gamma"] == pytest.approx(1.0)
    assert parent.data.metrics["best/loss/D_r1"] == pytest.approx(found.best.metrics["loss/D_r1"])
    log = caplog.text
    assert "study search: 3/3 trials finished (2 done, 1 stopped early, 0 failed), 0 running" in log
    assert f"best trial {found.best.trial_id}: loss/D_r1" in log
