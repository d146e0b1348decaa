"""Shards on object storage and damaged shards: reads from the session's S3 server, retries on
throttling (a proxy in front of it answers 503 SlowDown), one located error for missing or damaged data,
and a training run that stops on it without a retry."""

from __future__ import annotations

import http.client
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pof3d.data.__main__ import main as data_main
from pof3d.data.shard_io import read_with_retry
from pof3d.data.shard_reader import check_shards, iter_rows, read_manifest, shard_paths
from pof3d.data.shard_source import read_pieces
from pof3d.data.shards import ShardWriter, encode_png
from pof3d.data.synthetic import generate
from pof3d.errors import DataError

ROWS = 12


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """One shard of 12 rows (16 px), so that the first read of training meets any damage in it."""
    return generate(tmp_path_factory.mktemp("data") / "faces", ROWS, 16, "faces", seed=3)


def upload(local: Path, bucket: str, name: str = "faces") -> str:
    uri = f"s3://{bucket}/{name}"
    pafs.copy_files(str(local), uri)
    return uri


def damage(shard: str) -> None:
    """Zero 4 KiB in the middle of the shard's image column, the same number of bytes in place."""
    fs, path = pafs.FileSystem.from_uri(shard) if "://" in shard else (pafs.LocalFileSystem(), shard)
    with fs.open_input_file(path) as f:
        data = bytearray(f.read())
        column = pq.ParquetFile(f).metadata.row_group(0).column(1)
    start = column.dictionary_page_offset or column.data_page_offset
    middle = start + column.total_compressed_size // 2
    data[middle - 2048 : middle + 2048] = bytes(4096)
    with fs.open_output_stream(path) as f:
        f.write(bytes(data))


def read_all(uri: str) -> list[int]:
    """Row ids of every decoded block of the set, read as a Ray Data read task would."""
    pieces = [(path, [0]) for path in shard_paths(uri)]
    return [i for block in read_pieces(uri, pieces, 16, False, False, False) for i in block["id"].to_pylist()]


def test_a_set_on_s3_verifies_inspects_and_streams_like_the_local_one(shard_set, s3_bucket, capsys):
    uri = upload(shard_set, s3_bucket)
    assert data_main(["verify", uri]) == 0 and f"{uri}: verified {ROWS} rows" in capsys.readouterr().out
    assert data_main(["inspect", uri]) == 0 and "row 0: source=" in capsys.readouterr().out
    local = list(iter_rows(str(shard_set), ["id", "image"]))
    remote = list(iter_rows(uri, ["id", "image"]))
    assert [r["id"] for r in remote] == [r["id"] for r in local] == list(range(ROWS))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(local, remote, strict=True))
    assert check_shards(uri) == [(f"{uri}/part-00000.parquet", 0, ROWS)]
    assert read_all(uri) == list(range(ROWS))


def test_a_missing_bucket_shard_or_resized_shard_is_named_before_reading(shard_set, s3_bucket, tmp_path):
    with pytest.raises(DataError, match=rf"^s3://{s3_bucket}-absent/faces: no manifest.json"):
        read_manifest(f"s3://{s3_bucket}-absent/faces")
    uri = upload(shard_set, s3_bucket)
    fs, shard = pafs.FileSystem.from_uri(f"{uri}/part-00000.parquet")
    fs.delete_file(shard)
    with pytest.raises(DataError, match=rf"^{uri}/part-00000.parquet: listed in manifest.json but missing"):
        check_shards(uri)
    copy = generate(tmp_path / "faces", ROWS, 16, "faces", seed=3)
    shard = copy / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        DataError, match=r"part-00000.parquet: \d+ bytes, manifest.json says \d+; .*truncated"
    ):
        check_shards(str(copy))


