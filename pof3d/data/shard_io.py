"""Reading shard files: retries on transient object-store errors, and every other failure a
:class:`~pof3d.errors.DataError` naming the shard URI, row group and rows.

Object stores throttle and fail now and then (HTTP 503 "SlowDown", 500, dropped connections). Ray's own
Parquet reader retries a read when the error's text matches one of ``DataContext.retried_io_errors``,
with exponential backoff and random jitter (10 attempts, at most 32 s between them); the shard readers
here do the same, with the same patterns (Ray's configured ones when Ray Data is loaded, so a user's
``DataContext`` setting applies here too) plus throttling and any 5xx status.

Everything else is not transient and is never retried: a missing shard, access denied, a damaged footer
or page, an image that does not decode. Those raise ``DataError`` at once, naming the URI (and the row
group and row where known), so that a run stops with one clear message instead of retrying a worker that
would fail the same way again. A transient error that outlasts every attempt is re-raised as an
``OSError`` (the store is down, the data may be fine), which Ray Train's failure policy may retry.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pof3d.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ray 2.60's DEFAULT_RETRIED_IO_ERRORS, plus throttling and any 5xx, as pyarrow's S3 client words them.
TRANSIENT_ERRORS = (
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error UNKNOWN (HTTP status 503)",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error THROTTLING",
    r"HTTP status 5\d\d",
)
MAX_ATTEMPTS = 10
MAX_BACKOFF_S = 32.0


def transient_patterns() -> tuple[str, ...]:
    """Our patterns and, inside a process that runs Ray Data (its read tasks), the context's own."""
    patterns = TRANSIENT_ERRORS
    ray_data = sys.modules.get("ray.data")
    if ray_data is not None:
        patterns += tuple(
            p for p in ray_data.DataContext.get_current().retried_io_errors if p not in patterns
        )
    return patterns


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) reads as a throttling, 5xx or connection error of the store."""
    text = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        text += f" {err.__cause__}"
    return any(p in text or _search(p, text) for p in transient_patterns())


def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def read_with_retry(
    what: str,
    read: Callable[[], T],
    *,
    attempts: int = MAX_ATTEMPTS,
    max_backoff_s: float = MAX_BACKOFF_S,
) -> T:
    """``read()``, retried on transient store errors; any other failure is a ``DataError`` on ``what``.

    ``what`` names the object read (a URI, with row group and rows when known). ``read`` must start from
    scratch on every call (open the file itself, or re-read from an offset), as Ray's retries require.
    """
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except DataError:
            raise
        except FileNotFoundError as err:
            raise DataError(f"{what}: not found ({err}); expected the file the manifest lists") from err
        except (OSError, pa.ArrowException) as err:
            if not is_transient(err):
                raise DataError(f"{what}: unreadable ({type(err).__name__}: {err})") from err
            if attempt == attempts:
                raise OSError(f"{what}: still failing after {attempts} attempts: {err}") from err
            backoff = min(2.0**attempt, max_backoff_s) * random.random()
            log.warning(
                "%s: transient error (%s); retry %d/%d in %.1fs", what, err, attempt, attempts, backoff
            )
            time.sleep(backoff)
    raise AssertionError("unreachable")  # the loop returns or raises


def open_parquet(fs: pafs.FileSystem, path: str, uri: str) -> pq.ParquetFile:
    """The shard at ``path`` on ``fs`` (``uri`` names it in errors), its footer read with retries.

    Pages written with a checksum (every shard written since page checksums were added) are verified as
    they are read, so damaged bytes fail the read instead of reaching training as garbage pixels.
    """
    return read_with_retry(
        uri, lambda: pq.ParquetFile(fs.open_input_file(path), page_checksum_verification=True)
    )


def first_rows(metadata: pq.FileMetaData) -> list[int]:
    """The shard's row index of the first row of every row group."""
    starts, row = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(row)
        row += metadata.row_group(group).num_rows
    return starts


def read_group(parquet: pq.ParquetFile, uri: str, group: int, columns: list[str] | None) -> pa.Table:
    """Row group ``group`` of an :func:`open_parquet` shard, with retries; errors name its rows."""
    first = first_rows(parquet.metadata)[group]
    last = first + parquet.metadata.row_group(group).num_rows - 1
    return read_with_retry(
        f"{uri} row group {group} (rows {first}-{last})",
        lambda: parquet.read_row_group(group, columns=columns),
    )


def row_location(uri: str, group: int, row: int) -> str:
    """How errors name one row: the shard, its row group and the row's index in the shard."""
    return f"{uri} row group {group}, row {row}"


def undecodable(err: BaseException) -> str:
    """The message of a row whose bytes do not decode, with what to do about it."""
    return (
        f"does not decode ({type(err).__name__}: {err}); the shard is damaged or was replaced"
        " (`python -m pof3d.data verify` checks every shard against its manifest checksum)"
    )
