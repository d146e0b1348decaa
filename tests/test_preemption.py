"""Preemption notices: the notice file and the driver's signal handlers, then SIGTERM to a real training
command: a checkpoint at a step that is no snapshot step, and the run resumes from it (real Ray, real
MLflow store, the micro model)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scoped_env import isolated_run_env

from pof3d.checkpoint import latest_checkpoint, load_checkpoint
from pof3d.distributed.preemption import NoticeWatch, notice_location, notices_from_signals, write_notice
from pof3d.run_files import RunFiles
from pof3d.storage import Location
from pof3d.testing.micro import MICRO
from pof3d.train import main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DID_NOT_START = 75  # tests/drain_scenario.py's exit code when Ray's nodes did not start in time


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_notice_file_reaches_rank_0_and_is_removed_once_acted_on(tmp_path) -> None:
    files = RunFiles(Location.parse(tmp_path / "run"))
    watch = NoticeWatch(files, rank=0, poll_s=0.05)
    try:
        assert watch.check() is None
        written = time.time()
        write_notice(files, "maintenance")
        notice = _wait(watch.check, 5, "the notice")
        assert notice.stop and notice.reason == "maintenance" and abs(notice.given_at - written) < 1
        watch.acknowledge(notice)
        assert not notice_location(files).is_file()
    finally:
        watch.close()
    # Other ranks never read storage: they learn of a notice only through rank 0's broadcast.
    other = NoticeWatch(files, rank=1, poll_s=0.05)
    write_notice(files, "maintenance")
    time.sleep(0.3)
    assert other.check() is None and other._thread is None


def test_a_resize_notice_is_taken_once_and_a_stop_outranks_it_without_being_lost(tmp_path) -> None:
    files = RunFiles(Location.parse(tmp_path / "run"))
    watch = NoticeWatch(files, rank=0, poll_s=0.05)
    try:
        for reason in ("resize from 1 to 2 workers", "resize from 2 to 1 workers"):
            write_notice(files, reason, kind="resize")
            notice = _wait(watch.check, 5, "the notice")
            assert (notice.reason, notice.stop, notice.kind) == (reason, False, "resize")
            watch.acknowledge(notice)
            time.sleep(0.3)  # several polls: the acted-on notice is not taken again
            assert watch.check() is None and not notice_location(files, "resize").is_file()
        # A stop arrives while the loop acts on a resize notice: it is neither overwritten by the resize
        # notice nor removed with it, and it is the next notice taken.
        write_notice(files, "resize from 2 to 3 workers", kind="resize")
        resize = _wait(watch.check, 5, "the resize notice")
        write_notice(files, "SIGUSR1")
        stop = _wait(lambda: (n := watch.check()) is not None and n.stop and n, 5, "the stop")
        watch.acknowledge(resize)
        assert notice_location(files).is_file() and not notice_location(files, "resize").is_file()
        assert watch.check() is stop
        # A notice file of an older writer (no fields) still stops the run.
        watch.acknowledge(stop)
        notice_location(files).write_text("{}")
        assert _wait(watch.check, 5, "the bare notice").stop
    finally:
        watch.close()


def test_sigusr1_to_the_driver_writes_the_notice_and_the_handlers_are_restored(tmp_path) -> None:
    files = RunFiles(Location.parse(tmp_path / "run"))
    write_notice(files, "left by a run that never acted on it")
    before = signal.getsignal(signal.SIGUSR1)
    with notices_from_signals(files):
        assert not notice_location(files).is_file()  # a stale notice must not stop the new launch
        os.kill(os.getpid(), signal.SIGUSR1)
        record = json.loads(
            _wait(
                lambda: notice_location(files).is_file() and notice_location(files).read_text(),
                5,
                "the notice",
            )
        )
        assert record["reason"] == "SIGUSR1" and time.time() - record["at"] < 5
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not notice_location(files).is_file()


def _sets(extra: list[str]) -> list[str]:
    return [arg for item in [*MICRO, *extra] for arg in ("--set", item)]


def _ticks(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_sigterm_checkpoints_between_snapshots_and_the_command_returns_0(ray_local, tmp_path, capsys) -> None:
    """SIGTERM to the training command (``pof3d.train.main`` in this process, whose main thread runs it):
    every worker finishes its step, rank 0 writes a checkpoint although no snapshot is due (snapshots
    every 1 kimg), and the command returns 0 saying it stopped at the notice."""
    run_dir = tmp_path / "run"
    timings: dict[str, float] = {}

    def signal_after_two_ticks() -> None:
        _wait(lambda: len(_ticks(run_dir)) >= 2, 300, "two ticks of training")
        timings["signal"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        _wait(lambda: latest_checkpoint(run_dir), 120, "the checkpoint")
        timings["checkpoint"] = time.monotonic()

    sender = threading.Thread(target=signal_after_two_ticks, daemon=True)
    with isolated_run_env(tmp_path):
        sender.start()
        code = main(
            ["--kimg", "1", "--batch", "4", "--run-dir", str(run_dir), *_sets(["train.snapshot_kimg=1"])]
        )
        timings["exit"] = time.monotonic()
        sender.join(timeout=5)
        out = capsys.readouterr().out
        assert code == 0, out[-4000:]
        stopped = re.search(r"stopped at the preemption notice \(SIGTERM\) after ([\d.]+) kimg", out)
        assert stopped, out[-4000:]
        images = round(float(stopped.group(1)) * 1000)
        checkpoint = latest_checkpoint(run_dir)
        _, _, progress = load_checkpoint(checkpoint)
        assert progress["images_seen"] == images and images % 1000 != 0 and images >= 8
        assert checkpoint.name == f"checkpoint-kimg{images / 1000:07.3f}"
        to_checkpoint, to_exit = (timings[k] - timings["signal"] for k in ("checkpoint", "exit"))
        with capsys.disabled():
            print(f"\nSIGTERM -> checkpoint {to_checkpoint:.1f} s, -> command returns {to_exit:.1f} s")
        assert to_checkpoint < 30

    # Resuming from such a checkpoint: tests/test_slurm.py (a requeued job resumes from the notice's).
    ticks = _ticks(run_dir)
    assert [t["images_seen"] for t in ticks][-1] == images  # the notice's step ended with a tick
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert run.data.tags["stop_reason"] == f"preemption notice (SIGTERM) after {images / 1000:.3f} kimg"


@pytest.mark.slow  # a two-node Ray cluster in a process of its own: about a minute on an idle 2-core machine
def test_a_node_drained_for_preemption_gets_a_checkpoint_and_training_goes_on(tmp_path) -> None:
    """Ray drains the Train worker's node as a preemption (what Kubernetes' SIGTERM to the pod's
    ``ray start --block`` does): rank 0 writes a checkpoint at the next step, which no snapshot
    schedule asked for, and the run goes on to its target."""
    out = tmp_path / "drain.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    for _ in range(2):  # once more if Ray's 30 s bound for a starting node passed (a loaded machine)
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "drain_scenario.py"), str(tmp_path), str(out)],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if done.returncode != CLUSTER_DID_NOT_START:
            break
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert result["exit_code"] == 0 and result["accepted"], result
    noticed = re.search(
        r"preemption notice \(node drain for ranks \[0\].*\): checkpoint at kimg ([\d.]+)", log
    )
    assert noticed and "training goes on until the node goes" in log, log[-4000:]
    images = round(float(noticed.group(1)) * 1000)
    assert result["drained_at_images"] <= images < 60
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-kimg*"))
    assert checkpoints == [f"checkpoint-kimg{images / 1000:07.3f}", "checkpoint-kimg000.060"]
    _, _, progress = load_checkpoint(tmp_path / "run" / "checkpoints" / checkpoints[0])
    assert progress["images_seen"] == images
    print(f"\nnode drain -> checkpoint {result['drain_to_checkpoint_s']:.1f} s")
