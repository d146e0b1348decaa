"""Freed host memory stays in a process started with the retaining glibc tunables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pof3d.distributed.launcher import worker_runtime_env
from pof3d.host_memory import ENV_VAR, RETAIN_TUNABLES, is_retaining, retaining_env
from pof3d.presets import load_config

# Allocates and fills a 256 MB tensor three times (PyTorch allocates it 64-byte aligned); prints the
# minor page faults of the last two rounds.
_PROBE = """
import resource, torch
def round_():
    t = torch.empty(64 * 2**20)
    t.fill_(1.0)
    del t
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES = 2 * 256 * 2**20 // 4096  # two rounds of 256 MB in 4 KiB pages


def _faults(env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.split()[-1])


def test_retaining_env_merges_with_existing_tunables() -> None:
    env = retaining_env({ENV_VAR: "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=7"})
    items = env[ENV_VAR].split(":")
    assert "glibc.malloc.arena_max=2" in items  # someone else's tunable is kept
    assert "glibc.malloc.mmap_max=7" not in items  # ours replaces the same name
    assert all(t in items for t in RETAIN_TUNABLES)
    assert is_retaining(env) and not is_retaining({})
    assert retaining_env({})[ENV_VAR] == ":".join(RETAIN_TUNABLES)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_retained_memory_is_not_faulted_in_again() -> None:
    base = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    default = _faults(base)
    retained = _faults({**base, **retaining_env(base)})
    assert default > _PAGES // 2, f"glibc's default maps the block afresh each round ({default} faults)"
    assert retained < _PAGES // 20, f"retained memory was faulted in again ({retained} faults)"


def test_cpu_workers_get_the_tunables_and_gpu_workers_do_not(ray_local) -> None:
    cfg = load_config("tiny", [])
    runtime_env = worker_runtime_env(cfg)
    assert runtime_env is not None

    @ray_local.remote(num_cpus=0.1, runtime_env=runtime_env)
    def probe() -> bool:
        return is_retaining()

    assert ray_local.get(probe.remote()) is True
    assert worker_runtime_env(load_config("tiny", ["train.gpus_per_worker=1"])) is None
    assert worker_runtime_env(load_config("tiny", ["train.retain_cpu_memory=false"])) is None