def test_training_on_a_truncated_shard_is_a_usage_error_before_ray_starts(shard_set, tmp_path, capsys):
    import ray

    from pof3d.train import main as train_main

    copy = Path(shutil.copytree(shard_set, tmp_path / "faces"))
    shard = copy / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    was_running = ray.is_initialized()
    assert train_main(["--data", str(copy), "--kimg", "0.004", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{shard}:" in err and "truncated" in err
    assert ray.is_initialized() == was_running  # the check ran before connecting to any Ray


def test_damaged_bytes_are_one_error_naming_shard_row_group_and_rows(shard_set, tmp_path, capsys):
    copy = Path(shutil.copytree(shard_set, tmp_path / "faces"))
    damage(str(copy / "part-00000.parquet"))
    check_shards(str(copy))  # same size, intact footer: only reading finds the damage
    where = rf"{copy}/part-00000.parquet row group 0 \(rows 0-{ROWS - 1}\): unreadable \(OSError: .*CRC"
    with pytest.raises(DataError, match=where):
        read_all(str(copy))
    with pytest.raises(DataError, match=where):
        list(iter_rows(str(copy)))
    assert data_main(["verify", str(copy)]) == 2
    assert "sha256 differs from the manifest's" in capsys.readouterr().err


def test_a_row_that_is_no_image_is_named_by_its_row(tmp_path):
    writer = ShardWriter(tmp_path / "set", resolution=8)
    pixels = np.zeros((8, 8, 3), np.uint8)
    for i in range(5):
        image = b"\x89PNG not an image" if i == 3 else encode_png(pixels)
        writer.add(image, "png", 8, 8, source=f"img-{i}.png", pose=np.zeros(2))
    writer.close()
    uri = str(tmp_path / "set")
    shard = f"{Path(uri).resolve()}/part-00000.parquet"
    with pytest.raises(DataError, match=rf"^{shard} row group 0, row 3 \(id 3\): does not decode"):
        list(read_pieces(uri, [(shard, [0])], 8, False, False, False))
    with pytest.raises(DataError, match=rf"^{shard} row group 0, row 3: does not decode"):
        list(iter_rows(uri))


class FaultyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that answers the first ``failures`` GETs of shard files
    with ``status`` (503 SlowDown: throttling; 403 AccessDenied: not transient)."""

    def __init__(self, upstream: str, failures: int, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.split("://", 1)[1]
        self.failures, self.status, self.failed = failures, status, 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FaultyProxy

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "GET" and "part-" in self.path and self.server.failed < self.server.failures:
            self.server.failed += 1
            code = "SlowDown" if self.server.status == 503 else "AccessDenied"
            payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self.send_response(self.server.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        head = self.command == "HEAD"  # its Content-Length is the object's size, with no body
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "server", "date") and (
                head or key.lower() != "content-length"
            ):
                self.send_header(key, value)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """Start a proxy; this process's S3 clients then reach the S3 server through it."""
    servers = []

    def start(failures: int, status: int) -> FaultyProxy:
        server = FaultyProxy(s3_server, failures, status)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def test_throttled_reads_go_through_and_access_denied_is_one_error(shard_set, s3_bucket, proxy):
    uri = upload(shard_set, s3_bucket)
    throttled = proxy(failures=5, status=503)
    assert read_all(uri) == list(range(ROWS)) and throttled.failed == 5
    denied = proxy(failures=1, status=403)
    with pytest.raises(DataError, match=rf"^{uri}/part-00000.parquet.*: unreadable .*ACCESS_DENIED"):
        read_all(uri)
    assert denied.failed == 1  # not retried


def test_transient_errors_are_retried_with_backoff_and_others_are_not():
    """The retry loop beyond pyarrow's own retries, with the S3 client's wording of the errors."""
    failures = [
        OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
    ] * 2
    calls = []

    def flaky() -> str:
        calls.append(1)
        if failures:
            raise failures.pop()
        return "data"

    assert read_with_retry("s3://b/x", flaky, max_backoff_s=0.01) == "data" and len(calls) == 3
    denied = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    with pytest.raises(DataError, match=r"^s3://b/x: unreadable \(OSError: AWS Error ACCESS_DENIED"):
        read_with_retry("s3://b/x", lambda: (calls.append(1), (_ for _ in ()).throw(denied)))
    assert len(calls) == 4
    down = OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.")
    with pytest.raises(OSError, match=r"^s3://b/x: still failing after 3 attempts") as caught:
        read_with_retry("s3://b/x", lambda: (_ for _ in ()).throw(down), attempts=3, max_backoff_s=0.01)
    assert not isinstance(caught.value, DataError)  # the store is down, not the data: Ray Train may retry


@pytest.mark.slow
def test_a_damaged_shard_stops_training_with_one_error_and_no_retry(
    ray_local, s3_bucket, tmp_path, capsys, monkeypatch
):
    """Shards on S3 read by two workers: the harder case (local shards read the same way, through the
    same reader, and the damaged-file errors of local shards are covered by the tests above)."""
    from mlflow.tracking import MlflowClient

    from pof3d.testing.micro import MICRO
    from pof3d.train import main as train_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workers = 2
    data = upload(generate(tmp_path / "faces", ROWS, 32, "faces", seed=3), s3_bucket)
    shard = f"{data}/part-00000.parquet"
    damage(shard)
    run_dir = tmp_path / "run"
    pids = PidWatcher(run_dir / "workers")
    args = ["--data", data, "--kimg", "0.024", "--batch", "4", "--workers", str(workers)]
    code = train_main([*args, "--run-dir", str(run_dir), *[a for s in MICRO for a in ("--set", s)]])
    pids.stop()
    err = capsys.readouterr().err
    assert code == 1
    stopped = [line for line in err.splitlines() if line.startswith("training stopped:")]
    assert len(stopped) == 1, err[-3000:]
    assert f"training stopped: {shard} row group 0 (rows 0-{ROWS - 1}): unreadable (OSError:" in stopped[0]
    assert "CRC checksum verification failed" in stopped[0]
    assert pids.seen == {f"rank-{r}.pid": 1 for r in range(workers)}, "the worker group was restarted"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pof3d").experiment_id])
    assert run.info.status == "FAILED" and shard in run.data.tags["training_error"]


class PidWatcher:
    """Counts the distinct processes that wrote each ``rank-N.pid`` while a run goes on: a restarted
    worker group writes new ones."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._pids, self._done = folder, {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            self._scan()

    def _scan(self) -> None:
        for path in self.folder.glob("rank-*.pid"):
            text = path.read_text().strip()
            if text:
                self._pids.setdefault(path.name, set()).add(text)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._scan()

    @property
    def seen(self) -> dict[str, int]:
        return {name: len(pids) for name, pids in sorted(self._pids.items())}
