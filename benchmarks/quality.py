"""The quality run's report: stage times, the metrics with their floors and counts, the targets of issue 14, the
rejection sweep, and the pictures under docs/ (samples, reconstructions, the trade-off plot).

    vq2 demo-data --out data/fashion --per-class all --val-per-class all
    vq2 run --config configs/fashion.yaml
    python benchmarks/quality.py --config configs/fashion.yaml --docs docs   # the README's tables

It reads the complete outputs of the config's stages (the ones `vq2 status` lists); it runs no stage.
"""

import argparse
from pathlib import Path

import torch

from pipeline.checkpoints import load_model
from pipeline.config import load_config
from pipeline.dataset import Dataset
from pipeline.figures import image_grid, png_bytes
from pipeline.runner import pipeline_status
from pipeline.shard_reader import sample_pipeline, to_model_range, to_uint8
from pipeline.storage import Location


def row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def metric_rows(metrics: dict) -> list[str]:
    """FID-like metrics with their floors, counts and validity."""
    lines = [row("metric", "value", "floor (real train vs real val; FID*: their reconstructions)", "images compared",
                 "feature dim", "reliable"),
             row(*["---"] * 6)]
    for net in ("inception_v3", "classifier"):
        for name in ("fid", "fid_star", "fid_recon", "precision", "recall"):
            key = f"{name}_{net}"
            if key not in metrics:
                continue
            lines.append(row(f"`{key}`", number(metrics[key], 3), number(metrics.get(f"{key}_floor"), 3),
                             f"{metrics[f'{key}_n']:.0f} vs {metrics[f'{key}_ref_n']:.0f}", f"{metrics[f'{key}_dim']:.0f}",
                             "yes" if metrics.get(f"{key}_reliable") else "no"))
    return lines


def targets(metrics: dict, sweep: list[dict], stage_minutes: float) -> list[str]:
    """Issue 14's targets for this run, each with its number and whether it is met."""
    checks = [("every stage within 60 minutes on the 2-core machine", f"{stage_minutes:.1f} min", stage_minutes <= 60)]
    for level in ("top", "bottom"):
        train, val = metrics.get(f"{level}_train_nll_bits"), metrics.get(f"{level}_val_nll_bits")
        gap = (val - train) / train
        checks.append((f"{level} prior: val NLL within 5% of train NLL", f"{train:.3f} / {val:.3f} bits ({gap:+.1%})",
                       abs(gap) <= 0.05))
    ratio = metrics["cas_top1"] / metrics["cas_real_top1"]
    checks.append(("CAS top-1 at least 0.75 of the real-data CAS top-1",
                   f"{metrics['cas_top1']:.3f} / {metrics['cas_real_top1']:.3f} = {ratio:.2f}", ratio >= 0.75))
    fid, floor = metrics["fid_recon_inception_v3"], metrics["fid_recon_inception_v3_floor"]
    checks.append(("reconstruction FID (Inception) within 2x of its floor", f"{fid:.2f} vs floor {floor:.2f} "
                   f"({fid / floor:.2f}x)", fid <= 2 * floor))
    for key, direction in (("precision_classifier", "rises"), ("is_classifier", "rises"), ("recall_classifier", "falls")):
        values = [point[key] for point in sweep]
        ordered = all(b >= a for a, b in zip(values, values[1:])) if direction == "rises" else \
            all(b <= a for a, b in zip(values, values[1:]))
        checks.append((f"along the sweep (keep fraction falling), {key} {direction}",
                       " -> ".join(f"{v:.3f}" for v in values), ordered))
    lines = [row("target", "measured", "met"), row("---", "---", "---")]
    lines += [row(name, measured, "yes" if met else "**no**") for name, measured, met in checks]
    return lines


