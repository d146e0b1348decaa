"""Studies: variants, search-space validation, concurrency planning, results table and MLflow layout.
The end-to-end Ray Tune runs of the real training are in ``test_study_runs.py``."""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pof3d.config import apply_overrides
from pof3d.errors import ConfigError
from pof3d.presets import load_config, preset
from pof3d.storage import Location
from pof3d.studies import mlflow_wiring
from pof3d.studies.resources import TrialFootprint, plan_concurrency, trial_cpu_threads
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


def test_concurrent_cpu_trials_share_a_nodes_cores_instead_of_each_taking_them_all() -> None:
    tiny = preset("tiny")  # 1 worker x 0.5 CPU + 1 CPU for Ray Data: 1.5 CPU a trial
    # Ten trials fit on a 16-core node: one thread each, not the 15 a worker alone would take.
    assert trial_cpu_threads(tiny, 10, [16.0]) == 1
    # Two trials: half the node each, less a core for Ray Data.
    assert trial_cpu_threads(tiny, 2, [16.0]) == 7
    # The most crowded node decides: 4 trials on the 8-core node (2 threads each), not the 64-core one.
    assert trial_cpu_threads(tiny, 4, [64.0, 8.0]) == 2
    # Two workers per trial share the trial's part of the node.
    two = apply_overrides(tiny, ["train.workers=2"])  # 2.0 CPU a trial
    assert trial_cpu_threads(two, 2, [16.0]) == 3
    # One trial at a time, a thread count the user set, or GPU trials: the worker's own rule holds.
    assert trial_cpu_threads(tiny, 1, [16.0]) is None
    assert trial_cpu_threads(apply_overrides(tiny, ["train.cpu_threads=4"]), 10, [16.0]) is None
    assert trial_cpu_threads(apply_overrides(tiny, ["train.gpus_per_worker=1"]), 4, [16.0]) is None


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
    # The seeds' spread (half their range) beside each column measured with two seeds or more.
    assert full["JS ±"] == pytest.approx(0.1) and table.rows[1]["JS ±"] is None
    assert table.columns.index("JS ±") == table.columns.index("JS") + 1 and "Pose ±" not in table.columns
    csv_path, md_path = table.write(tmp_path)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows[0]["variant"] == "full" and math.isclose(float(rows[0]["JS"]), 0.3)
    assert rows[0]["FID"] == ""  # not measured: empty, never invented
    assert math.isclose(float(rows[0]["JS ±"]), 0.1) and rows[1]["JS ±"] == ""
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


