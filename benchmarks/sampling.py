"""Codes per second of the naive and the fast (cached) sampler over the same priors and seeds.

    python benchmarks/sampling.py            # top prior 32x32, lower prior 64x64, batch 8
    python benchmarks/sampling.py --quick    # smaller grids, under a minute

The naive sampler costs one full forward pass per position whatever the position, so its rate
is measured over the first --naive-positions positions; the fast sampler runs the whole grid.
Both draw from the same uniforms, and the codes of the measured prefix are checked equal.
"""

import argparse
import time

import torch

from models.prior import CodePrior, PriorConfig
from models.sampling import sample_level_fast, sample_level_naive, sample_uniforms


def build_priors(top_grid: int, channels: int, layers: int, codebook: int) -> tuple[CodePrior, CodePrior]:
    common = dict(codebook_size=codebook, num_classes=10, channels=channels, residual_channels=2 * channels,
                  num_layers=layers, kernel_size=5, num_heads=8, dropout=0.0)
    torch.manual_seed(0)
    top = CodePrior(PriorConfig(grid=(top_grid, top_grid), attention_layers=2, **common))
    lower = CodePrior(PriorConfig(
        grid=(2 * top_grid, 2 * top_grid), attention_layers=0, condition_grids=((top_grid, top_grid),),
        condition_codebook_sizes=(codebook,), condition_channels=channels, condition_residual_blocks=4, **common,
    ))
    return top.eval(), lower.eval()


def measure(name, prior, labels, condition, seeds, naive_positions):
    H, W = prior.cfg.grid
    (uniforms,) = sample_uniforms(seeds, [H * W])
    batch = len(seeds)
    start = time.perf_counter()
    naive = sample_level_naive(prior, uniforms, labels, condition, max_positions=naive_positions)
    naive_rate = batch * naive_positions / (time.perf_counter() - start)
    start = time.perf_counter()
    fast = sample_level_fast(prior, uniforms, labels, condition)
    fast_seconds = time.perf_counter() - start
    fast_rate = batch * H * W / fast_seconds
    n = naive_positions
    agree = torch.equal(naive.flatten(1)[:, :n], fast.flatten(1)[:, :n])
    return fast, (name, f"{H}x{W}", naive_rate, fast_rate, fast_rate / naive_rate, fast_seconds, agree)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16 / 32x32 grids and fewer naive positions")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--naive-positions", type=int, default=None)
    args = parser.parse_args()
    top_grid = 16 if args.quick else 32
    naive_positions = args.naive_positions or (4 if args.quick else 8)
    torch.set_grad_enabled(False)

    top, lower = build_priors(top_grid, args.channels, args.layers, codebook=512)
    seeds = list(range(args.batch))
    labels = torch.arange(args.batch) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.channels} channels, {args.layers} layers, naive measured over {naive_positions} positions")
    codes_top, row_top = measure("top (attention)", top, labels, None, seeds, naive_positions)
    _, row_lower = measure("lower (conditional)", lower, labels, [codes_top], seeds, max(1, naive_positions // 2))

    header = ("prior", "grid", "naive codes/s", "fast codes/s", "speed-up", "fast s/batch", "codes agree")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, grid, naive_rate, fast_rate, ratio, seconds, agree in (row_top, row_lower):
        print(f"| {name} | {grid} | {naive_rate:.1f} | {fast_rate:.1f} | {ratio:.1f}x | {seconds:.1f} | {agree} |")


if __name__ == "__main__":
    main()
