"""The fast (cached) sampler against its limit, one teacher-forced forward pass, and the naive sampler.

    python benchmarks/sampling.py                  # top prior 32x32, lower prior 64x64, batch 8
    python benchmarks/sampling.py --batch 8 64     # both batch sizes
    python benchmarks/sampling.py --quick          # 16x16 / 32x32 grids, under two minutes
    python benchmarks/sampling.py --threads 1      # one torch thread
    python benchmarks/sampling.py --repeat 5       # five rounds of sampler and forward pass (default 3)
    python benchmarks/sampling.py --breakdown      # also: where one run of the top prior's fast sampler spends its time
    python benchmarks/sampling.py --without-vertical  # also: the top prior's sampler with its vertical stack skipped

An exact incremental sampler does about the work of one forward pass over the whole grid, so
the column `fast / forward` (fast sampler seconds over the seconds of one forward pass of the
same prior on the same batch) is how far the sampler is from its limit. Each of --repeat rounds
times the sampler and then one forward pass; the table gives the fastest time of each, the
round least disturbed by the rest of a shared machine (timeit's rule), since these machines
drift by a quarter from one minute to the next.

The column `products only / forward` is a floor under `fast / forward`: the sampler's matrix
products and convolutions alone, the same shapes and weights (read from the prior's own sampling
caches) with nothing else between them. No exact sampler built on torch's CPU kernels goes below
it; the rest of the sampler's time goes to its elementwise ops, draws, copies and Python.

The naive sampler costs one forward pass per position whatever the position, so its rate is
measured over the first --naive-positions positions. Codes are checked two ways: against the
naive sampler over that prefix, and over the whole grid by teacher forcing (one forward pass on
the fast sampler's codes, a draw at every position from the same uniforms, which is what the
naive sampler would draw, since the logits at a position depend only on the codes before it).
"""

import argparse
import time
from collections import Counter
from contextlib import contextmanager
from unittest.mock import patch

import torch

import models.sampling
from models.prior import CausalSelfAttention, CodePrior, GatedLayer, PriorConfig
from models.sampling import draw, sample_level_fast, sample_level_naive, sample_uniforms


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


def samples_redrawn(logits, uniforms, codes) -> int:
    """How many samples a draw at every position from one forward pass's logits (B, K, H, W) gives again,
    code for code: what the naive sampler would have drawn."""
    B, K, H, W = logits.shape
    same = torch.ones(B, dtype=torch.bool, device=codes.device)
    for r in range(H):  # a row at a time: the whole grid's float64 probabilities would be B*H*W*K
        row = logits[:, :, r].permute(0, 2, 1).reshape(B * W, K)
        drawn = draw(row, uniforms[:, r * W : (r + 1) * W].reshape(-1)).view(B, W)
        same &= (drawn == codes[:, r]).all(1)
    return int(same.sum())


