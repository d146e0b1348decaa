"""What a user sees of a run in MLflow's UI, against real SQLite stores and the installed MLflow: links
that open the training view, who ran what, figures where the UI shows them, system metrics that
measure what they say and keep their times, and a generator logged without console noise."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.tracking.fluent
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pof3d.generator import Generator
from pof3d.presets import load_config
from pof3d.studies.mlflow_wiring import open_parent
from pof3d.testing.micro import MICRO
from pof3d.tracking import Tracker, logged_model, ui_command
from pof3d.tracking.system_metrics import NodeMonitor
from pof3d.tracking.ui import (
    NOTE,
    PARENT_RUN,
    SOURCE_NAME,
    TRAINING_VIEW_QUERY,
    USER,
    command_line,
    command_name,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"preset": "tiny", "train.kimg": 0.05, "train.seed": 0, "run.run_dir": "/runs/a"}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def experiment(request) -> str:
    return request.node.name


def test_printed_links_open_the_runs_in_the_training_view(uri: str, experiment: str) -> None:
    """MLflow 3.17's UI picks its view from the URL's ``workflowType`` (else the browser's last choice,
    GenAI at first); the experiment's kind tag no longer decides it."""
    tracker = Tracker.open(uri, experiment, "run-a", PARAMS)
    tracker.finish()
    experiment_id = MlflowClient(uri).get_run(tracker.run_id).info.experiment_id
    assert ui_command(uri, tracker.run_id) == (
        f"mlflow ui --backend-store-uri {uri}, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{tracker.run_id}?{TRAINING_VIEW_QUERY}"
    )
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    # The installed UI reads that query and knows that value.
    (bundle,) = (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js")
    text = bundle.read_text(errors="replace")
    assert '.get("workflowType")' in text and 'MACHINE_LEARNING="machine_learning"' in text


def test_runs_say_who_ran_what_and_trials_take_it_from_their_study(uri: str, experiment: str) -> None:
    client = MlflowClient(uri)
    tracker = Tracker.open(uri, experiment, "run-a", PARAMS)
    tracker.finish()
    tags = client.get_run(tracker.run_id).data.tags
    assert tags[SOURCE_NAME] == command_name() and tags[USER] == getpass.getuser()
    assert f"started by `{command_line()}`" in tags[NOTE] and "**Figures**" in tags[NOTE]
    # A continued run keeps the description its user edited.
    client.set_tag(tracker.run_id, NOTE, "my notes")
    Tracker.open(uri, experiment, "run-a", PARAMS, run_id=tracker.run_id).finish()
    assert client.get_run(tracker.run_id).data.tags[NOTE] == "my notes"

    parent = open_parent(uri, experiment, "study-a", {"mode": "search"})
    parent_tags = client.get_run(parent).data.tags
    assert parent_tags[SOURCE_NAME] == command_name() and parent_tags[USER] == getpass.getuser()
    assert "study `study-a`" in parent_tags[NOTE]
    # A trial runs in a Ray worker: its source and user are its study's.
    client.set_tag(parent, SOURCE_NAME, "python sweeps/ablation.py")
    client.set_tag(parent, USER, "someone")
    trial = Tracker.open(uri, experiment, "trial-a", PARAMS, tags={PARENT_RUN: parent})
    trial.finish()
    trial_tags = client.get_run(trial.run_id).data.tags
    assert trial_tags[SOURCE_NAME] == "python sweeps/ablation.py" and trial_tags[USER] == "someone"
    assert "started by `python sweeps/ablation.py`" in trial_tags[NOTE]


def test_figures_are_an_image_series_in_their_own_section_and_files_on_the_run_page(
    tmp_path: Path, uri: str, experiment: str
) -> None:
    tracker = Tracker.open(uri, experiment, "run-a", PARAMS)
    for name, file in (("samples", "fakes-000.008.png"), ("poses", "poses-000.008.png")):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / file)
        tracker.log_figure(name, tmp_path / file, step=8)
    tracker.finish()
    client = MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(tracker.run_id, "samples")}
    assert files == {"samples/fakes-000.008.png", "samples/poses-000.008.png"}
    # MLflow writes "/" of a key as "~"; the chart view's section is what comes before the last "/".
    images = [a.path for a in client.list_artifacts(tracker.run_id, "images") if a.path.endswith(".png")]
    keys = sorted(path.split("/", 1)[1].split("+")[0].replace("~", "/") for path in images)
    assert keys == ["Figures/poses", "Figures/samples"]
    assert all("+step+8+" in path for path in images)


