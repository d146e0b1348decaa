"""Ray Data streaming of a shard set into training batches.

The set is read by a custom Ray Data source (:class:`ShardSource`): every read task reads a few Parquet
row groups (``id``, ``image``, ``pose``; local paths or any pyarrow filesystem URI), decodes the images
straight into ``uint8 [B,3,H,W]`` and yields them in blocks of ``DECODE_BATCH`` rows. There is no
separate listing or map stage, so an epoch starts with one round of tasks, and only a few blocks are in
flight at a time, whatever the size of the set. Images cross the object store as uint8 (a quarter of the
bytes of float32); :func:`iter_train_batches` (or :class:`ImageCollate` given to ``iter_torch_batches``)
turns them into float32 in [-1, 1] on the consumer, in Ray's prefetch thread. Ray Train splits the
stream among workers (``iter_train_batches(get_dataset_shard("train"), ...)``).

Shuffling is streaming-friendly: the row groups (64 rows each) of all shards are dealt to read tasks in
a new random order every epoch (seeded, reseeded per execution), and the rows of every read task are
permuted. ``full_shuffle=True`` adds Ray's global ``random_shuffle``, which materialises the set in the
object store. One execution (one iteration of the dataset) can hold several epochs (``epochs=``), so
that small sets do not restart the pipeline every epoch.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.exceptions import RayError

from pof3d.data.shard_io import first_rows, open_parquet, read_group, row_location, undecodable
from pof3d.data.shard_reader import check_shards, read_manifest, resolve
from pof3d.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import ray.data
    import torch

log = logging.getLogger(__name__)

DECODE_BATCH = 128  # rows per output block: a task yields its first block after decoding this many rows
TASK_ROWS = 512  # rows (whole row groups) per read task; also the span of the in-task row permutation
DECODE_CPUS = 0.25  # fractional: on small machines the decoders share cores with the training workers
PREFETCH_BATCHES = 2  # batches the consumer's iterator collates ahead of the training step
STREAM_ROWS = 65536  # epochs=None: enough epochs per execution for about this many rows (small sets)
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


class ImageCollate(NumpyBatchCollateFn):
    """Consumer-side collation: ``image`` uint8 [B,3,R,R] -> float32 in [-1, 1]; other columns as tensors.

    The arithmetic is numpy's, never torch's: this runs in Ray's prefetch thread, and a torch op there
    would start a second OpenMP thread team (torch applies ``set_num_threads`` to every thread). With
    more OpenMP threads than cores, libgomp stops spinning at its barriers and the training thread's
    own team waits on the kernel: a 2-thread CPU step measured 1.45x slower (docs/training-step.md).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        import torch

        out = {}
        for name, array in batch.items():
            if name == "image":
                array = array.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            elif not array.flags.writeable:  # Ray's batches may be read-only views
                array = array.copy()
            out[name] = torch.from_numpy(array)
        return out


def iter_train_batches(
    source: Any,
    batch_size: int,
    *,
    drop_last: bool = False,
    prefetch_batches: int = PREFETCH_BATCHES,
    device: Any = "auto",
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of torch batches from a :func:`make_dataset` dataset or a Ray Train dataset shard:
    ``image`` float32 [B,3,R,R] in [-1,1], ``pose`` float32 [B,2] (NaN where absent), ``id`` int64 [B].

    A damaged shard or row raises a plain :class:`DataError` with the read task's message (shard, row
    group, row), not Ray's wrapper of it with the task's traceback.
    """
    batches = source.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        collate_fn=ImageCollate(),
        device=device,
    )
    try:
        yield from batches
    except Exception as exc:
        original = _data_error_in(exc)
        if original is None:
            raise
        raise DataError(str(original)) from exc


def _data_error_in(exc: BaseException) -> DataError | None:
    """The project's ``DataError`` raised in a Ray task, found through Ray's wrappers (a read task's
    ``RayTaskError``, re-raised by Ray Train's split coordinator), or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DataError) and not isinstance(err, RayError):
            return err
        stack += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return None


def stream_epochs(rows: int) -> int:
    """Epochs per execution for ``make_dataset(epochs=None)``: 1 for large sets, more for small ones."""
    return max(1, math.ceil(STREAM_ROWS / max(rows, 1)))


def ingest_options() -> Any:
    """Ray Train's default ingest options (the current ``DataContext``'s) with ``preserve_order``: Train
    replaces a dataset's execution options with these (``DataConfig(execution_options=...)``), and a
    multi-epoch stream needs its blocks in order so that its epochs follow one another.

    Built here rather than by ``DataConfig.default_ingest_options()``, which copies the deprecated
    ``exclude_resources`` (zero unless set, and the project never sets it) and so raises a
    ``RayDeprecationWarning`` in every run.
    """
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )


