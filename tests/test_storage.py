"""Run storage on any filesystem URI, against the session's S3-compatible server (no Ray needed):
locations and atomic writes, the storage pre-flight, checkpoint discovery on an object store, the
metrics log, and the plan's handling of run directories (existing runs, ``--resume auto``,
``--config``, ``--print-config``)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pof3d.checkpoint import find_latest, save_checkpoint
from pof3d.distributed.plan import TrainRequest, plan_run
from pof3d.errors import ConfigError
from pof3d.presets import load_config
from pof3d.run_files import RunFiles
from pof3d.storage import Location, check_reachable
from pof3d.train import main


@pytest.fixture
def root(s3_bucket) -> Location:
    return Location.parse(f"s3://{s3_bucket}/runs/a")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(tmp: Path, run: Location, images_seen: int, run_id: str | None = None) -> Location:
    """A complete checkpoint made locally and uploaded file by file, as Ray Train persists them."""
    cfg = load_config("tiny", ["train.kimg=0.05"])
    progress = {"images_seen": images_seen, "step": images_seen // 4, "tick": 1, "mlflow_run_id": run_id}
    local = save_checkpoint(tmp / f"ck{images_seen}", {"w": images_seen}, cfg, progress)
    target = RunFiles(run).checkpoints / f"checkpoint-kimg{images_seen / 1000:07.3f}"
    for file in local.iterdir():
        (target / file.name).upload(file)
    return target


def test_locations_read_and_write_on_s3_and_locally(root, tmp_path) -> None:
    (root / "x" / "a.txt").write_text("one")
    assert (root / "x" / "a.txt").read_text() == "one" and (root / "x" / "a.txt").is_file()
    assert str(root / "x") == f"{root.uri}/x" and (root / "x").parent == root
    assert [root.child(i.path).name for i in root.walk() if i.type == pafs.FileType.File] == ["a.txt"]
    local = Location.parse(tmp_path / "d") / "b.json"
    local.write_text("{}")
    local.write_text('{"v": 2}')  # replaced atomically: no temporary sibling is left behind
    assert os.listdir(tmp_path / "d") == ["b.json"] and json.loads(local.read_text()) == {"v": 2}


def test_print_config_for_a_new_s3_run_starts_fresh_and_never_creates_a_local_folder(
    root, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--print-config", "--run-dir", root.uri, "--resume", "auto", "--kimg", "0.1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["run_dir"] == root.uri and plan["start"] == "start fresh" and plan["resume_from"] is None
    assert plan["config"]["train"]["kimg"] == 0.1
    assert os.listdir(tmp_path) == []  # no `s3:` folder, no data, no MLflow store
    assert not root.exists()  # planning reads storage, it writes nothing


def test_preflight_names_the_uri_for_a_missing_bucket_endpoint_or_credentials(
    s3_server, monkeypatch, capsys
) -> None:
    missing = "s3://pof3d-no-such-bucket/runs/a"
    assert main(["--print-config", "--run-dir", missing]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {missing}: bucket 'pof3d-no-such-bucket' does not exist at {s3_server}" in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"s3://b-x/r: the object store at http://127.0.0.1:\d+ cannot be"):
        check_reachable(Location.parse("s3://b-x/r"))
    assert time.monotonic() - started < 30  # bounded connect timeout and retries, not a hang

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    assert main(["--print-config", "--run-dir", "s3://b-y/runs/a"]) == 2
    assert "--run-dir s3://b-y/runs/a: no AWS credentials found" in capsys.readouterr().err


def test_only_complete_checkpoints_are_found_on_s3(root, tmp_path) -> None:
    files = RunFiles(root)
    assert files.latest_checkpoint() is None
    good = _checkpoint(tmp_path, root, 16)
    half = _checkpoint(tmp_path, root, 24)
    fs, path = (half / "state.pt").fs()
    fs.delete_file(path)  # an upload cut short: the manifest lists a file that is not there
    (RunFiles(root).checkpoints / ".checkpoint-tmp" / "manifest.json").write_text("{}")
    assert find_latest(files.checkpoints) == good


def test_metrics_log_on_s3_drops_ticks_after_the_checkpoint_and_rewrites_one_object(root) -> None:
    files = RunFiles(root)
    log = files.metrics_log(0)
    for images in (4, 8, 12):
        log.append({"images_seen": images, "loss/G": 0.5, "perf/eta_sec": float("inf")})
    lines = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [t["images_seen"] for t in lines] == [4, 8, 12] and lines[0]["perf/eta_sec"] is None
    files.metrics.write_text(files.metrics.read_text() + '{"images_se')  # a line cut short
    files.metrics_log(8).append({"images_seen": 12})
    assert [json.loads(line)["images_seen"] for line in files.metrics.read_text().splitlines()] == [4, 8, 12]


def test_a_run_dir_with_checkpoints_needs_resume_and_auto_continues_it(root, tmp_path) -> None:
    fresh = plan_run(TrainRequest(run_dir=root.uri, resume="auto"))
    assert fresh.resume_from is None and fresh.start_line() == "start fresh"
    RunFiles(root).write_config(load_config("tiny"))
    with pytest.raises(ConfigError, match=f"--run-dir {root} already holds a run .*--resume auto"):
        plan_run(TrainRequest(run_dir=root.uri))
    ckpt = _checkpoint(tmp_path, root, 16, run_id="from-checkpoint")
    with pytest.raises(ConfigError, match="already holds a run .*checkpoint-kimg000.016"):
        plan_run(TrainRequest(run_dir=root.uri, kimg=1))
    RunFiles(root).write_tracking("sqlite:////tmp/x.db", "pof3d", "from-storage")
    plan = plan_run(TrainRequest(run_dir=root.uri, resume="auto", overrides=["train.kimg=0.1"]))
    assert plan.resume_from == ckpt and plan.resume_images == 16 and plan.root == root
    # The MLflow run kept in storage wins over the checkpoint's copy; its tracking URI is reused.
    assert (plan.tracking.run_id, plan.tracking.uri) == ("from-storage", "sqlite:////tmp/x.db")
    with pytest.raises(ConfigError, match="already at kimg 0.016; expected a longer --kimg"):
        plan_run(TrainRequest(run_dir=root.uri, resume="auto", kimg=0.016))
    with pytest.raises(ConfigError, match="--resume auto needs --run-dir"):
        plan_run(TrainRequest(resume="auto"))


def test_config_starts_a_new_run_from_a_saved_config(root, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POF3D_STORAGE", str(tmp_path / "store"))
    RunFiles(root).write_config(load_config("tiny", ["loss.symmetry_weight=0.25", "train.kimg=3"]))
    plan = plan_run(TrainRequest(config=root.uri, kimg=5, overrides=["train.seed=7"]))
    assert plan.cfg.loss.symmetry_weight == 0.25 and plan.cfg.train.kimg == 5 and plan.cfg.train.seed == 7
    assert plan.resume_from is None and plan.root.uri.startswith(str(tmp_path / "store" / "tiny-"))
    with pytest.raises(ConfigError, match="--config .* does not exist"):
        plan_run(TrainRequest(config=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="pass only one of them"):
        plan_run(TrainRequest(config=root.uri, resume="auto", run_dir=root.uri))
