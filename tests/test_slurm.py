"""cluster/slurm/pof3d.sbatch on a real single-node SLURM (tests/slurm_cluster.py), training the micro
model: two jobs at once on the node, each on a Ray of its own, ending cleanly and freeing the node at
once; a job whose time limit arrives, which checkpoints, requeues itself and resumes from that checkpoint
in the same run (as a resubmission with ``--resume auto`` does); a missing DATA directory that fails the
job before Ray starts.

The jobs overlap in time so that the module stays around two minutes on two idle cores. The limited job
trains toward a target it cannot reach; once it trains, the test shortens its time limit to end 90 to
150 s later (an operator may do so; SLURM's warning then comes within its 30 s check, and the notice
falls at half the new limit, which has then passed or comes soon), so that how fast this machine starts
Ray and training does not matter. Once its second start has trained past the checkpoint it resumed
from, the test cancels it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
import slurm_cluster
from mlflow.tracking import MlflowClient

from pof3d.data.synthetic import ensure_synthetic
from pof3d.distributed.plan import SYNTHETIC_SEED
from pof3d.run_files import read_metrics_log
from pof3d.storage import Location
from pof3d.testing.micro import MICRO

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm" / "pof3d.sbatch"
# This machine has no GPU: the allocation asks for none, so the script starts Ray with 0 GPUs.
ALLOCATION = ["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0"]
NOTICE = re.compile(r"preemption notice \(SIGUSR1\): checkpoint at kimg ([\d.]+) written ([\d.]+) s")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(slurm_cluster.missing() is not None, reason=str(slurm_cluster.missing())),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=6)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """The jobs' "shared filesystem": run storage, the synthetic-set cache and one shard set."""
    root = tmp_path_factory.mktemp("site")
    cache = root / "cache"
    shards = ensure_synthetic(cache, n=64, resolution=32, poses="faces", seed=SYNTHETIC_SEED)
    return {"root": root, "storage": root / "runs", "cache": cache, "shards": shards}


