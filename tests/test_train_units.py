"""Fast checks of the training wiring that need no Ray workers: progress figures, resource and
request checks, CLI exit codes, and MLflow tracking against a real local store or a dead server."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pof3d.checkpoint import save_checkpoint
from pof3d.distributed.launcher import decode_task_cap
from pof3d.distributed.plan import TrainRequest, flag_overrides, plan_run
from pof3d.distributed.progress import (
    TickMeter,
    TimeLimit,
    deadline,
    format_eta,
    next_boundary,
    progress_line,
)
from pof3d.distributed.resources import check_resources
from pof3d.errors import ConfigError
from pof3d.presets import load_config
from pof3d.storage import Location
from pof3d.tracking import Tracker, default_tracking_uri, ui_command
from pof3d.train import main


def test_next_boundary_is_the_next_multiple() -> None:
    assert next_boundary(0, 0.2) == 200
    assert next_boundary(199, 0.2) == 200
    assert next_boundary(200, 0.2) == 400
    assert next_boundary(1000, 0.004) == 1004


def test_tick_meter_averages_figures_and_measures_throughput() -> None:
    clock = iter([0.0, 10.0, 14.0])
    meter = TickMeter(target_images=100, clock=lambda: next(clock))
    meter.update({"loss/G_adv": 1.0, "pose/h_mean_deg": 90.0}, images=8, data_wait=1.0, step_time=4.0)
    meter.update({"loss/G_adv": 3.0, "bad": math.nan}, images=12, data_wait=0.0, step_time=4.0)
    out = meter.close(images_seen=20)
    assert out["loss/G_adv"] == pytest.approx(2.0)
    assert "bad" not in out
    assert out["perf/images_per_sec"] == pytest.approx(2.0)  # 20 images in 10 s
    assert out["perf/sec_per_kimg"] == pytest.approx(500.0)
    assert out["perf/data_wait_share"] == pytest.approx(1.0 / 8.0)
    assert out["perf/eta_sec"] == pytest.approx(40.0)  # 80 images left at 2 img/s
    line = progress_line(3, 20, 100, out)
    assert line.startswith("tick 3 | kimg 0.020/0.1 | G adv 2 | pose h 90.0° |") and "eta 0m40s" in line
    assert "gpu" not in line  # a CPU run has no GPU memory to show
    assert progress_line(3, 20, 100, out | {"perf/gpu_mem_peak_gb": 3.14}).endswith(" | gpu 3.1 GiB peak")
    second = meter.close(images_seen=20)  # the meter restarted: no figures carried over
    assert "loss/G_adv" not in second and second["perf/images_per_sec"] == 0.0
    assert format_eta(math.inf) == "?" and format_eta(3725) == "1h02m"


def test_tick_meter_names_the_ticks_rate_and_the_steps_rate_apart() -> None:
    """``perf/images_per_sec`` is over the tick's wall clock (data wait, evaluation and snapshots
    included), ``perf/step_images_per_sec`` over the trainer's own step time (``time/step_s``)."""
    clock = iter([0.0, 10.0])
    meter = TickMeter(target_images=100, clock=lambda: next(clock))
    meter.update({"time/step_s": 1.5}, images=8, data_wait=0.5, step_time=2.0)
    meter.update({"time/step_s": 2.5}, images=8, data_wait=0.0, step_time=2.5)
    out = meter.close(images_seen=16)
    assert out["perf/images_per_sec"] == pytest.approx(1.6)  # 16 images in the tick's 10 s
    assert out["perf/step_images_per_sec"] == pytest.approx(4.0)  # 16 images in 4 s of steps


def test_time_limit_is_rank_0s_clock_against_the_launch_deadline() -> None:
    assert deadline(0.0, 100.0) is None and deadline(1.5, 100.0) == 190.0
    assert not TimeLimit(None).reached() and TimeLimit(None).remaining() == math.inf
    now = [150.0]
    limit = TimeLimit(190.0, clock=lambda: now[0])
    assert not limit.reached() and limit.remaining() == 40.0
    now[0] = 190.0
    assert limit.reached() and limit.remaining() == 0.0
    assert not limit.reached(rank=1)  # alone, a rank other than 0 never decides by its own clock
    with pytest.raises(ConfigError, match="train.time_limit_min=-1.0: expected minutes >= 0"):
        load_config("tiny", ["train.time_limit_min=-1"])


