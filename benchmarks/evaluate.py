"""Images/s of the evaluate stage's feature extraction: the Ray Data actor pool (1 and 2 actors) against a
plain single-process loop over the same tars with the same nets and batch size.

    python benchmarks/evaluate.py                         # 64 random 32x32 PNG samples, inception_v3
    python benchmarks/evaluate.py --images 128 --nets inception_v3 efficientnet_lite0
    python benchmarks/evaluate.py --gpu --size 256 --images 1024   # on a GPU machine (1 actor)

The inputs are WebDataset tars of PNGs as the sample stage writes them (`--per-tar` images each): every
run reads, decodes and featurises every image with every net. The pool's rate includes actor start-up
and net loading (as the stage sees it); "steady" is images over the actors' summed busy time divided by
the actor count. Threads are split evenly: 1 actor gets every CPU, 2 actors half each.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from models.vqvae import VQVAE, vqvae_tiny
from pipeline.checkpoints import save_model
from pipeline.config import EvaluateConfig
from pipeline.evaluate import extract_features, read_images
from pipeline.feature_nets import extract, load_feature_net
from pipeline.sample import _tar_bytes
from pipeline.storage import Location


def make_tars(folder: Path, args) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    uris = []
    for start in range(0, args.images, args.per_tar):
        count = min(args.per_tar, args.images - start)
        images = torch.randint(0, 256, (count, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
        keys = [f"c{i % 8}/sample-{start + i:06d}" for i in range(count)]
        location = Location(str(folder / f"batch-{start // args.per_tar:06d}.tar"))
        location.write_bytes(_tar_bytes(keys, images, torch.arange(count) % 8))
        uris.append(location.uri)
    return uris


def plain_loop(uris: list[str], args, threads: int) -> float:
    torch.set_num_threads(threads)
    device = "cuda" if args.gpu else "cpu"
    started = time.perf_counter()
    nets = [load_feature_net(name, device=device) for name in args.nets]
    images = 0
    for uri in uris:
        _, batch, _ = read_images(uri, None, None)
        for net in nets:
            extract(net, batch, args.batch)
        images += len(batch)
    return images / (time.perf_counter() - started)


def pool(uris: list[str], vqvae: str, args, actors: int) -> tuple[float, float]:
    cpus = max(1.0, (os.cpu_count() or 2) / actors) if not args.gpu else 1.0
    section = EvaluateConfig(feature_nets=args.nets, num_actors=actors, cpus_per_actor=cpus, use_gpu=args.gpu,
                             batch_size=args.batch)
    actor_args = {"nets": args.nets, "weights": {}, "vqvae": vqvae, "endpoint_url": None, "region": None,
                  "batch_size": args.batch, "use_gpu": args.gpu, "threads": max(1, int(cpus))}
    started = time.perf_counter()
    tasks = [{"kind": "samples", "uri": uri, "keys": None, "nets": args.nets} for uri in uris]
    features, timing, progress = extract_features(tasks, section, actor_args)
    elapsed = time.perf_counter() - started
    images = len(features["samples"][args.nets[0]])
    return images / elapsed, images / (timing["actor_busy_s"] / min(actors, len(uris)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--per-tar", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--nets", nargs="+", default=["inception_v3"], choices=["inception_v3", "efficientnet_lite0"])
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uris = make_tars(folder, args)
        vqvae = Location(str(folder / "vqvae.pt"))  # the actors load a decoder for reconstructions; unused here
        save_model(vqvae, "vqvae", VQVAE(vqvae_tiny()))
        ray.init(num_cpus=cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False)
        results = {"images": args.images, "size": args.size, "nets": args.nets, "cpus": cpus}
        results["plain_before"] = plain_loop(uris, args, cpus)
        for actors in ([1] if args.gpu else [1, 2]):
            rate, steady = pool(uris, vqvae.uri, args, actors)
            results[f"pool_{actors}_actors"], results[f"pool_{actors}_actors_steady"] = rate, steady
        results["plain_after"] = plain_loop(uris, args, cpus)
        plain = (results["plain_before"] + results["plain_after"]) / 2
        for actors in ([1] if args.gpu else [1, 2]):
            results[f"ratio_{actors}_actors_vs_plain"] = results[f"pool_{actors}_actors"] / plain
        ray.shutdown()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
