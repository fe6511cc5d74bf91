"""The pyfunc loader of vq2's registered models: a weights-only model file in, a model with `predict` out.

A registered vq2 model names this module as its `loader_module`, so `mlflow.pyfunc.load_model` imports it
from the installed vq2 package (no code comes from the artifact store) and it reads the model file with
torch.load(weights_only=True): a file holding pickled code is refused, never run. What `predict` takes and
returns (the model's MLflow signature, `signature` below):

- vqvae: images (N, 3, H, W) float32 in [-1, 1] -> {level: codes (N, h, w) int64}, top first;
- prior: {"codes": (N, h, w) int64, "labels": (N,) int64, "condition_<i>": codes of level i above it, top
  first} -> logits (N, K, h, w) float32;
- classifier: images (N, 3, H, W) float32 in [-1, 1] -> logits (N, classes) float32.
"""

from __future__ import annotations

import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.checkpoints import read_model
from pipeline.codes import level_names
from pipeline.storage import Location

EXAMPLE_MAX_SIZE = 256  # larger images make the input example (JSON) megabytes; the signature takes any size


class RegisteredModel:
    """A vq2 model as an MLflow pyfunc model."""

    def __init__(self, kind: str, model: torch.nn.Module, extra: dict):
        self.kind, self.model, self.extra = kind, model, extra

    @torch.no_grad()
    def predict(self, model_input, params: dict | None = None):
        if self.kind == "prior":
            codes = torch.as_tensor(model_input["codes"], dtype=torch.long)
            labels = torch.as_tensor(model_input["labels"], dtype=torch.long) if self.model.cfg.num_classes else None
            condition = [torch.as_tensor(model_input[f"condition_{i}"], dtype=torch.long)
                         for i in range(len(self.model.cfg.condition_grids))] or None
            return self.model(codes, labels, condition).float().numpy()
        images = model_input["images"] if isinstance(model_input, dict) else model_input
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if self.kind == "vqvae":
            codes = self.model.encode(images)
            return {name: grid.numpy() for name, grid in zip(level_names(len(codes)), codes)}
        return self.model(images).float().numpy()


def _load_pyfunc(data_path: str) -> RegisteredModel:
    """What mlflow.pyfunc.load_model calls with the model's data file."""
    kind, model, extra = read_model(Location(data_path))
    return RegisteredModel(kind, model, extra)


def signature(kind: str, cfg, image_size: int | None) -> tuple[ModelSignature, object]:
    """(MLflow signature, input example) of a model with this config (VQVAEConfig, PriorConfig,
    ClassifierConfig): the shapes the config fixes, batch size free."""
    if kind == "prior":
        height, width = cfg.grid
        above = list(enumerate(cfg.condition_grids))
        inputs = [TensorSpec(np.dtype(np.int64), (-1, height, width), "codes"),
                  TensorSpec(np.dtype(np.int64), (-1,), "labels")]
        inputs += [TensorSpec(np.dtype(np.int64), (-1, h, w), f"condition_{i}") for i, (h, w) in above]
        outputs = [TensorSpec(np.dtype(np.float32), (-1, cfg.codebook_size, height, width))]
        example = {"codes": np.zeros((1, height, width), np.int64), "labels": np.zeros(1, np.int64)}
        example |= {f"condition_{i}": np.zeros((1, h, w), np.int64) for i, (h, w) in above}
        return ModelSignature(Schema(inputs), Schema(outputs)), example
    # Convolutional: any image size the downsampling divides; the example has the training size, at most 256.
    images = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    size = min(image_size or EXAMPLE_MAX_SIZE, EXAMPLE_MAX_SIZE)
    example = np.zeros((1, 3, size, size), np.float32)
    if kind == "vqvae":
        names = level_names(cfg.levels)
        outputs = [TensorSpec(np.dtype(np.int64), (-1, -1, -1), name) for name in names]
    else:
        outputs = [TensorSpec(np.dtype(np.float32), (-1, cfg.num_classes))]
    return ModelSignature(Schema([images]), Schema(outputs)), example
