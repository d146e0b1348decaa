"""How one optimiser step's global batch is cut into micro-batches and dealt to the workers.

The global batch (``train.batch``) is a property of the run; the number of workers is not (an elastic
run grows and shrinks). So the cut is made on the global batch first: micro-batches are fixed slices of
``batch_gpu`` images (EG3D's name: the most one device processes at once), at offsets 0, batch_gpu,
2 x batch_gpu, ... of the global batch, and each worker takes whole micro-batches, consecutive ones, as
evenly as they divide. Every micro-batch therefore holds the same samples (and, seeded by its offset,
the same latents and noise) whatever the number of workers, which is what makes a run's trajectory
independent of it. A worker's loss on a micro-batch is weighted by the micro-batch's share of the global
batch, so an uneven deal (3 workers, batch 8) is exact, not rounded.

An uneven deal turns with the step: at step ``s`` worker ``r`` takes the part dealt to position
``(r + s) mod world``, so over any ``world`` consecutive steps every worker reads the same number of
images. Each worker reads its own split of one Ray Data stream, which deals the splits equal rows; a
worker that read fewer images at every step would fall further behind the others at each step until the
stream, holding its unread rows, stalls the readers ahead of it (Ray's ``streaming_split``: "if one
iterator falls behind, other iterators may be stalled"), and they wait for each other in the gradient
all-reduce. Which worker computes a micro-batch does not change the step: its samples and seeds are
those of its offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pof3d.errors import ConfigError


@dataclass(frozen=True)
class MicroBatch:
    offset: int  # index of its first sample in the global batch
    size: int


def micro_size(batch: int, batch_gpu: int, max_workers: int) -> int:
    """``batch_gpu``, or when it is 0 the most a worker gets with ``max_workers`` alive: one micro-batch
    per worker at full size, as a fixed-size run without ``batch_gpu`` always did."""
    return batch_gpu if batch_gpu > 0 else math.ceil(batch / max_workers)


def check_split(batch: int, batch_gpu: int, min_workers: int, max_workers: int) -> None:
    """Refuse a batch that some allowed worker count cannot share (a worker with no micro-batch)."""
    if batch_gpu < 0:
        raise ConfigError(f"train.batch_gpu={batch_gpu}: expected 0 (one micro-batch per worker) or more")
    size = micro_size(batch, batch_gpu, max_workers)
    if batch_gpu > batch:
        raise ConfigError(
            f"train.batch_gpu={batch_gpu} is larger than train.batch={batch}; expected at most the batch"
        )
    chunks = math.ceil(batch / size)
    if chunks < max_workers:
        raise ConfigError(
            f"train.batch={batch} in micro-batches of {size} (train.batch_gpu) makes {chunks} "
            f"micro-batch(es), fewer than the {max_workers} worker(s) the run may have, so a worker would "
            f"have nothing to do; expected a larger batch, a smaller train.batch_gpu or fewer workers"
        )
    del min_workers  # every count up to max_workers divides at least as easily


def micro_batches(batch: int, size: int, world: int, rank: int, step: int = 0) -> list[MicroBatch]:
    """The micro-batches worker ``rank`` of ``world`` processes at ``step``, in order."""
    chunks = [MicroBatch(o, min(size, batch - o)) for o in range(0, batch, size)]
    per, extra = divmod(len(chunks), world)
    position = (rank + step) % world  # the deal turns, so that every worker reads alike over world steps
    start = position * per + min(position, extra)
    return chunks[start : start + per + (1 if position < extra else 0)]


def share(batch: int, size: int, world: int, rank: int, step: int = 0) -> int:
    """Images worker ``rank`` reads at ``step``."""
    return sum(m.size for m in micro_batches(batch, size, world, rank, step))