@torch.no_grad()
def products_only(prior: CodePrior, batch: int, labels, condition_codes) -> float:
    """Seconds of the fast sampler's matrix products and convolutions alone, in the sampler's order."""
    (H, W), C, R = prior.cfg.grid, prior.cfg.channels, prior.cfg.residual_channels
    h, inner, columns = torch.randn(batch, C), torch.randn(batch, R), torch.randn(W * batch, 2 * C)
    query = torch.randn(batch * prior.cfg.num_heads, 1, C // prior.cfg.num_heads)
    condition = prior.condition_features(condition_codes)  # once a level, outside the loop, as the sampler
    prior.start_sampling(batch)
    try:
        start = time.perf_counter()
        for r in range(H):
            for layer in prior.layers:  # a row's class and condition biases
                layer.conditioning(labels, None if condition is None else condition[:, :, r : r + 1])
            for c in range(W):
                for layer, attention in prior.sampling_stack:
                    cache = layer.cache
                    torch.addmm(cache.fixed_h_bias, cache.window_at[c], cache.h_weight)
                    torch.addmm(cache.in_bias, h, cache.in_weight)
                    torch.addmm(cache.out_bias, inner, cache.out_weight)
                    if attention is not None:
                        torch.addmm(attention.qkv_bias, h, attention.qkv_weight)
                        scores = torch.bmm(query, attention.keys[:, :, : r * W + c + 1])
                        torch.bmm(scores, attention.values[:, : r * W + c + 1])
                        torch.addmm(attention.proj.bias, h, attention.proj_weight)
                for weight, bias in prior.head_weights:
                    torch.addmm(bias, h, weight)
            if r + 1 < H:
                for layer in prior.layers:  # the vertical stack's row
                    layer.v_conv(layer.cache.v_inputs)
                    torch.addmm(layer.cache.fixed_h_bias, columns, layer.cache.v_to_h_weight)
        return time.perf_counter() - start
    finally:
        prior.stop_sampling()


@contextmanager
def timed(parts: dict, seconds: Counter):
    """Adds each call's seconds to seconds[name] while inside, for parts {name: (owner, attribute)}."""
    originals = {name: getattr(owner, attribute) for name, (owner, attribute) in parts.items()}

    def timer(name, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        return call

    for name, (owner, attribute) in parts.items():
        setattr(owner, attribute, timer(name, originals[name]))
    try:
        yield
    finally:
        for name, (owner, attribute) in parts.items():
            setattr(owner, attribute, originals[name])


def breakdown(name, prior, labels, condition, seeds) -> dict:
    """Seconds of one fast sampler run in each of its parts, timed around each part's calls."""
    (uniforms,) = sample_uniforms(seeds, [prior.cfg.grid[0] * prior.cfg.grid[1]])
    seconds = Counter()
    parts = {"gated layer steps": (GatedLayer, "step"), "attention steps": (CausalSelfAttention, "step"),
             "vertical stack rows": (CodePrior, "end_row"), "draws": (models.sampling, "draw"),
             "code writes": (CodePrior, "write_code")}
    with timed(parts, seconds):
        start = time.perf_counter()
        sample_level_fast(prior, uniforms, labels, condition)
        total = time.perf_counter() - start
    start = time.perf_counter()
    prior(torch.zeros(len(seeds), *prior.cfg.grid, dtype=torch.long), labels, condition)
    forward = time.perf_counter() - start
    rest = total - sum(seconds.values())
    return {"prior": name, "batch": len(seeds), "forward s": f"{forward:.2f}", "fast s": f"{total:.2f}",
            **{f"{part} s": f"{seconds[part]:.2f}" for part in parts}, "the rest s": f"{rest:.2f}"}


def without_vertical(prior, labels, seeds, repeat) -> dict:
    """The fast sampler with every vertical stack row skipped (its codes are wrong; only its time counts),
    alternating with the sampler as it is and a forward pass: a floor under any sampler that hides the
    vertical stack behind the positions' chain, on another thread or anywhere else."""
    (uniforms,) = sample_uniforms(seeds, [prior.cfg.grid[0] * prior.cfg.grid[1]])
    times = {"fast s": [], "without vertical s": [], "forward s": []}
    for _ in range(repeat):
        start = time.perf_counter()
        codes = sample_level_fast(prior, uniforms, labels)
        times["fast s"].append(time.perf_counter() - start)
        with patch.object(CodePrior, "end_row", lambda *args: None):
            start = time.perf_counter()
            sample_level_fast(prior, uniforms, labels)
            times["without vertical s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        prior(codes, labels)
        times["forward s"].append(time.perf_counter() - start)
    fastest = {name: min(seconds) for name, seconds in times.items()}
    forward = fastest["forward s"]
    return {"prior": "top (attention)", "batch": len(seeds), **{k: f"{v:.2f}" for k, v in fastest.items()},
            "fast / forward": f"{fastest['fast s'] / forward:.2f}x",
            "without vertical / forward": f"{fastest['without vertical s'] / forward:.2f}x"}


def measure(name, prior, labels, condition, seeds, naive_positions, repeat) -> tuple[torch.Tensor, dict]:
    H, W = prior.cfg.grid
    (uniforms,) = sample_uniforms(seeds, [H * W])
    batch, n = len(seeds), naive_positions
    start = time.perf_counter()
    naive = sample_level_naive(prior, uniforms, labels, condition, max_positions=n)
    naive_step = (time.perf_counter() - start) / n  # one forward pass over the grid, and a draw
    fast_times, forward_times = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        fast = sample_level_fast(prior, uniforms, labels, condition)
        fast_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        logits = prior(fast, labels, condition)
        forward_times.append(time.perf_counter() - start)
    fast_seconds, forward = min(fast_times), min(forward_times)
    floor = min(products_only(prior, batch, labels, condition) for _ in range(repeat))
    return fast, {
        "prior": name, "grid": f"{H}x{W}", "batch": batch, "forward s": f"{forward:.2f}",
        "fast s": f"{fast_seconds:.2f}", "fast / forward": f"{fast_seconds / forward:.2f}x",
        "fast / forward, each round": " ".join(f"{f / w:.2f}" for f, w in zip(fast_times, forward_times)),
        "products only / forward": f"{floor / forward:.2f}x",
        "naive codes/s": f"{batch / naive_step:.1f}", "fast codes/s": f"{batch * H * W / fast_seconds:.1f}",
        "fast vs naive": f"{H * W * naive_step / fast_seconds:.0f}x",
        "agree: naive prefix": torch.equal(naive.flatten(1)[:, :n], fast.flatten(1)[:, :n]),
        "agree: whole grid": samples_redrawn(logits, uniforms, fast) == batch,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16 / 32x32 grids")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--naive-positions", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of sampler and forward pass; the fastest counts")
    parser.add_argument("--breakdown", action="store_true", help="also time each part of one fast sampler run of the top prior")
    parser.add_argument("--without-vertical", action="store_true",
                        help="also time the top prior's sampler with its vertical stack skipped, against the sampler and a forward pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    top_grid = 16 if args.quick else 32
    naive_positions = args.naive_positions or 2
    torch.set_grad_enabled(False)

    top, lower = build_priors(top_grid, args.channels, args.layers, codebook=512)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.channels} channels, "
          f"{args.layers} layers, kernel 5, naive measured over {naive_positions} positions (top), "
          f"{max(1, naive_positions // 2)} (lower), fastest of {args.repeat} rounds")
    rows = []
    for batch in args.batch:
        seeds = list(range(batch))
        labels = torch.arange(batch) % 10
        codes_top, row = measure("top (attention)", top, labels, None, seeds, naive_positions, args.repeat)
        rows.append(row)
        print(row, flush=True)
        _, row = measure("lower (conditional)", lower, labels, [codes_top], seeds, max(1, naive_positions // 2), args.repeat)
        rows.append(row)
        print(row, flush=True)

    print_table(rows)
    if args.breakdown:
        parts = []
        for batch in args.batch:
            labels = torch.arange(batch) % 10
            parts.append(breakdown("top (attention)", top, labels, None, list(range(batch))))
            print(parts[-1], flush=True)
        print_table(parts)
    if args.without_vertical:
        rows = []
        for batch in args.batch:
            rows.append(without_vertical(top, torch.arange(batch) % 10, list(range(batch)), args.repeat))
            print(rows[-1], flush=True)
        print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
