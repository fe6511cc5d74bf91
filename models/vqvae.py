"""Hierarchical VQ-VAE (VQ-VAE-2): multi-level encoder, EMA quantizers, shared decoder."""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.quantizer import VectorQuantizerEMA


@dataclass
class VQVAEConfig:
    in_channels: int = 3
    hidden_channels: int = 128
    residual_channels: int = 64
    num_residual_layers: int = 2
    code_dim: int = 64
    codebook_size: int = 512  # per level
    levels: int = 2
    bottom_downsample: int = 4  # image side / bottom grid side; each level above halves the grid
    beta: float = 0.25
    ema_decay: float = 0.99
    restart_after: int = 100  # steps a code may go unused before it is restarted; 0 = never

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.bottom_downsample < 2 or self.bottom_downsample & (self.bottom_downsample - 1):
            raise ValueError(f"bottom_downsample must be a power of two >= 2, got {self.bottom_downsample}")

    def grid_shapes(self, image_size: int) -> list[tuple[int, int]]:
        """Code grid (H, W) of every level for square images of image_size, top first."""
        # The encoder halves the image that many times: a remainder would be cut off, and the decoder would
        # give back a smaller image than it was given.
        top_downsample = self.bottom_downsample * 2 ** (self.levels - 1)
        if image_size % top_downsample or image_size < top_downsample:
            raise ValueError(f"image size {image_size} does not divide into {self.levels} levels: "
                             f"it must be a multiple of {top_downsample}")
        bottom = image_size // self.bottom_downsample
        return [(bottom // 2**level,) * 2 for level in reversed(range(self.levels))]

    def to_dict(self) -> dict:
        return asdict(self)


def vqvae_imagenet256() -> VQVAEConfig:
    """The paper's ImageNet 256x256 setting: top 32x32, bottom 64x64."""
    return VQVAEConfig()


def vqvae_ffhq1024() -> VQVAEConfig:
    """The paper's FFHQ 1024x1024 setting: 32x32, 64x64 and 128x128."""
    return VQVAEConfig(levels=3, bottom_downsample=8)


def vqvae_tiny() -> VQVAEConfig:
    """A CPU-sized model for tests and the demo (32x32 images: 4x4 top, 8x8 bottom)."""
    return VQVAEConfig(
        hidden_channels=32, residual_channels=16, num_residual_layers=1,
        code_dim=16, codebook_size=64, restart_after=20,
    )


VQVAE_PRESETS = {"imagenet256": vqvae_imagenet256, "ffhq1024": vqvae_ffhq1024, "tiny": vqvae_tiny}


class ResidualStack(nn.Module):
    def __init__(self, channels: int, residual_channels: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, residual_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(residual_channels, channels, 1),
            )
            for _ in range(num_layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return F.relu(x)


def _halvings(factor: int) -> int:
    return int(math.log2(factor))


class Encoder(nn.Module):
    """Strided 4x4 convs down by `downsample`, then 3x3 conv and a residual stack."""

    def __init__(self, in_ch: int, hidden: int, residual: int, num_res: int, downsample: int):
        super().__init__()
        layers, ch = [], in_ch
        for i in range(_halvings(downsample)):
            out = hidden // 2 if i < _halvings(downsample) - 1 else hidden
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
            ch = out
        layers += [nn.Conv2d(ch, hidden, 3, padding=1), ResidualStack(hidden, residual, num_res)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """3x3 conv and a residual stack, then 4x4 transposed convs up by `upsample`."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, residual: int, num_res: int, upsample: int):
        super().__init__()
        layers = [nn.Conv2d(in_ch, hidden, 3, padding=1), ResidualStack(hidden, residual, num_res)]
        ch, n = hidden, _halvings(upsample)
        for i in range(n):
            last = i == n - 1
            out = out_ch if last else hidden // 2
            layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _upsampler(channels: int, factor: int) -> nn.Module:
    """Transposed convs that bring a level's quantized map up to the bottom grid."""
    if factor == 1:
        return nn.Identity()
    return nn.Sequential(*[nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1) for _ in range(_halvings(factor))])


@dataclass
class LevelStats:
    perplexity: torch.Tensor
    usage: torch.Tensor


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W)
    loss: torch.Tensor  # reconstruction + commitment
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor  # summed over levels
    codes: list[torch.Tensor]  # top first, (B, h_l, w_l) each
    levels: list[LevelStats] = field(default_factory=list)  # top first


class VQVAE(nn.Module):
    """VQ-VAE-2 with any number of levels; level 0 is the bottom (finest) in the internals.

    Wiring (paper, section 3.1): encoders run bottom-up, each level above encodes the features
    of the level below at half the resolution. Quantization runs top-down: the top is quantized
    from its features; every lower level is quantized from its encoder features concatenated
    with a decoding of the quantized level above, so it only has to hold what that level lacks.
    The decoder takes every level's quantized map, upsampled to the bottom grid.
    Images are expected in [-1, 1].
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        h, r, n, d, L = cfg.hidden_channels, cfg.residual_channels, cfg.num_residual_layers, cfg.code_dim, cfg.levels
        self.encoders = nn.ModuleList(
            [Encoder(cfg.in_channels, h, r, n, cfg.bottom_downsample)]
            + [Encoder(h, h, r, n, 2) for _ in range(L - 1)]
        )
        # Level l < top sees its features plus the decoded level above (d channels).
        self.pre_quantize = nn.ModuleList(nn.Conv2d(h + (d if l < L - 1 else 0), d, 1) for l in range(L))
        self.quantizers = nn.ModuleList(
            VectorQuantizerEMA(cfg.codebook_size, d, cfg.ema_decay, cfg.beta, restart_after=cfg.restart_after)
            for _ in range(L)
        )
        self.condition_decoders = nn.ModuleList(Decoder(d, d, h, r, n, 2) for _ in range(L - 1))  # level l+1 -> l
        self.upsamplers = nn.ModuleList(_upsampler(d, 2**l) for l in range(L))
        self.decoder = Decoder(L * d, cfg.in_channels, h, r, n, cfg.bottom_downsample)

    def _quantize(self, images: torch.Tensor):
        """Quantizer outputs of every level, bottom first."""
        features = []
        x = images
        for encoder in self.encoders:
            x = encoder(x)
            features.append(x)
        outputs = [None] * self.cfg.levels
        above = None
        for l in reversed(range(self.cfg.levels)):
            z = features[l] if above is None else torch.cat([features[l], above], 1)
            outputs[l] = self.quantizers[l](self.pre_quantize[l](z))
            if l > 0:
                above = self.condition_decoders[l - 1](outputs[l].quantized)
        return outputs

    def _decode_quantized(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Image from quantized maps, bottom first."""
        upsampled = [up(q) for up, q in zip(self.upsamplers, quantized)]
        return self.decoder(torch.cat(upsampled, 1))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        outputs = self._quantize(images)
        reconstruction = self._decode_quantized([o.quantized for o in outputs])
        reconstruction_loss = F.mse_loss(reconstruction, images)
        commitment_loss = sum(o.commitment_loss for o in outputs)
        return VQVAEOutput(
            reconstruction=reconstruction,
            loss=reconstruction_loss + commitment_loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment_loss,
            codes=[o.codes for o in reversed(outputs)],
            levels=[LevelStats(o.perplexity, o.usage) for o in reversed(outputs)],
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Codes of every level, top first: list of (B, h_l, w_l) int64."""
        was_training = self.training
        self.eval()  # never move the codebook while encoding
        try:
            return [o.codes for o in reversed(self._quantize(images))]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Images from codes, top first (the order encode returns)."""
        if len(codes) != self.cfg.levels:
            raise ValueError(f"expected {self.cfg.levels} code grids (top first), got {len(codes)}")
        quantized = [q.lookup(c.long()) for q, c in zip(self.quantizers, reversed(codes))]
        return self._decode_quantized(quantized)
