"""benchmarks/plane_kernel.py: the sampling kernel alone on a real render's inputs, against other sources."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pof3d import plane_kernel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "plane_kernel.py"

pytestmark = pytest.mark.skipif(not plane_kernel.available(), reason="no C++ compiler on this machine")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_another_source_is_timed_beside_this_one_and_compared_value_by_value(tmp_path) -> None:
    # A copy with one more comment line: a source of its own (built and cached apart), the same code.
    other = tmp_path / "other.cpp"
    other.write_text(plane_kernel.SOURCE.read_text() + "\n// a copy\n")
    done = _run("--preset", "tiny", "--iters", "2", "--threads", "1", "--against", str(other))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(
        r"^preset tiny: planes 8 x 3 x 32 x 32 x 16, 12288 points per image, 1 threads$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
    number = r"(\d+\.\d\d)"
    this = re.search(rf"^pof3d/plane_sampler\.cpp\s+{number}\s+{number}\s+-$", done.stdout, re.MULTILINE)
    copy = re.search(
        rf"^{re.escape(str(other))}\s+{number}\s+{number}\s+(\S+) (\S+) (\S+)$", done.stdout, re.MULTILINE
    )
    assert this and copy, done.stdout
    assert all(float(v) > 0 for v in (*this.groups(), *copy.groups()[:2]))
    # The same code on the same inputs: every value and gradient identical.
    assert [float(v) for v in copy.groups()[2:]] == [0.0, 0.0, 0.0]


def test_a_missing_source_is_refused_by_name(tmp_path) -> None:
    done = _run("--against", str(tmp_path / "missing.cpp"))
    assert done.returncode == 2 and f"--against {tmp_path / 'missing.cpp'}: no such file" in done.stderr
