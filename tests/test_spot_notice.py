"""pof3d/distributed/spot_notice.py: reading an EC2 spot interruption notice from an instance metadata
service (IMDSv2's token, then the notice), and draining a real Ray node as a preemption with the
notice's deadline.

The metadata service is EC2's and does not run here; a small HTTP server on 127.0.0.1 answers as it
documents (a PUT for a token, 401 without a valid one, 404 until a notice, then its JSON)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error

import pytest

from pof3d.distributed.spot_notice import (
    InstanceMetadata,
    NoMetadata,
    SpotNotice,
    main,
    parse_notice,
    watch,
)

NOTICE = {"action": "terminate", "time": "2026-12-06T19:30:00Z"}


class Metadata(http.server.ThreadingHTTPServer):
    """IMDSv2 as EC2 documents it, with a switch for the notice and one for expiring tokens."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.notice: dict | None = None
        self.tokens_issued = 0
        self.valid_token = ""
        self.requests: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def expire_token(self) -> None:
        self.valid_token = "expired-" + self.valid_token


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Metadata

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: str = "") -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self) -> None:
        self.server.requests.append(f"PUT {self.path}")
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(400)
        self.server.tokens_issued += 1
        self.server.valid_token = f"token-{self.server.tokens_issued}"
        self._send(200, self.server.valid_token)

    def do_GET(self) -> None:
        self.server.requests.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.valid_token:
            return self._send(401)
        if self.path != "/latest/meta-data/spot/instance-action" or self.server.notice is None:
            return self._send(404)
        self._send(200, json.dumps(self.server.notice))


@pytest.fixture
def metadata():
    server = Metadata()
    yield server
    server.shutdown()
    server.server_close()


def test_a_notice_is_read_with_a_token_and_drains_once(metadata) -> None:
    drained: list[SpotNotice] = []
    looks = []

    def sleep(seconds: float) -> None:  # the watch's clock: the notice comes at the third look
        looks.append(seconds)
        if len(looks) == 2:
            metadata.expire_token()  # a token that ran out meanwhile is renewed, once
            metadata.notice = NOTICE

    notice = watch(InstanceMetadata(metadata.url), lambda n: drained.append(n) or (True, ""), 5.0, sleep)
    assert drained == [notice] and looks == [5.0, 5.0]
    assert notice == SpotNotice("terminate", dt.datetime(2026, 12, 6, 19, 30, tzinfo=dt.UTC))
    assert metadata.tokens_issued == 2
    assert metadata.requests.count("PUT /latest/api/token") == 2


def test_read_errors_do_not_end_the_watch(metadata) -> None:
    reader = InstanceMetadata(metadata.url)
    calls = []

    class Flaky:
        def notice(self):
            calls.append(1)
            if len(calls) == 1:
                raise urllib.error.URLError("connection reset")
            if len(calls) == 2:
                raise NoMetadata("the service did not answer this time")
            metadata.notice = NOTICE
            return reader.notice()

    notice = watch(Flaky(), lambda n: (False, "node is the head"), 0.0, lambda s: None)
    assert notice.action == "terminate" and len(calls) == 3


def test_notice_bodies() -> None:
    before = dt.datetime.now(dt.UTC)
    odd = parse_notice(json.dumps({"action": "stop", "time": "soon"}))
    assert odd.action == "stop" and 100 < odd.seconds_left(before) <= 121  # AWS's two minutes
    with pytest.raises(ValueError, match="expected a JSON object with 'action' and 'time'"):
        parse_notice('"terminate"')
    notice = parse_notice(json.dumps(NOTICE))
    assert notice.seconds_left(dt.datetime(2026, 12, 6, 19, 28, tzinfo=dt.UTC)) == 120.0
    assert notice.seconds_left(dt.datetime(2026, 12, 6, 19, 31, tzinfo=dt.UTC)) == 0.0


def test_without_instance_metadata_the_watcher_says_so_and_exits_0(capsys) -> None:
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert main(["--metadata-url", url]) == 0
    assert "no instance metadata at " + url in capsys.readouterr().out


DRAIN = """
import datetime as dt, json, ray
from pof3d.distributed.spot_notice import SpotNotice, drain_ray_node
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # never the session's
context = ray.get_runtime_context()
notice = SpotNotice("terminate", dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120))
accepted, why = drain_ray_node(context.gcs_address, context.get_node_id(), notice)
print(json.dumps({"accepted": accepted, "why": why}))
ray.shutdown()
"""


def test_the_drain_is_accepted_by_a_real_ray_node() -> None:
    """A Ray of its own in a subprocess: draining this session's shared Ray would end it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", DRAIN], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"accepted": True, "why": ""}, result
