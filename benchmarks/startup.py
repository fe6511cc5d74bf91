"""Seconds a fresh process takes to import each stage's module, as every Ray Train controller and rank and
every actor of a pool does: as the stages import mlflow now (only where a call needs it), against a process
that imports mlflow's tracking client first, as every such process did while the stage modules imported
it at module level.

    python benchmarks/startup.py              # 3 rounds, alternating the two ways
    python benchmarks/startup.py --rounds 5

Each number is the median wall time of `python -c "import ..."` over the rounds; the ratio is lazy/eager
within the same rounds (the machines here drift from run to run).
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.runner import STAGE_MODULES

REPO = Path(__file__).resolve().parents[1]


def import_seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'module':<28} {'lazy s':>7} {'eager s':>8} {'lazy/eager':>10}")
    for module in STAGE_MODULES:
        lazy, eager = [], []
        for _ in range(args.rounds):
            lazy.append(import_seconds(f"import {module}"))
            eager.append(import_seconds(f"import mlflow.tracking, {module}"))
        lazy_s, eager_s = statistics.median(lazy), statistics.median(eager)
        print(f"{module:<28} {lazy_s:7.2f} {eager_s:8.2f} {lazy_s / eager_s:10.2f}")


if __name__ == "__main__":
    main()
