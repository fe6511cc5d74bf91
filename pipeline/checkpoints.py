"""Model files on storage: weights-only checkpoints that later stages load by URI."""

from __future__ import annotations

import io
from dataclasses import asdict

import torch

from models.classifier import ClassifierConfig, ResNetClassifier
from models.prior import CodePrior, PriorConfig
from models.vqvae import VQVAE, VQVAEConfig
from pipeline.storage import Location

KINDS = {
    "vqvae": (VQVAEConfig, VQVAE),
    "prior": (PriorConfig, CodePrior),
    "classifier": (ClassifierConfig, ResNetClassifier),
}


def save_model(location: Location, kind: str, model: torch.nn.Module, **extra) -> None:
    """Write {kind, config, weights, extra} atomically; loadable with torch.load(weights_only=True)."""
    config = asdict(model.cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"kind": kind, "config": config, "model": state, "extra": extra}, buffer)
    location.write_bytes(buffer.getvalue())


def model_from_state(kind: str, config: dict, weights: dict) -> torch.nn.Module:
    config_type, model_type = KINDS[kind]
    model = model_type(config_type(**config))
    model.load_state_dict(weights)
    return model.eval()


def load_model(location: Location, kind: str, map_location: str | torch.device = "cpu"):
    """(model in eval mode, extra) from a file written by save_model; refuses a file of another kind."""
    payload = torch.load(io.BytesIO(location.read_bytes()), map_location=map_location, weights_only=True)
    if payload.get("kind") != kind:
        raise ValueError(f"{location}: holds a {payload.get('kind')!r} model, expected {kind!r}")
    return model_from_state(kind, payload["config"], payload["model"]), payload["extra"]
