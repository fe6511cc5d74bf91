"""Model files on storage: weights-only checkpoints that later stages load by URI."""

from __future__ import annotations

import io
from dataclasses import asdict

import torch

from pipeline.storage import Location

KINDS = ("vqvae", "prior", "classifier")


def _model_types(kind: str) -> tuple[type, type]:
    """(config dataclass, module class) of a model kind.

    Imported here rather than at module level: a stage depends on a model's code through its own
    imports or through the fingerprint of the stage that trained the model, not through this file
    (see pipeline/code_digest.py), so a change to the prior does not retrain the VQ-VAE.
    """
    if kind == "vqvae":
        from models.vqvae import VQVAE, VQVAEConfig

        return VQVAEConfig, VQVAE
    if kind == "prior":
        from models.prior import CodePrior, PriorConfig

        return PriorConfig, CodePrior
    if kind == "classifier":
        from models.classifier import ClassifierConfig, ResNetClassifier

        return ClassifierConfig, ResNetClassifier
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def save_model(location: Location, kind: str, model: torch.nn.Module, **extra) -> None:
    """Write {kind, config, weights, extra} atomically; loadable with torch.load(weights_only=True)."""
    config = asdict(model.cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"kind": kind, "config": config, "model": state, "extra": extra}, buffer)
    location.write_bytes(buffer.getvalue())


def model_from_state(kind: str, config: dict, weights: dict) -> torch.nn.Module:
    config_type, model_type = _model_types(kind)
    model = model_type(config_type(**config))
    model.load_state_dict(weights)
    return model.eval()


def read_model(location: Location, map_location: str | torch.device = "cpu") -> tuple[str, torch.nn.Module, dict]:
    """(kind, model in eval mode, extra) of a file written by save_model. torch.load(weights_only=True): a file
    holding pickled code is refused (UnpicklingError), never run."""
    payload = torch.load(io.BytesIO(location.read_bytes()), map_location=map_location, weights_only=True)
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{location}: not a vq2 model file (kind {kind!r}; expected one of {', '.join(KINDS)})")
    return kind, model_from_state(kind, payload["config"], payload["model"]), payload["extra"]


def load_model(location: Location, kind: str, map_location: str | torch.device = "cpu"):
    """(model in eval mode, extra) from a file written by save_model; refuses a file of another kind."""
    found, model, extra = read_model(location, map_location)
    if found != kind:
        raise ValueError(f"{location}: holds a {found!r} model, expected {kind!r}")
    return model, extra
