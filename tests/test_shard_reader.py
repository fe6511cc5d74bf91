"""The image trainers' readers: how shards are dealt to ranks and which validation images are scored."""

import io
from collections import Counter

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from models.classifier import ResNetClassifier, classifier_tiny
from pipeline.shard_reader import batch_loader
from pipeline.storage import Location
from pipeline.train_classifier import _val_batches, _validate, val_pieces


def write_shards(folder, counts: list[int], size: int = 8) -> list[Location]:
    """Tars of `counts[s]` JPEGs each; keys `s<shard>/<image>`, label = the shard's index."""
    shards, image = [], 0
    for index, count in enumerate(counts):
        path = folder / f"shard-{index:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(count):
                jpeg = io.BytesIO()
                Image.fromarray(np.full((size, size, 3), image % 256, np.uint8)).save(jpeg, "JPEG")
                writer.write({"__key__": f"s{index}/{image:05d}", "jpg": jpeg.getvalue(), "cls": str(index).encode()})
                image += 1
        shards.append(Location(str(path)))
    return shards


def test_every_image_is_drawn_about_equally_often_whatever_the_shard_sizes(tmp_path):
    # The last shard of a split is short (and every growth adds one). Dealt to the ranks once, the rank holding
    # a 4-image shard replayed it at the rate the others read 40-image ones: 10x as often per image.
    counts, world, steps, batch = [40, 40, 4], 3, 60, 8
    shards = write_shards(tmp_path, counts)
    draws = Counter()
    for rank in range(world):
        batches = iter(batch_loader(shards, batch, repeat=True, seed=7, rank=rank, world=world, shuffle_buffer=16))
        for _ in range(steps):
            keys, _, _ = next(batches)
            draws.update(key.split("/")[0] for key in keys)
    per_image = {shard: draws[f"s{shard}"] / count for shard, count in enumerate(counts)}
    assert max(per_image.values()) < 1.5 * min(per_image.values()), per_image


def test_the_deal_is_the_same_on_every_rank_so_a_pass_reads_each_shard_once(tmp_path):
    shards = write_shards(tmp_path, [3] * 5)
    read = []
    for rank, shards_dealt in ((0, 3), (1, 2)):  # pass 0 deals 5 shards to 2 ranks: 3 and 2
        batches = iter(batch_loader(shards, 1, repeat=True, seed=11, rank=rank, world=2))
        read.append({next(batches)[0][0].split("/")[0] for _ in range(3 * shards_dealt)})
    assert not read[0] & read[1] and len(read[0] | read[1]) == 5


def test_validation_scores_the_first_val_samples_images_whatever_the_worker_count(tmp_path):
    # One val shard of 40 images, val_samples 40: with two workers each took ceil(40 / 2) from its own shards,
    # and the worker without a shard scored none, so 20 were scored.
    counts = [40, 25, 10]
    sizes = list(zip(write_shards(tmp_path, counts, size=16), counts))
    for limit, expected in ((40, 40), (50, 50), (None, 75)):
        pieces = val_pieces(sizes, limit)
        scored = {}
        for world in (1, 2, 4):
            images = Counter()
            for rank in range(world):
                for batch, labels in _val_batches(pieces[rank::world], workers=0):
                    images.update(zip(labels.tolist(), batch.float().mean((1, 2, 3)).round().tolist()))
            scored[world] = images
            assert sum(images.values()) == expected, (limit, world)
        assert scored[1] == scored[2] == scored[4]  # the same images, whichever rank scored them


def test_validate_sums_what_every_rank_scored(tmp_path):
    sizes = list(zip(write_shards(tmp_path, [12], size=16), [12]))
    torch.manual_seed(0)
    metrics = _validate(ResNetClassifier(classifier_tiny(3)), val_pieces(sizes, 5), torch.device("cpu"), 0)
    assert metrics["val_images"] == 5 and 0 <= metrics["val_top1"] <= metrics["val_top5"] <= 1
