"""Samples/s of the sample stage's actor pool (1 and 2 actors, fast sampler) against one process.

    python benchmarks/sample.py            # top 8x8 / bottom 16x16 priors of 64 channels, 64 samples
    python benchmarks/sample.py --quick    # 4x4 / 8x8 tiny priors, 32 samples

The same randomly initialised models (VQ-VAE, priors, classifier) serve every row; each row
samples, decodes and scores the same seeds. Rows: a single process with the naive sampler (the
reference), a single process with the fast sampler, and the Ray actor pool with 1 and 2 actors.
"""

import argparse
import tempfile
import time

import ray
import torch

from models.classifier import ResNetClassifier, classifier_tiny
from models.prior import CodePrior, prior_tiny_lower, prior_tiny_top
from models.sampling import sample_codes
from models.vqvae import VQVAE, VQVAEConfig
from pipeline.checkpoints import save_model
from pipeline.codes import CodesLayout
from pipeline.config import SampleConfig
from pipeline.sample import Scorer, plan, run_batches
from pipeline.storage import Location


def build_models(folder: Location, args) -> tuple[dict, CodesLayout]:
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(hidden_channels=32, residual_channels=16, num_residual_layers=1, code_dim=16,
                              codebook_size=args.codebook, bottom_downsample=4))
    size = 8 * args.top
    top_grid, bottom_grid = (args.top, args.top), (2 * args.top, 2 * args.top)
    top = prior_tiny_top(args.codebook, top_grid, num_classes=args.classes)
    bottom = prior_tiny_lower(args.codebook, bottom_grid, above=(top_grid,), num_classes=args.classes)
    for cfg in (top, bottom):
        cfg.channels, cfg.residual_channels = args.channels, 2 * args.channels
    models = {"vqvae": folder / "vqvae.pt", "priors": [folder / "top.pt", folder / "bottom.pt"],
              "classifier": folder / "classifier.pt", "score_columns": list(range(args.classes))}
    save_model(models["vqvae"], "vqvae", vqvae)
    save_model(models["priors"][0], "prior", CodePrior(top))
    save_model(models["priors"][1], "prior", CodePrior(bottom))
    save_model(models["classifier"], "classifier", ResNetClassifier(classifier_tiny(args.classes)))
    assert vqvae.cfg.grid_shapes(size) == [top_grid, bottom_grid]
    layout = CodesLayout([top_grid, bottom_grid], [args.codebook] * 2, models["vqvae"].uri, "benchmark")
    return models, layout


def single_process(models: dict, batches: list[dict], fast: bool) -> float:
    from pipeline.checkpoints import load_model

    vqvae = load_model(models["vqvae"], "vqvae")[0]
    priors = [load_model(m, "prior")[0] for m in models["priors"]]
    scorer = Scorer(models["classifier"], models["score_columns"], torch.device("cpu"))
    started, count = time.perf_counter(), 0
    for batch in batches:
        labels = torch.tensor(batch["labels"])
        codes = sample_codes(priors, labels, batch["seeds"], fast=fast)
        scorer(vqvae.decode_codes(codes), labels)
        count += len(labels)
    return count / (time.perf_counter() - started)


def pool(models: dict, layout: CodesLayout, batches: list[dict], section: SampleConfig, folder: Location) -> float:
    args = {"models": models, "layout": layout, "classes": [f"c{i}" for i in range(64)], "output": folder,
            "section": section, "fault": None}
    started = time.perf_counter()
    progress = run_batches(batches, args, section)
    return progress.images / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--codebook", type=int, default=64)
    args = parser.parse_args()
    args.top = 4 if args.quick else 8
    args.channels = 32 if args.quick else 64
    args.samples = args.samples or (32 if args.quick else 64)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Location(tmp)
        models, layout = build_models(folder / "models", args)
        rows = []
        section = SampleConfig(samples_per_class=args.samples // args.classes, batch_size=args.batch)
        batches = plan(section, args.classes)
        torch.set_num_threads(1)  # one core per sampler, as each actor gets
        rows.append(("one process, naive sampler", single_process(models, batches, fast=False)))
        rows.append(("one process, fast sampler", single_process(models, batches, fast=True)))
        for actors in (1, 2):
            section = SampleConfig(samples_per_class=args.samples // args.classes, batch_size=args.batch,
                                   num_actors=actors)
            rows.append((f"Ray actor pool, {actors} actor(s)", pool(models, layout, batches, section,
                                                                   folder / f"out{actors}")))
    base = rows[0][1]
    print(f"\n{args.samples} samples, batch {args.batch}, top {args.top}x{args.top} / bottom "
          f"{2 * args.top}x{2 * args.top}, {args.channels} channels; 1 torch thread per process")
    print("| sampler | samples/s | vs naive one process |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
