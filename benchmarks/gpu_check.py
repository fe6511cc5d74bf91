"""GPU check at paper size: VQ-VAE training rate and its share of the bf16 peak, the fast sampler, encode.

    PYTHONPATH=. python3 benchmarks/gpu_check.py             # on one GPU, about 5 minutes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu --quick   # tiny sizes on the CPU, to test the script

Imports torch and models/ only (the GPU machine has no Ray, MLflow or fsspec). Each part runs in
its own try block, so one failure leaves the others' numbers; the table is printed, and written
as JSON to $OUT/gpu_check.json when OUT is set.

(a) train_vqvae: the ImageNet-256 VQ-VAE (models.vqvae.vqvae_imagenet256) at 256x256, the step of
    pipeline/train_vqvae.py (bf16 autocast, Adam, gradient clipping at 1.0) on random images;
    images/s over the timed steps after warm-up, achieved TFLOP/s from the FLOPs of one step
    (torch.utils.flop_counter.FlopCounterMode) and their fraction of the GPU's dense bf16 peak.
(b) sample: the fast sampler (models.sampling.sample_level_fast) with the paper's priors
    (prior_imagenet256_top, 32x32 with attention; prior_imagenet256_bottom, 64x64 conditioned
    on the top) with random weights, in fp32, batch 64; peak GPU memory; the time of one
    teacher-forced forward pass beside it (the sampler's limit). Two rows are timed first; a grid
    estimated to take longer than --sampler-budget-s is timed over the rows that fit and the
    whole grid extrapolated from them (the `extrapolated` column says so).
(c) encode: VQVAE.encode at 256x256, fp32 (as the encode stage runs) and bf16 autocast.
(d) agree: issue 11's sampler rows on this device (benchmarks/sampling.py's priors, 128 channels,
    8 layers, batch 8: top 32x32, lower 64x64): fast sampler over one forward pass, and how many
    samples the forward pass's logits redraw exactly (the naive sampler's codes), with torch's
    default float32 settings (TF32 convolutions) and with TF32 off. The samplers turn TF32 off
    themselves (models.sampling.full_float32), so both rows should redraw every sample.
(e) layout: the two image trainers' steps (the classifier of configs/imagenet256.yaml, base preset, batch
    64; the VQ-VAE, batch 8) under DistributedDataParallel (one rank; NCCL on a GPU), in torch's default
    layout and in channels_last (the stages' `channels_last` option), with the warnings DDP raised.
"""

import argparse
import json
import os
import socket
import time
import traceback
import warnings

import torch

from models.classifier import ResNetClassifier, classifier_base, classifier_tiny
from models.prior import CodePrior, prior_imagenet256_bottom, prior_imagenet256_top, prior_tiny_lower, prior_tiny_top
from models.sampling import full_float32, sample_level_fast, sample_uniforms
from models.vqvae import VQVAE, vqvae_imagenet256, vqvae_tiny

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by a word in the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name, or None for a device not in the table."""
    return next((peak for word, peak in BF16_PEAK_TFLOPS.items() if word in device_name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def images_per_s(step, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of `step()` over `steps` calls after `warmup` untimed ones, the device synchronized around them."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def train_step(model, optimizer, images, bf16: bool):
    """One step of pipeline/train_vqvae.py's loop."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(images)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return out


