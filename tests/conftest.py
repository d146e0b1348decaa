"""Shared fixtures: one local Ray for the whole test session, temporary dirs, fixed seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once per session; tests that need Ray take this fixture."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Run the study tests last.

    An ASHA-stopped trial is killed by Tune; Ray Train's placement-group cleaner may keep that trial's
    worker reservation (0.5 CPU) alive for the rest of the Ray session. On a 2-core machine that is enough
    to starve a later Train run of this session's shared local Ray, so the Tune tests go at the end.
    """
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_sweeps.py"))
