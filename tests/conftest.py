"""Shared fixtures: the session's S3-compatible server and local Ray, fresh buckets, one torch thread."""

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


def pytest_collection_modifyitems(config, items):
    """Run the study tests last.

    An ASHA-stopped trial is killed by Tune; Ray Train's placement-group cleaner may keep that trial's
    worker reservation (0.5 CPU) alive for the rest of the Ray session. On a 2-core machine that is enough
    to starve a later Train run of this session's shared local Ray, so the Tune tests go at the end.
    """
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_sweeps.py"))
