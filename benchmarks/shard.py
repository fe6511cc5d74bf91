"""Images/s of the shard stage on 1 and 2 Ray workers against a plain single-process loop doing the same work.

    .venv/bin/python benchmarks/shard.py            # 5,000 JPEGs of 400x350 (the corpus is cached)
    .venv/bin/python benchmarks/shard.py --quick    # 600 JPEGs, for a smoke run

Every mode decodes, converts, resizes/crops to --image-size, re-encodes and writes tars of the same
shards (pipeline.shard.write_shard); the Ray modes run the whole stage (listing, planning, tasks,
index, manifest, MLflow tracking into a local sqlite store). Ray start-up is excluded and the
workers are warmed up on a small corpus first, as they are on a long-lived cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray

from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.images import ImageSettings
from pipeline.listing import scan
from pipeline.runner import run_pipeline
from pipeline.shard import ShardTask, write_shard
from pipeline.storage import Location

CLASSES = 8


def make_corpus(folder: Path, images: int) -> Location:
    """ImageNet-like JPEGs of 400x350 in `train/<class>/`; reused when already there."""
    corpus = Location(str(folder / f"corpus-{images}"))
    if len(corpus.list_files()) != images:
        corpus.remove()
        print(f"generating {images} JPEGs of 400x350 in {corpus} ...", flush=True)
        demo_data.synthetic(corpus, images // CLASSES, 0, size=(400, 350), classes=CLASSES)
    return corpus


def config(root: Path, source: Location, workers: int, image_size: int, shard_size: int, tracking: str):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": source.path, "splits": ["train"], "image_size": image_size, "shard_size": shard_size},
        "ray": {"num_workers": workers, "cpus_per_task": 1},
        "mlflow": {"tracking_uri": tracking, "experiment": "benchmark-shard"},
    }
    return parse_config(tree, "benchmark.yaml")


def plain_loop(source: Location, out: Location, image_size: int, shard_size: int) -> int:
    """The same shards, one after another in this process, no Ray."""
    entries = scan(source, ("train",)).entries
    classes = {name: label for label, name in enumerate(sorted({e.label_name for e in entries}))}
    settings = ImageSettings(image_size, True, 90, 89_478_485, 64 << 20)
    images = 0
    for index, start in enumerate(range(0, len(entries), shard_size)):
        samples = tuple((e.key, classes[e.label_name], e.path) for e in entries[start : start + shard_size])
        images += write_shard(ShardTask("train", index, samples, source, out), settings)["samples"]
    return images


def timed(function, *args) -> tuple[float, int]:
    started = time.perf_counter()
    images = function(*args)
    return time.perf_counter() - started, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 images instead of 5,000")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "vq2-bench-shard"))
    args = parser.parse_args()
    images = args.images or (600 if args.quick else 5000)
    work = Path(args.work_dir)
    corpus = make_corpus(work, images)
    warmup = make_corpus(work, 2 * CLASSES)
    tracking = f"sqlite:///{work}/mlflow.db"
    runs = work / "runs"

    ray.init(num_cpus=2, include_dashboard=False)
    rows = []
    try:
        shutil.rmtree(runs, ignore_errors=True)
        seconds, done = timed(plain_loop, corpus, Location(str(runs / "plain")), args.image_size, args.shard_size)
        rows.append(("plain loop (1 process)", 1, done, seconds))
        for workers in (1, 2):
            run_pipeline(config(runs / f"warmup-{workers}", warmup, workers, args.image_size, 2, tracking), "shard")
            cfg = config(runs / f"ray-{workers}", corpus, workers, args.image_size, args.shard_size, tracking)
            seconds, result = timed(run_pipeline, cfg, "shard")
            rows.append(("shard stage, Ray", workers, result["shard"].manifest["counts"]["accepted"], seconds))
    finally:
        ray.shutdown()
        shutil.rmtree(runs, ignore_errors=True)

    plain_rate = rows[0][2] / rows[0][3]
    print(f"\n{images} JPEGs 400x350 -> {args.image_size}px, shards of {args.shard_size}, {os.cpu_count()} CPUs")
    print(f"{'mode':<24} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs plain':>9}")
    for mode, workers, done, seconds in rows:
        rate = done / seconds
        print(f"{mode:<24} {workers:>7} {done:>7} {seconds:>8.2f} {rate:>9.1f} {rate / plain_rate:>8.2f}x")


if __name__ == "__main__":
    main()