def _submit(slurm, site, run: str, data: str, sbatch: list[str], train: list[str], **env: str) -> str:
    """``sbatch`` the script as a user would (settings in the environment, pof3d.train's arguments after
    it); returns the job id."""
    job_env = {**slurm.env, **env, "PRESET": "tiny", "RUN_NAME": run, "DATA": data}
    job_env |= {
        "POF3D_STORAGE": str(site["storage"]),
        "POF3D_CACHE": str(site["cache"]),
        "POF3D_VENV": str(ROOT / ".venv"),
        "RAY_AUTH_TOKEN_PATH": str(site["root"] / "ray-token"),
        # The test ends its last job with scancel: the 30 s node drain that SLURM's SIGTERM starts in
        # `ray start --block` would only hold the node (and the module's teardown) that much longer.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
    }
    job_env.pop("MLFLOW_TRACKING_URI", None)
    sets = [a for item in MICRO for a in ("--set", item)]
    command = ["sbatch", "--parsable", *ALLOCATION, *sbatch, str(SBATCH), "--batch", "4", *sets, *train]
    done = subprocess.run(command, env=job_env, cwd=site["root"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _wait_job(slurm, job: str, until, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = slurm.job(job)
        if until(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} after {timeout} s: {info}\n{_log(info)[-4000:]}")
        time.sleep(0.5)


def _ended(info: dict[str, str]) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _log(info: dict[str, str]) -> str:
    path = Path(info["StdOut"])
    return path.read_text() if path.is_file() else f"(no log at {path})"


def _ticks(run_dir: Path) -> list[dict]:
    return read_metrics_log(Location.parse(run_dir / "metrics.jsonl"))


def _mlflow_steps(run_dir: Path) -> list[int]:
    """The steps of the run directory's one MLflow run (it fails if there are several)."""
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss/G_adv")]


def _assert_clean_end(info: dict[str, str], log: str) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    for bad in ("CANCELLED", "srun: error", "Killed", "already running"):
        assert bad not in log, f"{bad!r} in the log:\n{log[-4000:]}"


def _seconds(duration: str) -> int:
    """Seconds of a SLURM duration, ``[D-]HH:MM:SS``."""
    days, _, clock = duration.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def _head(log: str) -> tuple[str, str]:
    """(address, Ray folder) of the first Ray head a job's log announces."""
    return re.search(r"Ray head on \S+ at (\S+) .*Ray files in (\S+)", log).groups()


def test_jobs_share_a_node_requeue_at_the_time_limit_and_refuse_missing_data(slurm, site) -> None:
    started = time.monotonic()
    runs = site["storage"]
    # Snapshots (every 1 kimg) do not fall due: the only checkpoint is the notice's.
    limited = _submit(
        slurm, site, "limited", "", ["--time=30"], ["--kimg", "2", "--set", "train.snapshot_kimg=1"]
    )
    # Submitted with a node range: SLURM grants the one node it has, and the job trains the micro-batches
    # of the range's top (2 workers: batch 4 in 2 micro-batches of 2) on its one worker.
    shared = _submit(
        slurm,
        site,
        "shared",
        str(site["shards"]),
        ["--time=30", "--nodes=1-2"],
        ["--kimg", "0.008"],
        MAX_NODES="2",
    )
    missing = _submit(slurm, site, "missing", str(site["root"] / "no-such-dir"), [], [])

    # A missing DATA directory: exit 2 before any Ray starts.
    info = _wait_job(slurm, missing, _ended, 120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", _log(info)
    assert "no-such-dir" in _log(info) and "Ray head" not in _log(info), _log(info)

    # The job beside the limited one: trains on its own Ray and ends cleanly, under the preset's name.
    info = _wait_job(slurm, shared, _ended, 600)
    shared_log = _log(info)
    _assert_clean_end(info, shared_log)
    assert info["JobName"] == "pof3d-tiny" and Path(info["StdOut"]).name == f"pof3d-tiny-{shared}.out"
    assert not (site["root"] / f"pof3d-{shared}.out").exists()
    assert "0 GPUs" in shared_log and not _head(shared_log)[0].startswith("127.")
    assert [t["images_seen"] for t in _ticks(runs / "shared")] == [4, 8]
    assert "1 of up to 2 nodes: 1 workers, micro-batches of 2 images" in shared_log, shared_log[-4000:]
    train = json.loads((runs / "shared" / "config.json").read_text())["train"]
    assert (train["workers"], train["batch"], train["batch_gpu"]) == (1, 4, 2)
    assert _mlflow_steps(runs / "shared") == [4, 8]
    # Once training has exited, the job ends its Ray at once (no 30 s node drain) and frees the node.
    exited = re.search(r"(\d\d:\d\d:\d\d) pof3d.sbatch: training exited with status 0", shared_log).group(1)
    released = _seconds(info["EndTime"][11:]) - _seconds(exited)
    assert released <= 20, shared_log[-4000:]  # 13 s with another job training beside it; 32 s with the drain

    # Once the limited job trains, its limit comes near; it checkpoints between snapshots before the
    # limit and requeues itself (this SLURM holds a requeued job 6 s, not two minutes: cred_expire).
    info = _wait_job(slurm, limited, lambda i: _ended(i) or bool(_ticks(runs / "limited")), 600)
    # At least 90 s left: SLURM's warning within 30 s, and a minute for the checkpoint and the requeue.
    minutes = math.ceil((_seconds(info["RunTime"]) + 90) / 60)
    slurm.run("scontrol", "update", f"JobId={limited}", f"TimeLimit={minutes}")
    info = _wait_job(slurm, limited, lambda i: int(i["Restarts"]) >= 1 or _ended(i), 240)
    limited_log = _log(info)
    assert int(info["Restarts"]) == 1, limited_log[-4000:]
    slurm.run("scontrol", "update", f"JobId={limited}", "TimeLimit=30")  # for its second start
    written = NOTICE.search(limited_log)
    assert written and "requeueing job" in limited_log, limited_log[-4000:]
    notice_images = round(float(written.group(1)) * 1000)
    assert 0 < notice_images < 1000
    # Both jobs had a Ray of their own at the same time: other ports, other folders.
    (address_a, folder_a), (address_b, folder_b) = _head(limited_log), _head(shared_log)
    assert address_a != address_b and folder_a != folder_b

    # The second start resumes from the notice's checkpoint, in the same MLflow run, and trains on.
    def trained_past_the_checkpoint(info: dict[str, str]) -> bool:
        return _ended(info) or any(t["images_seen"] > notice_images for t in _ticks(runs / "limited"))

    info = _wait_job(slurm, limited, trained_past_the_checkpoint, 600)
    log = _log(info)
    assert info["JobState"] == "RUNNING", log[-4000:]
    slurm.run("scancel", limited)
    _wait_job(slurm, limited, _ended, 60)
    checkpoint = runs / "limited" / "checkpoints" / f"checkpoint-kimg{notice_images / 1000:07.3f}"
    assert f"resumed from {checkpoint} at kimg {notice_images / 1000:.3f}" in log, log[-4000:]
    steps = [t["images_seen"] for t in _ticks(runs / "limited")]
    assert steps == sorted(set(steps)) and notice_images in steps and steps[-1] > notice_images
    # One MLflow run. The cancel may cut off the last tick on either side: MLflow's sender may not send
    # it, or a worker killed by the cancel may be restarted from a checkpoint before the job ends, and
    # the restart drops the ticks after that checkpoint from metrics.jsonl, where MLflow already has them.
    logged = _mlflow_steps(runs / "limited")
    common = min(len(logged), len(steps))
    assert logged[:common] == steps[:common] and abs(len(logged) - len(steps)) <= 1, (logged, steps)
    assert notice_images in logged
    print(
        f"\nSLURM jobs: {time.monotonic() - started:.0f} s; notice to checkpoint {written.group(2)} s; "
        f"node released {released} s after training exited"
    )
