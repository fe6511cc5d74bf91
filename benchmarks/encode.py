"""Images/s of the encode stage (Ray Data actor pool, 1 and 2 actors) against a plain single-process loop,
and the size of the code tables against the JPEGs they came from.

    python benchmarks/encode.py            # 64x64 synthetic corpus, 256 train images a class
    python benchmarks/encode.py --quick    # 32x32, 64 a class
    python benchmarks/encode.py --gpu --size 256 --preset imagenet256   # on a GPU machine (1 actor)

Every run encodes the same shards (train and val) with the same VQ-VAE and batch size, writes one zstd
Parquet file per shard, and decodes the val split for its reconstruction error: the plain loop does
exactly the stage's per-shard work (`encode_shard`) in one process, without Ray. The stage's images/s
covers its encode phase (actor start-up and model loading included); "steady" spans the first
shard's start to the last shard's end inside the actors (start-up excluded); "stage wall s" is the
whole stage as the runner times it. The plain loop runs before and after the stage runs, and the
ratios use the mean of the two (on a shared machine the spread shows the noise). The threads are split evenly: 1 actor gets every CPU, 2 actors half each.
"""

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from pipeline import demo_data
from pipeline.checkpoints import load_model
from pipeline.config import parse_config
from pipeline.dataset import Dataset
from pipeline.encode import _plan, encode_shard, layout_for
from pipeline.runner import run_pipeline
from pipeline.storage import Location


def make_config(root: Path, corpus: Location, args, actors: int, cpus: float):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": corpus.uri, "image_size": args.size, "shard_size": args.shard_size},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench-encode"},
        "train_vqvae": {  # the model only has to exist: encoding speed does not depend on its training
            "preset": args.preset, "num_workers": 1, "batch_size": 8, "steps": 2, "checkpoint_every": 2,
            "validate_every": 2, "log_every": 2, "loader_workers": 0, "shuffle_buffer": 0, "val_samples": 8,
            "use_gpu": args.gpu,
        },
        "encode": {"num_actors": actors, "cpus_per_actor": cpus, "use_gpu": args.gpu, "batch_size": args.batch,
                   "loader_workers": args.loader_workers},
    }
    return parse_config(tree, "benchmark.yaml")


def plain_loop(results, out: Path, args, threads: int) -> tuple[float, int]:
    """The stage's per-shard work, one shard after another in this process: (images/s, images)."""
    torch.set_num_threads(threads)
    dev = torch.device("cuda" if args.gpu else "cpu")
    layout = layout_for(results["train_vqvae"])
    model, _ = load_model(Location(layout.vqvae_model), "vqvae", map_location=dev)
    model.to(dev)
    tasks = _plan(Dataset.open(results["shard"].location), Location(str(out)))
    started = time.perf_counter()
    images = sum(encode_shard(task, model, layout, args.batch, args.loader_workers, dev)["rows"] for task in tasks)
    if args.gpu:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - started), images


def jpeg_bytes(dataset: Dataset) -> tuple[int, int]:
    """(bytes of the .jpg members, images) over every shard: the raw JPEG payload, tar headers excluded."""
    total = count = 0
    for shard in dataset.manifest["shards"]:
        with tarfile.open(fileobj=io.BytesIO(dataset.shard_location(shard).read_bytes())) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    total += member.size
                    count += 1
    return total, count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--images-per-class", type=int, default=None)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    args.size = args.size or (32 if args.quick else 64)
    args.shard_size = args.shard_size or (64 if args.quick else 128)
    per_class = args.images_per_class or (64 if args.quick else 256)

    cpus = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = Location(str(root / "corpus"))
        demo_data.synthetic(corpus, per_class, max(8, per_class // 8), size=(args.size, args.size))
        one = make_config(root / "runs", corpus, args, actors=1, cpus=cpus)
        run_pipeline(one, only="shard")
        results = run_pipeline(one, only="train_vqvae")

        plain, images = plain_loop(results, root / "plain", args, cpus)
        rows = [("plain single-process loop (before)", 1, plain, plain, None)]
        stage_runs = [(1, cpus)] + ([] if args.gpu else [(2, cpus / 2)])  # one GPU here: a 2nd actor has none
        manifest = None
        for actors, actor_cpus in stage_runs:
            cfg = make_config(root / "runs", corpus, args, actors=actors, cpus=actor_cpus)
            started = time.perf_counter()
            result = run_pipeline(cfg, only="encode")["encode"]
            wall = time.perf_counter() - started
            manifest = result.manifest
            assert manifest["images_encoded"] == images, (manifest["images_encoded"], images)
            rows.append(("encode stage (Ray Data actors)", actors, manifest["images_per_s"],
                         manifest["steady_images_per_s"], wall))

        # Again after the stage runs: other load on the machine shows up as the spread of the two.
        again, _ = plain_loop(results, root / "plain-again", args, cpus)
        rows.append(("plain single-process loop (after)", 1, again, again, None))
        plain = (plain + again) / 2  # the baseline of the ratios
        if cpus > 1:  # what one actor of the 2-actor pool gets: half the threads
            half, _ = plain_loop(results, root / "plain-half", args, max(1, cpus // 2))
            rows.append((f"plain single-process loop, {max(1, cpus // 2)} thread(s)", 1, half, half, None))

        jpeg, count = jpeg_bytes(Dataset.open(results["shard"].location))
        parquet = manifest["parquet_bytes"] / manifest["rows"]
        grids = manifest["layout"]["grids"]

    print(f"\npreset {args.preset}, {args.size}x{args.size}, {images} images in {len(manifest['files']['train'])} "
          f"train + {len(manifest['files']['val'])} val shards, batch {args.batch}, {args.loader_workers} loader "
          f"process(es), {cpus} CPU threads, {'GPU' if args.gpu else 'CPU'}")
    print("| run | actors | images/s (start-up incl.) | vs plain | steady images/s | vs plain | stage wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, actors, rate, steady, wall in rows:
        steady_cells = "n/a | n/a" if steady is None else f"{steady:.1f} | {steady / plain:.2f}x"
        print(f"| {name} | {actors} | {rate:.1f} | {rate / plain:.2f}x | {steady_cells} | "
              f"{'' if wall is None else f'{wall:.1f}'} |")

    pixels = 3 * args.size * args.size
    int16_codes = 2 * sum(h * w for h, w in grids)
    print(f"\ncodes per image: {' + '.join(f'{h}x{w}' for h, w in grids)}, codebooks {manifest['layout']['codebook_sizes']}")
    print("| bytes per image | bytes | RGB pixels / this | JPEG / this |")
    print("|---|---|---|---|")
    for name, size in (("RGB pixels (uint8)", pixels), (f"JPEG (as sharded, q{one.dataset.jpeg_quality})", jpeg / count),
                       ("codes, int16 uncompressed", int16_codes), ("codes, Parquet zstd (on storage)", parquet)):
        print(f"| {name} | {size:.1f} | {pixels / size:.1f}x | {jpeg / count / size:.2f}x |")


if __name__ == "__main__":
    main()
