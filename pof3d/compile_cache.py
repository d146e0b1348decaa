"""Compiled graphs kept across restarts and resumes (``train.compile``), and a count of what was compiled.

Compiling the generator's convolution stacks costs minutes on a CPU (about two minutes for the tests'
micro model on one thread, 2-core machine) and seconds to load again from a cache. PyTorch's inductor keeps
compiled graphs in an on-disk cache that a later process finds by the graph's hash; by default under
``/tmp``, which a container restart or a node's reboot wipes. A run that compiles points it into pof3d's
own cache folder, ``$POF3D_CACHE/inductor`` (``~/.cache/pof3d/inductor``), unless the user chose one with
``TORCHINDUCTOR_CACHE_DIR``: a restarted, resumed or repeated run on the same node then loads its graphs
instead of compiling them again, and a cluster that mounts a volume there keeps them across nodes' lives.

The cache is kept beside the node on purpose, not with the run in its storage: its entries are pickled
Python objects and generated code, run as they are loaded. In the run's storage, which every node reads
and several people may write, they would let anyone who can write there run code on every worker, which
the checkpoint format refuses (pof3d/checkpoint.py). A node that has not compiled the run's graphs
compiles them once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pof3d.cache import cache_dir

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache() -> Path:
    """Point inductor's cache at ``$POF3D_CACHE/inductor`` unless the user named one; returns the folder.

    Inductor reads the variable whenever it looks for a cached graph, so this takes effect for every
    compilation after it. Importing ``torch._dynamo`` already sets the variable to inductor's default
    folder, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get(INDUCTOR_CACHE_ENV) in (None, "", default_cache_dir()):
        os.environ[INDUCTOR_CACHE_ENV] = str(cache_dir() / "inductor")
    folder = Path(os.environ[INDUCTOR_CACHE_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class CompiledGraphs:
    """Graphs compiled by inductor in this process: ``new`` ones (compiled here, cache missed or bypassed)
    and ``cached`` ones (loaded from the cache)."""

    new: int = 0
    cached: int = 0

    @classmethod
    def so_far(cls) -> CompiledGraphs:
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        new = inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]
        return cls(new=int(new), cached=int(inductor["fxgraph_cache_hit"]))

    def metrics(self) -> dict[str, float]:
        return {"compile/graphs_new": float(self.new), "compile/graphs_cached": float(self.cached)}
