"""Ray Data streaming of a shard set into training batches.

The set is read by a custom Ray Data source (:class:`ShardSource`, in ``pof3d/data/shard_source.py``):
every read task reads a few Parquet row groups (``id``, ``image``, ``pose``; local paths or any pyarrow
filesystem URI), decodes the images straight into ``uint8 [B,3,H,W]`` and yields them in blocks of
``DECODE_BATCH`` rows. There is no separate listing or map stage, so an epoch starts with one round of
tasks, and only a few blocks are in flight at a time, whatever the size of the set. Images cross the
object store as uint8 (a quarter of the bytes of float32); :func:`iter_train_batches` (or
:class:`ImageCollate` given to ``iter_torch_batches``) turns them into float32 in [-1, 1] on the
consumer, in Ray's prefetch thread. Ray Train splits the stream among workers
(``iter_train_batches(get_dataset_shard("train"), ...)``).

Shuffling is streaming-friendly: the row groups (64 rows each) of all shards are dealt to read tasks in
a new random order every epoch (seeded, reseeded per execution), and the rows of every read task are
permuted. ``full_shuffle=True`` adds Ray's global ``random_shuffle``, which materialises the set in the
object store. One execution (one iteration of the dataset) can hold several epochs (``epochs=``), so
that small sets do not restart the pipeline every epoch.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.exceptions import RayError

from pof3d.data.shard_reader import read_manifest
from pof3d.data.shard_source import DECODE_BATCH, TASK_ROWS, ShardSource
from pof3d.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import ray.data
    import torch

log = logging.getLogger(__name__)

DECODE_CPUS = 0.25  # fractional: on small machines the decoders share cores with the training workers
PREFETCH_BATCHES = 2  # batches the consumer's iterator collates ahead of the training step
STREAM_ROWS = 65536  # epochs=None: enough epochs per execution for about this many rows (small sets)


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


class StepFeed:
    """A worker's images for each step, as many as the step takes: an uneven deal of the global batch
    turns with the step (pof3d/batch_split.py), so a worker's share changes from step to step, while a
    Ray Data iterator hands out batches of one size. Batches of ``chunk`` images, execution after
    execution of ``source``, are cut and joined to each request; a short last batch of an execution joins
    the next request, so no image of the stream is skipped."""

    def __init__(self, source: Any, chunk: int) -> None:
        self.source, self.chunk = source, chunk
        self._batches = self._endless()
        self._held: dict[str, torch.Tensor] | None = None

    def take(self, count: int) -> dict[str, torch.Tensor]:
        """The next ``count`` images of this worker's stream (``iter_train_batches``' columns)."""
        import torch

        parts, got = [], 0
        while got < count:
            if self._held is None:
                self._held = next(self._batches)
            held = self._held
            n = min(count - got, len(held["image"]))
            parts.append({k: v[:n] for k, v in held.items()})
            self._held = {k: v[n:] for k, v in held.items()} if n < len(held["image"]) else None
            got += n
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _endless(self) -> Iterator[dict[str, torch.Tensor]]:
        # One pass of the loop is one execution, which holds several epochs on small sets.
        while True:
            empty = True
            for batch in iter_train_batches(self.source, self.chunk):
                empty = False
                yield batch
            if empty:
                raise DataError("the training data yields no images for this worker")


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
    max_tasks: int | None = None,
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
    (leave it None under Ray Train, which reserves the training workers' CPUs itself). ``max_tasks`` caps
    the read tasks running at once (None: as many as the free CPUs allow). Every task Ray runs at once
    needs a worker process of its own, and starting one costs about two CPU seconds (Python, Ray and the
    reader's imports), more than a short run's steps need of decoding (docs/data.md).

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
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks={max_tasks}: expected at least 1 read task at a time, or None")
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
        concurrency=max_tasks,
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
        "streaming %d rows (%d row groups) from %d shards of %s, %d epoch(s) per execution, from row %d, %s",
        manifest["rows"],
        len(source.groups),
        len(manifest["shards"]),
        uri,
        epochs,
        start,
        f"at most {max_tasks} read task(s) at once" if max_tasks else "read tasks as CPUs allow",
    )
    return ds
