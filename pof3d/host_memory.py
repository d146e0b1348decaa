"""Keep freed host memory inside a process, so that large CPU tensors are not page-faulted in again.

A training step on CPU allocates and frees tensors of tens to hundreds of MB many times (sampled
tri-plane features, their gradients, decoder activations). glibc serves every allocation above its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``, so the kernel faults in
and zeroes those pages on every use: at the ``anchor`` size 16-26 % of the benchmark's CPU time was
spent in the kernel. Three glibc tunables keep that memory in the process instead:

- ``mmap_max=0``: large blocks come from the heap, not from their own mappings;
- ``trim_threshold``: the heap is never given back to the OS, so its pages stay mapped;
- ``tcache_count=0``: no small freed chunks parked in the per-thread cache. Parked chunks count as in
  use, so they would sit between large free blocks, stop them from merging, and make a repeated
  aligned allocation of the same size grow the heap every time.

The process keeps its peak footprint (the policy of PyTorch's CUDA caching allocator on GPUs). glibc
reads tunables once, at process start, so they are passed through the environment of new processes:
Ray Train's CPU workers (``train.retain_cpu_memory``) and ``benchmarks/step.py``, which restarts itself
with them. Other C libraries ignore the variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

ENV_VAR = "GLIBC_TUNABLES"
RETAIN_TUNABLES = (
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={2**62}",
    "glibc.malloc.tcache_count=0",
)


def retaining_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{GLIBC_TUNABLES: ...}`` that adds the retaining tunables to those already in ``env``.

    Tunables already set for the same names are replaced; others are kept.
    """
    env = os.environ if env is None else env
    ours = {item.split("=", 1)[0] for item in RETAIN_TUNABLES}
    kept = [t for t in env.get(ENV_VAR, "").split(":") if t and t.split("=", 1)[0] not in ours]
    return {ENV_VAR: ":".join([*kept, *RETAIN_TUNABLES])}


def is_retaining(env: Mapping[str, str] | None = None) -> bool:
    """Whether a process started with ``env`` (default: this one) keeps its freed memory."""
    env = os.environ if env is None else env
    present = set(env.get(ENV_VAR, "").split(":"))
    return all(t in present for t in RETAIN_TUNABLES)


def restart_retaining(script: str, argv: Sequence[str]) -> None:
    """Run ``script`` again in this process with the retaining tunables, unless they are already set.

    glibc reads its tunables at process start, so a benchmark measuring what CPU training workers get
    restarts itself once with them (those workers receive them from the launcher).
    """
    if not is_retaining():
        os.execve(sys.executable, [sys.executable, script, *argv], {**os.environ, **retaining_env()})