def _agree(rank: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo group asking :class:`TimeLimit` with its own clock, twice: once with
    only rank 0's clock past the deadline, once with only rank 1's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        answers = [
            TimeLimit(100.0, clock=lambda c=c: c[rank]).reached(rank, 2) for c in ((101, 99), (99, 101))
        ]
    finally:
        dist.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(answers))


@pytest.mark.slow  # two spawned processes: about 10 s alone, over 30 s on a busy 2-core machine
def test_every_rank_takes_rank_0s_answer(tmp_path) -> None:
    """Clocks disagree across processes; all ranks must stop (or go on) after the same step."""
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == [True, False]


def test_resource_check_rejects_requests_that_would_starve_ray_data() -> None:
    cfg = load_config("tiny", ["train.workers=2", "train.cpus_per_worker=0.5"])
    check_resources(cfg, {"CPU": 2.0})  # 1 CPU for training, 1 for data
    check_resources(load_config("tiny", ["train.workers=3", "train.batch=6"]), {"CPU": 2.0})  # 0.5 left
    greedy = load_config("tiny", ["train.workers=2", "train.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker=1 = 2 CPUs .* cluster's 2 CPUs"):
        check_resources(greedy, {"CPU": 2.0})
    gpu = load_config("tiny", ["train.workers=2", "train.gpus_per_worker=1"])
    with pytest.raises(ConfigError, match="2 GPUs, but the Ray cluster has 0"):
        check_resources(gpu, {"CPU": 16.0})
    with pytest.raises(ConfigError, match=r"train.resource_wait_min=-1.0: expected minutes >= 0"):
        load_config("tiny", ["train.resource_wait_min=-1"])


def test_the_stream_runs_decode_tasks_per_worker_of_the_largest_group() -> None:
    assert decode_task_cap(load_config("tiny")) == 1  # one task at a time for one worker, by default
    assert decode_task_cap(load_config("tiny", ["data.decode_tasks=3", "train.workers=2"])) == 6
    elastic = load_config("tiny", ["data.decode_tasks=2", "train.workers=1", "train.max_workers=4"])
    assert decode_task_cap(elastic) == 8  # made once per group: room for the largest
    assert decode_task_cap(load_config("tiny", ["data.decode_tasks=0"])) is None  # as CPUs allow


def test_flags_become_overrides_only_when_given() -> None:
    assert flag_overrides(TrainRequest()) == []
    request = TrainRequest(kimg=0.5, workers=2, data="/d")
    # A fixed --workers N also sets max_workers=0, so that it replaces a resumed run's elastic range.
    expected = ["data.path=/d", "train.kimg=0.5", "train.workers=2", "train.max_workers=0"]
    assert flag_overrides(request) == expected


def test_bad_requests_are_config_errors_before_anything_runs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="valid fields of train"):
        plan_run(TrainRequest(overrides=["train.nope=1"], run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="train.eval_metrics='pose,nope': unknown metric 'nope'"):
        evaluating = ["train.eval_kimg=1", "train.eval_metrics=pose,nope"]
        plan_run(TrainRequest(overrides=evaluating, run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="no such path"):
        plan_run(TrainRequest(resume=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        plan_run(TrainRequest(resume=str(tmp_path)))


def test_cli_exits_2_on_config_errors(tmp_path, capsys) -> None:
    assert main(["--set", "loss.nope=1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown field loss.nope" in capsys.readouterr().err
    assert main(["--batch", "3", "--workers", "4", "--run-dir", str(tmp_path / "r")]) == 2
    assert "makes 3 micro-batch(es), fewer than the 4 worker(s)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_tracker_logs_params_metrics_and_continues_a_run(tmp_path) -> None:
    uri = default_tracking_uri(tmp_path)
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    tracker = Tracker.open(uri, "exp", "run-a", {"train.kimg": 1.0, "model.pivot": (0.0, 0.0, 0.2)})
    assert tracker.active
    tracker.log_metrics({"loss/G_adv": 0.5, "perf/eta_sec": math.inf}, step=8)
    (tmp_path / "a.txt").write_text("x")
    tracker.log_artifact(tmp_path / "a.txt", "files")
    tracker.finish()
    again = Tracker.open(uri, "exp", "run-a", {"train.kimg": 2.0, "extra": 1}, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    again.log_metrics({"loss/G_adv": 0.25}, step=16)
    again.finish()  # calls are sent in the background; finishing waits for them
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["train.kimg"] == "1.0" and run.data.params["model.pivot"] == "0.0,0.0,0.2"
    assert run.data.params["extra"] == "1" and run.data.tags["resumed.train.kimg"] == "2.0"
    assert "perf/eta_sec" not in run.data.metrics  # non-finite values are not sent
    history = client.get_metric_history(tracker.run_id, "loss/G_adv")
    assert [(m.step, m.value) for m in history] == [(8, 0.5), (16, 0.25)]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "files")] == ["files/a.txt"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts next to the store, not in the cwd


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_warns_once_and_never_raises(caplog, monkeypatch) -> None:
    """A run that cannot be opened goes untracked with one warning; a tracker attached to a run keeps its
    calls while the server is away, returns at once, says so once, and at the end says what it could not
    send."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's own retries are under test
    uri = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING, logger="pof3d"):
        tracker = Tracker.open(uri, "exp", "run", {"a": 1})
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(__file__)
        tracker.finish()
        attached = Tracker(uri, "some-run-id")
        started = time.monotonic()
        for step in (1, 2, 3):
            attached.log_metrics({"x": 1.0}, step=step)
        logging_took = time.monotonic() - started
        deadline = time.monotonic() + 60
        while not any("is not answering" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no warning that the server is away"
            time.sleep(0.1)
        attached.finish(timeout_s=1)
    assert not tracker.active and tracker.run_id is None
    assert logging_took < 1.0, "logging waited for the server"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1  # the run that could not be opened
    assert sum("is not answering" in m for m in messages) == 1  # once, not once per call or retry
    assert sum("could not be sent before the end" in m for m in messages) == 1


def _saved_run(root, images_seen: int):
    """A run directory as training leaves it: config.json and one Ray checkpoint directory."""
    cfg = load_config("tiny", ["data.path=/data/shards"])
    run_dir = root / "run-a"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    progress = {
        "images_seen": images_seen,
        "step": 3,
        "tick": 2,
        "mlflow_run_id": "abc",
        "mlflow_tracking_uri": "x",
    }
    ckpt = save_checkpoint(run_dir / "checkpoints" / "checkpoint-kimg000.024", {"w": 1}, cfg, progress)
    return run_dir, ckpt


def test_resume_latest_finds_the_newest_run_and_keeps_its_tracking(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POF3D_STORAGE", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="no run directory with config.json"):
        plan_run(TrainRequest(resume="latest"))
    run_dir, ckpt = _saved_run(tmp_path, images_seen=24)
    plan = plan_run(TrainRequest(resume="latest", kimg=0.05, overrides=["train.tick_kimg=0.01"]))
    assert (plan.resume_from, plan.root) == (Location.parse(ckpt), Location.parse(run_dir))
    assert plan.cfg.train.kimg == 0.05 and plan.cfg.train.tick_kimg == 0.01 and plan.cfg.preset == "tiny"
    assert (plan.tracking.run_id, plan.tracking.uri, plan.data_uri) == ("abc", "x", "/data/shards")
    assert plan_run(TrainRequest(resume=str(ckpt), kimg=0.05)).root == Location.parse(run_dir)
    with pytest.raises(ConfigError, match="already at kimg 0.024; expected a longer --kimg"):
        plan_run(TrainRequest(resume=str(run_dir), kimg=0.02))


def test_worker_threads_share_the_nodes_cores_and_leave_one_to_the_data(monkeypatch) -> None:
    """Not Ray's one thread per held CPU (one for a half-CPU worker on any node); a share of more than
    two cores leaves one to the data pipeline."""
    from pof3d.distributed import worker

    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cfg = load_config("tiny")
    assert [worker._threads(cfg, n) for n in (1, 2, 4, 8, 16)] == [15, 7, 3, 2, 1]
    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [worker._threads(cfg, n) for n in (1, 2)] == [2, 1]
    assert worker._threads(load_config("tiny", ["train.cpu_threads=2"]), 1) == 2