def train_flops_per_image(model, size: int, device: torch.device, bf16: bool) -> float:
    """FLOPs of one training step (forward and backward) per image, counted on a batch of two."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(images).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def check_train(args, device) -> list[dict]:
    cfg, size = (vqvae_tiny(), 32) if args.quick else (vqvae_imagenet256(), 256)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    model = VQVAE(cfg).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    flops = train_flops_per_image(model, size, device, bf16)
    peak = bf16_peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    rows = []
    for batch in args.train_batches:
        row = {"part": "train_vqvae", "batch": batch, "size": size, "bf16": bf16}
        try:
            reset_peak_memory(device)
            images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rate = images_per_s(lambda: train_step(model, optimizer, images, bf16), batch, args.warmup_steps,
                                args.train_steps, device)
            tflops = rate * flops / 1e12
            row.update(images_per_s=rate, gflop_per_image=flops / 1e9, tflops=tflops,
                       peak_fraction=tflops / peak if peak else None, peak_tflops=peak,
                       peak_memory_gib=peak_memory_gib(device))
        except Exception as error:  # keep the other batch sizes' numbers (e.g. out of memory)
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        print(row, flush=True)
    return rows


def paper_priors(quick: bool) -> tuple[CodePrior, CodePrior]:
    top_cfg, bottom_cfg = (prior_tiny_top(), prior_tiny_lower()) if quick else (prior_imagenet256_top(),
                                                                                  prior_imagenet256_bottom())
    torch.manual_seed(0)
    return CodePrior(top_cfg).eval(), CodePrior(bottom_cfg).eval()


def time_sampler(prior, labels, condition, batch: int, rows: int, device) -> tuple[dict, torch.Tensor]:
    """Seconds of the fast sampler over the first rows of the grid (all rows if rows is 0)."""
    H, W = prior.cfg.grid
    rows = min(rows or H, H)
    (uniforms,) = sample_uniforms(range(batch), [H * W])
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    codes = sample_level_fast(prior, uniforms, labels, condition, max_positions=rows * W)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"rows_timed": rows, "seconds": seconds, "peak_memory_gib": peak_memory_gib(device)}, codes


def check_sampler(args, device) -> list[dict]:
    with torch.device(device):  # 300-400M parameters each: initialised where they run
        top, bottom = paper_priors(args.quick)
    batch = args.sampler_batch
    labels = torch.arange(batch, device=device) % top.cfg.num_classes
    rows, top_codes = [], None
    for name, prior in (("top (attention)", top), ("bottom (conditional)", bottom)):
        H, W = prior.cfg.grid
        row = {"part": "sample", "prior": name, "grid": f"{H}x{W}", "batch": batch, "dtype": "fp32",
               "parameters_m": sum(p.numel() for p in prior.parameters()) / 1e6}
        try:
            if prior is bottom and top_codes is None:
                raise RuntimeError("no top codes to condition on (the top prior failed)")
            condition = [top_codes] if prior is bottom else None
            # Time-box: two rows give the rate; the grid is run whole only if it fits the budget.
            probe, codes = time_sampler(prior, labels, condition, batch, 2, device)
            per_row = probe["seconds"] / probe["rows_timed"]
            timed, codes = time_sampler(prior, labels, condition, batch, max(2, int(args.sampler_budget_s / per_row)), device)
            grid_seconds = timed["seconds"] * H / timed["rows_timed"]
            synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                prior(codes, labels, condition)  # the limit: one teacher-forced forward pass over the grid
            synchronize(device)
            forward = time.perf_counter() - start
            row.update(timed, extrapolated=timed["rows_timed"] < H, seconds_per_batch=grid_seconds,
                       samples_per_s=batch / grid_seconds, ms_per_position=1e3 * grid_seconds / (H * W),
                       forward_s=forward, fast_over_forward=grid_seconds / forward)
            if prior is top:
                top_codes = codes  # rows not sampled stay 0: the bottom prior's cost does not depend on the codes
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
    return rows


def check_encode(args, device) -> list[dict]:
    cfg, size = (vqvae_tiny(), 32) if args.quick else (vqvae_imagenet256(), 256)
    torch.manual_seed(0)
    model = VQVAE(cfg).to(device).eval()
    rows = []
    for bf16 in ([False, True] if device.type == "cuda" else [False]):
        for batch in args.encode_batches:
            row = {"part": "encode", "batch": batch, "size": size, "bf16": bf16}
            try:
                reset_peak_memory(device)
                images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    rate = images_per_s(lambda: model.encode(images), batch, args.warmup_steps, args.encode_steps,
                                        device)
                row.update(images_per_s=rate, peak_memory_gib=peak_memory_gib(device))
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            print(row, flush=True)
    return rows


@torch.no_grad()
def check_agree(args, device) -> list[dict]:
    from sampling import build_priors, samples_redrawn  # benchmarks/sampling.py: its priors and agreement check

    grid, batch = (8, 2) if args.quick else (32, 8)
    with torch.device(device):
        top, lower = build_priors(grid, channels=32 if args.quick else 128, layers=8, codebook=512)
    labels = torch.arange(batch, device=device) % 10
    defaults = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    settings = [("torch defaults", *defaults), ("TF32 off", False, False)] if device.type == "cuda" else [("fp32", *defaults)]
    rows = []
    for setting, conv_tf32, matmul_tf32 in settings:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32
        codes_top = None
        for name, prior in (("top (attention)", top), ("lower (conditional)", lower)):
            H, W = prior.cfg.grid
            row = {"part": "agree", "prior": name, "grid": f"{H}x{W}", "batch": batch, "setting": setting,
                   "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
            try:
                condition = None if prior is top else [codes_top]
                (uniforms,) = sample_uniforms(range(batch), [H * W])
                uniforms = uniforms.to(device)
                fast_times, forward_times = [], []
                for _ in range(1 + args.agree_repeat):  # the first round warms up kernels and handles
                    synchronize(device)
                    start = time.perf_counter()
                    codes = sample_level_fast(prior, uniforms, labels, condition)
                    synchronize(device)
                    fast_times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    prior(codes, labels, condition)
                    synchronize(device)
                    forward_times.append(time.perf_counter() - start)
                fast, forward = min(fast_times[1:]), min(forward_times[1:])
                with full_float32():  # as the naive sampler runs its forward passes
                    logits = prior(codes, labels, condition)
                row.update(fast_s=fast, forward_s=forward, fast_over_forward=fast / forward,
                           ms_per_position=1e3 * fast / (H * W),
                           samples_redrawn=f"{samples_redrawn(logits, uniforms, codes)}/{batch}")
                codes_top = codes if prior is top else codes_top
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            rows.append(row)
            print(row, flush=True)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults
    return rows


def check_layout(args, device) -> list[dict]:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.type == "cuda"
    size = 32 if args.quick else 256
    with socket.socket() as s:  # a free port for the one-rank process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    models = {
        "classifier": (lambda: ResNetClassifier(classifier_tiny(10) if args.quick else classifier_base(1000)),
                       2 if args.quick else 64, lambda out, labels: F.cross_entropy(out.float(), labels)),
        "vqvae": (lambda: VQVAE(vqvae_tiny() if args.quick else vqvae_imagenet256()), 2 if args.quick else 8,
                  lambda out, _: out.loss),
    }
    rows = []
    try:
        for name, (build, batch, loss_of) in models.items():
            for layout in (torch.contiguous_format, torch.channels_last):
                row = {"part": "layout", "model": name, "batch": batch, "size": size,
                       "layout": "channels_last" if layout is torch.channels_last else "default"}
                try:
                    torch.manual_seed(0)
                    model = build().to(device, memory_format=layout)
                    ddp = DistributedDataParallel(model, device_ids=[0] if cuda else None,
                                                  broadcast_buffers=name != "vqvae")
                    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
                    images = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=layout)
                    labels = torch.randint(0, model.cfg.num_classes if name == "classifier" else 1, (batch,), device=device)

                    def step():
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                            loss = loss_of(ddp(images), labels)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()

                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        rate = images_per_s(step, batch, args.warmup_steps, args.train_steps, device)
                    row.update(images_per_s=rate,
                               warnings="; ".join(sorted({str(w.message)[:120] for w in caught})) or "none")
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {error}"
                    traceback.print_exc()
                rows.append(row)
                print(row, flush=True)
    finally:
        dist.destroy_process_group()
    return rows


TABLES = {
    "train_vqvae": ("(a) train_vqvae step: ImageNet-256 preset (tiny with --quick), Adam, clipping 1.0, random images", [
        ("batch", "batch", ""), ("size", "size", ""), ("bf16", "bf16", ""), ("images_per_s", "images/s", ".1f"),
        ("gflop_per_image", "GFLOP/image", ".3g"), ("tflops", "TFLOP/s", ".3g"),
        ("peak_fraction", "of bf16 peak", ".1%"), ("peak_memory_gib", "peak GiB", ".1f"), ("error", "error", ""),
    ]),
    "sample": ("(b) fast sampler: paper priors (tiny with --quick) with random weights, fp32", [
        ("prior", "prior", ""), ("parameters_m", "params M", ".1f"), ("grid", "grid", ""), ("batch", "batch", ""),
        ("rows_timed", "rows timed", ""), ("extrapolated", "extrapolated", ""), ("seconds_per_batch", "s/batch", ".1f"),
        ("samples_per_s", "samples/s", ".2f"), ("ms_per_position", "ms/position", ".2f"),
        ("forward_s", "forward s", ".2f"), ("fast_over_forward", "fast/forward", ".1f"),
        ("peak_memory_gib", "peak GiB", ".1f"), ("error", "error", ""),
    ]),
    "encode": ("(c) encode: VQVAE.encode, ImageNet-256 preset (tiny with --quick), random images", [
        ("batch", "batch", ""), ("size", "size", ""), ("bf16", "bf16", ""), ("images_per_s", "images/s", ".1f"),
        ("peak_memory_gib", "peak GiB", ".1f"), ("error", "error", ""),
    ]),
    "agree": ("(d) issue 11's sampler rows: benchmarks/sampling.py's priors (tiny with --quick), fastest of --agree-repeat", [
        ("prior", "prior", ""), ("grid", "grid", ""), ("batch", "batch", ""), ("setting", "float32 setting", ""),
        ("fast_s", "fast s", ".3f"), ("forward_s", "forward s", ".4f"), ("fast_over_forward", "fast/forward", ".0f"),
        ("ms_per_position", "ms/position", ".2f"), ("samples_redrawn", "samples redrawn", ""), ("error", "error", ""),
    ]),
    "layout": ("(e) training steps under DDP (one rank), torch's default layout vs channels_last", [
        ("model", "model", ""), ("batch", "batch", ""), ("size", "size", ""), ("layout", "layout", ""),
        ("images_per_s", "images/s", ".1f"), ("warnings", "warnings", ""), ("error", "error", ""),
    ]),
}


def cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, float) else str(value)


def print_tables(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, CUDA {results['cuda']}, "
          f"TF32 matmul {results['tf32_matmul']}, TF32 cuDNN {results['tf32_cudnn']}")
    for key, (title, columns) in TABLES.items():
        print(f"\n{title}\n| " + " | ".join(header for _, header, _ in columns) + " |")
        print("|" + "---|" * len(columns))
        for row in results[key]:
            print("| " + " | ".join(cell(row.get(name), spec) for name, _, spec in columns) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --quick: a test of this script)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes")
    parser.add_argument("--parts", nargs="+", default=["train", "sample", "encode", "agree", "layout"],
                        choices=["train", "sample", "encode", "agree", "layout"])
    parser.add_argument("--train-batches", type=int, nargs="+", default=None)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="train in channels_last memory format")
    parser.add_argument("--sampler-batch", type=int, default=None)
    parser.add_argument("--sampler-budget-s", type=float, default=45.0,
                        help="seconds per prior: a grid estimated to take longer is timed over the rows that fit")
    parser.add_argument("--agree-repeat", type=int, default=2, help="timed rounds of part (d), after one warm-up")
    parser.add_argument("--encode-batches", type=int, nargs="+", default=None)
    parser.add_argument("--encode-steps", type=int, default=5)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (and --quick) to run on the CPU")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.train_batches = args.train_batches or ([4] if args.quick else [32, 64, 128])
    args.encode_batches = args.encode_batches or ([4] if args.quick else [64, 128, 256])
    args.sampler_batch = args.sampler_batch or (2 if args.quick else 64)
    if args.quick:
        args.train_steps, args.warmup_steps, args.encode_steps = 2, 1, 2
    torch.backends.cudnn.benchmark = True

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "train_vqvae": [], "sample": [], "encode": [], "agree": [], "layout": [],
    }
    parts = {"train": ("train_vqvae", check_train), "sample": ("sample", check_sampler), "encode": ("encode", check_encode),
             "agree": ("agree", check_agree), "layout": ("layout", check_layout)}
    for part in args.parts:
        key, check = parts[part]
        started = time.perf_counter()
        try:
            results[key] = check(args, device)
        except Exception as error:
            traceback.print_exc()
            results[key] = [{"part": key, "error": f"{type(error).__name__}: {error}"}]
        print(f"{key}: {time.perf_counter() - started:.0f} s", flush=True)
        write_json(results)
    print_tables(results)


def write_json(results: dict) -> None:
    """Results so far to $OUT/gpu_check.json, when OUT is set."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
