"""The environment a command's own local Ray starts with (pof3d/distributed/local_ray.py).

What it does for a run (no PlacementGroupCleaner traceback beside a second Ray, no preemption-watcher
error, no raylet worker warning) is checked on the real CLI in tests/test_console.py.
"""

from __future__ import annotations

import os
import socket

import pytest

from pof3d.distributed.local_ray import free_port, local_ray_env, scoped_environ


def test_the_local_rays_address_is_set_only_while_it_starts(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    with scoped_environ(local_ray_env(6399)):
        assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6399"
        assert os.environ["RAY_GCS_SERVER_PORT"] == "6399"
    # Afterwards this process neither points at that Ray nor fixes the port of a later one.
    assert os.environ["RAY_ADDRESS"] == "10.0.0.9:6379"
    assert "RAY_GCS_SERVER_PORT" not in os.environ


def test_the_environment_is_restored_when_ray_fails_to_start(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError), scoped_environ(local_ray_env(6399)):
        raise RuntimeError("the raylet did not start")
    assert "RAY_ADDRESS" not in os.environ


def test_the_chosen_port_is_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("", free_port()))  # would raise if something listened there