def test_every_cpu_sample_measures_the_interval_before_it() -> None:
    """The first sample (the sampling thread's first reading) and the last (taken when sampling stops)
    read 0 % when psutil had no earlier reading of the same thread to compare with."""
    samples: list[tuple[dict[str, float], int, int]] = []
    monitor = NodeMonitor("node_0", lambda *sample: samples.append(sample), interval_s=0.3)
    busy_until = time.monotonic() + 1.2
    while time.monotonic() < busy_until:  # one core busy: the node is far from idle
        sum(i * i for i in range(1000))
    monitor.stop()
    cpu = [figures["system/node_0/cpu_utilization_percentage"] for figures, _, _ in samples]
    assert len(cpu) >= 3 and min(cpu) > 0, cpu
    assert [index for _, index, _ in samples] == list(range(len(samples)))


def test_system_samples_kept_while_the_store_is_busy_keep_the_time_they_were_taken(
    uri: str, experiment: str, monkeypatch
) -> None:
    """Samples wait in the sender's queue behind a call that holds it (as they do while a server is
    away); each one still lands at the time it was taken, not in a burst at the time it was sent."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment(experiment)).info.run_id
    tracker = Tracker(uri, run_id, node_id="node_0")
    tracker._submit("hold", lambda: time.sleep(1.5))
    released = time.time() + 1.5
    time.sleep(1.6)
    tracker.close()
    history = MlflowClient(uri).get_metric_history(run_id, "system/node_0/cpu_utilization_percentage")
    stamps = sorted(m.timestamp / 1000 for m in history)
    assert len(stamps) >= 3
    assert stamps[0] < released - 0.5, "the first sample was stamped when it was sent"
    assert all(0.1 < later - earlier < 1.0 for earlier, later in zip(stamps[:-2], stamps[1:-1], strict=True))


def test_the_generator_is_logged_as_from_the_runs_command_without_progress_bars(
    tmp_path: Path, uri: str, experiment: str, capfd, process_wide_mlflow_state
) -> None:
    tracker = Tracker.open(uri, experiment, "run-a", PARAMS)
    tracker.finish()
    client = MlflowClient(uri)
    client.set_tag(tracker.run_id, SOURCE_NAME, "python -m pof3d.train")
    cfg = load_config("tiny", MICRO)
    artifacts = logged_model.stage_generator(Generator(cfg.model), cfg, tmp_path / "staged")
    capfd.readouterr()
    logged_model.log_generator(uri, tracker.run_id, artifacts, step=8)
    assert "Downloading artifacts" not in capfd.readouterr().err
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.tags[SOURCE_NAME] == "python -m pof3d.train" and model.tags[USER] == getpass.getuser()


def test_importing_the_logged_model_raises_no_type_hint_warning() -> None:
    """MLflow checks ``predict``'s type hints when the class is defined, i.e. on import (a fresh process)."""
    code = "import warnings; warnings.simplefilter('always'); import pof3d.tracking.logged_model"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "type hints" not in result.stderr, result.stderr[-3000:]


@pytest.fixture
def process_wide_mlflow_state():
    """log_generator sets MLflow's process-wide tracking URI and experiment (in a worker, nothing else
    uses them); here they are put back after the test, so that later tests do not inherit them."""
    yield
    mlflow.set_tracking_uri(None)  # also clears MLFLOW_TRACKING_URI, which it had exported
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None  # no public way to unset it
