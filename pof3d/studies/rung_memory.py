"""ASHA's rung results kept across ``--resume``.

Ray Tune 2.60 saves a study's search algorithm and callbacks with the experiment, but not its scheduler:
a resumed study's ASHA starts with empty rungs, and the next trial passes every rung (nothing to compare
with) however bad it is. Tune does restore callbacks' ``get_state``, so this callback carries the
scheduler's rung records (trial id -> objective at each milestone, and each trial's bracket) as plain
data and puts them back into the restored scheduler.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler


class RungMemory(Callback):
    """Saves and restores ``scheduler``'s rungs with the experiment's callback state."""

    def __init__(self, scheduler: AsyncHyperBandScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any] | None:
        brackets = self.scheduler._brackets
        return {
            "rungs": [[(milestone, dict(recorded)) for milestone, recorded in b._rungs] for b in brackets],
            "bracket_of": {tid: brackets.index(b) for tid, b in self.scheduler._trial_info.items()},
            "num_stopped": self.scheduler._num_stopped,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        brackets = self.scheduler._brackets
        if len(state["rungs"]) != len(brackets):
            raise ValueError(
                f"saved ASHA state has {len(state['rungs'])} brackets, the restored scheduler "
                f"{len(brackets)}; expected the study's own scheduler"
            )
        for bracket, rungs in zip(brackets, state["rungs"], strict=True):
            saved = {milestone: recorded for milestone, recorded in rungs}
            bracket._rungs = [(m, dict(saved.get(m, recorded))) for m, recorded in bracket._rungs]
        self.scheduler._trial_info.update({tid: brackets[i] for tid, i in state["bracket_of"].items()})
        self.scheduler._num_stopped = state["num_stopped"]
