"""``ray job submit --working-dir . -- python -m pof3d.train ...`` against a real ``ray start --head``.

The head runs on its own free ports (dashboard on 127.0.0.1) so that it never meets the test session's
Ray or anyone else's; it is stopped by signalling the process group this test started, never with
``ray stop`` (which would stop every Ray on the machine). Token authentication is on, with a token file
of the test's own, passed to the head and to the job CLI the documented way (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pof3d.testing.micro import MICRO

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_dashboard(address: str, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the dashboard answers at all (401 without a token counts: it is up and enforcing auth)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the dashboard at {address} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --block`` in its own process group; yields the dashboard address."""
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        # At the end of the test a SIGTERM to `ray start --block` drains the node first, 30 s by default,
        # which the fixture's 10 s wait would only sit out before it kills the group.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1",
    )
    log = tmp_path / "head.log"
    # Its own short temp dir (socket paths are length-limited): Ray writes the "current cluster" file
    # there, not in /tmp/ray where any later ray.init() on this machine would find a dead address.
    temp_dir = tempfile.mkdtemp(prefix="pof3d-ray-", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with log.open("w") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, head, log)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its Ray processes on SIGTERM
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # anything of the group still shutting down
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(env: dict, *args: str, timeout: float = 180) -> str:
    """Run ``ray job ...``; its output (the CLI logs part of it to stderr)."""
    done = subprocess.run(
        [str(BIN / "ray"), "job", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_job_submission_runs_training_and_logs_ticks(ray_head, tmp_path) -> None:
    address, env = ray_head
    run_dir = tmp_path / "job-run"
    job_id = f"pof3d-test-{uuid.uuid4().hex[:8]}"
    env = dict(env, POF3D_CACHE=str(tmp_path / "cache"))
    # Without --no-wait the command follows the job's log to its end and exits 0 only if it succeeded:
    # one process, where polling `ray job status` started a Python with Ray's imports every few seconds.
    submitted = _ray_job(
        env, "submit", "--address", address, "--submission-id", job_id,
        "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".",
        "--", "python", "-m", "pof3d.train", "--kimg", "0.004", "--batch", "4", "--run-dir", str(run_dir),
        *[arg for item in MICRO for arg in ("--set", item)],
        timeout=300,
    )  # fmt: skip
    assert "tick 1 " in submitted, submitted[-5000:]  # the training's lines, as the command followed them
    status = _ray_job(env, "status", "--address", address, job_id).lower()
    logs = _ray_job(env, "logs", "--address", address, job_id)
    assert f"job '{job_id}' succeeded" in status, logs[-5000:]
    assert "tick 1 " in logs and "kimg 0.004/0.004" in logs
    assert "mlflow ui --backend-store-uri sqlite:///" in logs
    assert (run_dir / "metrics.jsonl").is_file()
