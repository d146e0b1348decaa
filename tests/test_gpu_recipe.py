"""The synthetic-poses GPU recipe (``studies/synthetic_poses/gpu.sh``): its refusals, and its CPU dry
mode end to end (real Ray, real MLflow, the study's report), which is the GPU pipeline at the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

RECIPE = Path(__file__).resolve().parents[1] / "studies" / "synthetic_poses" / "gpu.sh"


def _recipe(args: list[str], tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    clean.update(PYTHON=sys.executable, POF3D_CACHE=str(tmp_path / "cache"))
    clean.update(env)
    return subprocess.run(
        ["bash", str(RECIPE), *args], env=clean, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("hours", ["0", "soon", "1.5.2"])
def test_a_bad_time_bound_is_refused(tmp_path, hours) -> None:
    done = _recipe([hours], tmp_path, timeout=30)
    assert done.returncode == 2
    assert f"HOURS must be a positive number of hours (e.g. 1 or 0.5), got '{hours}'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_without_a_cuda_device_the_recipe_exits_2_before_anything_starts(tmp_path) -> None:
    run_dir = tmp_path / "run"
    done = _recipe(["0.5"], tmp_path, timeout=120, POF3D_RECIPE_RUN_DIR=str(run_dir))
    assert done.returncode == 2
    assert "no CUDA device is visible to PyTorch" in done.stderr and "POF3D_RECIPE_DRY=1" in done.stderr
    assert not run_dir.exists()


# Stands in for the interpreter: ``-m pof3d.train`` records its arguments and writes what a run writes
# (one evaluated tick) and its summary line; anything else (report.py) runs for real.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2" == "-m pof3d.train" ]]; then
  shift 2
  printf '%s\\n' "$@" >>"$ARGS_FILE"
  while [[ $# -gt 0 && "$1" != --run-dir ]]; do shift; done
  echo '{"images_seen": 32, "eval/js": 0.5, "pose/h_std_deg": 20.0}' >"$2/metrics.jsonl"
  echo "trained to kimg 0.032 in 4 ticks; results in $2"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _table(results: str) -> tuple[str, str]:
    """Header and first row of the table of evaluations in ``results.md``."""
    lines = results.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| kimg |"))
    return lines[start], lines[start + 2]


def test_the_recipe_reports_after_training_and_continues_a_run_with_a_checkpoint(tmp_path) -> None:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    run_dir, out, args = tmp_path / "run", tmp_path / "out", tmp_path / "args.txt"
    env = dict(POF3D_RECIPE_DRY="1", POF3D_RECIPE_RUN_DIR=str(run_dir), POF3D_RECIPE_OUT=str(out))
    env |= dict(ARGS_FILE=str(args), REAL_PYTHON=sys.executable)
    done = _recipe(["0.5", "--set", "train.seed=3"], tmp_path, timeout=120, PYTHON=str(fake), **env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    first = args.read_text().splitlines()
    assert "--resume" not in first and first[-2:] == ["--set", "train.seed=3"]  # the user's come last
    assert {"train.time_limit_min=30", "train.eval_metrics=pose,js,fd_random,kd_random"} <= set(first)
    assert _table((out / "results.md").read_text()) == (
        "| kimg | JS | learned yaw std (deg, batch) |",
        "| 0.0 | 0.5 | 20 |",
    )
    run = (out / "run.md").read_text()
    assert "| command | bash studies/synthetic_poses/gpu.sh 0.5 --set train.seed=3 |" in run
    assert "| training | trained to kimg 0.032 in 4 ticks" in run and "(exit 0)" in run
    # A second call finds the run's checkpoint and continues the run.
    (run_dir / "checkpoints" / "checkpoint-kimg000.032").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-kimg000.032" / "manifest.json").write_text("{}")
    args.unlink()
    done = _recipe(["0.5"], tmp_path, timeout=120, PYTHON=str(fake), **env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    again = args.read_text().splitlines()
    assert again[again.index("--resume") + 1] == str(run_dir)
    assert "(continuing the run from its last checkpoint)" in (out / "run.md").read_text()


@pytest.mark.slow
def test_dry_mode_runs_the_recipe_end_to_end_and_writes_the_tables(tmp_path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    done = _recipe(
        [],
        tmp_path,
        timeout=600,
        POF3D_RECIPE_DRY="1",
        POF3D_RECIPE_RUN_DIR=str(run_dir),
        POF3D_RECIPE_OUT=str(out),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = (out / "results.md").read_text()
    assert "## Full model, every evaluation" in results
    header, row = _table(results)
    assert header.startswith("| kimg | JS | JS yaw | JS pitch | D pose error on reals (deg) |")
    assert row.startswith("| 0.0 | ")  # the final evaluation, at 0.032 kimg
    for name in ("curves.png", "samples.png", "pose-histograms.png", "pose-trajectories.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    run = (out / "run.md").read_text()
    assert "CPU (dry run" in run and "trained to kimg 0.032" in run and "(exit 0)" in run
    assert "metrics (64 samples) " in done.stdout  # the dry run's evaluation is small
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("synthetic-poses").experiment_id])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["train.time_limit_min"] == "60.0"  # one hour, the default bound
    assert tracked.data.params["train.eval_samples"] == "64"
    assert "eval/js" in tracked.data.metrics and "eval/fd_random" in tracked.data.metrics
    assert "eval/depth_error" not in tracked.data.metrics  # the dry run skips the depth estimator's training
