"""One evaluation spread over the workers of a run: each rank renders a share of the samples.

Shares are contiguous runs of whole batches, and the gathered arrays are concatenated in rank order, so
every sample is rendered in the same batch as in a single process and the combined features are the
ones a single process computes. The gather is passed in (:func:`torch_gather` for a
``torch.distributed`` group): the metrics never import Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

MAX_DIMS = 8  # arrays gathered by torch_gather have at most this many dimensions
# Every rank's array, in rank order, on every rank. Arrays must share their dtype; shapes may differ.
Gather = Callable[[np.ndarray], list[np.ndarray]]


def gather_alone(array: np.ndarray) -> list[np.ndarray]:
    return [array]


@dataclass(frozen=True)
class Spread:
    """This process's place in a spread evaluation; the default is a single process."""

    rank: int = 0
    world: int = 1
    gather: Gather = gather_alone

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of world size {self.world}: expected 0 <= rank < world")

    @property
    def leader(self) -> bool:
        """Rank 0 computes the distances and the metrics that are not spread, and logs."""
        return self.rank == 0

    def share(self, count: int, batch: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` of this rank out of ``count`` samples in batches of ``batch``."""
        batches = -(-count // batch)
        per, extra = divmod(batches, self.world)
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (1 if self.rank < extra else 0)
        return min(first * batch, count), min(last * batch, count)

    def concat(self, array: np.ndarray) -> np.ndarray:
        """Every rank's array concatenated in rank order; empty arrays (a rank without a share) of any
        shape are left out."""
        parts = [part for part in self.gather(array) if part.size]
        return np.concatenate(parts) if parts else array


ALONE = Spread()  # a single process: the default of every evaluation


def torch_gather(device: torch.device | str) -> Gather:
    """A :data:`Gather` over the default ``torch.distributed`` group, through tensors on ``device``
    (the training device: CPU for gloo, the rank's GPU for NCCL). Plain tensors, no pickling."""

    def gather(array: np.ndarray) -> list[np.ndarray]:
        world = dist.get_world_size()
        array = np.ascontiguousarray(array)
        if array.ndim > MAX_DIMS:
            raise ValueError(f"can gather arrays of at most {MAX_DIMS} dimensions, got {array.ndim}")
        # Shapes first (each rank's may differ), then the flat data padded to the largest size.
        shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64, device=device)
        shape[0] = array.ndim
        shape[1 : array.ndim + 1] = torch.tensor(array.shape, dtype=torch.int64)
        shapes = [torch.zeros_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape)
        shapes = [tuple(s[1 : int(s[0]) + 1].tolist()) for s in shapes]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        flat = torch.zeros(max(*sizes, 1), dtype=torch.from_numpy(array.reshape(-1)[:0]).dtype, device=device)
        flat[: array.size] = torch.from_numpy(array.reshape(-1)).to(device)
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        return [
            part[:size].cpu().numpy().reshape(s) for part, size, s in zip(parts, sizes, shapes, strict=True)
        ]

    return gather


def distributed_spread(device: torch.device | str) -> Spread:
    """The spread of the current ``torch.distributed`` group, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Spread()
    return Spread(dist.get_rank(), dist.get_world_size(), torch_gather(device))
