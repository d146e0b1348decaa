"""The record of each worker group's start (the Ray Train controller callback) and what rank 0 of a new
group makes of it; the checkpoint a running group writes before a resize stops it."""

from __future__ import annotations

import json
import threading
import time

import pytest
from ray.train.v2._internal.execution.controller.state import (
    ResizingState,
    RestartingState,
    RunningState,
    SchedulingState,
)
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

from pof3d.checkpoint import read_progress, save_checkpoint
from pof3d.distributed.elastic import GroupChange, read_group_record, write_group_record
from pof3d.distributed.group_watch import GroupWatch
from pof3d.distributed.preemption import NoticeWatch, notice_location
from pof3d.presets import load_config
from pof3d.run_files import RunFiles
from pof3d.storage import Location


def _decision(workers: int) -> ResizeDecision:
    return ResizeDecision(num_workers=workers, resources_per_worker={"CPU": 0.5})


def test_the_controller_callback_records_each_group_start_and_why_the_last_one_stopped(tmp_path) -> None:
    files = RunFiles(Location.parse(str(tmp_path / "run")))
    watch = GroupWatch(files)
    watch.before_controller_execute_resize_decision(_decision(1))  # the launch's first group
    first = read_group_record(files)
    assert first["workers"] == 1 and first["previous"] is None and first["cause"] == "start"
    watch.after_controller_state_update(SchedulingState(_decision(1)), RunningState())
    before = time.time()
    watch.after_controller_state_update(RunningState(), ResizingState(_decision(2)))
    watch.after_controller_state_update(ResizingState(_decision(2)), SchedulingState(_decision(2)))
    watch.before_controller_execute_resize_decision(_decision(2))
    grown = read_group_record(files)
    assert (grown["workers"], grown["previous"], grown["cause"]) == (2, 1, "resize")
    assert before <= grown["stopped_at"] <= grown["scheduled_at"] <= time.time()
    watch.after_controller_state_update(SchedulingState(_decision(2)), RunningState())
    watch.after_controller_state_update(RunningState(), RestartingState(training_failed_error=None))
    watch.before_controller_execute_resize_decision(_decision(1))
    shrunk = read_group_record(files)
    assert (shrunk["workers"], shrunk["previous"], shrunk["cause"]) == (1, 2, "failure")


def test_a_resize_waits_for_the_running_groups_checkpoint_then_stops_it(tmp_path, caplog) -> None:
    """Rank 0 of the running group (its notice watch, and a checkpoint like the loop's) answers the
    controller's request; without an answer the resize goes on after the timeout."""
    files = RunFiles(Location.parse(str(tmp_path / "run")))
    cfg = load_config("tiny")
    save_checkpoint(files.checkpoints.local_path / "checkpoint-kimg000.008", {}, cfg, {"images_seen": 8})
    rank0, done = NoticeWatch(files, rank=0, poll_s=0.05), threading.Event()
    taken = []

    def train() -> None:  # a step every 50 ms; a notice is acted on after the step, as in the loop
        images = 8
        while not done.wait(0.05):
            images += 4
            if (notice := rank0.check()) is not None:
                taken.append(notice)
                path = files.checkpoints.local_path / f"checkpoint-kimg{images / 1000:07.3f}"
                save_checkpoint(path, {}, cfg, {"images_seen": images})
                rank0.acknowledge(notice)

    group = threading.Thread(target=train, daemon=True)
    group.start()
    watch = GroupWatch(files, resize_save_timeout_s=30)
    try:
        watch.before_controller_execute_resize_decision(_decision(1))
        watch.after_controller_state_update(SchedulingState(_decision(1)), RunningState())
        watch.after_controller_state_update(RunningState(), ResizingState(_decision(2)))
        watch.before_controller_execute_resize_decision(_decision(2))
    finally:
        done.set()
        group.join(5)
        rank0.close()
    (notice,) = taken  # once, and training went on: no stop
    assert notice.kind == "resize" and not notice.stop and notice.reason == "resize from 1 to 2 workers"
    grown = read_group_record(files)
    assert grown["cause"] == "resize" and 0 < grown["saved_s"] < 30
    assert read_progress(files.latest_checkpoint())["images_seen"] > 8
    assert not notice_location(files, "resize").is_file()
    # Nobody answers (a group stuck in a long evaluation): the resize goes on after the timeout, and
    # the notice is not left for the next group.
    watch = GroupWatch(files, resize_save_timeout_s=0.3)
    watch.before_controller_execute_resize_decision(_decision(2))
    watch.after_controller_state_update(SchedulingState(_decision(2)), RunningState())
    watch.after_controller_state_update(RunningState(), ResizingState(_decision(3)))
    caplog.set_level("WARNING", logger="pof3d.distributed.group_watch")
    watch.before_controller_execute_resize_decision(_decision(3))
    assert read_group_record(files)["saved_s"] is None and not notice_location(files, "resize").is_file()
    assert "within train.resize_save_timeout_s=0.3 s before the resize from 2 to 3" in caplog.text
    # A shrink follows lost capacity (Ray shrinks a running group when a node went): its worker there
    # cannot step, so the group is not asked and the resize does not wait.
    caplog.clear()
    watch = GroupWatch(files, resize_save_timeout_s=30)
    watch.before_controller_execute_resize_decision(_decision(2))
    watch.after_controller_state_update(SchedulingState(_decision(2)), RunningState())
    watch.after_controller_state_update(RunningState(), ResizingState(_decision(1)))
    started = time.monotonic()
    watch.before_controller_execute_resize_decision(_decision(1))
    assert time.monotonic() - started < 5
    shrunk = read_group_record(files)
    assert shrunk["cause"] == "resize" and shrunk["previous"] == 2 and shrunk["workers"] == 1
    assert shrunk["saved_s"] is None and not notice_location(files, "resize").is_file()
    assert "resize_save_timeout_s" not in caplog.text


def test_rank_0_of_a_new_group_says_how_it_changed_and_what_the_restart_cost(tmp_path, caplog) -> None:
    files = RunFiles(Location.parse(str(tmp_path / "run")))
    assert GroupChange.at_start(files, 1, 0, time.time()) is None  # no record: a plain start
    ticks = [{"images_seen": i, "tick": i // 4, "world_size": 1} for i in (4, 8, 12)]
    files.metrics.write_text("".join(json.dumps(t) + "\n" for t in ticks))
    stopped = time.time() - 5.0
    record = {"workers": 2, "previous": 1, "cause": "resize", "stopped_at": stopped, "saved_s": 1.5}
    write_group_record(files, record)
    change = GroupChange.at_start(files, 2, 8, begun_at=stopped + 3.0)  # resumed at the checkpoint of 8
    caplog.set_level("INFO", logger="pof3d.distributed.elastic")
    figures = change.first_step(data_wait=0.5)
    assert figures["group/previous_workers"] == 1 and figures["group/redone_images"] == 4
    assert figures["group/save_s"] == 1.5 and "checkpointed on its way down in 1.5 s" in caplog.text
    assert figures["group/start_s"] == pytest.approx(3.0)
    assert 5.0 <= figures["group/restart_s"] < 60
    assert "worker group grew from 1 to 2 workers (resize): training again" in caplog.text
    assert "4 images the old group trained after that checkpoint (as far as its ticks show)" in caplog.text
