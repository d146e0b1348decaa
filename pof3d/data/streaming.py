"""Ray Data streaming of a shard set into training batches.

Rows are read from the manifest's shards with ``ray.data.read_parquet`` (local paths or any pyarrow
filesystem URI) and decoded in ``map_batches`` tasks into float images in [-1, 1] and poses, so only a
few blocks are in flight at a time, whatever the size of the set. Ray Train splits the stream among
workers (``get_dataset_shard("train").iter_torch_batches(...)``).

Shuffling is streaming-friendly: the shard files are read in a new random order every epoch (seeded,
reseeded per execution) and the rows of every decode batch are permuted. Sets cut into many shards mix
better (``--shard-mb``); ``full_shuffle=True`` uses Ray's global ``random_shuffle`` instead, which
materialises the encoded set in the object store.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pof3d.data.shards import decode_image, read_manifest, shard_paths

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

DECODE_BATCH = 64  # rows per decode task call; also the span of the in-batch row permutation
BLOCK_BYTES = 32 * 2**20  # smaller than Ray's default, so that decode tasks run in parallel on small sets
DECODE_CPUS = 0.25  # fractional: on small machines the decoders share cores with the training workers


def decode_batch(batch: pa.Table, xflip: bool, cars: bool, permute: bool) -> dict[str, np.ndarray]:
    """Encoded rows -> ``image`` float32 [B,3,H,W] in [-1,1], ``pose`` float32 [B,2] (NaN when absent),
    ``id`` int64 [B]. With ``xflip`` each image is mirrored left-right with probability 1/2 and its pose
    mirrored with it (h -> pi - h, or 2 pi - h for cars).

    Flips and the permutation draw from fresh OS entropy: a seeded stream here would repeat the same
    flips every epoch, as this function does not know the epoch.
    """
    rng = np.random.default_rng()
    images = np.stack([decode_image(b) for b in batch.column("image").to_pylist()])  # [B, H, W, 3]
    pose = np.array(
        [p if p is not None else (math.nan, math.nan) for p in batch.column("pose").to_pylist()],
        dtype=np.float32,
    ).reshape(-1, 2)
    ids = batch.column("id").to_numpy().astype(np.int64)
    if xflip:
        flip = rng.random(len(images)) < 0.5
        images[flip] = images[flip, :, ::-1]
        pose[flip, 0] = (2 * math.pi if cars else math.pi) - pose[flip, 0]
    if permute:
        order = rng.permutation(len(images))
        images, pose, ids = images[order], pose[order], ids[order]
    image = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return {"image": np.ascontiguousarray(image), "pose": pose, "id": ids}


def make_dataset(
    uri: str,
    *,
    xflip: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    full_shuffle: bool = False,
    cars: bool | None = None,
    batch_size: int = DECODE_BATCH,
    decode_cpus: float = DECODE_CPUS,
    cpu_budget: float | None = None,
) -> ray.data.Dataset:
    """A lazily streamed Ray Dataset over the shard set at ``uri`` (columns ``image``, ``pose``, ``id``).

    ``cars`` picks the left-right mirror of the pose for ``xflip``; by default it is read from a synthetic
    set's manifest (faces otherwise). ``cpu_budget`` caps the CPUs Ray Data may use for this dataset
    (leave it None under Ray Train, which reserves the training workers' CPUs itself).
    """
    import ray.data
    from ray.data import FileShuffleConfig, RandomSeedConfig

    manifest = read_manifest(uri)
    if cars is None:
        cars = (manifest.get("synthetic") or {}).get("kind") == "cars"
    ds = ray.data.read_parquet(
        shard_paths(uri, manifest),
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None,
        num_cpus=decode_cpus,
    ).select_columns(["id", "image", "pose"])  # pushed down into the reader: depth is never read
    if full_shuffle:
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=decode_cpus,
        fn_kwargs={"xflip": xflip, "cars": cars, "permute": shuffle},
    )
    ds.context.target_max_block_size = BLOCK_BYTES
    if cpu_budget is not None:
        from ray.data import ExecutionResources

        ds.context.execution_options.resource_limits = ExecutionResources(cpu=cpu_budget)
    log.info("streaming %d rows from %d shards of %s", manifest["rows"], len(manifest["shards"]), uri)
    return ds
