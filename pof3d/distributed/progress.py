"""Per-tick bookkeeping: averaged figures, throughput, data-wait share, ETA, the progress line, and
the wall-clock limit of a run.

Kept free of Ray and of the model so that the arithmetic (and the line users read in ``ray job logs``)
is tested on its own.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

STEP_TIME = "time/step_s"  # the trainer's own time of one step, among its figures (pof3d.loop)


@dataclass
class TickMeter:
    """Accumulates one tick's steps; :meth:`close` returns the tick's figures and starts the next.

    ``images`` counts images over all workers (the trainer's ``images_seen`` delta), so images/s is the
    global throughput. ``data_wait`` is the time this worker spent blocked on the next batch.

    Two rates, one name each: ``perf/images_per_sec`` is over the tick's wall-clock time (everything:
    data wait, evaluation, snapshots, reporting; what the ETA uses), ``perf/step_images_per_sec`` over
    the training steps' own time alone (the trainer's ``time/step_s``, summed over the tick).
    """

    target_images: int
    clock: Callable[[], float] = time.perf_counter
    _sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _images: int = 0
    _data_wait: float = 0.0
    _step_time: float = 0.0
    _started: float = 0.0

    def __post_init__(self) -> None:
        self._started = self.clock()

    def update(self, figures: dict[str, float], images: int, data_wait: float, step_time: float) -> None:
        """Add one step: its figures (averaged over the tick), images and timings in seconds."""
        for name, value in figures.items():
            value = float(value)
            if math.isfinite(value):
                self._sums[name] += value
                self._counts[name] += 1
        self._images += images
        self._data_wait += data_wait
        self._step_time += step_time

    def close(self, images_seen: int) -> dict[str, float]:
        """Figures of the tick that ends at ``images_seen``; resets the meter for the next tick."""
        now = self.clock()
        wall = max(now - self._started, 1e-9)
        out = {name: self._sums[name] / self._counts[name] for name in self._sums}
        rate = self._images / wall
        step_time = self._sums.get(STEP_TIME, 0.0)
        remaining = max(self.target_images - images_seen, 0)
        out.update(
            {
                "perf/images_per_sec": rate,
                "perf/step_images_per_sec": self._images / step_time if step_time > 0 else 0.0,
                "perf/sec_per_kimg": 1000.0 / rate if rate > 0 else math.inf,
                "perf/data_wait_share": self._data_wait / self._step_time if self._step_time > 0 else 0.0,
                "perf/tick_sec": wall,
                "perf/eta_sec": remaining / rate if rate > 0 else math.inf,
            }
        )
        self._sums, self._counts = defaultdict(float), defaultdict(int)
        self._images, self._data_wait, self._step_time = 0, 0.0, 0.0
        self._started = now
        return out


def deadline(limit_min: float, started: float) -> float | None:
    """Wall-clock time (``time.time()``) at which a launch started at ``started`` with
    ``train.time_limit_min=limit_min`` ends; None for no limit (0)."""
    return started + 60.0 * limit_min if limit_min > 0 else None


@dataclass
class TimeLimit:
    """Whether the run's deadline has passed, as every worker must see it: the same answer at the same
    step.

    Ticks and snapshots need no agreement (every rank counts the same images), but clocks differ between
    processes, so rank 0 alone reads its clock and, in a data-parallel run, broadcasts its answer: a rank
    that stopped on its own clock while another took one more step would leave that one waiting forever
    in the gradient all-reduce. Every rank must call :meth:`reached` at every step (a collective); with no
    deadline it is free.
    """

    deadline: float | None
    clock: Callable[[], float] = time.time

    def reached(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> bool:
        if self.deadline is None:
            return False
        up = rank == 0 and self.clock() >= self.deadline
        if world > 1:
            flag = torch.tensor([int(up)], dtype=torch.int32, device=device)
            dist.broadcast(flag, src=0)
            up = bool(flag.item())
        return up

    def remaining(self) -> float:
        """Seconds left (inf with no deadline, 0 once passed): caps the progress line's ETA."""
        return math.inf if self.deadline is None else max(self.deadline - self.clock(), 0.0)


def next_boundary(images_seen: int, every_kimg: float) -> int:
    """The first multiple of ``every_kimg`` thousand images strictly above ``images_seen``."""
    every = max(int(round(every_kimg * 1000)), 1)
    return (images_seen // every + 1) * every


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def device_memory(device: torch.device | str) -> dict[str, float]:
    """``perf/gpu_mem_peak_gb``: the most GPU memory tensors held since the previous call (the peak is
    reset), in GiB; nothing on a CPU device."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/gpu_mem_peak_gb": peak}


def progress_line(tick: int, images_seen: int, target_images: int, figures: dict[str, float]) -> str:
    """One concise line: tick, kimg, losses by network, pose statistics, throughput, ETA, GPU memory.

    Every figure is in ``metrics.jsonl`` and MLflow at full precision; the line is for reading ``ray job
    logs`` at a glance, so losses get three significant digits and are grouped by network (``G adv 1.55
    sym 1.55 | D real 0.597 ...``), and the pose learner's yaw and pitch read as mean±std in degrees.
    """
    parts = [f"tick {tick}", f"kimg {images_seen / 1000:.3f}/{target_images / 1000:g}"]
    losses = {name[5:]: value for name, value in figures.items() if name.startswith("loss/")}
    for net in sorted({name.split("_", 1)[0] for name in losses}):
        terms = sorted(name for name in losses if name.split("_", 1)[0] == net)
        text = " ".join(
            f"{name.split('_', 1)[1] if '_' in name else name} {losses[name]:.3g}" for name in terms
        )
        parts.append(f"{net} {text}")
    pose = {name[5:]: value for name, value in figures.items() if name.startswith("pose/")}
    stats = []
    for axis in ("h", "v"):
        mean, std = pose.pop(f"{axis}_mean_deg", None), pose.pop(f"{axis}_std_deg", None)
        if mean is not None:
            stats.append(f"{axis} {mean:.1f}" + (f"±{std:.1f}°" if std is not None else "°"))
    stats += [
        f"{name[:-4]} {pose[name]:.3g}°" if name.endswith("_deg") else f"{name} {pose[name]:.3g}"
        for name in sorted(pose)
    ]
    if stats:
        parts.append("pose " + " ".join(stats))
    parts.append(f"{figures['perf/images_per_sec']:.1f} img/s {figures['perf/sec_per_kimg']:.1f} s/kimg")
    parts.append(f"data-wait {100 * figures['perf/data_wait_share']:.0f}%")
    parts.append(f"eta {format_eta(figures['perf/eta_sec'])}")
    if "perf/gpu_mem_peak_gb" in figures:
        parts.append(f"gpu {figures['perf/gpu_mem_peak_gb']:.1f} GiB peak")
    return " | ".join(parts)