def test_each_trials_run_ends_with_what_the_trial_did_whatever_its_process_managed(tmp_path: Path) -> None:
    """A trial's run can end FAILED or RUNNING when Tune stops it, and RUNNING when it trained to its
    budget but was ended before closing its run; the study gives each run the status of its trial's
    record (and leaves a finished run and a really failed one as they are)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = mlflow_wiring.open_parent(uri, "studies", "search-1", {"mode": "search"})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("studies").experiment_id
    ends = {
        "stopped-a": ("FAILED", "stopped early"),
        "stopped-b": (None, "stopped early"),
        "done-a": ("FINISHED", "done"),
        "done-b": (None, "done"),
        "failed": ("FAILED", "error"),
        "lost": (None, None),  # no record: its process is gone
    }
    runs = {}
    for trial, (status, _) in ends.items():
        runs[trial] = client.create_run(exp, tags=mlflow_wiring.child_tags(parent, "search-1", "x", trial))
        if status:
            client.set_terminated(runs[trial].info.run_id, status=status)
    outcomes = {trial: outcome for trial, (_, outcome) in ends.items() if outcome}
    mlflow_wiring.close_trial_runs(uri, "studies", parent, outcomes)
    after = {trial: client.get_run(run.info.run_id) for trial, run in runs.items()}
    assert {trial: run.info.status for trial, run in after.items()} == {
        "stopped-a": "KILLED",
        "stopped-b": "KILLED",
        "done-a": "FINISHED",
        "done-b": "FINISHED",
        "failed": "FAILED",
        "lost": "KILLED",
    }
    reasons = {trial for trial, run in after.items() if "ASHA" in run.data.tags.get("stop_reason", "")}
    assert reasons == {"stopped-a", "stopped-b"}


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


def _trial(status: str, result: dict) -> object:
    from ray.tune.experiment import Trial

    trial = Trial("trainable", config={}, stub=True)
    trial.update_last_result(result)
    trial.set_status(status)
    return trial


def test_progress_line_counts_trials_best_so_far_and_eta() -> None:
    """Tune's own trial objects: a finished trial at the budget is done, one that ended short was stopped
    by ASHA; the time left is the remaining trials' worth at the rate gained this session."""
    from pof3d.studies.progress import StudyProgress

    trials = [
        _trial("TERMINATED", {"images_seen": 8000, "eval/js": 0.30}),
        _trial("TERMINATED", {"images_seen": 2000, "eval/js": 0.50}),
        _trial("ERROR", {"images_seen": 1000}),
        _trial("RUNNING", {"images_seen": 4000, "eval/js": 0.20}),
        _trial("PENDING", {}),
    ]
    progress = StudyProgress("s", planned=6, target_images=8000, metric="eval/js", mode="min")
    progress.on_step_end(0, trials[:1])  # the session started with one trial's worth done
    line = progress.line(trials, progress._start + 600.0)
    best = trials[3].trial_id
    assert line == (
        f"study s: 3/6 trials finished (1 done, 1 stopped early, 1 failed), 1 running; best eval/js 0.2 "
        f"({best} at kimg 4); elapsed 10m00s, eta 10m00s"
    )  # 3.5 trials' worth done, 2.5 of them this session in 10 min: the 2.5 left take 10 min
    maximising = StudyProgress("s", 6, 8000, "eval/js", "max")
    assert "best eval/js 0.5 (" in maximising.line(trials, maximising._start + 1.0)
    restored = pickle.loads(pickle.dumps(progress))  # how Tune keeps it across --resume: clock reset
    assert restored._work_at_start is None and restored.planned == 6


def test_search_findings_rank_by_the_objective_at_the_budget_only() -> None:
    """The best trial and Optuna's importances use the trials that reached the budget: a stopped trial's
    better value at a smaller budget does not count. The objective depends on one parameter only, so
    that parameter must carry nearly all the importance."""
    from pof3d.studies.importance import findings, ranked
    from pof3d.studies.results import TrialRecord, build_table
    from pof3d.studies.space import load_space

    space = load_space(
        None,
        load_config("tiny"),
        ["optim.pose_lr=loguniform:1e-6:1e-3", "loss.symmetry_weight=uniform:0:2"],
        ["eval/js"],
    )
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        lr, sym = float(10 ** rng.uniform(-6, -3)), float(rng.uniform(0, 2))
        js = 0.1 + 0.05 * (np.log10(lr) + 6) + 1e-4 * sym
        records.append(TrialRecord(f"t{i}", "search", 0, "done", {"eval/js": js, "images_seen": 8000},
                                   {"optim.pose_lr": lr, "loss.symmetry_weight": sym}))  # fmt: skip
    records.append(TrialRecord("early", "search", 0, "stopped early", {"eval/js": 0.0}, records[0].params))
    found = findings(records, space)
    assert (
        found.counted == 12
        and found.best.trial_id == min(records[:12], key=lambda r: r.metrics["eval/js"]).trial_id
    )
    assert list(found.importances) == ["optim.pose_lr", "loss.symmetry_weight"]
    assert found.importances["optim.pose_lr"] > 0.9
    table = ranked(build_table(records, by_variant=False), records, found)
    assert table.columns[:3] == ["trial", "status", "rank"]
    assert [row["rank"] for row in table.rows] == [*range(1, 13), None]
    assert table.rows[-1]["trial"] == "early"
    single = findings(records[:1], space)
    assert single.importances == {} and "at least 2 trials" in single.note
