"""Images/s of the train_vqvae stage (Ray Train, 1 and 2 workers) against a plain PyTorch loop.

    python benchmarks/train_vqvae.py            # 64x64 synthetic corpus, 200 steps per run
    python benchmarks/train_vqvae.py --quick    # 32x32, 200 steps
    python benchmarks/train_vqvae.py --gpu --preset imagenet256 --size 256 --bf16   # on a GPU machine

All runs use the same model, per-worker batch, shards, loader processes and step count. The
rates are steady-state: the median of the images/s logged every 10 steps over the second half
of each run. The first half holds the warm-up, and in the stage Ray Train's helper actors
(dataset manager, preemption watcher) start while the workers already train. Start-up is reported
separately, as the stage's wall time.

Achieved TFLOP/s count the FLOPs of one training step (forward and backward, torch's
FlopCounterMode); on a GPU the fraction of its dense bf16 peak is shown (`--peak-tflops` to set it).

The machines drift by 20-30% over minutes, so the plain loop runs before, between and after the
stage runs, and each stage run is compared with the mean of the plain runs on either side of it.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.dataset import Dataset
from pipeline.runner import run_pipeline
from pipeline.shard_reader import batch_loader, to_model_range
from pipeline.storage import Location
from pipeline.train_vqvae import vqvae_config
from models.vqvae import VQVAE
from gpu_check import bf16_peak_tflops  # benchmarks/gpu_check.py: the one table of GPU peaks

LOG_EVERY = 10


def make_config(root: Path, corpus: Location, args, workers: int, cpus: float):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": corpus.uri, "image_size": args.size, "shard_size": 128},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench-train-vqvae"},
        "train_vqvae": {
            "preset": args.preset, "num_workers": workers, "cpus_per_worker": cpus, "use_gpu": args.gpu,
            "batch_size": args.batch, "steps": args.steps, "checkpoint_every": args.steps,
            "validate_every": args.steps, "log_every": LOG_EVERY, "loader_workers": args.loader_workers,
            "bf16": args.bf16, "val_samples": 16,
        },
    }
    return parse_config(tree, "benchmark.yaml")


def train_flops_per_image(cfg, size: int) -> float:
    """FLOPs of one training step (forward and backward) per image, counted on a batch of two."""
    from torch.utils.flop_counter import FlopCounterMode

    model = VQVAE(vqvae_config(cfg.train_vqvae))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, size, size)).loss.backward()
    return counter.get_total_flops() / 2


def gpu_peak_tflops(args) -> float | None:
    if args.peak_tflops or not args.gpu:
        return args.peak_tflops
    return bf16_peak_tflops(torch.cuda.get_device_name())


def steady_rate(rates: list[float]) -> float:
    return statistics.median(rates[len(rates) // 2:])


def plain_loop(cfg, shards, args) -> float:
    """The same model, batch and data in one process, no Ray: images/s after the first interval."""
    dev = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(int(cfg.train_vqvae.cpus_per_worker))  # as many threads as the 1-worker stage
    torch.manual_seed(0)
    model = VQVAE(vqvae_config(cfg.train_vqvae)).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train_vqvae.lr)
    loader = batch_loader(shards, args.batch, repeat=True, shuffle_buffer=1000, augment=True,
                          workers=args.loader_workers)
    batches, rates, last = iter(loader), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        _, images, _ = next(batches)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16 and args.gpu):
            out = model(to_model_range(images.to(dev)))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0:
            if args.gpu:
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(LOG_EVERY * args.batch / (now - last))
            last = now
    return steady_rate(rates)


def stage_rate(cfg) -> tuple[float, float]:
    started = time.perf_counter()
    result = run_pipeline(cfg, only="train_vqvae")["train_vqvae"]
    wall = time.perf_counter() - started
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(result.manifest["run_id"], "images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    return steady_rate(rates), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--images-per-class", type=int, default=None)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the fraction shown")
    args = parser.parse_args()
    args.size = args.size or (32 if args.quick else 64)
    args.steps = args.steps or 200
    per_class = args.images_per_class or (64 if args.quick else 256)

    cpus = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = Location(str(root / "corpus"))
        demo_data.synthetic(corpus, per_class, 8, size=(args.size, args.size))
        one = make_config(root / "runs", corpus, args, workers=1, cpus=cpus)
        shards = Dataset.open(run_pipeline(one, only="shard")["shard"].location).shards("train")

        plain = [plain_loop(one, shards, args)]
        stages = []
        worker_counts = [1] if args.gpu else [1, 2]  # one GPU here: a second worker would have none
        for workers in worker_counts:
            cfg = one if workers == 1 else make_config(root / "runs", corpus, args, workers=workers, cpus=cpus / workers)
            stages.append((workers, *stage_rate(cfg)))
            plain.append(plain_loop(one, shards, args))

    flops, peak = train_flops_per_image(one, args.size), gpu_peak_tflops(args)

    def achieved(rate: float) -> str:
        tflops = rate * flops / 1e12
        return f"{tflops:.3g}" + (f" ({tflops / peak:.1%} of {peak:g})" if peak else "")

    print(f"\npreset {args.preset}, {args.size}x{args.size}, batch {args.batch} per worker, {args.steps} steps, "
          f"{args.loader_workers} loader process(es) per worker, {cpus} CPU threads, "
          f"{torch.cuda.get_device_name() + (' bf16' if args.bf16 else '') if args.gpu else 'CPU'}, "
          f"{flops / 1e9:.3g} GFLOP per image per training step")
    print("| run | workers | images/s | vs plain loop (mean of the runs before and after) | TFLOP/s | stage wall s |")
    print("|---|---|---|---|---|---|")
    for index, rate in enumerate(plain):
        print(f"| plain PyTorch loop, run {index + 1} | 1 | {rate:.1f} | | {achieved(rate)} | |")
    for index, (workers, rate, wall) in enumerate(stages):
        base = (plain[index] + plain[index + 1]) / 2
        print(f"| Ray Train stage | {workers} | {rate:.1f} | {rate / base:.2f}x | {achieved(rate)} | {wall:.0f} |")


if __name__ == "__main__":
    main()
