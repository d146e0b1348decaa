"""End-to-end training on a real local Ray with real MLflow stores and the real synthetic data set.

The model is shrunk with ``--set`` (32 px output) and runs are a few dozen images long so that the
whole module stays around three minutes on two cores; the wiring exercised is the one of full runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scoped_env import isolated_run_env

from pof3d.checkpoint import latest_checkpoint, load_checkpoint
from pof3d.run_files import RunFiles
from pof3d.storage import Location
from pof3d.testing.micro import MICRO
from pof3d.tracking.ui import command_name, figure_key
from pof3d.train import main

pytestmark = pytest.mark.slow

BATCH = ["--batch", "4"]


def _sets(extra: list[str] = ()) -> list[str]:
    return [arg for item in [*MICRO, *extra] for arg in ("--set", item)]


def _ticks(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps of MLflow image series ``key`` (files ``images/<key, / as ~>+step+<N>+...png``)."""
    paths = [a.path for a in client.list_artifacts(run_id, "images")]
    prefix = f"images/{key.replace('/', '~')}+"
    series = [p for p in paths if p.startswith(prefix) and p.endswith(".png")]
    return sorted(int(p.split("+")[2]) for p in series)


def _assert_continuous(ticks: list[dict], per_tick: int) -> None:
    """Ticks numbered 1..N, each exactly ``per_tick`` images after the previous: nothing twice, no gap."""
    assert [t["tick"] for t in ticks] == list(range(1, len(ticks) + 1))
    assert [t["images_seen"] for t in ticks] == [per_tick * (i + 1) for i in range(len(ticks))]


@pytest.fixture(scope="module", autouse=True)
def _isolated_dirs(tmp_path_factory):
    """The synthetic-set cache and default run root of these tests live in a temporary folder."""
    root = tmp_path_factory.mktemp("train-env")
    with isolated_run_env(root):
        yield


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory) -> tuple[Path, str]:
    """The embedded default (synthetic set generated on first use), shrunk and 16 images long."""
    run_dir = tmp_path_factory.mktemp("runs") / "default"
    evaluate = ["train.eval_kimg=0.016", "train.eval_metrics=js"]
    code = main(["--kimg", "0.016", *BATCH, "--run-dir", str(run_dir), *_sets(evaluate)])
    assert code == 0
    return run_dir, f"sqlite:///{run_dir / 'mlflow.db'}"


def test_embedded_default_tracks_params_metrics_and_artifacts(finished_run, capsys) -> None:
    run_dir, uri = finished_run
    assert (run_dir / "config.json").is_file()
    assert list((Path(os.environ["POF3D_CACHE"])).iterdir()), "the synthetic set was not generated"
    _assert_continuous(_ticks(run_dir), per_tick=4)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.kimg"] == "0.016" and run.data.params["model.image_resolution"] == "32"
    history = client.get_metric_history(run.info.run_id, "loss/G_adv")
    assert [m.step for m in history] == [4, 8, 12, 16]  # step = images seen
    assert "perf/images_per_sec" in run.data.metrics and "perf/data_wait_share" in run.data.metrics
    # One name per rate: the whole tick's, and the steps' own (the faster); no replica spread of one worker.
    assert run.data.metrics["perf/step_images_per_sec"] > run.data.metrics["perf/images_per_sec"]
    assert "images_per_s" not in run.data.metrics and "ddp/param_spread" not in run.data.metrics
    assert run.data.metrics["eval/js"] > 0  # evaluated on rank 0 at kimg 0.016; untrained poses are off
    # Sample grids and pose plots as MLflow image series with a step per snapshot (the UI's slider), in
    # the chart view's "Figures" section, and as files on the run's page.
    for key in ("Figures/samples", "Figures/poses"):
        assert _image_steps(client, run.info.run_id, key) == [8, 16], key
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert figures == {f"samples/{f}-000.0{k}.png" for f in ("fakes", "poses") for k in ("08", "16")}
    # Who ran what: the command, the user, a description that says where to look.
    assert run.data.tags["mlflow.source.name"] == command_name() and run.data.tags["mlflow.user"]
    assert "**Figures**" in run.data.tags["mlflow.note.content"]
    final = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/state.pt", "checkpoint/config.json", "checkpoint/progress.json"} <= final
    _, _, progress = load_checkpoint(latest_checkpoint(run_dir))
    assert progress["images_seen"] == 16 and progress["mlflow_run_id"] == run.info.run_id
    # A descriptive run name; an experiment MLflow opens in its model-training view.
    assert re.fullmatch(r"tiny-s0-\d{8}-\d{4}", run.info.run_name), run.info.run_name
    experiment = client.get_experiment_by_name("pof3d")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # System metrics of the (only) node: CPU and memory at least; no CPU sample reads a meaningless 0 %.
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    cpu = client.get_metric_history(run.info.run_id, "system/node_0/cpu_utilization_percentage")
    assert cpu and all(m.value > 0 for m in cpu), [m.value for m in cpu]


