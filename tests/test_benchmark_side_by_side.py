"""benchmarks/side_by_side.py: two checkouts' step benchmarks at once, one core each, ratios per round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "side_by_side.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_same_checkout_twice_gives_both_sides_and_a_ratio_per_round() -> None:
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    step_args = ["--preset", "tiny", "--iters", "1", "--warmup", "0", "--set", "train.batch=4"]
    done = _run(
        str(ROOT), str(ROOT), "--rounds", "2", "--cores", cores, "--", *step_args, "--host-memory", "default"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    rows = re.findall(
        r"^\s+(\d) tiny\s+(before|after|ratio)\s+(\d*)\s+((?:[\d.]+\s*){6})$", out, re.MULTILINE
    )
    assert [(r[0], r[1]) for r in rows] == [(str(i), s) for i in (1, 2) for s in ("before", "after", "ratio")]
    # The cores swap between rounds.
    first, second = [int(r[2]) for r in rows if r[1] == "before"]
    assert first != second
    for _, side, _, cells in rows:
        values = [float(v) for v in cells.split()]
        assert all(v > 0 for v in values), (side, values)
    assert re.search(r"^\s+tiny\s+median\s+(?:[\d.]+\s*){6}$", out, re.MULTILINE), out


def test_a_folder_that_is_no_checkout_and_a_bad_core_are_refused(tmp_path) -> None:
    done = _run(str(tmp_path), str(ROOT))
    assert done.returncode == 2 and f"before={tmp_path}: expected a pof3d checkout" in done.stderr
    done = _run(str(ROOT), str(ROOT), "--cores", "0,0")
    assert done.returncode == 2 and "--cores [0, 0]: expected two different cores" in done.stderr
