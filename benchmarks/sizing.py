"""A sizing table for the full ImageNet-256 run (1.28M training images): storage, memory, FLOPs, GPU-hours.

    python benchmarks/sizing.py                             # the README table, from the figures recorded below
    python benchmarks/sizing.py --paper-scale run.json      # bytes and peaks from a `paper_scale.py --json` run
    python benchmarks/sizing.py --gpu gpu.json              # GPU-hours at the utilisation measured on a GPU
    python benchmarks/sizing.py --measure-gpu --out gpu.json   # on a GPU: each model's step at its per-GPU batch
    python benchmarks/sizing.py --measure-gpu --channels-last  # the same in channels_last memory format

FLOPs per image are counted with torch's FlopCounterMode (forward and backward for a training step) on
the models of configs/imagenet256.yaml; the work per stage (steps x global batch, images, samples)
comes from the same config. GPU-hours = FLOPs / (peak x utilisation) on an H100 SXM (dense bf16
989 TFLOP/s). The default utilisation, 35%, is the fraction these models reach on a GPU in
practice: they are convolution stacks at 32x32 to 256x256 with 64 to 512 channels, smaller per
layer than the transformer matmuls that reach 50-60%, with autoregressive attention and gated
activations that are memory-bound; `--measure-gpu` measures it per model on the GPU at hand (the
fast sampler is not a matmul workload: per position it reads every weight once, so its time is
bounded by memory bandwidth and kernel launches; its row gives the seconds per batch that
benchmarks/gpu_check.sh measured, and that bound in the column of the assumed utilisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.classifier import ClassifierConfig, ResNetClassifier
from models.prior import CodePrior, prior_imagenet256_bottom, prior_imagenet256_top
from models.vqvae import VQVAE, vqvae_imagenet256

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, VAL_IMAGES, CLASSES = 1_281_167, 50_000, 1000
H100_BF16_PEAK = 989e12  # H100 SXM, dense bf16 tensor cores
H100_HBM_BYTES_PER_S = 3.35e12
UTILISATION = 0.35
KERNEL_LAUNCH_S = 5e-6  # per kernel in the sampler's per-position loop, on the host
# Per-GPU batches of configs/imagenet256.yaml (global batch / 16 workers).
GPU_BATCHES = {"train_vqvae": 8, "train_classifier": 64, "top": 64, "bottom": 32, "encode": 256}

# Measured with --measure-gpu on one NVIDIA H100 80GB HBM3 (torch 2.11, bf16 autocast, Adam) at the per-GPU
# batches of configs/imagenet256.yaml (--gpu replaces them): utilisation = counted FLOPs / time / 989 TFLOP/s.
# At other batches on the same GPU: VQ-VAE 128 -> 2,931 images/s (8.6%); classifier 256 -> 7.9%; top prior
# 32 -> 166 images/s (26.9%, 19.9 GiB); bottom prior 48 runs out of its 80 GB (24 -> 25.5%); encode 1,024 ->
# 7,076 images/s (4.4%). The fast sampler ("sample") and, beside it, the VQ-VAE in channels_last (128 -> 3,719
# images/s, 11.0%; 256 -> 4,135, 12.2%) were measured on another H100 of the same kind by benchmarks/gpu_check.sh.
# configs/imagenet256.yaml trains the VQ-VAE and the classifier in channels_last: their rows are a later run with
# --channels-last; the same run without it gave 433 images/s (1.3%) and 477 (7.8%); the priors 1.09x (top) and
# 0.96x (bottom) in channels_last, which they do not use.
GPU_MEASURED = {
    "device": "NVIDIA H100 80GB HBM3",
    "train_vqvae": {"batch": 8, "images_per_s": 487, "utilisation": 0.0143, "peak_gib": 0.3},
    "train_classifier": {"batch": 64, "images_per_s": 1124, "utilisation": 0.1836, "peak_gib": 8.8},
    "train_prior top": {"batch": 64, "images_per_s": 174, "utilisation": 0.281, "peak_gib": 34.7},
    "train_prior bottom": {"batch": 32, "images_per_s": 38.1, "utilisation": 0.262, "peak_gib": 56.4},
    "encode": {"batch": 256, "images_per_s": 6919, "utilisation": 0.0427, "peak_gib": 6.5},
    "sample": {"batch": 64, "seconds_per_batch": 4.21 + 12.45, "peak_gib": 5.3},  # fp32: top 32x32 + bottom 64x64
    # evaluate's FLOPs are mostly its two CAS classifiers, which train in the default layout
    "evaluate": {"batch": 64, "images_per_s": 477, "utilisation": 0.0779, "peak_gib": 8.9},
}

# Measured by one benchmarks/paper_scale.py run on this project's 2-core CPU machine (README's table is of a
# later run; --paper-scale replaces them): bytes on S3 per image, each stage's peak RSS per worker or actor process
# (and the driver's), and its object store peak. The CPU run trains at batch 1-2 per worker: on a GPU
# node the host RAM of a training worker is less (its model, gradients, Adam state and activations live
# in GPU memory, measured above), the driver's and the actors' about the same.
MEASURED = {
    "shard_bytes_per_image": 40_257, "encode_bytes_per_image": 3_778, "sample_bytes_per_image": 134_360,
    "evaluate_bytes": 51_595,
    "worker_rss": {"shard": 362.6e6, "train_vqvae": 895.9e6, "encode": 626.1e6, "train_classifier": 1_623.8e6,
                   "train_prior": 11_320.9e6, "sample": 4_720.0e6, "evaluate": 1_481.8e6},
    "driver_rss": {"shard": 530.7e6, "train_vqvae": 595.1e6, "encode": 633.0e6, "train_classifier": 700.4e6,
                   "train_prior": 6_028.0e6, "sample": 2_169.5e6, "evaluate": 2_176.1e6},
    "object_store_peak": {"shard": 0, "train_vqvae": 5_275, "encode": 23_996, "train_classifier": 10_461,
                          "train_prior": 11_725, "sample": 23_161, "evaluate": 172_741},
}
# A code table row holds 5,120 codes of 9 bits of entropy at most (512 codes a level): zstd cannot store it in
# less, whatever a short run's VQ-VAE (few codes in use, so fewer bytes) measured.
CODES_BYTES_PER_IMAGE = 5120 * 9 / 8


def paper_models():
    """The ImageNet-256 models of the paper (the presets configs/imagenet256.yaml uses)."""
    return {
        "vqvae": VQVAE(vqvae_imagenet256()),
        "classifier": ResNetClassifier(ClassifierConfig(num_classes=CLASSES)),
        "top": CodePrior(prior_imagenet256_top()),
        "bottom": CodePrior(prior_imagenet256_bottom()),
    }


def flops(fn, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def flops_per_image() -> dict[str, float]:
    """Forward and training-step FLOPs per image of every model. The priors and the classifier are counted on
    the meta device (shapes only); the VQ-VAE on CPU tensors (its quantizer reads values)."""
    batch = 2
    with torch.device("meta"):
        models = {k: v for k, v in paper_models().items() if k != "vqvae"}
        y = torch.zeros(batch, dtype=torch.long)
        top_codes, bottom_codes = torch.zeros(batch, 32, 32, dtype=torch.long), torch.zeros(batch, 64, 64, dtype=torch.long)
        images = torch.zeros(batch, 3, 256, 256)
        top, bottom, classifier = models["top"], models["bottom"], models["classifier"]
        out = {
            "top_forward": flops(lambda: top(top_codes, y), batch),
            "top_train": flops(lambda: F.cross_entropy(top(top_codes, y), top_codes).backward(), batch),
            "bottom_forward": flops(lambda: bottom(bottom_codes, y, [top_codes]), batch),
            "bottom_train": flops(lambda: F.cross_entropy(bottom(bottom_codes, y, [top_codes]), bottom_codes).backward(),
                                  batch),
            "classifier_forward": flops(lambda: classifier(images), batch),
            "classifier_train": flops(lambda: F.cross_entropy(classifier(images), y).backward(), batch),
        }
    vqvae = VQVAE(vqvae_imagenet256())
    images = torch.zeros(batch, 3, 256, 256)
    out["vqvae_train"] = flops(lambda: vqvae(images).loss.backward(), batch)
    with torch.no_grad():
        out["vqvae_encode"] = flops(lambda: vqvae.encode(images), batch)
        codes = vqvae.encode(images)
        out["vqvae_decode"] = flops(lambda: vqvae.decode_codes(codes), batch)
    out.update(feature_net_flops())
    return out


def feature_net_flops() -> dict[str, float]:
    """The evaluate stage's fixed networks: counted when their packages are installed, else their published sizes
    (InceptionV3 at 299 px: 5.7 GMAC; EfficientNet-Lite0 at 224 px: 0.39 GMAC)."""
    out = {"inception_forward": 2 * 5.7e9, "efficientnet_forward": 2 * 0.39e9}
    try:
        from pipeline.feature_nets import EFFICIENTNET_LITE0, load_feature_net

        net = load_feature_net(EFFICIENTNET_LITE0)
        with torch.no_grad():
            out["efficientnet_forward"] = flops(lambda: net.features_and_logits(torch.zeros(2, 3, 256, 256,
                                                                                           dtype=torch.uint8)), 2)
    except Exception as error:  # noqa: BLE001 - the published figure stands in
        print(f"(EfficientNet-Lite0 not counted: {error}; its published size is used)")
    return out


# --- the workload of each stage for the full run -------------------------------------------------------


def workload(cfg) -> dict[str, dict]:
    """Images processed by each stage's model in the full run, from the config (global batch = per-worker x workers)."""
    vq, clf, prior, sample, ev = cfg.train_vqvae, cfg.train_classifier, cfg.train_prior, cfg.sample, cfg.evaluate
    samples = sample.samples_per_class * CLASSES
    real = min(ev.max_real_images or VAL_IMAGES, VAL_IMAGES)
    return {
        "train_vqvae": {"steps": vq.steps, "batch": vq.batch_size * vq.num_workers, "paper": "batch 128, ~300k steps"},
        "encode": {"images": TRAIN_IMAGES + VAL_IMAGES, "decoded": VAL_IMAGES},
        "train_classifier": {"steps": clf.steps, "batch": clf.batch_size * clf.num_workers, "paper": "-"},
        "train_prior top": {"steps": prior.steps, "batch": prior.level_batch("top") * prior.num_workers,
                            "paper": "batch 1024 (steps not given)"},
        "train_prior bottom": {"steps": prior.steps, "batch": prior.level_batch("bottom") * prior.num_workers,
                               "paper": "batch 512 (steps not given)"},
        "sample": {"samples": samples, "batch": sample.batch_size, "paper": "50k samples for FID/IS"},
        "evaluate": {"real": real, "samples": samples, "cas_images": 2 * ev.cas_steps * ev.cas_batch_size},
    }