def test_the_final_generator_is_an_mlflow_model_that_generates(finished_run, monkeypatch) -> None:
    """The logged model, loaded back with MLflow, turns latents into the images the checkpoint's G_ema
    makes of them."""
    import mlflow
    import numpy as np
    import torch

    from pof3d.evaluate import load_models
    from pof3d.plots import to_uint8

    run_dir, uri = finished_run
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    (output,) = run.outputs.model_outputs
    assert output.step == 16
    logged = client.get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id
    # "Logged from" the command that trained it, not the Ray worker process that logged it.
    assert logged.tags["mlflow.source.name"] == run.data.tags["mlflow.source.name"]
    # models:/ resolves against the process's tracking URI; set through the environment (restored after
    # the test) because mlflow.set_tracking_uri would also export it to every later run of this session.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    cfg, G, _, _ = load_models(latest_checkpoint(run_dir))
    z = np.random.default_rng(0).standard_normal((2, cfg.model.z_dim)).astype(np.float32)
    images = model.predict(z, params={"truncation_psi": 0.7})
    with torch.no_grad():
        expected = to_uint8(G(torch.from_numpy(z), truncation_psi=0.7, noise_mode="const")["image"])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)


def test_resume_continues_a_finished_run_and_a_time_limit_ends_it_like_its_target(
    finished_run, capsys
) -> None:
    """``--resume`` continues the finished run and its MLflow run; the limit given to this launch has
    passed before its first step, so the launch ends after that step as cleanly as at its target: final
    tick, evaluation and checkpoint, the MLflow run finished with the reason."""
    run_dir, uri = finished_run
    assert main(["--resume", str(run_dir), "--kimg", "1", "--set", "train.time_limit_min=0.001"]) == 0
    out = capsys.readouterr().out
    assert "(stopped at the time limit after 0.020 kimg; --resume" in out, out[-2000:]
    ticks = _ticks(run_dir)
    _assert_continuous(ticks, per_tick=4)
    assert ticks[-1]["images_seen"] == 20 and ticks[-1]["eval/js"] > 0  # the final evaluation
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/G_adv")]
    assert steps == [4, 8, 12, 16, 20]
    assert run.data.tags["resumed.train.kimg"] == "1.0"
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "time limit after 0.020 kimg"
    _, _, progress = load_checkpoint(latest_checkpoint(run_dir))
    assert progress["images_seen"] == 20 and progress["step"] == 5


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(finished_run, capsys) -> None:
    run_dir, _ = finished_run
    before = latest_checkpoint(run_dir)
    started = time.monotonic()
    code = main(["--resume", str(run_dir), "--kimg", "0.1", "--set", "loss.dis_cam_weight=1e40"])
    err = capsys.readouterr().err
    assert code == 1
    # Either a phase's loss is non-finite, or an update left a network non-finite before a snapshot.
    pattern = r"training stopped: non-finite (?:loss in phase|parameters in) (\w+) (?:at|after) step (\d+)"
    stopped = re.search(pattern, err)
    assert stopped, err[-3000:]
    names = ("G_main", "G_density", "D_main", "D_r1", "G", "D", "G_ema")
    assert stopped.group(1) in names and int(stopped.group(2)) >= 5
    assert time.monotonic() - started < 120, "the failure was retried instead of stopping the run"
    assert latest_checkpoint(run_dir) == before
    _, _, progress = load_checkpoint(before)
    assert progress["images_seen"] == 20


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_survive_a_killed_worker_stay_in_sync_and_ignore_a_dead_mlflow(
    ray_local, tmp_path
) -> None:
    """One 2-worker run covers three promises: a SIGKILLed worker is replaced and training resumes from
    the last checkpoint to its target with continuous counters; both ranks hold identical parameters at
    every snapshot; an unreachable tracking server does not stop training."""
    run_dir = tmp_path / "faulty"
    pid_file = run_dir / "workers" / "rank-1.pid"
    killed: list[int] = []

    def kill_rank_1_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                ready = latest_checkpoint(run_dir) is not None and any(
                    t["images_seen"] >= 12 for t in _ticks(run_dir)
                )
            except (OSError, ValueError):  # metrics.jsonl not there yet, or being rewritten
                ready = False
            if ready:
                killed.append(int(pid_file.read_text()))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint, daemon=True)
    killer.start()
    dead = f"http://127.0.0.1:{_closed_port()}"
    args = ["--kimg", "0.024", *BATCH, "--workers", "2", "--run-dir", str(run_dir), "--mlflow-uri", dead]
    assert main([*args, *_sets()]) == 0
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert int(pid_file.read_text()) != killed[0], "rank 1 was not restarted"
    ticks = _ticks(run_dir)
    _assert_continuous(ticks, per_tick=4)
    assert ticks[-1]["images_seen"] == 24
    assert {t["world_size"] for t in ticks} == {2}
    spreads = [t["ddp/param_spread"] for t in ticks if "ddp/param_spread" in t]
    assert spreads == [0.0, 0.0, 0.0]  # identical parameters on both ranks at every snapshot
    _, _, progress = load_checkpoint(latest_checkpoint(run_dir))
    assert progress["images_seen"] == 24 and progress["step"] == 6  # one step per global batch of 4
    assert progress["mlflow_run_id"] is None and not (run_dir / "mlflow.db").exists()


