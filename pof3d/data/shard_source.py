"""The Ray Data source of a shard set: read tasks that read a few Parquet row groups each (``id``,
``image``, ``pose``; local paths or any pyarrow filesystem URI), decode the images straight into
``uint8 [B,3,H,W]`` and yield them in blocks of ``DECODE_BATCH`` rows, the rows of every task permuted and
the row groups dealt to tasks in a new seeded order every epoch. ``pof3d/data/streaming.py`` builds the
dataset on it and turns its blocks into training batches.
"""

from __future__ import annotations

import functools
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from pof3d.data.shard_io import first_rows, open_parquet, read_group, row_location, undecodable
from pof3d.data.shard_reader import check_shards, read_manifest, resolve
from pof3d.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

DECODE_BATCH = 128  # rows per output block: a task yields its first block after decoding this many rows
TASK_ROWS = 512  # rows (whole row groups) per read task; also the span of the in-task row permutation
COLUMNS = ["id", "image", "pose"]


def decode_into(
    out: np.ndarray,
    encoded: list[bytes],
    flip: np.ndarray | None,
    where: Callable[[int], str] = "row {}".format,
) -> None:
    """Decode PNG/JPEG bytes into ``out`` uint8 [B,3,H,W], mirrored left-right where ``flip``.

    A row that does not decode, or not to the set's size, is a ``DataError`` that names it by
    ``where(i)``. PIL splits each image into its channel planes, which is cheaper than a strided
    HWC -> CHW copy.
    """
    height, width = out.shape[2:]
    for i, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.size != (width, height):
                    raise DataError(
                        f"{where(i)}: image of {img.size[0]}x{img.size[1]} in a set of {width}x{height}"
                    )
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                if flip is not None and flip[i]:
                    rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                for c, band in enumerate(rgb.split()):
                    out[i, c] = np.asarray(band)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bytes that are no image
            raise DataError(f"{where(i)}: {undecodable(err)}") from err


def _poses(column: pa.ChunkedArray) -> np.ndarray:
    """float32 [B,2] of a list<float32> column, NaN where a row has no pose."""
    array = column.combine_chunks()
    if array.null_count == 0:
        flat = array.flatten().to_numpy(zero_copy_only=False)
        if flat.size == 2 * len(array):
            return flat.astype(np.float32).reshape(-1, 2)
    return np.array(
        [p if p is not None else (math.nan, math.nan) for p in array.to_pylist()], dtype=np.float32
    ).reshape(-1, 2)


def read_pieces(
    uri: str,
    pieces: list[tuple[str, list[int]]],
    resolution: int,
    xflip: bool,
    cars: bool,
    permute: bool,
    block_rows: int = DECODE_BATCH,
    seed: list[int] | None = None,
    skip: int = 0,
) -> Iterator[pa.Table]:
    """Read the given row groups of the given shards; yield decoded blocks of ``block_rows`` rows:
    ``image`` uint8 [B,3,R,R], ``pose`` float32 [B,2] (NaN when absent), ``id`` int64 [B].

    With ``permute`` the rows of all the pieces are shuffled together; with ``xflip`` each image is
    mirrored left-right with probability 1/2 and its pose mirrored with it (h -> pi - h, or 2 pi - h for
    cars). Both draw from ``seed`` (a stream's seed, epoch and task: the same rows in the same order with
    the same flips when a stream is restarted part-way), fresh OS entropy without one. The first ``skip``
    rows of that order are left out (read by the stream before it restarted).

    Transient store errors are retried; a damaged or missing shard, page or image raises ``DataError``
    naming the shard, row group and row (see :mod:`pof3d.data.shard_io`).
    """
    fs, root = resolve(uri)
    tables, rows_at = [], []  # rows_at: (shard, row group, row in shard) of every row of the table
    for path, groups in pieces:
        parquet = open_parquet(fs, f"{root.rstrip('/')}/{path.rsplit('/', 1)[-1]}", path)
        starts = first_rows(parquet.metadata)
        for group in groups:
            tables.append(read_group(parquet, path, group, COLUMNS))
            rows_at += [(path, group, starts[group] + i) for i in range(tables[-1].num_rows)]
    table = pa.concat_tables(tables)
    rng = np.random.default_rng(seed)
    order = rng.permutation(table.num_rows) if permute else np.arange(table.num_rows)
    flips = rng.random(len(order)) < 0.5 if xflip else None  # drawn for every row, skipped ones too
    order = order[skip:]
    flips = flips[skip:] if flips is not None else None
    encoded = table.column("image").to_pylist()
    ids = table.column("id").to_numpy().astype(np.int64)
    pose = _poses(table.column("pose"))
    for start in range(0, len(order), block_rows):
        rows = order[start : start + block_rows]
        flip = flips[start : start + block_rows] if flips is not None else None
        image = np.empty((len(rows), 3, resolution, resolution), np.uint8)
        decode_into(
            image,
            [encoded[i] for i in rows],
            flip,
            lambda i, rows=rows: f"{row_location(*rows_at[rows[i]])} (id {ids[rows[i]]})",
        )
        block_pose = pose[rows]
        if flip is not None:
            block_pose[flip, 0] = (2 * math.pi if cars else math.pi) - block_pose[flip, 0]
        yield BlockAccessor.batch_to_block({"image": image, "pose": block_pose, "id": ids[rows]})


