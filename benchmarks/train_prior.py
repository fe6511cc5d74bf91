"""Images/s of the train_prior stage (Ray Train, 1 and 2 workers) against a plain PyTorch loop.

    python benchmarks/train_prior.py            # 64x64 synthetic corpus (8x8 top / 16x16 bottom codes), 100 steps
    python benchmarks/train_prior.py --quick    # 32x32 (4x4 / 8x8 codes), batch 16, 30 steps
    python benchmarks/train_prior.py --gpu --preset imagenet256 --size 256 --bf16   # on a GPU machine

The upstream stages (shard, a very short train_vqvae, encode) run once; every row then trains the
same priors (one per level, top then bottom) on the same train code table with the same per-worker
batch and step count. "images/s" counts code grids (one per image) per second, over all workers.
The rates are steady-state: the median of the images/s logged every 10 steps after the first
logging interval, per level (start-up is reported separately, as the stage's wall time, both
levels included). The plain loop gets as many torch threads as the 1-worker stage; 2 workers get
half each.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from models.prior import CodePrior
from pipeline import demo_data, training
from pipeline.codes import table_tensors
from pipeline.config import parse_config
from pipeline.encode import read_split
from pipeline.runner import run_pipeline
from pipeline.storage import Location
from pipeline.train_prior import prior_configs

LOG_EVERY = 10


def make_config(root: Path, corpus: Location, args, workers: int, cpus: float):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": corpus.uri, "image_size": args.size, "shard_size": 128},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench-train-prior"},
        "train_vqvae": {  # the model only has to exist: prior training speed does not depend on its training
            "preset": args.preset, "num_workers": 1, "use_gpu": args.gpu, "steps": 2, "checkpoint_every": 2,
            "validate_every": 2, "log_every": 2, "loader_workers": 0, "val_samples": 16,
        },
        "encode": {"use_gpu": args.gpu, "num_actors": 1 if args.gpu else 2},
        "train_prior": {
            "preset": args.preset, "num_workers": workers, "cpus_per_worker": cpus, "use_gpu": args.gpu,
            "batch_size": args.batch, "steps": args.steps, "checkpoint_every": args.steps,
            "validate_every": args.steps, "log_every": LOG_EVERY, "bf16": args.bf16, "sample_grid": 0,
        },
    }
    return parse_config(tree, "benchmark.yaml")


def plain_loop(cfg, results, args) -> dict[str, float]:
    """The same priors, batch and code table in one process, no Ray: images/s per level after the first interval."""
    dev = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(int(cfg.train_prior.cpus_per_worker))  # as many threads as the 1-worker stage
    section = cfg.train_prior
    layout, table = read_split(results["encode"], "train")
    labels, codes = table_tensors(table, layout)
    configs = prior_configs(section, layout, len(results["shard"].manifest["classes"]))
    rates = {}
    for level, (name, prior_config) in enumerate(configs.items()):
        torch.manual_seed(section.seed)
        model = CodePrior(prior_config).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=section.lr)
        conditional = model.cfg.num_classes > 0
        order, position = torch.randperm(len(labels)), 0
        level_rates, last = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            if position + args.batch > len(order):  # a new shuffled pass, the last partial batch dropped
                order, position = torch.randperm(len(labels)), 0
            rows = order[position:position + args.batch]
            position += args.batch
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = training.learning_rate(section, step - 1)
            target = codes[level][rows].to(dev).long()
            condition = [c[rows].to(dev).long() for c in codes[:level]] or None
            with training.autocast(section, dev):
                logits = model(target, labels[rows].to(dev) if conditional else None, condition)
            loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if section.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
            optimizer.step()
            loss.item()  # the stage reads every step's loss
            if step % LOG_EVERY == 0:
                if args.gpu:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                level_rates.append(LOG_EVERY * args.batch / (now - last))
                last = now
        rates[name] = statistics.median(level_rates[1:])
    return rates


def stage_rates(cfg, levels) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    result = run_pipeline(cfg, only="train_prior")["train_prior"]
    wall = time.perf_counter() - started
    client = MlflowClient(cfg.mlflow.tracking_uri)
    rates = {}
    for name in levels:
        history = client.get_metric_history(result.manifest["run_id"], f"{name}_images_per_s")
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        rates[name] = statistics.median(values[1:])
    return rates, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--images-per-class", type=int, default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    args.size = args.size or (32 if args.quick else 64)
    args.batch = args.batch or (16 if args.quick else 32)
    args.steps = args.steps or (30 if args.quick else 100)
    per_class = args.images_per_class or (32 if args.quick else 256)
    classes = len(demo_data.SYNTHETIC_CLASSES)
    if per_class * classes // 2 < args.batch:  # each of 2 workers needs a whole batch of rows per pass
        parser.error(f"{per_class} images a class x {classes} classes is too few for 2 workers of batch {args.batch}")

    cpus = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = Location(str(root / "corpus"))
        demo_data.synthetic(corpus, per_class, 8, size=(args.size, args.size))
        one = make_config(root / "runs", corpus, args, workers=1, cpus=cpus)
        results = {}
        for stage in ("shard", "train_vqvae", "encode"):
            results |= run_pipeline(one, only=stage)
        layout = read_split(results["encode"], "train")[0]
        levels = layout.levels

        rows = [("plain PyTorch loop", 1, plain_loop(one, results, args), None)]
        rates, wall = stage_rates(one, levels)
        rows.append(("Ray Train stage", 1, rates, wall))
        if not args.gpu:  # one GPU here: a second worker would have none
            rates, wall = stage_rates(make_config(root / "runs", corpus, args, workers=2, cpus=cpus / 2), levels)
            rows.append(("Ray Train stage", 2, rates, wall))

    base = rows[0][2]
    grids = " / ".join(f"{name} {h}x{w}" for name, (h, w) in zip(levels, layout.grids))
    print(f"\npreset {args.preset}, {args.size}x{args.size} images ({grids} codes), {per_class * classes} train rows, "
          f"batch {args.batch} per worker, {args.steps} steps per level, {cpus} CPU threads, "
          f"{'GPU' + (' bf16' if args.bf16 else '') if args.gpu else 'CPU'}")
    header = " | ".join(f"{name} images/s | {name} vs plain loop" for name in levels)
    print(f"| run | workers | {header} | stage wall s |")
    print("|---|---|" + "---|---|" * len(levels) + "---|")
    for name, workers, rates, wall in rows:
        cells = " | ".join(f"{rates[level]:.0f} | {rates[level] / base[level]:.2f}x" for level in levels)
        print(f"| {name} | {workers} | {cells} | {'' if wall is None else f'{wall:.0f}'} |")


if __name__ == "__main__":
    main()