def reconstructions(vqvae_file: Location, dataset: Location, classes: int, per_class: int) -> torch.Tensor:
    """Rows of real val images (one column per class) above their reconstructions: (2 * per_class, classes, ...)."""
    vqvae, _ = load_model(vqvae_file, "vqvae")
    vqvae.eval()
    picked: dict[int, list[torch.Tensor]] = {label: [] for label in range(classes)}
    for _, image, label in sample_pipeline(Dataset.open(dataset).shards("val"), repeat=False):
        if len(picked[label]) < per_class:
            picked[label].append(image)
        if all(len(images) == per_class for images in picked.values()):
            break
    rows = []
    for i in range(per_class):
        real = torch.stack([picked[label][i] for label in range(classes)])
        with torch.no_grad():
            rebuilt = to_uint8(vqvae(to_model_range(real)).reconstruction)
        rows += [real, rebuilt]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion.yaml")
    parser.add_argument("--docs", default=None, help="folder to write the pictures into (e.g. docs)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    rows = {row_["stage"]: row_ for row_ in pipeline_status(cfg)}
    missing = [stage for stage, row_ in rows.items() if row_["state"] != "complete"]
    if missing:
        raise SystemExit(f"{args.config}: stages not complete: {', '.join(missing)} (run `vq2 run --config {args.config}`)")
    outputs = {stage: Location(row_["output"]) for stage, row_ in rows.items()}
    manifests = {stage: (location / "manifest.json").read_json() for stage, location in outputs.items()}

    print(f"## Stage times ({args.config})\n")
    print(row("stage", "wall time"))
    print(row("---", "---"))
    for stage, manifest in manifests.items():
        print(row(stage, f"{manifest['wall_time_s'] / 60:.1f} min"))
    total = sum(manifest["wall_time_s"] for manifest in manifests.values())
    print(row("**all stages**", f"**{total / 60:.1f} min**"))

    summary = (outputs["evaluate"] / "summary.json").read_json()
    metrics, sweep = summary["metrics"], summary["sweep"]
    print("\n## Headline numbers\n")
    print(row("quantity", "value"))
    print(row("---", "---"))
    for label, key in (("reconstruction MSE, val images ([-1, 1] range)", "recon_mse"),
                       ("top prior NLL, train / val (bits per dimension)", ("top_train_nll_bits", "top_val_nll_bits")),
                       ("bottom prior NLL, train / val", ("bottom_train_nll_bits", "bottom_val_nll_bits")),
                       ("classifier top-1 on real val images", "classifier_val_top1"),
                       ("classifier top-1 on the class-conditional samples (all / accepted)",
                        ("sample_accuracy", "sample_accuracy_accepted")),
                       ("CAS top-1: trained on samples / on real images, tested on real val", ("cas_top1", "cas_real_top1")),
                       ("IS on the classifier: samples / real images", ("is_classifier", "is_real_classifier")),
                       ("samples / accepted by rejection", ("samples", "accepted_samples"))):
        keys = key if isinstance(key, tuple) else (key,)
        print(row(label, " / ".join(number(metrics.get(k), 4 if k == "recon_mse" else 3) for k in keys)))
    print()
    print("\n".join(metric_rows(metrics)))
    print("\n## Targets\n")
    print("\n".join(targets(metrics, sweep, total / 60)))

    print(f"\n## Rejection sweep ({summary['sweep_by']}, every point subsampled to the same count per class)\n")
    print(row("keep fraction", "samples", "FID (classifier)", "precision", "recall", "IS (classifier)",
              "classifier top-1 on samples"))
    print(row(*["---"] * 7))
    for point in sweep:
        print(row(point[summary["sweep_by"]], point["samples"], number(point["fid_classifier"]),
                  number(point["precision_classifier"]), number(point["recall_classifier"]),
                  number(point["is_classifier"]), number(point.get("sample_accuracy"))))
    for note in summary["notes"]:
        print(f"\nnote: {note}")

    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        name = Path(args.config).stem
        (docs / f"{name}_samples.png").write_bytes((outputs["sample"] / manifests["sample"]["grid"]).read_bytes())
        (docs / f"{name}_rejection_tradeoff.png").write_bytes((outputs["evaluate"] / "rejection_tradeoff.png").read_bytes())
        grid = reconstructions(outputs["train_vqvae"] / "vqvae.pt", outputs["shard"],
                               len(manifests["shard"]["classes"]), per_class=2)
        (docs / f"{name}_reconstructions.png").write_bytes(png_bytes(image_grid(grid)))
        print(f"\nwrote {docs}/{name}_samples.png, {name}_reconstructions.png, {name}_rejection_tradeoff.png")


if __name__ == "__main__":
    main()
