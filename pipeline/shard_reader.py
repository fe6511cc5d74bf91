"""Streams the shard stage's WebDataset tars into batches of image tensors, one subset per worker."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.images import decode_rgb
from pipeline.storage import Location, validate_key

MAX_PIXELS = 4096 * 4096  # stored samples were bounded when sharded; this bounds a tampered shard


@dataclass
class ShardOrder(IterableDataset):
    """The shards of one reader as webdataset url dicts: once in order, or forever, dealt anew each pass.

    With repeat, every pass shuffles all the shards in an order seeded by `seed` and the pass (the same
    order on every rank) and this reader takes every `world`-th one from its `rank`. Dealt once, a rank
    holding a small shard (the last of a split, or one a growth added) would replay it at the rate the
    others go through large ones; dealt anew, each image is drawn equally often on the whole.
    """

    shards: list[Location]
    seed: int = 0
    repeat: bool = False
    rank: int = 0
    world: int = 1

    def __iter__(self):
        if not self.repeat:
            yield from ({"url": shard} for shard in self.shards)
            return
        passes = 0
        while True:
            order = list(self.shards)
            random.Random(f"deal {self.seed} {passes}").shuffle(order)
            yield from ({"url": shard} for shard in order[self.rank :: self.world])
            passes += 1


def _open_shards(src):
    """webdataset stage: open each shard Location (local, s3://, memory://) as a stream whose reads are
    retried on transient faults, so a long pass over the shards survives a throttled or flaky store."""
    for item in src:
        shard: Location = item["url"]
        with shard.open_read() as stream:
            yield {"url": shard.uri, "stream": stream}


def _to_tensors(sample: dict) -> tuple[str, torch.Tensor, int]:
    """Key, image as (3, H, W) uint8, label; keys from data are validated before use. The image member is
    `.jpg` (the shards) or `.png` (the sample stage's lossless tars)."""
    key = validate_key(sample["__key__"])
    data = sample["jpg"] if "jpg" in sample else sample["png"]
    image = torch.from_numpy(decode_rgb(data, MAX_PIXELS)).permute(2, 0, 1).contiguous()
    return key, image, int(sample["cls"])


def _flip(seed: str):
    rng = random.Random(seed)

    def flip(sample):
        key, image, label = sample
        return key, (image.flip(-1) if rng.random() < 0.5 else image), label

    return flip


# The webdataset stages from shard url dicts to raw samples (a dict of one key's tar members).
TAR_SAMPLES = (_open_shards, wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys)


def sample_pipeline(shards: list[Location], *, repeat: bool, seed: int = 0, rank: int = 0, world: int = 1,
                    shuffle_buffer: int = 0, augment: bool = False) -> wds.DataPipeline:
    """(key, image uint8 (3, H, W), label) samples; shards are dealt to ranks (ShardOrder) and split over
    DataLoader workers. The shuffle and the flips are seeded by the seed and the rank."""
    stages = [ShardOrder(shards, seed, repeat, rank, world), wds.split_by_worker, *TAR_SAMPLES]
    if shuffle_buffer:
        rng = random.Random(f"shuffle {seed} {rank}")
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng))
    stages.append(wds.map(_to_tensors))
    if augment:
        stages.append(wds.map(_flip(f"flip {seed} {rank}")))
    return wds.DataPipeline(*stages)


def read_tar(location: Location, wanted: Callable[[int, str], bool] | None = None
             ) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, image uint8 (3, H, W), label) of the samples of one tar, in its order, those for which
    `wanted(position, key)` holds (every sample with None). The others are not decoded: a metric task
    reading 64 images of a 2,000-image shard would otherwise decode all 2,000."""
    for position, sample in enumerate(wds.DataPipeline(ShardOrder([location]), *TAR_SAMPLES)):
        if wanted is None or wanted(position, validate_key(sample["__key__"])):
            yield _to_tensors(sample)


def collate(batch: list[tuple[str, torch.Tensor, int]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, images uint8 (B, 3, H, W), labels (B,)) of a list of samples."""
    keys, images, labels = zip(*batch)
    return list(keys), torch.stack(images), torch.tensor(labels, dtype=torch.long)


def batch_loader(shards: list[Location], batch_size: int, *, repeat: bool, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle_buffer: int = 0, augment: bool = False, workers: int = 0) -> DataLoader:
    """Batches (keys, images uint8 (B, 3, H, W), labels (B,)), decoded in `workers` loader processes.

    With repeat=True the stream never ends, so every DDP rank can take the same number of steps
    whatever its share of the shards; each pass deals all of `shards` to the `world` ranks again
    (`seed` must be the same on every rank). Loader processes are capped at the shard count: a
    process without a shard would have nothing to read.
    """
    workers = min(workers, len(shards))
    pipeline = sample_pipeline(shards, repeat=repeat, seed=seed, rank=rank, world=world,
                               shuffle_buffer=shuffle_buffer, augment=augment)
    return DataLoader(
        pipeline, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the models expect."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
