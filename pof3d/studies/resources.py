"""How many trials may run at once, decided before any trial starts.

Each trial is a Tune function trainable that launches a Ray Train run: its workers take the CPU/GPU
asked for in the config, and its streaming Ray Data pipeline needs CPU that no placement group holds.
When concurrent trials reserve every CPU for their workers, Ray Data's budget drops to zero and all
trials wait on each other forever (observed on a 2-core machine with two trials, even with fractional
worker CPUs). So a trial is budgeted a whole CPU for its data on top of its workers, the default
concurrency is what fits, and a requested concurrency that does not fit is refused with the sums.
"""

from __future__ import annotations

from dataclasses import dataclass

from pof3d.config import Config
from pof3d.errors import ConfigError

# CPU kept free per trial for Ray Data's read/decode tasks (outside any placement group).
DATA_CPU_PER_TRIAL = 1.0
# The trial function only waits on its TorchTrainer; Tune refuses a zero request, so a token amount.
TRIAL_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class TrialFootprint:
    """Resources one trial holds while it trains."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, cfg: Config) -> TrialFootprint:
        t = cfg.train
        return cls(
            cpus=t.workers * t.cpus_per_worker + DATA_CPU_PER_TRIAL, gpus=t.workers * t.gpus_per_worker
        )

    def describe(self) -> str:
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.cpus:g} CPU{gpu} (workers plus {DATA_CPU_PER_TRIAL:g} CPU for Ray Data)"


def fitting_concurrency(footprint: TrialFootprint, cluster: dict[str, float]) -> int:
    """How many trials of this footprint the cluster's resources hold at once (0 if not even one)."""
    fits = int(cluster.get("CPU", 0.0) // footprint.cpus + 1e-9)
    if footprint.gpus:
        fits = min(fits, int(cluster.get("GPU", 0.0) // footprint.gpus + 1e-9))
    return fits


def plan_concurrency(
    footprint: TrialFootprint, cluster: dict[str, float], requested: int | None, trials: int
) -> int:
    """The concurrency to run with: the request if it fits, else what fits; a clear error otherwise."""
    have = f"{cluster.get('CPU', 0.0):g} CPU and {cluster.get('GPU', 0.0):g} GPU"
    fits = fitting_concurrency(footprint, cluster)
    if fits < 1:
        raise ConfigError(
            f"one trial needs {footprint.describe()} but the Ray cluster has {have}; lower "
            "train.workers / train.cpus_per_worker / train.gpus_per_worker or add nodes"
        )
    if requested is None:
        return max(1, min(fits, trials))
    if requested < 1:
        raise ConfigError(f"--concurrency={requested}: expected a positive number of trials")
    if requested > fits:
        raise ConfigError(
            f"--concurrency={requested} cannot be scheduled: each trial needs {footprint.describe()}, "
            f"{requested} trials need {requested * footprint.cpus:g} CPU"
            + (f" and {requested * footprint.gpus:g} GPU" if footprint.gpus else "")
            + f", but the Ray cluster has {have}; at most {fits} fit. Concurrent trials that share too few "
            "CPUs stall waiting for Ray Data, so this is refused instead of hanging"
        )
    return requested


def trial_cpu_threads(cfg: Config, concurrency: int, node_cpus: list[float]) -> int | None:
    """Torch threads for each CPU trial worker when concurrent trials may share a node; ``None`` leaves
    the worker's own rule (``train.cpu_threads`` set, GPU trials, or one trial at a time).

    A worker shares its node's cores among the workers of its own run only; it cannot see the other
    trials on the node. Ten concurrent trials on a 16-core node would each take 15 threads, and a
    trainer whose OpenMP threads outnumber the free cores waits at every parallel region for a
    descheduled thread: on 2 cores two ``tiny`` trainers at once took 4.43 s a step on two threads each
    and 0.88 s on one thread each (``python benchmarks/threads.py --preset tiny --batch 8``). So each
    worker gets the cores of the most crowded node divided among the most trial workers it can hold,
    less one core for Ray Data where that share is more than two.
    """
    t = cfg.train
    if t.cpu_threads > 0 or t.gpus_per_worker > 0 or concurrency <= 1:
        return None
    footprint = TrialFootprint.of(cfg)
    shares = []
    for cpus in node_cpus:
        trials_here = min(concurrency, int(cpus // footprint.cpus + 1e-9))
        if trials_here >= 1:
            shares.append(int(cpus // (trials_here * t.workers)))
    if not shares:
        return None
    share = max(1, min(shares))
    return share - 1 if share > 2 else share
