"""Shared fixtures: the session's S3-compatible server and local Ray, fresh buckets, one torch thread; the
share of the cores and the test order when the suite runs on several pytest-xdist workers."""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch
from scoped_env import scoped_env

pytest_plugins = ["loss_setup"]  # the loss tests' fixtures (tests/loss_setup.py)

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Several xdist workers on one machine share its cores. A worker whose torch kept one thread per core
# would run more OpenMP threads than there are cores, and a 2-thread step beside another busy process
# runs 5-10x slower (docs/training-step.md), so each worker computes on its share.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _workers))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 for the whole session.

    Its endpoint and dummy credentials go into the standard AWS environment variables, which pyarrow,
    boto3 and every Ray worker started afterwards read; nothing reaches beyond 127.0.0.1. Yields the
    endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "pof3d-test",
        "AWS_SECRET_ACCESS_KEY": "pof3d-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with scoped_env(env):
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the session's S3 server; yields its name (``s3://<name>/...``)."""
    import boto3

    name = "pof3d-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{next(_bucket_ids)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray, started once per session; tests that need Ray take this fixture.

    It starts after the S3 server so that Ray's workers inherit the server's endpoint and credentials.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests on tiny tensors: as fast, and no fight with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The longest modules, longest first (their tests' durations in a whole run in one process on two cores,
# 2026-12-07: 229, 157, 148, 133, 117, 110, 71, 69, 61 and 58 s). Starting them first lets the short ones
# even out the workers.
LONGEST_MODULES = [
    "tests/test_slurm.py",
    "tests/test_train_e2e.py",
    "tests/test_elastic.py",
    "tests/test_study_runs.py",
    "tests/test_multinode.py",
    "tests/test_compile_cache.py",
    "tests/test_preemption.py",
    "tests/test_train_job.py",
    "tests/test_gpu_recipe.py",
    "tests/test_tracking.py",
]


def pytest_collection_modifyitems(config, items):
    """Under xdist, the longest modules first, then the other end-to-end (``slow``) ones; always the study
    tests last.

    First: with ``-n 2`` xdist hands out whole modules (``--dist loadfile --no-loadscope-reorder`` in
    pyproject.toml) in this order, so the long ones start early and the short ones fill in at the end. A
    run in one process keeps the modules' own order.

    Last: an ASHA-stopped trial is killed by Tune; Ray Train's placement-group cleaner may keep that trial's
    worker reservation (0.5 CPU) alive for the rest of the Ray session. On a 2-core machine that is enough
    to starve a later Train run of this session's shared local Ray, so the Tune tests go at the end.
    """
    slow_modules = {_module(item) for item in items if item.get_closest_marker("slow")}
    under_xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))

    def order(item) -> tuple[bool, int, bool]:
        module = _module(item)
        if not under_xdist:
            return (module == "tests/test_sweeps.py", 0, False)
        rank = LONGEST_MODULES.index(module) if module in LONGEST_MODULES else len(LONGEST_MODULES)
        return (module == "tests/test_sweeps.py", rank, module not in slow_modules)

    items.sort(key=order)


def _module(item) -> str:
    return item.nodeid.split("::")[0]
