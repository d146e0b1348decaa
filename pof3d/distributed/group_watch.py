"""A Ray Train controller callback that records every start of a worker group in the run's storage.

The controller is the one process that knows why a group stops (a resize, a lost worker, a preemption)
and how large the next one will be; the workers of the new group know neither. So before each group
starts, this writes ``ROOT/workers/group.json`` (:mod:`pof3d.distributed.elastic` reads it on rank 0):
the new size, the size of the group before it in this launch (None for the first), the cause, and when
the old group stopped. Before a resize stops a healthy group to grow it, it first asks that group for a
checkpoint (:func:`pof3d.distributed.preemption.checkpoint_before_resize`): Ray Train would stop it
without warning, and the new group would redo everything since the last snapshot. A shrink is not
asked: Ray Train shrinks a running group when the capacity it reserved went away, a lost node, whose
worker can no longer step (the others wait for it in the gradient all-reduce), so no checkpoint can come
and the resize would only wait out ``train.resize_save_timeout_s``.

Ray Train 2.60 has no public hook for this; its controller calls every non-``UserCallback`` callback of
``RunConfig(callbacks=...)`` as an internal ``ControllerCallback`` (``DataParallelTrainer`` keeps them for
such uses). The callback is pickled into the controller actor, which runs on the driver's node; it writes
through the run's storage, which every node reaches.
"""

from __future__ import annotations

import logging
import time

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    PreemptingState,
    ResizingState,
    RestartingState,
    RunningState,
)

from pof3d.distributed.elastic import write_group_record
from pof3d.distributed.preemption import checkpoint_before_resize
from pof3d.run_files import RunFiles

logger = logging.getLogger(__name__)


class GroupWatch(ControllerCallback):
    def __init__(self, files: RunFiles, resize_save_timeout_s: float = 0.0) -> None:
        self.files = files
        self.resize_save_timeout_s = resize_save_timeout_s
        self._running: int | None = None  # size of the group that last reached RunningState
        self._starting: int | None = None  # size of the group being started
        self._stopped_at: float | None = None
        self._cause: str | None = None
        self._preempting = False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, PreemptingState):
            self._preempting = True  # the group still trains (and checkpoints) until the node goes
        elif isinstance(current_state, (ResizingState, RestartingState)) and self._stopped_at is None:
            self._stopped_at = time.time()
            if isinstance(current_state, ResizingState):
                self._cause = "resize"
            else:
                self._cause = "preemption" if self._preempting else "failure"
        elif isinstance(current_state, RunningState) and self._starting is not None:
            self._running, self._starting = self._starting, None
            self._stopped_at, self._cause, self._preempting = None, None, False

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        """Called before every group start (the first one, a resize and a restart after a failure alike)."""
        self._starting = resize_decision.num_workers
        saved_s = None
        growing = self._running is not None and resize_decision.num_workers > self._running
        if self._cause == "resize" and growing and self.resize_save_timeout_s > 0:
            # The old group still trains: it checkpoints after its step in progress, then Ray stops it.
            reason = f"resize from {self._running} to {resize_decision.num_workers} workers"
            saved_s = checkpoint_before_resize(self.files, reason, self.resize_save_timeout_s)
            if saved_s is None:
                logger.warning(
                    "no checkpoint within train.resize_save_timeout_s=%g s before the %s; the new group "
                    "resumes from the last one",
                    self.resize_save_timeout_s,
                    reason,
                )
            self._stopped_at = time.time()  # the group stops now, after its checkpoint
        record = {
            "workers": resize_decision.num_workers,
            "previous": self._running,
            "cause": self._cause or "start",
            "stopped_at": self._stopped_at,
            "saved_s": saved_s,
            "scheduled_at": time.time(),
        }
        try:
            write_group_record(self.files, record)
        except OSError as exc:  # storage briefly unreachable: the group starts anyway, unrecorded
            logger.warning("cannot record the worker group's start: %s", exc)