class ShardSource(Datasource):
    """Ray Data source over a shard set: one read task per ``task_rows`` rows of whole row groups."""

    def __init__(
        self,
        uri: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        xflip: bool = False,
        cars: bool = False,
        task_rows: int = TASK_ROWS,
        block_rows: int = DECODE_BATCH,
        epochs: int = 1,
        start: int = 0,
    ) -> None:
        super().__init__()
        if epochs < 1:
            raise DataError(f"epochs: got {epochs}, expected at least 1 pass over the set per execution")
        if start < 0:
            raise DataError(f"start: got {start}, expected the rows of the stream already read (>= 0)")
        self.epochs, self.start = epochs, start
        self.uri = str(uri)
        manifest = read_manifest(self.uri)
        self.resolution = int(manifest["resolution"])
        self.rows = int(manifest["rows"])
        # (shard, row group, rows); missing, truncated or unreadable shards stop here, before any worker.
        self.groups = check_shards(self.uri, manifest)
        if sum(n for _, _, n in self.groups) != self.rows:
            raise DataError(f"{uri}: the shards hold {sum(n for *_, n in self.groups)} rows, not {self.rows}")
        self.seed, self.shuffle, self.xflip, self.cars = seed, shuffle, xflip, cars
        self.task_rows, self.block_rows = max(1, task_rows), max(1, block_rows)

    def get_name(self) -> str:
        return "ReadShards"

    @property
    def row_bytes(self) -> int:
        """Decoded bytes of one row: the uint8 image plus its pose and id."""
        return 3 * self.resolution**2 + 16

    def estimate_inmemory_data_size(self) -> int:
        return self.rows * self.row_bytes

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        # Ray advances the context's execution index after every completed execution; its own file shuffle
        # reseeds the same way. Execution x holds epochs x * epochs ... x * epochs + epochs - 1, counted
        # from the epoch that ``start`` falls in, whose first ``start % rows`` rows are left out.
        execution = int(getattr(data_context, "_execution_idx", 0) or 0)
        first, skip = divmod(self.start, self.rows)
        if execution:
            skip = 0
        tasks = []
        for epoch in range(first + execution * self.epochs, first + (execution + 1) * self.epochs):
            groups = list(self.groups)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(groups))
                groups = [groups[i] for i in order]
            chunks, chunk, rows = [], [], 0
            for group in groups:
                chunk.append(group)
                rows += group[2]
                if rows >= self.task_rows:
                    chunks.append((chunk, rows))
                    chunk, rows = [], 0
            if chunk:  # tasks never span two epochs
                chunks.append((chunk, rows))
            for index, (chunk, rows) in enumerate(chunks):
                left_out = min(skip, rows)
                skip -= left_out
                if left_out < rows:
                    tasks.append(self._task(chunk, rows, [self.seed, epoch, index], left_out))
        return tasks

    @property
    def block_bytes(self) -> int:
        return self.block_rows * self.row_bytes

    def num_tasks(self) -> int:
        return len(self.get_read_tasks(1))

    def _task(self, chunk: list[tuple[str, int, int]], rows: int, seed: list[int], skip: int) -> ReadTask:
        pieces: dict[str, list[int]] = {}
        for path, group, _ in chunk:
            pieces.setdefault(path, []).append(group)
        read = functools.partial(
            read_pieces,
            self.uri,
            list(pieces.items()),
            self.resolution,
            self.xflip,
            self.cars,
            self.shuffle,
            self.block_rows,
            seed,
            skip,
        )
        rows -= skip
        meta = BlockMetadata(
            num_rows=rows, size_bytes=rows * self.row_bytes, exec_stats=None, input_files=None
        )
        return ReadTask(read, meta)
