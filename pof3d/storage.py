"""Where runs and studies write: a local path or any pyarrow filesystem URI (``s3://``, ``gs://``, ...).

A :class:`Location` is one file or folder on such a filesystem. The project's own code reads and writes
run files only through it, so that a run directory on an object store behaves like one on local disk:

- **Atomic writes.** Locally a file is written to a hidden temporary sibling and renamed into place; on an
  object store one PUT (or one completed multipart upload) is atomic by itself. Readers never see half a
  file under its final name.
- **Endpoints and credentials from the standard environment only.** pyarrow's S3 client does not read
  ``AWS_ENDPOINT_URL`` on its own, so it is read here (``AWS_ENDPOINT_URL_S3`` first, as the AWS SDKs do)
  and passed as the endpoint; keys, profiles, web identities and instance roles are left to the AWS SDK's
  usual chain. Nothing is taken from command-line flags (which end up in logs).
- **Bounded waits.** S3 connections time out after :data:`S3_CONNECT_TIMEOUT_S` and requests are retried
  :data:`S3_ATTEMPTS` times, so an unreachable endpoint is an error in seconds, not a hang.

:func:`check_reachable` is the pre-flight: a missing bucket, an endpoint that does not answer or missing
credentials become one :class:`~pof3d.errors.ConfigError` naming the URI, before any worker starts.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pof3d.errors import ConfigError

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 120.0  # per request; large uploads are split into parts by the S3 client
S3_ATTEMPTS = 3
#: bytes per read when files are copied between storage and local disk. pyarrow's default (1 MiB) makes
#: one ranged GET per MiB on object stores, 1,300 requests for a 1.3 GB ffhq512 checkpoint;
#: benchmarks/checkpoint.py times a restore both ways
TRANSFER_CHUNK_BYTES = 64 << 20
_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",  # static keys (with AWS_SECRET_ACCESS_KEY)
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",  # Kubernetes service accounts (IRSA)
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS tasks
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",  # EKS pod identity
)


def is_uri(text: str) -> bool:
    """``scheme://...`` (``file://`` included); anything else is a local path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    """One client per endpoint/region/key (the arguments are the cache key; the client reads the keys)."""
    del key_id
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        region=region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or URI; ``ConfigError`` for an unknown scheme."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = _s3_filesystem(s3_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID"))
        return fs, rest.strip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{uri}: not a filesystem URI pyarrow can open ({exc})") from exc


@dataclass(frozen=True)
class Location:
    """A file or folder given as a local path or a URI. Picklable: Ray workers receive these."""

    uri: str  # an absolute local path, or scheme://...

    @classmethod
    def parse(cls, text: str | os.PathLike) -> Location:
        text = os.fspath(text)
        if not text:
            raise ConfigError("empty path; expected a local path or a URI such as s3://bucket/runs/a")
        if is_uri(text):
            scheme, _, rest = text.partition("://")
            if scheme == "file":
                return cls(str(Path(rest).resolve()))
            return cls(f"{scheme}://{rest.rstrip('/')}")
        return cls(str(Path(text).expanduser().resolve()))

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Location:
        if self.is_local:
            return Location(str(Path(self.uri) / name))
        return Location(posixpath.join(self.uri, name))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(str(Path(self.uri).parent))
        scheme, _, rest = self.uri.partition("://")
        return Location(f"{scheme}://{posixpath.dirname(rest)}")

    def fs(self) -> tuple[pafs.FileSystem, str]:
        return filesystem(self.uri)

    def child(self, fs_path: str) -> Location:
        """The location of ``fs_path``, a path below this one as the filesystem lists it."""
        _, base = self.fs()
        rel = posixpath.relpath(fs_path.replace(os.sep, "/"), base.replace(os.sep, "/"))
        return self / rel if rel != "." else self

    # -- reading ----------------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        fs, path = self.fs()
        return fs.get_file_info(path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        fs, path = self.fs()
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def walk(self) -> list[pafs.FileInfo]:
        """Every file and folder below this one (one listing on object stores); [] if there is none."""
        fs, path = self.fs()
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))

    def children(self) -> list[pafs.FileInfo]:
        fs, path = self.fs()
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))

    # -- writing ----------------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically (temporary sibling + rename; one PUT)."""
        if self.is_local:
            path = self.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        fs, path = self.fs()
        with fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload(self, local: Path) -> None:
        """Copy the local file ``local`` here, atomically."""
        if self.is_local:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.local_path.with_name(f".{self.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, self.local_path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        fs, path = self.fs()
        pafs.copy_files(str(local), path, destination_filesystem=fs, chunk_size=TRANSFER_CHUNK_BYTES)

    def download_dir(self, into: Path) -> Path:
        """Copy this folder's files into the local folder ``into`` (created); returns ``into``."""
        fs, path = self.fs()
        into.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(into), source_filesystem=fs, chunk_size=TRANSFER_CHUNK_BYTES)
        return into


def as_local_dir(location: Location, scratch: Path) -> Path:
    """A local folder with ``location``'s files: the folder itself when it is local, else a download
    into ``scratch`` (a temporary folder the caller owns)."""
    if location.is_local:
        return location.local_path
    return location.download_dir(scratch / location.name)


# ---------------------------------------------------------------------------------------------
# Pre-flight


def check_reachable(location: Location, what: str = "--run-dir") -> None:
    """``ConfigError`` naming ``location`` if it cannot be used: a missing bucket, an endpoint that does
    not answer, missing credentials. Local paths: the nearest existing parent must be a writable folder."""
    if location.is_local:
        _check_local(location.local_path, what)
        return
    scheme, _, rest = location.uri.partition("://")
    if scheme == "s3":
        _check_s3(location, rest.split("/", 1)[0], what)
        return
    try:
        location.info()
    except OSError as exc:
        raise ConfigError(f"{what} {location}: cannot be reached ({_first_line(exc)})") from exc


def _check_local(path: Path, what: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file; expected a folder (or a path to create)")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")


def _check_s3(location: Location, bucket: str, what: str) -> None:
    endpoint = s3_endpoint() or "AWS S3"
    if not bucket:
        raise ConfigError(f"{what} {location}: no bucket in the URI; expected s3://BUCKET/PATH")
    if not _s3_credentials_configured():
        raise ConfigError(
            f"{what} {location}: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or ~/.aws/credentials, a web identity or container role); instance metadata is "
            "disabled (AWS_EC2_METADATA_DISABLED)"
        )
    fs, _ = location.fs()
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise ConfigError(
            f"{what} {location}: the object store at {endpoint} cannot be used ({_first_line(exc)}); "
            "check AWS_ENDPOINT_URL, the network and the credentials"
        ) from exc
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(
            f"{what} {location}: bucket {bucket!r} does not exist at {endpoint}; create it first "
            f"(e.g. aws s3 mb s3://{bucket})"
        )


def _s3_credentials_configured() -> bool:
    """False only when no credential source exists at all; whether they are valid the server says."""
    if any(os.environ.get(name) for name in _CREDENTIAL_VARIABLES):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    config = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    if any(Path(p).expanduser().is_file() for p in (shared, config)):
        return True
    # An instance role can only be asked for over the network; the bucket check tells then.
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:400] if text else type(exc).__name__
