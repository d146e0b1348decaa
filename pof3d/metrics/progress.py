"""Progress lines of long evaluation loops, so that a 50k-sample FID never looks hung."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EVERY_S = 10.0  # at most one line per this many seconds (and one when the loop is done)


class ProgressLog:
    """Logs ``<what>: done/total <unit> (rate/s, ETA)`` every :data:`EVERY_S` seconds and at the end.

    ``logger=None`` makes it silent (the ranks other than 0 of a spread evaluation).
    """

    def __init__(
        self,
        what: str,
        total: int,
        logger: logging.Logger | None,
        unit: str = "images",
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.logger, self.unit, self.every_s, self.clock = (
            what,
            total,
            logger,
            unit,
            every_s,
            clock,
        )
        self.done = 0
        self.started = self.last = clock()

    def update(self, count: int) -> None:
        self.done += count
        now = self.clock()
        if self.logger is None or (self.done < self.total and now - self.last < self.every_s):
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.logger.info(
            "%s: %d/%d %s (%.1f/s, ETA %.0f s)", self.what, self.done, self.total, self.unit, rate, eta
        )