def make_dataset(
    uri: str,
    *,
    xflip: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    full_shuffle: bool = False,
    cars: bool | None = None,
    task_rows: int = TASK_ROWS,
    block_rows: int = DECODE_BATCH,
    epochs: int | None = 1,
    decode_cpus: float = DECODE_CPUS,
    cpu_budget: float | None = None,
    start: int = 0,
) -> ray.data.Dataset:
    """A lazily streamed Ray Dataset over the shard set at ``uri``: columns ``image`` (uint8 [3,R,R]),
    ``pose`` (float32 [2]) and ``id``; iterate it with :func:`iter_train_batches` for float images.

    One iteration (execution) yields ``epochs`` epochs one after the other, each every row exactly once
    in a new order; the next iteration continues with the following epochs. Several epochs per execution
    spare small sets Ray Data's start-up and pipeline fill at every epoch; ``None`` picks
    :func:`stream_epochs` of the set's size (1 with ``full_shuffle``, which shuffles a whole execution).

    ``cars`` picks the left-right mirror of the pose for ``xflip``; by default it is read from a synthetic
    set's manifest (faces otherwise). ``cpu_budget`` caps the CPUs Ray Data may use for this dataset
    (leave it None under Ray Train, which reserves the training workers' CPUs itself).

    ``start``: rows of the stream already read (a run's images seen at the checkpoint it resumes from).
    The stream then goes on from there, not from its first epoch: the rows, order within each read task
    and flips depend only on the seed, the epoch and the task, so a restart at ``start`` reads what the
    unbroken stream would have read from row ``start`` on, as far as the order of the tasks' blocks is
    kept (``preserve_order``).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    manifest = read_manifest(uri)
    if cars is None:
        cars = (manifest.get("synthetic") or {}).get("kind") == "cars"
    if epochs is None:
        epochs = 1 if full_shuffle else stream_epochs(int(manifest["rows"]))
    if full_shuffle and epochs != 1:
        raise DataError(
            f"full_shuffle with epochs={epochs}: a global shuffle would mix the epochs of one execution;"
            " expected epochs=1 (or None)"
        )
    source = ShardSource(
        uri,
        seed=seed,
        shuffle=shuffle,
        xflip=xflip,
        cars=cars,
        task_rows=task_rows,
        block_rows=block_rows,
        epochs=epochs,
        start=start,
    )
    ds = ray.data.read_datasource(
        # As many blocks as read tasks: Ray would otherwise split each task's output into tiny blocks.
        source,
        num_cpus=decode_cpus,
        override_num_blocks=source.num_tasks(),
    )
    if full_shuffle:
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # One block per DECODE_BATCH rows: Ray would otherwise coalesce a task's output before handing it on.
    ds.context.target_max_block_size = source.block_bytes
    if epochs > 1:  # blocks in task order, so that the epochs follow one another in the stream
        ds.context.execution_options.preserve_order = True
    if cpu_budget is not None:
        from ray.data import ExecutionResources

        ds.context.execution_options.resource_limits = ExecutionResources(cpu=cpu_budget)
    log.info(
        "streaming %d rows (%d row groups) from %d shards of %s, %d epoch(s) per execution, from row %d",
        manifest["rows"],
        len(source.groups),
        len(manifest["shards"]),
        uri,
        epochs,
        start,
    )
    return ds
