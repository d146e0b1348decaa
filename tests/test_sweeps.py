"""Studies: variants, search-space validation, concurrency planning, results table, MLflow layout,
and end-to-end Ray Tune runs of the real training (ablation, Optuna + ASHA search, resume)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import optuna
import pytest
from micro_config import MICRO as MICRO_MODEL
from mlflow.tracking import MlflowClient
from scoped_env import isolated_run_env

from pof3d.config import apply_overrides, preset
from pof3d.errors import ConfigError
from pof3d.storage import Location
from pof3d.studies import mlflow_wiring
from pof3d.studies.resources import TrialFootprint, plan_concurrency
from pof3d.studies.results import Table, TrialRecord, build_table, variant_metrics
from pof3d.studies.space import load_space
from pof3d.studies.variants import VARIANTS, parse_variants, variant_overrides

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPACE = ROOT / "sweeps" / "search_space.example.yaml"

# ---------------------------------------------------------------------------------------------
# Variants


def test_variants_are_the_posters_rows_as_config_overrides() -> None:
    base = preset("ffhq256")
    cfgs = {name: apply_overrides(base, variant_overrides(name, base)) for name in VARIANTS}
    assert set(cfgs) == {"full", "no_symmetry", "no_pose_aware_d", "pose_lr_x10", "pose_lr_x0.1"}
    assert cfgs["full"] == base
    assert cfgs["no_symmetry"].loss.symmetry_weight == 0
    assert cfgs["no_pose_aware_d"].model.pose_aware_d is False
    assert cfgs["no_pose_aware_d"].loss.dis_cam_weight == cfgs["no_pose_aware_d"].loss.pose_gd_weight == 0
    # The poster's lr rows: 2.5e-4 and 2.5e-6 for the pose learner, everything else untouched.
    assert cfgs["pose_lr_x10"].optim.pose_lr == pytest.approx(2.5e-4)
    assert cfgs["pose_lr_x0.1"].optim.pose_lr == pytest.approx(2.5e-6)
    assert cfgs["pose_lr_x10"].optim.g_lr == base.optim.g_lr


def test_pose_lr_variants_scale_the_presets_own_rate() -> None:
    base = apply_overrides(preset("tiny"), ["optim.pose_lr=1e-3"])
    cfg = apply_overrides(base, variant_overrides("pose_lr_x0.1", base))
    assert cfg.optim.pose_lr == pytest.approx(1e-4)


def test_variant_names_are_checked() -> None:
    assert parse_variants("full, no_symmetry") == ["full", "no_symmetry"]
    with pytest.raises(ConfigError, match="unknown variant 'no_sym'.*full"):
        parse_variants("full,no_sym")
    with pytest.raises(ConfigError, match="twice"):
        parse_variants("full,full")
    with pytest.raises(ConfigError, match="at least one"):
        parse_variants(" , ")


# ---------------------------------------------------------------------------------------------
# Search space


def test_example_space_parses_and_samples_conditionals() -> None:
    space = load_space(EXAMPLE_SPACE, preset("tiny"))
    assert space.metrics == ("eval/js",) and space.modes == ("min",)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        fixed = space(trial) or {}
        params = {**trial.params, **fixed}
        seen.add(params["model.pose_aware_d"])
        assert 2.5e-6 <= params["optim.pose_lr"] <= 2.5e-4
        if params["model.pose_aware_d"]:
            assert "loss.dis_cam_weight" in trial.params and params["loss.dis_cam_weight"] >= 0.5
        else:
            # Conditional parameter not sampled; it takes its 'otherwise' value.
            assert "loss.dis_cam_weight" not in trial.params and fixed["loss.dis_cam_weight"] == 0.0
        cfg = apply_overrides(preset("tiny"), [f"{k}={v}" for k, v in params.items()])
        assert cfg.optim.pose_lr == pytest.approx(params["optim.pose_lr"])
    assert seen == {True, False}


def test_flags_add_to_the_file_and_multi_objective(tmp_path: Path) -> None:
    space = load_space(
        None,
        preset("tiny"),
        flags=["optim.g_lr=loguniform:1e-4:1e-2", "model.pose_aware_d=choice:true,false"],
        metrics=["eval/js", "eval/pose_error_deg"],
        modes=["min"],
    )
    assert [p.path for p in space.params] == ["optim.g_lr", "model.pose_aware_d"]
    assert space.params[1].values == (True, False)
    assert space.multi_objective and space.modes == ("min", "min")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "params: {optim.gen_lr: {type: uniform, low: 0, high: 1}}",
            "optim.gen_lr.*unknown.*valid fields of optim",
        ),
        ("params: {optimizer.g_lr: {type: uniform, low: 0, high: 1}}", "not a config field"),
        (
            "params: {optim.g_lr: {type: loguniform, low: 0.1, high: 0.01}}",
            "low=0.1 is greater than high=0.01",
        ),
        ("params: {optim.g_lr: {type: loguniform, low: 0, high: 0.01}}", "loguniform needs low > 0"),
        ("params: {optim.g_lr: {type: normal, low: 0, high: 1}}", "type 'normal' is not one of"),
        ("params: {train.batch: {type: int, low: 0.5, high: 8}}", "integer bounds"),
        ("params: {model.pose_aware_d: {type: choice, values: [true, maybe]}}", "'maybe' is not valid"),
        (
            "params: {loss.dis_cam_weight: {type: uniform, low: 0, high: 1,"
            " when: {model.pose_aware_d: true}}}",
            "'when' refers to 'model.pose_aware_d'",
        ),
        ("metric: js\nmode: lowest\nparams: {optim.g_lr: {type: uniform, low: 0, high: 1}}", "mode 'lowest'"),
        ("params: {}", "non-empty mapping"),
        (
            "params: {optim.g_lr: {type: uniform, low: 0, high: 1}}\npoints: [{optim.d_lr: 0.1}]",
            "not searched",
        ),
        (
            "params: {train.batch: {type: int, low: 4, high: 8}}\npoints: [{train.batch: 0}]",
            "not a valid config",
        ),
        ("space: {}", "unknown top-level key"),
    ],
)
def test_invalid_space_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_space(path, preset("tiny"))
    assert str(path) in str(info.value)


def test_space_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml", preset("tiny"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_space(bad, preset("tiny"))


def test_tiny_studies_default_to_short_trials() -> None:
    from pof3d.studies.study import StudyRequest, base_overrides

    assert "train.kimg=0.2" in base_overrides(StudyRequest())
    assert "train.kimg=0.05" in base_overrides(StudyRequest(kimg=0.05))
    assert not any(o.startswith("train.kimg") for o in base_overrides(StudyRequest(preset="ffhq256")))


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_concurrency_follows_the_machine() -> None:
    tiny = TrialFootprint.of(preset("tiny"))  # 1 worker x 0.5 CPU + 1 CPU for Ray Data
    assert plan_concurrency(tiny, {"CPU": 2.0}, None, trials=5) == 1
    assert plan_concurrency(tiny, {"CPU": 16.0}, None, trials=5) == 5
    assert plan_concurrency(tiny, {"CPU": 16.0}, None, trials=3) == 3


def test_unschedulable_concurrency_is_refused_with_the_sums() -> None:
    tiny = TrialFootprint.of(preset("tiny"))
    with pytest.raises(ConfigError, match=r"--concurrency=2 cannot be scheduled.*3 CPU.*2 CPU.*at most 1"):
        plan_concurrency(tiny, {"CPU": 2.0}, 2, trials=2)
    gpu = TrialFootprint.of(apply_overrides(preset("tiny"), ["train.workers=2", "train.gpus_per_worker=1"]))
    with pytest.raises(ConfigError, match="one trial needs .*2 GPU.*has 8 CPU and 0 GPU"):
        plan_concurrency(gpu, {"CPU": 8.0}, None, trials=1)
    assert plan_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}, None, trials=8) == 4


# ---------------------------------------------------------------------------------------------
# Results table


def test_results_table_one_row_per_variant_with_seed_means(tmp_path: Path) -> None:
    records = [
        TrialRecord("a", "full", 0, "TERMINATED", {"eval/js": 0.2, "loss/G_adv": 1.0, "images_seen": 40}),
        TrialRecord("b", "full", 1, "TERMINATED", {"eval/js": 0.4, "loss/G_adv": 3.0, "images_seen": 40}),
        TrialRecord(
            "c",
            "no_symmetry",
            0,
            "TERMINATED",
            {"eval/js": 0.5, "eval/pose_error_deg": 7.5, "loss/G_adv": 2.0},
        ),
    ]
    table = build_table(records)
    assert [r["variant"] for r in table.rows] == ["full", "no_symmetry"]
    full = table.rows[0]
    assert full["JS"] == pytest.approx(0.3) and full["loss/G_adv"] == pytest.approx(2.0)
    assert full["trials"] == 2 and full["kimg"] == pytest.approx(0.04) and full["FID"] is None
    assert table.rows[1]["Pose"] == 7.5
    csv_path, md_path = table.write(tmp_path)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows[0]["variant"] == "full" and math.isclose(float(rows[0]["JS"]), 0.3)
    assert rows[0]["FID"] == ""  # not measured: empty, never invented
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| variant | trials | status | kimg | FID | Depth | Pose | JS |")
    assert "| no_symmetry |" in md[3] and "| 0.5 |" in md[3]
    assert "FD_random" not in table.columns  # a stand-in column appears only where it was measured
    records[2].metrics["eval/fd_random"] = 12.5
    table = build_table(records)
    assert (
        "FD_random" in table.columns
        and table.rows[1]["FD_random"] == 12.5
        and table.rows[0]["FD_random"] is None
    )


# ---------------------------------------------------------------------------------------------
# MLflow parent / child layout


def test_parent_and_child_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = mlflow_wiring.open_parent(uri, "studies", "abl-1", {"mode": "ablation"})
    assert mlflow_wiring.open_parent(uri, "studies", "abl-1", {}, existing_run_id=parent) == parent
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("studies").experiment_id
    child = client.create_run(exp, tags=mlflow_wiring.child_tags(parent, "abl-1", "full", "t0"))
    table = Table(["variant", "JS"], [{"variant": "full", "JS": 0.25}, {"variant": "no_symmetry", "JS": 0.5}])
    files = list(table.write(tmp_path))
    mlflow_wiring.close_parent(uri, parent, table, files, variant_metrics(table))
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in runs] == [child.info.run_id]
    assert runs[0].data.tags["pof3d.variant"] == "full"
    done = client.get_run(parent)
    assert done.info.status == "FINISHED" and done.data.params["mode"] == "ablation"
    assert done.data.metrics == {"JS/full": 0.25, "JS/no_symmetry": 0.5}  # one chart lines variants up
    assert {a.path for a in client.list_artifacts(parent)} == {
        "results.csv",
        "results.md",
        "results_table.json",
    }
    # A resumed study closes the parent again: its table replaces the first, rows are not doubled.
    table.rows[0]["JS"] = 0.2
    mlflow_wiring.close_parent(uri, parent, table, files, variant_metrics(table))
    saved = json.loads(
        Path(client.download_artifacts(parent, "results_table.json", str(tmp_path))).read_text()
    )
    assert saved["columns"] == ["variant", "JS"]
    assert saved["data"] == [["full", 0.2], ["no_symmetry", 0.5]]


def test_studies_honour_mlflow_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    study = Location.parse(tmp_path / "study")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert mlflow_wiring.tracking_uri(None, None, study) == "http://tracking.example:5000"
    assert mlflow_wiring.tracking_uri("sqlite:///x.db", None, study) == "sqlite:///x.db"
    # A resumed study stays with the store that holds its parent run.
    assert mlflow_wiring.tracking_uri(None, "sqlite:///first.db", study) == "sqlite:///first.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_wiring.tracking_uri(None, None, study) == f"sqlite:///{study.local_path}/mlflow.db"
    # SQLite needs a local file: a study on an object store keeps its store in the local cache.
    monkeypatch.setenv("POF3D_CACHE", str(tmp_path / "cache"))
    remote = mlflow_wiring.tracking_uri(None, None, Location.parse("s3://bucket/studies/abl-1"))
    cache = (tmp_path / "cache").resolve()
    assert remote.startswith(f"sqlite:///{cache}/mlflow/") and remote.endswith("/mlflow.db")


# ---------------------------------------------------------------------------------------------
# End to end: real Ray Tune trials of the real training, real Optuna, real MLflow (slow)

# The training tests' micro model: a few seconds per trial on 2 cores.
MICRO = [*MICRO_MODEL, "train.eval_metrics=pose,js"]


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


@pytest.mark.slow
def test_two_variant_ablation_tracks_parent_children_and_table(ray_local, study_env) -> None:
    from pof3d.studies.study import run_study

    summary = run_study(_request(study_env, "abl", variants=["full", "no_symmetry"], kimg=0.008))
    assert summary.finished
    assert [r["variant"] for r in summary.table.rows] == ["full", "no_symmetry"]
    for row in summary.table.rows:
        assert row["status"] == "done" and row["kimg"] == pytest.approx(0.008)
        assert row["JS"] > 0  # measured at the end of each trial: the untrained poses are off the data's
        assert math.isfinite(row["loss/G_adv"]) and math.isfinite(row["loss/D_real"])
    assert row["loss/G_sym"] is None  # the no_symmetry trial has no symmetry term at all
    assert summary.table.rows[0]["loss/G_sym"] is not None
    assert (summary.study_dir / "results.csv").is_file() and (summary.study_dir / "results.md").is_file()
    assert summary.study_dir.uri == str(study_env / "studies" / "abl")

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


@pytest.mark.slow
def test_unschedulable_concurrency_is_refused_before_any_trial(ray_local, study_env) -> None:
    from pof3d.studies.study import run_study

    with pytest.raises(ConfigError, match="--concurrency=2 cannot be scheduled"):
        run_study(
            _request(study_env, "too-many", variants=["full", "no_symmetry"], kimg=0.004, concurrency=2)
        )
    assert not (study_env / "studies" / "too-many").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_interrupted_study_on_s3_resumes_without_rerunning_finished_trials(
    ray_local, study_env, s3_bucket
) -> None:
    """The study keeps all its state on the object store (Tune's and the project's own files); resumed
    from there, it finishes without starting the finished trial again."""
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
    request = _request(study_env, "resume", variants=["full", "pose_lr_x10"], kimg=0.008)
    request.storage = storage
    first = run_study(request, callbacks=[CtrlCAfterFirstTrial()])
    assert not first.finished and first.study_dir.uri == f"{storage}/resume"
    trials = first.study_dir / TRIALS_DIR
    runs = [trials.child(i.path) for i in trials.children() if i.type == pafs.FileType.Directory]

    def ticks(run) -> int:
        metrics = run / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    done = [r for r in runs if ticks(r) == 2]
    assert len(done) == 1
    lines_before = (done[0] / "metrics.jsonl").read_text()

    again = _request(study_env, "resume")
    again.storage = storage
    second = run_study(again, resume=True)
    assert second.finished and second.parent_run_id == first.parent_run_id
    assert sorted(r["variant"] for r in second.table.rows) == ["full", "pose_lr_x10"]
    assert all(r["status"] == "done" for r in second.table.rows)
    assert (second.study_dir / "results.md").is_file()
    # The finished trial was not started again; its files are untouched.
    assert attempts(done[0]) == 1
    assert (done[0] / "metrics.jsonl").read_text() == lines_before
    children = _children(second.mlflow_uri, "pof3d-studies", second.parent_run_id)
    assert sorted(c.data.tags["pof3d.variant"] for c in children) == ["full", "pose_lr_x10"]


@pytest.mark.slow
def test_search_with_asha_stops_a_clearly_worse_trial_early(ray_local, study_env, tmp_path) -> None:
    """The objective is the R1 term, which is proportional to R1 gamma by construction. The start points
    lower gamma 100x per trial, so each good trial beats the rung median of those before it; the last
    has 1e5 times the largest gamma before it, so ASHA's first rung must stop it after one tick."""
    from pof3d.studies.study import run_study

    space = tmp_path / "space.yaml"
    space.write_text(
        "metric: loss/D_r1\nmode: min\n"
        "params: {loss.r1_gamma: {type: loguniform, low: 1.0e-6, high: 1.0e+3}}\n"
        "points: [{loss.r1_gamma: 1.0e-2}, {loss.r1_gamma: 1.0e-4}, {loss.r1_gamma: 1.0e-6},"
        " {loss.r1_gamma: 1.0e+3}]\n"
    )
    overrides = [*MICRO, "loss.r1_interval=1"]
    summary = run_study(
        _request(
            study_env, "search", mode="search", space=str(space), samples=4, kimg=0.016, overrides=overrides
        )
    )
    assert summary.finished
    rows = {row["loss.r1_gamma"]: row for row in summary.table.rows}
    assert len(summary.table.rows) == 4
    stopped = [r for r in summary.table.rows if r["status"] == "stopped early"]
    assert [r["loss.r1_gamma"] for r in stopped] == [1000.0]
    assert stopped[0]["kimg"] < 0.016
    assert all(
        rows[g]["status"] == "done" and rows[g]["kimg"] == pytest.approx(0.016) for g in (1e-2, 1e-4, 1e-6)
    )
    children = _children(summary.mlflow_uri, "pof3d-studies", summary.parent_run_id)
    assert len(children) == 4
    assert sorted(c.info.status for c in children).count("KILLED") == 1
