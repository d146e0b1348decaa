"""The study's own progress line, about once a minute: trials done / running / stopped early / failed,
the best objective so far, and an estimate of the time left.

An hours-long study is read in a terminal or a job log, where Ray Tune's status tables either scroll
away or are turned off; one line per minute says what a user wants to know at a glance.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """The study's state at one moment, as counted from Tune's trials."""

    planned: int
    done: int
    stopped: int
    failed: int
    running: int
    work: float  # trials' worth of training: a finished trial counts 1, a running one its share
    best: tuple[float, str, float] | None  # (value, trial id, kimg) of the best report so far

    def line(self, study: str, metric: str, elapsed_s: float, eta_s: float | None) -> str:
        best = "–"
        if self.best is not None:
            value, trial, kimg = self.best
            best = f"{value:.4g} ({trial} at kimg {kimg:g})"
        eta = "unknown" if eta_s is None else _duration(eta_s)
        finished = self.done + self.stopped + self.failed
        return (
            f"study {study}: {finished}/{self.planned} trials finished ({self.done} done, "
            f"{self.stopped} stopped early, {self.failed} failed), {self.running} running; "
            f"best {metric} {best}; elapsed {_duration(elapsed_s)}, eta {eta}"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def snapshot(trials: list[Any], planned: int, target_images: int, metric: str, mode: str) -> Snapshot:
    """Count Tune's ``trials`` (objects with ``status``, ``last_result``, ``trial_id``) for the line.

    ``best`` is over every trial's latest report that carries ``metric``: reports of one study share
    its budget, so a trial stopped early can only hold the best value it had when it was stopped.
    """
    done = stopped = failed = running = 0
    work = 0.0
    best: tuple[float, str, float] | None = None
    sign = 1.0 if mode == "min" else -1.0
    for trial in trials:
        result = trial.last_result or {}
        seen = float(result.get("images_seen", 0) or 0)
        share = min(1.0, seen / target_images) if target_images > 0 else 0.0
        if trial.status == "TERMINATED":
            work += 1.0
            if seen >= target_images:
                done += 1
            else:
                stopped += 1
        elif trial.status == "ERROR":
            work += 1.0
            failed += 1
        else:
            work += share
            running += trial.status == "RUNNING"
        value = result.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or sign * value < sign * best[0]:
                best = (float(value), str(trial.trial_id), seen / 1000.0)
    return Snapshot(planned, done, stopped, failed, running, work, best)


class StudyProgress(Callback):
    """A Ray Tune callback that logs :meth:`Snapshot.line` every ``interval_s`` seconds and once when the
    study ends.

    The time left is the remaining trials' worth of training at the rate this session has trained so
    far. Tune keeps its callbacks in the study's state and restores them with ``--resume``; the clock
    and the work counted at the start are reset then, so earlier sessions' work does not flatter the rate.
    """

    def __init__(
        self, study: str, planned: int, target_images: int, metric: str, mode: str, interval_s: float = 60.0
    ) -> None:
        self.study, self.planned, self.target_images = study, planned, target_images
        self.metric, self.mode, self.interval_s = metric, mode, interval_s
        self._reset_clock()

    def _reset_clock(self) -> None:
        self._start = time.monotonic()
        self._last_line = self._start
        self._work_at_start: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        keep = ("study", "planned", "target_images", "metric", "mode", "interval_s")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_clock()

    def _snapshot(self, trials: list[Any]) -> Snapshot:
        return snapshot(trials, self.planned, self.target_images, self.metric, self.mode)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if self._work_at_start is None:
            self._work_at_start = self._snapshot(trials).work
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            logger.info(self.line(trials, now))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        logger.info(self.line(trials, time.monotonic()))

    def line(self, trials: list[Any], now: float) -> str:
        snap = self._snapshot(trials)
        elapsed = now - self._start
        gained = snap.work - (self._work_at_start or 0.0)
        left = max(0.0, self.planned - snap.work)
        eta = elapsed * left / gained if gained > 1e-6 else (0.0 if left == 0 else None)
        return snap.line(self.study, self.metric, elapsed, eta)