def test_two_workers_train_into_s3_and_resume_auto_continues_the_run(
    ray_local, s3_bucket, tmp_path, monkeypatch
) -> None:
    """Everything the run writes goes to the object store (nothing to a local ``s3:`` folder); a restart
    with the same command and a longer target continues it: ticks, checkpoints and the MLflow run."""
    monkeypatch.chdir(tmp_path)
    root = Location.parse(f"s3://{s3_bucket}/runs/a")
    files = RunFiles(root)
    command = ["--run-dir", root.uri, "--resume", "auto", *BATCH, "--workers", "2", *_sets()]
    assert main(["--kimg", "0.008", *command]) == 0
    assert os.listdir(tmp_path) == []
    tracked = json.loads(files.tracking.read_text())
    assert main(["--kimg", "0.016", *command]) == 0
    assert os.listdir(tmp_path) == []
    ticks = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    _assert_continuous(ticks, per_tick=4)
    assert ticks[-1]["images_seen"] == 16 and {t["world_size"] for t in ticks} == {2}
    assert json.loads(files.config.read_text())["train"]["kimg"] == 0.016
    names = {root.child(i.path).uri[len(root.uri) + 1 :] for i in root.walk()}
    for kimg in ("000.008", "000.016"):
        checkpoint = f"checkpoints/checkpoint-kimg{kimg}"
        assert {f"{checkpoint}/{f}" for f in ("state.pt", "manifest.json", "progress.json")} <= names
        assert {f"samples/fakes-{kimg}.png", f"samples/poses-{kimg}.png"} <= names
    latest = files.latest_checkpoint()
    assert latest == files.checkpoints / "checkpoint-kimg000.016"
    with tempfile.TemporaryDirectory() as scratch:
        _, _, progress = load_checkpoint(latest.download_dir(Path(scratch) / "ck"))
    assert progress["images_seen"] == 16 and progress["step"] == 4
    # One MLflow run (in the local cache's store, found again through tracking.json), steps continuous.
    assert json.loads(files.tracking.read_text()) == tracked
    client = MlflowClient(tracked["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert run.info.run_id == tracked["run_id"] == progress["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/G_adv")] == [4, 8, 12, 16]
    # The figures written to the object store are also the run's image series, one step per snapshot.
    for name in ("samples", "poses"):
        assert _image_steps(client, run.info.run_id, figure_key(name)) == [8, 16], name
