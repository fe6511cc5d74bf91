"""The networks of VQ-VAE-2 in plain PyTorch: no Ray, MLflow or fsspec here."""

from models.classifier import ClassifierConfig, ResNetClassifier, classifier_tiny
from models.prior import (
    CodePrior,
    PriorConfig,
    prior_ffhq1024,
    prior_imagenet256_bottom,
    prior_imagenet256_top,
    prior_tiny_lower,
    prior_tiny_top,
)
from models.quantizer import VectorQuantizerEMA
from models.sampling import sample_codes, sample_images, sample_level_fast, sample_level_naive
from models.vqvae import VQVAE, VQVAE_PRESETS, VQVAEConfig, vqvae_ffhq1024, vqvae_imagenet256, vqvae_tiny

__all__ = [
    "VQVAE", "VQVAEConfig", "VQVAE_PRESETS", "vqvae_imagenet256", "vqvae_ffhq1024", "vqvae_tiny",
    "VectorQuantizerEMA",
    "CodePrior", "PriorConfig", "prior_imagenet256_top", "prior_imagenet256_bottom", "prior_ffhq1024",
    "prior_tiny_top", "prior_tiny_lower",
    "sample_codes", "sample_images", "sample_level_fast", "sample_level_naive",
    "ResNetClassifier", "ClassifierConfig", "classifier_tiny",
]
