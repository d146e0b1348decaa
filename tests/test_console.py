"""What a run prints: the tick lines, not Ray's per-report and data-plan chatter (unless verbose)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pof3d import console
from pof3d.data.streaming import ingest_options
from pof3d.testing.micro import MICRO

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def verbose_env(monkeypatch):
    """Set or clear POF3D_VERBOSE for one test."""

    def set_verbose(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
        else:
            monkeypatch.setenv(console.VERBOSE_ENV, value)

    return set_verbose


def test_ray_train_logs_at_warning_unless_verbose(verbose_env) -> None:
    verbose_env(None)
    assert console.train_logging_config().log_level == "WARNING"
    verbose_env("1")
    assert console.train_logging_config().log_level == "INFO"


def test_ray_data_announces_executions_only_when_verbose(ray_local, verbose_env) -> None:
    for value, announced in ((None, False), ("1", True)):
        verbose_env(value)
        dataset = ray_local.data.range(4)
        console.quiet_dataset(dataset)
        assert dataset.context.print_on_execution_start is announced
        assert dataset.context.enable_progress_bars is False


def test_ingest_options_raise_no_deprecation_warning(recwarn) -> None:
    # (Creating Ray Data's context warns about Ray's own deprecated defaults; those are not ours.)
    options = ingest_options()
    assert options.preserve_order
    assert not [w for w in recwarn if "exclude_resources" in str(w.message)]


# Lines of Ray's and MLflow's that a plain run printed and must not: what each says, and where it came from.
NOISE = {
    "Reporting training result": "Ray Train, once per report and worker",
    "TrainingReport(": "Ray Train, the same report",
    "Execution plan of Dataset": "Ray Data, once per execution",
    "Deprecat": "a deprecation warning of Ray's",
    "has constructor arguments in the object store": "Ray core, Ray Train's preemption watcher",
    "worker processes have been started on node": "the raylet, more workers than its startup concurrency",
    "Add type hints to the `predict` method": "MLflow, logging the generator",
    "Downloading artifacts": "MLflow, a progress bar",
    "PlacementGroupCleaner": "Ray Train: a traceback, its cleaner not finding its cluster beside another Ray",
    "Found multiple active Ray instances": "Ray, the same",
    "MLflow UI:": "the run's `mlflow ui` command a second time",
}


@pytest.mark.slow
def test_plain_run_prints_only_its_own_lines_beside_a_second_ray(ray_local, tmp_path) -> None:
    """The real CLI in a subprocess, two ticks long, starting its own Ray (as a plain run does) while the
    session's Ray runs on the same machine."""
    # The node's default thread count is checked below, so the micro model's one thread is left out.
    sets = [arg for item in MICRO if not item.startswith("train.cpu_threads") for arg in ("--set", item)]
    argv = [sys.executable, "-m", "pof3d.train", "--kimg", "0.008", "--batch", "4", *sets]
    argv += ["--run-dir", str(tmp_path / "run")]
    env = dict(os.environ, POF3D_CACHE=str(tmp_path / "cache"))
    for name in (console.VERBOSE_ENV, "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    assert ray_local.is_initialized()  # the second Ray instance on the machine
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    ticks = [line for line in out.splitlines() if "pof3d.distributed.worker: tick " in line]
    assert len(ticks) == 2 and "kimg 0.008/0.008" in ticks[-1], out[-5000:]
    noise = {marker: out.count(marker) for marker in NOISE}
    assert not any(noise.values()), f"{ {m: n for m, n in noise.items() if n} } in the output:\n{out[-8000:]}"
    summary = [line for line in out.splitlines() if line.startswith("trained to kimg 0.008 in 2 ticks")]
    assert len(summary) == 1 and "mlflow ui --backend-store-uri " in summary[0], out[-5000:]
    assert out.count("mlflow ui ") == 1, out[-5000:]  # the command once, at the end of the summary
    # One worker on the node trains on its cores (all but one where it has more than two, left to the data
    # pipeline), not on the one thread Ray's OMP_NUM_THREADS gives a half-CPU worker.
    cores = len(os.sched_getaffinity(0))
    threads = cores - 1 if cores > 2 else cores
    assert f"on cpu ({threads} threads): starting at kimg 0.000" in out, out[-5000:]


def test_ray_trains_per_report_line_is_dropped_unless_verbose() -> None:
    from ray.train.v2._internal.execution import context

    report_logger = logging.getLogger(context.__file__)  # where Ray 2.60 logs "Reporting training result"
    console.quiet_train_worker(False)
    assert not report_logger.isEnabledFor(logging.INFO) and report_logger.isEnabledFor(logging.WARNING)
    console.quiet_train_worker(True)
    assert report_logger.isEnabledFor(logging.INFO)