def stage_flops(f: dict[str, float], work: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """(FLOPs per image, total FLOPs) of every stage."""
    per_step = lambda name, key: f[key] * work[name]["steps"] * work[name]["batch"]  # noqa: E731
    enc = work["encode"]
    sample_per = f["top_forward"] + f["bottom_forward"] + f["vqvae_decode"] + f["efficientnet_forward"]
    ev = work["evaluate"]
    nets = f["inception_forward"] + f["efficientnet_forward"] + f["classifier_forward"]
    evaluate_total = (ev["real"] * (2 * nets + f["vqvae_decode"]) + ev["samples"] * nets
                      + ev["cas_images"] * f["classifier_train"] + 2 * ev["real"] * f["classifier_forward"])
    return {
        "train_vqvae": (f["vqvae_train"], per_step("train_vqvae", "vqvae_train")),
        "encode": (f["vqvae_encode"], enc["images"] * f["vqvae_encode"] + enc["decoded"] * f["vqvae_decode"]),
        "train_classifier": (f["classifier_train"], per_step("train_classifier", "classifier_train")),
        "train_prior top": (f["top_train"], per_step("train_prior top", "top_train")),
        "train_prior bottom": (f["bottom_train"], per_step("train_prior bottom", "bottom_train")),
        "sample": (sample_per, work["sample"]["samples"] * sample_per),
        "evaluate": (nets, evaluate_total),
    }


def stored_model_bytes(cfg) -> dict[str, tuple[float, float]]:
    """(bytes stored at the end, bytes written over the run) of each training stage: Ray Train keeps 2
    checkpoints (fp32 weights and Adam's two moments: 12 bytes a parameter), plus the weights-only model
    file (4 bytes a parameter); every `checkpoint_every` steps a checkpoint is written."""
    with torch.device("meta"):
        sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in paper_models().items()}
    out = {}
    for stage, section, models in (("train_vqvae", cfg.train_vqvae, ["vqvae"]),
                                   ("train_classifier", cfg.train_classifier, ["classifier"]),
                                   ("train_prior top", cfg.train_prior, ["top"]),
                                   ("train_prior bottom", cfg.train_prior, ["bottom"])):
        parameters = sum(sizes[m] for m in models)
        checkpoints = -(-section.steps // section.checkpoint_every)
        out[stage] = (parameters * (2 * 12 + 4), parameters * (checkpoints * 12 + 4))
    return out


def sampler_bound_s(samples: int, batch: int) -> float:
    """Seconds of the fast sampler on one H100, bounded below by reading every weight (bf16) once per position
    per batch, and by its kernel launches (about 10 per layer per position)."""
    seconds = 0.0
    for config, positions in ((prior_imagenet256_top(), 32 * 32), (prior_imagenet256_bottom(), 64 * 64)):
        with torch.device("meta"):
            parameters = sum(p.numel() for p in CodePrior(config).parameters())
        per_position = max(2 * parameters / H100_HBM_BYTES_PER_S, 10 * config.num_layers * KERNEL_LAUNCH_S)
        seconds += positions * per_position * -(-samples // batch)
    return seconds


# --- measured on a GPU ---------------------------------------------------------------------------------


def measure_gpu(f: dict[str, float], steps: int, device: str = "cuda", batch: int | None = None,
                out: Path | None = None, channels_last: bool = False) -> dict[str, dict]:
    """Each model's training step (bf16 autocast, Adam, as the stages run it) and the encode forward, at the
    per-GPU batches of configs/imagenet256.yaml (halved until it fits); ms/step, TFLOP/s, fraction of peak.
    `device="cpu"` with a small `batch` is a dry run of this code. channels_last: the models' weights and the
    images in that memory format (the image stages' `channels_last` option; the priors have none)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "channels_last": channels_last}

    def run(name, build, step_fn, size, flops_per_image, train=True):
        size = batch or size
        while size >= 1:
            model = optimizer = None
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                model = build().to(dev, memory_format=memory_format)
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-4) if train else None
                for i in range(steps + 2):
                    if i == 2:
                        if cuda:
                            torch.cuda.synchronize()
                        started = time.perf_counter()
                    step_fn(model, optimizer, size)
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - started) / steps
                achieved = flops_per_image * size / seconds
                results[name] = {"batch": size, "ms_per_step": seconds * 1e3, "images_per_s": size / seconds,
                                 "tflops": achieved / 1e12, "utilisation": achieved / H100_BF16_PEAK,
                                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
                print(name, results[name], flush=True)
                break
            except torch.cuda.OutOfMemoryError:
                results.setdefault(f"{name} out of memory at batch", []).append(size)
                print(f"{name}: out of memory at batch {size}", flush=True)
                size //= 2
            except Exception as error:  # noqa: BLE001 - the other models are still measured
                results[f"{name} failed"] = f"{type(error).__name__}: {error}"
                print(f"{name} failed: {error}", flush=True)
                break
        if out:
            out.write_text(json.dumps({"flops_per_image": f, "results": results}, indent=1))

    def train_step(loss_fn):
        def step(model, optimizer, size):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model, size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    codes = lambda b, side: torch.randint(0, 512, (b, side, side), device=dev)  # noqa: E731
    labels = lambda b: torch.randint(0, CLASSES, (b,), device=dev)  # noqa: E731
    images = lambda b: (torch.rand(b, 3, 256, 256, device=dev) * 2 - 1).contiguous(memory_format=memory_format)  # noqa: E731

    def top_loss(model, b):
        target = codes(b, 32)
        return F.cross_entropy(model(target, labels(b)).float(), target)

    def bottom_loss(model, b):
        target = codes(b, 64)
        return F.cross_entropy(model(target, labels(b), [codes(b, 32)]).float(), target)

    def encode(model, _optimizer, b):
        with torch.inference_mode():
            model.encode(images(b))

    run("train_vqvae", lambda: VQVAE(vqvae_imagenet256()), train_step(lambda m, b: m(images(b)).loss),
        GPU_BATCHES["train_vqvae"], f["vqvae_train"])
    run("train_classifier", lambda: ResNetClassifier(ClassifierConfig(num_classes=CLASSES)),
        train_step(lambda m, b: F.cross_entropy(m(images(b)).float(), labels(b))), GPU_BATCHES["train_classifier"],
        f["classifier_train"])
    run("train_prior top", lambda: CodePrior(prior_imagenet256_top()), train_step(top_loss), GPU_BATCHES["top"],
        f["top_train"])
    run("train_prior bottom", lambda: CodePrior(prior_imagenet256_bottom()), train_step(bottom_loss),
        GPU_BATCHES["bottom"], f["bottom_train"])
    run("encode", lambda: VQVAE(vqvae_imagenet256()).eval(), encode, GPU_BATCHES["encode"], f["vqvae_encode"],
        train=False)
    return results


# --- the table -----------------------------------------------------------------------------------------


def human(value: float | None, unit: str = "B") -> str:
    if value is None:
        return "-"
    for prefix, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def load_measured(path: Path | None) -> dict:
    """Per-image bytes and peaks from a paper_scale.py --json run (else the recorded MEASURED figures)."""
    if path is None:
        return MEASURED
    rows = {row["stage"]: row for row in json.loads(path.read_text())["rows"]}
    return {
        "shard_bytes_per_image": rows["shard"]["bytes_per_image"],
        "encode_bytes_per_image": rows["encode"]["bytes_per_image"],
        "sample_bytes_per_image": rows["sample"]["bytes_per_image"],
        "evaluate_bytes": rows["evaluate"]["bytes"],
        "worker_rss": {name: max(row["processes"].values(), default=0) for name, row in rows.items()},
        "driver_rss": {name: row["driver_rss"] for name, row in rows.items()},
        "object_store_peak": {name: row["object_store_peak"] for name, row in rows.items()},
    }


def table(f: dict[str, float], work: dict[str, dict], measured: dict, gpu: dict, models: dict) -> str:
    totals = stage_flops(f, work)
    samples = work["sample"]["samples"]
    per_image = {"shard": TRAIN_IMAGES + VAL_IMAGES, "encode": TRAIN_IMAGES + VAL_IMAGES, "sample": samples}
    s3 = {stage: (measured[f"{stage}_bytes_per_image"] or 0) * count or None for stage, count in per_image.items()}
    s3["encode"] = max(measured["encode_bytes_per_image"] or 0, CODES_BYTES_PER_IMAGE) * per_image["encode"]
    s3 |= {stage: f"{human(kept)} ({human(written)} written)" for stage, (kept, written) in models.items()}
    s3["evaluate"] = measured["evaluate_bytes"]
    lines = [f"| stage | work (imagenet256.yaml) | paper | bytes on S3 | RAM peak per worker, this run (driver) | "
             f"object store peak, this run | FLOPs per image | total FLOPs | {gpu['device']}: batch, utilisation, "
             f"memory | GPU-hours (measured utilisation) | GPU-hours at {UTILISATION:.0%} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| shard | {TRAIN_IMAGES + VAL_IMAGES:,} images (CPU: decode, resize, JPEG) | - | {human(s3['shard'])} | "
                 f"{human(measured['worker_rss'].get('shard'))} ({human(measured['driver_rss'].get('shard'))}) | "
                 f"{human(measured['object_store_peak'].get('shard'))} | - | - | - | - | - |")
    sums = [0.0, 0.0]
    for stage, (per_image, total) in totals.items():
        w = work[stage]
        if "steps" in w:
            what = f"{w['steps']:,} steps x {w['batch']}"
        elif stage == "encode":
            what = f"{w['images']:,} images"
        elif stage == "sample":
            what = f"{w['samples']:,} samples, batch {w['batch']}"
        else:
            what = f"{w['real']:,} real + recon, {w['samples']:,} samples, CAS {w['cas_images']:,} images"
        key = stage.split()[0]
        if stage == "sample":
            assumed = sampler_bound_s(samples, w["batch"]) / 3600  # the column "at 35%" holds the bound here
            run = gpu.get("sample")
            hours = -(-samples // run["batch"]) * run["seconds_per_batch"] / 3600 if run else assumed
            on_gpu = (f"{run['batch']}, {run['seconds_per_batch']:.1f} s a batch (both levels, fp32), "
                      f"{run['peak_gib']:.1f} GiB" if run else "not measured; bound: weights read once per position")
        else:
            assumed = total / (H100_BF16_PEAK * UTILISATION) / 3600
            # evaluate's FLOPs are mostly its two CAS classifiers: a classifier's utilisation stands in for it
            run = gpu.get(stage) or (gpu.get("train_classifier") if stage == "evaluate" else None)
            hours = total / (H100_BF16_PEAK * run["utilisation"]) / 3600 if run else None
            on_gpu = f"{run['batch']}, {run['utilisation']:.1%}, {run['peak_gib']:.1f} GiB" if run else "-"
        sums[0] += hours or assumed
        sums[1] += assumed
        stored = s3.get(stage)
        lines.append(f"| {stage} | {what} | {w.get('paper', '-')} | {stored if isinstance(stored, str) else human(stored)} | "
                     f"{human(measured['worker_rss'].get(key))} ({human(measured['driver_rss'].get(key))}) | "
                     f"{human(measured['object_store_peak'].get(key))} | {human(per_image, 'FLOP')} | "
                     f"{human(total, 'FLOP')} | {on_gpu} | {'-' if hours is None else f'{hours:,.1f}'} | "
                     f"{assumed:,.1f} |")
    lines.append(f"| all | | | | | | | | | {sums[0]:,.0f} | {sums[1]:,.0f} |")
    codes = max(measured["encode_bytes_per_image"] or 0, CODES_BYTES_PER_IMAGE) * TRAIN_IMAGES
    for level in ("top", "bottom"):
        w, run = work[f"train_prior {level}"], gpu.get(f"train_prior {level}")
        passes = w["steps"] * w["batch"] / TRAIN_IMAGES
        rate = f", {run['images_per_s'] * codes / TRAIN_IMAGES / 1e6:.1f} MB/s per GPU" if run else ""
        lines.append(f"\ntrain_prior {level}: {passes:,.0f} passes over the code tables, each worker reading its "
                     f"1/workers share of {human(codes)} per pass ({human(passes * codes)} in all{rate}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-scale", type=Path, help="JSON written by benchmarks/paper_scale.py --json")
    parser.add_argument("--gpu", type=Path, help="JSON written by --measure-gpu")
    parser.add_argument("--measure-gpu", action="store_true", help="time each model's step on this machine's GPU")
    parser.add_argument("--out", type=Path, help="where --measure-gpu writes its JSON")
    parser.add_argument("--device", default="cuda", help="--measure-gpu on this device (cpu: a dry run)")
    parser.add_argument("--batch", type=int, help="--measure-gpu at this batch instead of the config's")
    parser.add_argument("--steps", type=int, default=6, help="--measure-gpu: timed steps per model")
    parser.add_argument("--channels-last", action="store_true", help="--measure-gpu in channels_last memory format")
    args = parser.parse_args()

    f = flops_per_image()
    print("FLOPs per image: " + ", ".join(f"{k} {human(v, 'FLOP')}" for k, v in f.items()))
    if args.measure_gpu:
        measure_gpu(f, args.steps, args.device, args.batch, args.out, args.channels_last)
        return
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "imagenet256.yaml")
    gpu = json.loads(args.gpu.read_text())["results"] if args.gpu else GPU_MEASURED
    print(table(f, workload(cfg), load_measured(args.paper_scale), gpu, stored_model_bytes(cfg)))


if __name__ == "__main__":
    main()
