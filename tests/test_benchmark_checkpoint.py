"""The checkpoint benchmark's smoke run: real checkpoints to moto's S3 server and local disk, a table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint.py"


@pytest.mark.slow
def test_quick_run_prints_save_restore_and_step_times() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    (row,) = [
        line.split() for line in out.splitlines() if line.startswith("tiny ") and not line.endswith("x")
    ]
    size_mb, *seconds = map(float, row[2:])
    assert size_mb > 0 and all(s > 0 for s in seconds), out
    step = re.search(r"^tiny\s+2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.MULTILINE)
    assert step and float(step.group(1)) > 0 and float(step.group(2)) > 0, out
