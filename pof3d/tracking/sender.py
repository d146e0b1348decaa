"""Delivery of tracking calls in the background: a bounded queue, retries with backoff, a flush at exit.

Training hands each call (metrics of a tick, an image, a tag) to :class:`Sender` and goes on at once;
one daemon thread sends them in order. A call that fails for a reason that may pass (the server is
down, restarting, overloaded, the network blips) stays at the head of the queue and is tried again
after a growing pause; a call the server refuses for good (a bad value, a deleted run) is dropped with
a warning, so one bad call cannot hold back the rest. While the server is away the sender says so once
(and again every few minutes), and says once when it is back.

The queue is bounded so that a server that stays away for days cannot fill the memory of a training
process: when it is full the oldest system-metrics sample makes room, or else the oldest metrics call
(see :func:`_victim`); what was dropped is counted and reported. A dropped call that carries metrics
is not lost: the run's ``metrics.jsonl`` holds every tick, and :mod:`pof3d.tracking.run` back-fills the
ticks MLflow lacks when the server is back and whenever a run (re)starts.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_PENDING = 2000  # calls kept while the server is away (a tick's metrics are one call)
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
REMIND_EVERY_S = 600.0  # while the server stays away, say so again this often
EXIT_FLUSH_S = 10.0  # what an interpreter exit without close() waits for unsent calls

# MLflow error codes that no retry can fix: the call itself is wrong or its run is gone.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "BAD_REQUEST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
    }
)


@dataclass
class Call:
    """One tracking call: ``fn`` does the sending; ``kind`` names it in messages ("metrics", "image")."""

    kind: str
    fn: Callable[[], object]
    cleanup: Callable[[], object] | None = None  # runs once the call is sent or given up
    step: int | None = None  # of a metrics call: how far a back-fill must reach if it is dropped


def is_permanent(exc: BaseException) -> bool:
    """True when the server refused the call itself (retrying cannot help)."""
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT_CODES


class Sender:
    """Sends calls in order on a daemon thread; :meth:`submit` never blocks on the server."""

    def __init__(
        self,
        where: str,
        on_recovered: Callable[[int], None] | None = None,
        max_pending: int = MAX_PENDING,
        first_retry_s: float = FIRST_RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ) -> None:
        """``where`` names the server in messages; ``on_recovered(step)`` runs on the sender thread when
        the queue has drained after metrics calls up to ``step`` were dropped (the back-fill hook)."""
        self.where = where
        self._on_recovered = on_recovered
        self._max_pending = max_pending
        self._first_retry_s, self._max_retry_s = first_retry_s, max_retry_s
        self._queue: collections.deque[Call] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._away_since: float | None = None
        self._dropped: collections.Counter[str] = collections.Counter()
        self._dropped_step: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"pof3d-tracking {where}", daemon=True)
        self._thread.start()
        _open_senders.add(self)

    # -- the training side ------------------------------------------------------------------------

    def submit(self, call: Call) -> bool:
        """Queue ``call``; if the queue is full (the server has been away long), drop and count it.
        Returns whether it was queued."""
        with self._cond:
            if self._closing:
                return False
            if len(self._queue) >= self._max_pending:
                victim = _victim(list(self._queue)[1:], call)  # the head may be in flight
                self._drop(victim)
                if victim is call:
                    return False
                self._queue.remove(victim)
            self._queue.append(call)
            self._cond.notify()
            return True

    def _drop(self, call: Call) -> None:
        """Count a call given up for lack of room (the caller holds the lock)."""
        self._dropped[call.kind] += 1
        if call.step is not None:
            self._dropped_step = max(self._dropped_step or 0, call.step)
        if call.cleanup is not None:
            call.cleanup()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + int(self._busy)

    @property
    def away(self) -> bool:
        return self._away_since is not None

    def close(self, timeout_s: float) -> int:
        """Send what is queued for at most ``timeout_s`` seconds; returns how many calls stay unsent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        _open_senders.discard(self)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            unsent = len(left) + int(self._busy)
        if unsent:
            kinds = collections.Counter(c.kind for c in left)
            logger.warning(
                "MLflow tracking at %s: %d call(s) could not be sent before the end (%s); the run's "
                "metrics.jsonl keeps every tick and a resumed run back-fills them",
                self.where,
                unsent,
                ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "1 in progress",
            )
        return unsent

    # -- the sending thread -----------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._first_retry_s
        reminded = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing and everything sent
                call = self._queue[0]
                self._busy = True
            try:
                call.fn()
            except Exception as exc:  # noqa: BLE001 - whatever the backend raises, training goes on
                if is_permanent(exc):
                    logger.warning(
                        "MLflow tracking at %s refused a %s call, which is dropped: %s",
                        self.where,
                        call.kind,
                        _first_line(exc),
                    )
                    self._done(call)
                    continue
                now = time.monotonic()
                if self._away_since is None:
                    self._away_since, reminded = now, now
                    logger.warning(
                        "MLflow tracking at %s is not answering (%s); training goes on, and calls are "
                        "kept and sent when it is back (metrics.jsonl keeps every tick)",
                        self.where,
                        _first_line(exc),
                    )
                elif now - reminded >= REMIND_EVERY_S:
                    reminded = now
                    logger.warning(
                        "MLflow tracking at %s still not answering after %s; %d call(s) kept",
                        self.where,
                        _duration(now - self._away_since),
                        self.pending,
                    )
                with self._cond:
                    self._busy = False
                    if self._closing:
                        # At the end, keep trying until close()'s timeout gives up on us.
                        self._cond.wait(min(delay, 1.0))
                    else:
                        self._cond.wait(delay)
                delay = min(delay * 2, self._max_retry_s)
                continue
            self._done(call)
            delay = self._first_retry_s
            if self._away_since is not None:
                logger.info(
                    "MLflow tracking at %s is back after %s; sending the %d kept call(s)",
                    self.where,
                    _duration(time.monotonic() - self._away_since),
                    self.pending,
                )
                self._away_since = None
            up_to = self._dropped_since_drain()
            if up_to is not None and self._on_recovered is not None:
                self._recover(up_to)

    def _done(self, call: Call) -> None:
        with self._cond:
            if self._queue and self._queue[0] is call:
                self._queue.popleft()
            self._busy = False
        if call.cleanup is not None:
            call.cleanup()

    def _dropped_since_drain(self) -> int | None:
        """Once the queue has drained after calls were dropped for lack of room: says so, and returns
        the last step of the dropped metrics (None if none were dropped, or the queue is not empty)."""
        with self._cond:
            if self._queue or not self._dropped:
                return None
            dropped, self._dropped = self._dropped, collections.Counter()
            up_to, self._dropped_step = self._dropped_step, None
        logger.warning(
            "MLflow tracking at %s: %s were dropped while the queue was full",
            self.where,
            ", ".join(f"{n} {k} call(s)" for k, n in sorted(dropped.items())),
        )
        return up_to

    def _recover(self, up_to: int) -> None:
        try:
            self._on_recovered(up_to)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a failed back-fill is retried at the next (re)start
            logger.warning("MLflow tracking at %s: back-fill failed: %s", self.where, _first_line(exc))


def _victim(queued: list[Call], new: Call) -> Call:
    """What makes room in a full queue: the oldest system-metrics sample, else the oldest metrics call
    (``metrics.jsonl`` back-fills it), else the new call itself; a run's status, tags, images and
    model are kept over figures that can be had again."""
    for kind in ("system", "metrics"):
        if new.kind == kind:
            return next((c for c in queued if c.kind == kind), new)
        found = next((c for c in queued if c.kind == kind), None)
        if found is not None:
            return found
    return new


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# Senders still open at interpreter exit get a short, bounded flush (close() is the normal way).
_open_senders: weakref.WeakSet[Sender] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for sender in list(_open_senders):
        sender.close(EXIT_FLUSH_S)
