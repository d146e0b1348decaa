"""``train.compile``: the compiled step computes what the eager one does, and its graphs are kept in
pof3d's cache folder (pof3d/compile_cache.py): a resumed run loads them instead of compiling them again,
and a folder the user chose is kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pof3d.compile_cache import INDUCTOR_CACHE_ENV, use_compile_cache

STEP = Path(__file__).with_name("compile_step.py")
# Relative errors of the compiled step against the eager one on a fixed batch (tests/compile_step.py): the
# largest over a phase's losses, and of its network's gradient. Measured (micro model, torch 2.13, one
# thread, AVX-512 machine): at most 2.4e-7 for losses and 1.1e-6 for gradients (G_density's; D_r1 runs
# no compiled part, 0). The tolerance is about 20x that: fp32 rounding of reordered sums, not more.
TOLERANCE = 2e-5


def test_the_cache_goes_to_pof3ds_folder_unless_the_user_chose_one(tmp_path, monkeypatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("POF3D_CACHE", str(tmp_path / "cache"))
    for unchosen in ("", default_cache_dir()):  # importing torch._dynamo sets inductor's own default
        monkeypatch.setenv(INDUCTOR_CACHE_ENV, unchosen)
        assert use_compile_cache() == tmp_path / "cache" / "inductor"
        assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "cache" / "inductor")
        assert (tmp_path / "cache" / "inductor").is_dir()
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")


def _step(tmp_path: Path, name: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != INDUCTOR_CACHE_ENV}
    env["POF3D_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(STEP), str(tmp_path / "checkpoint"), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


# A cold compile of the micro model takes about 110 s on one thread of a 2-core machine, loading it 19 s.
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) for inductor's CPU code")
def test_compiled_step_matches_eager_and_a_resume_loads_its_graphs_instead_of_compiling(tmp_path) -> None:
    folder = tmp_path / "cache" / "inductor"
    first = _step(tmp_path, "first")
    assert first["folder"] == str(folder)
    assert first["new"] > 0 and first["cached"] == 0, first  # an empty cache: everything compiled
    assert any(p.is_file() for p in folder.rglob("*")), "nothing was written to the cache folder"
    resumed = _step(tmp_path, "resumed", "--resume")
    assert resumed["images_seen"] == 2 * first["images_seen"]  # it did go on from the checkpoint
    # Every graph of the first run was loaded, none compiled again.
    assert resumed["new"] == 0 and resumed["cached"] == first["new"], (first, resumed)
    # Compiled from scratch or loaded, the step computes what the eager one does.
    for result in (first, resumed):
        assert set(result["errors"]) == {"G_main", "G_density", "D_main", "D_r1"}
        for phase, errors in result["errors"].items():
            assert errors["loss"] <= TOLERANCE and errors["grad"] <= TOLERANCE, (phase, errors)
