"""Preemption notices: a warning that the job, or one node of it, is about to go becomes a checkpoint.

Two kinds of notice reach the training loop, and both are acted on after the step in progress:

- **The whole run goes** (SLURM's ``--signal`` warning, a ``kill`` of the training command, a scheduler's
  SIGTERM to it): the driver, ``python -m pof3d.train``, catches SIGTERM and SIGUSR1 while the run is
  launched and writes ``ROOT/workers/preemption-notice.json``. Python runs signal handlers only in a
  process's main thread, and the training loop runs in Ray Train's training thread of another process,
  often on another node, so the notice travels through the run's storage, which every node reaches:
  rank 0 polls the file from a thread once a second (never from the step). Every rank then stops after
  the same step, rank 0 writes a checkpoint (no figures, no evaluation: the time is short), and the run
  ends with its ``stop_reason``; ``--resume`` continues from that checkpoint. Anyone may write the file
  (an operator, a spot-notice watcher); its ``reason`` names the sender.
- **One node goes** (Ray Core drains a node with reason PREEMPTION: a Kubernetes pod's
  ``ray start --block`` receiving SIGTERM, ``ray drain-node``, an autoscaler): Ray Train marks every
  worker of the group (``ray.train.get_preemption_info``). Rank 0 reads its own mark, rank 0 writes a
  checkpoint once, and training goes on; when the node is gone Ray Train restarts the group from that
  checkpoint (``FailureConfig.max_preemption_failures``, unlimited by default).

A third kind asks for a checkpoint without a stop: before Ray Train stops a healthy group to resize it,
the controller callback (:func:`checkpoint_before_resize`, called by ``group_watch.GroupWatch``) writes
``ROOT/workers/resize-notice.json``, waits for the checkpoint and lets the resize go on; the new group
resumes from it instead of the last snapshot. Each kind has its own file, so a stop that comes while a
resize notice is pending is neither overwritten nor removed with it, and it is acted on first.

Rank 0 decides and, in a data-parallel run, broadcasts its answer at every step: a rank that stopped on
its own would leave the others waiting in the next gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pof3d.checkpoint import images_seen
from pof3d.run_files import WORKERS_DIR, RunFiles
from pof3d.storage import Location

logger = logging.getLogger(__name__)

# ROOT/workers/{kind}-notice.json, one file per kind so that neither overwrites or removes the other; a
# stop (preemption) outranks a checkpoint for a resize.
KINDS = ("preemption", "resize")
POLL_S = 1.0  # how often rank 0 looks for the notice file: a stat locally, one HEAD request on S3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_NONE, _NODE, _RUN = 0, 1, 2  # what the broadcast code says


def notice_location(files: RunFiles, kind: str = "preemption") -> Location:
    if kind not in KINDS:
        raise ValueError(f"notice kind {kind!r}: expected one of {', '.join(KINDS)}")
    return files.root / WORKERS_DIR / f"{kind}-notice.json"


def write_notice(files: RunFiles, reason: str, kind: str = "preemption") -> Location:
    """Ask the run's workers to checkpoint after their current step, and then to stop (a preemption
    notice) or to train on (a resize notice)."""
    location = notice_location(files, kind)
    location.write_text(json.dumps({"reason": reason, "at": time.time()}) + "\n")
    return location


def clear_notice(files: RunFiles, kind: str = "preemption") -> None:
    location = notice_location(files, kind)
    if location.is_file():
        fs, path = location.fs()
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
            fs.delete_file(path)


def checkpoint_before_resize(
    files: RunFiles, reason: str, timeout_s: float, poll_s: float = 0.5
) -> float | None:
    """Ask the running group for a checkpoint after its step in progress and wait until it is complete
    in the run's storage (Ray Train's controller calls this before it stops the group for a resize).

    Returns the seconds from the notice to the complete checkpoint, or None when none came within
    ``timeout_s`` (the group is then stopped anyway, and the new one resumes from the last snapshot).
    The group trains on meanwhile; only the resize waits.
    """
    before = _newest_images(files)
    started = time.monotonic()
    write_notice(files, reason, kind="resize")
    try:
        while time.monotonic() - started < timeout_s:
            if _newest_images(files) > before:
                return time.monotonic() - started
            time.sleep(poll_s)
        return None
    finally:
        clear_notice(files, "resize")  # acted on, or too late: the next group must not take it


def _newest_images(files: RunFiles) -> int:
    try:
        latest = files.latest_checkpoint()
    except OSError:  # storage briefly away: the next look
        return -1
    return -1 if latest is None else images_seen(latest)


@dataclass(frozen=True)
class Notice:
    reason: str  # what sent it: "SIGUSR1", "node drain (...)"; the other ranks only know the kind
    stop: bool  # True: the run stops after the checkpoint; False: training goes on (a node or the group goes)
    given_at: float | None = None  # time.time() when it was written (rank 0, the file kind only)
    kind: str = "preemption"  # or "resize": Ray Train is about to stop the group for a resize

    def log_checkpoint(self, images_seen: int) -> None:
        """Say what the notice did, and for a notice file how long it took from the notice to the
        checkpoint (the driver's signal handler writes the file: that is signal to checkpoint)."""
        after = f" {time.time() - self.given_at:.1f} s after the notice" if self.given_at else ""
        goes = "the group is resized" if self.kind == "resize" else "the node goes"
        then = "the run stops" if self.stop else f"training goes on until {goes}"
        logger.info(
            "%s notice (%s): checkpoint at kimg %.3f written%s; %s",
            self.kind,
            self.reason,
            images_seen / 1000,
            after,
            then,
        )


class NoticeWatch:
    """Whether a preemption notice has arrived, the same answer on every rank at the same step.

    Every rank calls :meth:`check` after every step (a collective when data parallel); rank 0 polls the
    notice file in a thread, so the step never waits on storage.
    """

    def __init__(self, files: RunFiles, rank: int, poll_s: float = POLL_S) -> None:
        self.files, self.rank = files, rank
        self._file_notice: Notice | None = None
        self._acknowledged: dict[str, float | None] = {}  # per kind, the "at" of the notice acted on last
        self._node_notice_taken = False
        self._closed = threading.Event()
        self._thread = None
        if rank == 0:
            self._thread = threading.Thread(
                target=self._poll, args=(poll_s,), name="pof3d-notice", daemon=True
            )
            self._thread.start()

    def check(self, world: int = 1, device: torch.device | str = "cpu") -> Notice | None:
        code, notice = _NONE, None
        if self.rank == 0:
            notice = self._file_notice
            if notice is None and (notice := self._node_notice()) is not None:
                self._node_notice_taken = True  # once per group; a file notice leaves it for later
            code = _NONE if notice is None else (_RUN if notice.stop else _NODE)
        if world > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.broadcast(flag, src=0)
            code = int(flag.item())
        if code == _NONE:
            return None
        if notice is None:  # a rank other than 0
            notice = Notice(reason="rank 0's notice", stop=code == _RUN)
        return notice

    def acknowledge(self, notice: Notice) -> None:
        """``notice`` (what :meth:`check` returned) was acted on: remove its file, so that the next start
        does not stop at once and a resize notice is not taken twice; the poll goes on for the next one
        (a stop that arrived meanwhile stays)."""
        if self.rank != 0 or (notice is not self._file_notice and notice.given_at is None):
            return  # another rank, or Ray's node notice: no file
        clear_notice(self.files, notice.kind)
        self._acknowledged[notice.kind] = notice.given_at
        if self._file_notice is notice:
            self._file_notice = None

    def close(self) -> None:
        self._closed.set()

    def _poll(self, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            for kind in KINDS:  # the stop first
                pending = self._file_notice
                if pending is not None and (pending.stop or pending.kind == kind):
                    continue  # not acted on yet; only a stop may take a resize notice's place
                record = _read_notice(notice_location(self.files, kind))
                if record is None:
                    continue
                given_at = record.get("at")
                given_at = float(given_at) if isinstance(given_at, (int, float)) else None
                if given_at is not None and given_at == self._acknowledged.get(kind):
                    continue  # acted on, and about to be removed
                self._file_notice = Notice(
                    reason=str(record.get("reason") or "notice file"),
                    stop=kind == "preemption",
                    given_at=given_at,
                    kind=kind,
                )

    def _node_notice(self) -> Notice | None:
        """Ray Train's mark of a node drain, taken once per worker group (a restarted group starts clean)."""
        if self._node_notice_taken:
            return None
        info = _ray_preemption_info()
        if info is None:
            return None
        deadline = (
            f", node goes at {time.strftime('%H:%M:%S', time.localtime(info.deadline_ms / 1000))}"
            if info.deadline_ms
            else ""
        )
        return Notice(reason=f"node drain for ranks {info.preempted_ranks}{deadline}", stop=False)


def _read_notice(location: Location) -> dict | None:
    try:
        if not location.is_file():
            return None
        record = json.loads(location.read_text() or "{}")
    except (OSError, ValueError) as exc:  # half written, or storage briefly unreachable: the next poll
        logger.debug("reading %s: %s", location, exc)
        return None
    return record if isinstance(record, dict) else {}


def _ray_preemption_info():
    """This worker's ``PreemptionInfo`` as Ray Train's preemption watcher set it, or None.

    ``ray.train.get_preemption_info()`` would read the same value, but it is itself a collective through
    a Ray actor; rank 0 reads its own copy here and the answer travels with :meth:`NoticeWatch.check`'s
    broadcast. Outside a Ray Train worker (unit tests of the loop) there is none.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, RuntimeError, AttributeError):
        return None


@contextlib.contextmanager
def notices_from_signals(files: RunFiles) -> Iterator[None]:
    """While a run is launched, SIGTERM and SIGUSR1 to this process ask its workers to checkpoint and stop.

    A second signal ends the process as the signal would by default. A notice left by an earlier launch
    that never acted on it is removed first. Handlers can only be installed from the main thread (a Tune
    trial runs elsewhere): there, nothing changes.
    """
    for kind in KINDS:
        clear_notice(files, kind)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    received: list[int] = []

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if received:  # the second notice: stop waiting for the checkpoint
            logger.warning("%s again: stopping now without waiting for the checkpoint", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        location = write_notice(files, name)
        logger.warning(
            "%s received: every worker finishes its step, rank 0 writes a checkpoint, then the run stops "
            "(notice %s; the same signal again stops at once)",
            name,
            location,
        )

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        clear_notice(files)
