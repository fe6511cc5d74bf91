"""InceptionV3 images/s on a CPU: the net's passes of `cpu_pass_size` images against one pass over the whole batch.

    python benchmarks/feature_pass.py                    # 64 images of 32x32, 1 and 2 threads, 2 rounds
    python benchmarks/feature_pass.py --batch 128 --threads 1 --rounds 3

The evaluate stage hands a feature net a task's batch (evaluate.batch_size, 64 in the quality run); on a CPU
the FID Inception splits it into passes of 16, whose 299x299 activations stay in cache. The two ways
alternate within each round, so drift of a shared machine falls on both.
"""

import argparse
import time

import torch

from pipeline.feature_nets import InceptionV3FID


def images_per_s(net: InceptionV3FID, images: torch.Tensor, pass_size: int | None) -> float:
    net.cpu_pass_size = pass_size
    started = time.perf_counter()
    net.features(images)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    net = InceptionV3FID()
    pass_size = net.cpu_pass_size
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    net.features(images[:2])  # builds the frozen module
    print(f"| threads | passes of {pass_size} images/s | one pass of {args.batch} images/s | ratio |")
    print("|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        ours, whole = [], []
        for _ in range(args.rounds):
            ours.append(images_per_s(net, images, pass_size))
            whole.append(images_per_s(net, images, None))
        ours_rate, whole_rate = sum(ours) / len(ours), sum(whole) / len(whole)
        print(f"| {threads} | {ours_rate:.2f} | {whole_rate:.2f} | {ours_rate / whole_rate:.2f}x |")


if __name__ == "__main__":
    main()
