"""Fetching the Inception file: from a small HTTP server on 127.0.0.1 (no other network), a right file is
kept, a wrong one is refused, named and removed; missing weights put fd_random in the default metrics."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading
from pathlib import Path

import pytest

from pof3d import evaluate
from pof3d.cache import CACHE_ENV
from pof3d.metrics import default_metrics
from pof3d.metrics import fid as fidlib

RIGHT = b"the network, as far as this test is concerned" * 1000
WRONG = b"a page that is not the network"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the server's access log would go to stderr
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Base URL of an HTTP server on 127.0.0.1 serving right.pt and wrong.pt."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "right.pt").write_bytes(RIGHT)
    (root / "wrong.pt").write_bytes(WRONG)
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for name in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not see these requests
        monkeypatch.setenv(name, "*")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fidlib.URL_ENV, raising=False)
    monkeypatch.delenv(fidlib.INCEPTION_ENV, raising=False)
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_right_file_is_fetched_into_the_cache_and_kept(server: str, tmp_path: Path):
    expected = hashlib.sha256(RIGHT).hexdigest()
    path = fidlib.fetch_inception(f"{server}/right.pt", sha256=expected)
    assert path == tmp_path / "cache" / fidlib.INCEPTION_FILE and path.read_bytes() == RIGHT
    assert _leftovers(path.parent) == [fidlib.INCEPTION_FILE]  # no temporary file left behind
    # Already there with the right checksum: kept, nothing fetched (the URL would fail).
    assert fidlib.fetch_inception(f"{server}/gone.pt", sha256=expected) == path


def test_wrong_file_is_refused_named_and_removed(server: str, tmp_path: Path):
    expected = hashlib.sha256(RIGHT).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(fidlib.WeightsError) as info:
        fidlib.fetch_inception(f"{server}/wrong.pt", sha256=expected)
    message = str(info.value)
    assert f"{server}/wrong.pt" in message and hashlib.sha256(WRONG).hexdigest() in message
    assert expected in message and f"{len(WRONG)} bytes" in message
    assert _leftovers(cache) == []
    # A wrong file already at the destination is removed before the right one is fetched.
    (cache / fidlib.INCEPTION_FILE).write_bytes(WRONG)
    assert fidlib.fetch_inception(f"{server}/right.pt", sha256=expected).read_bytes() == RIGHT


def test_cli_fetch_exit_codes_and_mirror_variable(server: str, tmp_path: Path, monkeypatch, capsys):
    # The real checksum: what the test server serves is not the network, so both fetches are refused.
    assert evaluate.main(["--fetch-weights", "--url", f"{server}/wrong.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{server}/wrong.pt" in err and fidlib.INCEPTION_SHA256 in err
    monkeypatch.setenv(fidlib.URL_ENV, f"{server}/missing.pt")
    assert evaluate.main(["--fetch-weights"]) == 2
    err = capsys.readouterr().err
    assert f"{server}/missing.pt" in err and "404" in err
    assert _leftovers(tmp_path / "cache") == []
    with pytest.raises(SystemExit) as info:
        evaluate.main([])
    assert info.value.code == 2


def test_default_metrics_use_fd_random_without_the_inception_file(server: str, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        assert default_metrics() == ["pose", "js", "depth", "re", "fd_random"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fd_random instead of fid" in lines[0] and fidlib.FETCH_COMMAND in lines[0]
    # With a verified file in the cache (here one whose checksum the test declares right): fid.
    monkeypatch.setattr(fidlib, "INCEPTION_SHA256", hashlib.sha256(RIGHT).hexdigest())
    fidlib.fetch_inception(f"{server}/right.pt", sha256=fidlib.INCEPTION_SHA256)
    assert default_metrics() == ["pose", "js", "depth", "re", "fid"]
