"""Autoregressive priors over code grids: PixelSNAIL-style top prior, conditional PixelCNN below.

One network serves both roles. Its core is the two-stream gated PixelCNN (van den Oord et al.
2016): a vertical stack sees the rows above, a horizontal stack sees the row so far, so the
receptive field has no blind spot. The top prior adds multi-head causal self-attention over
the raster sequence (PixelSNAIL, Chen et al. 2018); a lower-level prior adds a conditioning
stack over the codes of the levels above. Both are class-conditional.

Every layer is written twice over the same weights: `forward` for the whole grid (training,
naive sampling) and a per-row / per-position form that the fast sampler (models/sampling.py)
drives from its activation caches.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PriorConfig:
    codebook_size: int = 512
    grid: tuple[int, int] = (32, 32)
    num_classes: int = 1000  # 0 = unconditional
    channels: int = 512  # width of both stacks ("hidden units")
    residual_channels: int = 2048  # inner width of each layer's 1x1 feed-forward ("residual units")
    num_layers: int = 20
    kernel_size: int = 5  # odd
    attention_layers: int = 4  # spread evenly over the layers; 0 = a plain gated PixelCNN
    num_heads: int = 8
    dropout: float = 0.1
    # The levels this prior is conditioned on, top first; empty for the top prior.
    condition_grids: tuple[tuple[int, int], ...] = ()
    condition_codebook_sizes: tuple[int, ...] = ()
    condition_channels: int = 512
    condition_residual_blocks: int = 20

    def __post_init__(self):
        self.grid = tuple(self.grid)
        self.condition_grids = tuple(tuple(g) for g in self.condition_grids)
        self.condition_codebook_sizes = tuple(self.condition_codebook_sizes)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if len(self.condition_grids) != len(self.condition_codebook_sizes):
            raise ValueError("condition_grids and condition_codebook_sizes must have the same length")
        if self.attention_layers and self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must divide into num_heads ({self.num_heads})")
        if self.attention_layers > self.num_layers:
            raise ValueError("attention_layers cannot exceed num_layers")

    @property
    def conditional(self) -> bool:
        return len(self.condition_grids) > 0

    def attention_after(self) -> set[int]:
        """Indices of the gated layers that are followed by an attention layer."""
        a, n = self.attention_layers, self.num_layers
        return {(i + 1) * n // a - 1 for i in range(a)} if a else set()

    def to_dict(self) -> dict:
        return asdict(self)


def prior_imagenet256_top() -> PriorConfig:
    """Paper appendix: 32x32 top prior, hidden 512, residual 2048, 20 layers, 4 attention, 8 heads."""
    return PriorConfig()


def prior_imagenet256_bottom() -> PriorConfig:
    """Paper appendix: 64x64 bottom prior, hidden 512, residual 1024, 20 layers, no attention."""
    return PriorConfig(
        grid=(64, 64), residual_channels=1024, attention_layers=0,
        condition_grids=((32, 32),), condition_codebook_sizes=(512,),
    )


def prior_ffhq1024(level: str) -> PriorConfig:
    """FFHQ-1024 priors (top 32, middle 64, bottom 128), sized like the ImageNet ones, unconditional."""
    if level == "top":
        return PriorConfig(num_classes=0)
    grids = {"middle": ((64, 64), ((32, 32),)), "bottom": ((128, 128), ((32, 32), (64, 64)))}
    grid, above = grids[level]
    return PriorConfig(
        grid=grid, num_classes=0, residual_channels=1024, attention_layers=0,
        condition_grids=above, condition_codebook_sizes=(512,) * len(above),
    )


def prior_tiny_top(codebook_size: int = 64, grid=(4, 4), num_classes: int = 10) -> PriorConfig:
    return PriorConfig(
        codebook_size=codebook_size, grid=grid, num_classes=num_classes, channels=32,
        residual_channels=64, num_layers=4, kernel_size=3, attention_layers=2, num_heads=4, dropout=0.0,
    )


def prior_tiny_lower(codebook_size: int = 64, grid=(8, 8), above=((4, 4),), num_classes: int = 10) -> PriorConfig:
    return PriorConfig(
        codebook_size=codebook_size, grid=grid, num_classes=num_classes, channels=32,
        residual_channels=64, num_layers=4, kernel_size=3, attention_layers=0, dropout=0.0,
        condition_grids=above, condition_codebook_sizes=(codebook_size,) * len(above),
        condition_channels=32, condition_residual_blocks=2,
    )


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Row r receives row r-1 (zeros for row 0)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Column c receives column c-1 (zeros for column 0)."""
    return F.pad(x, (1, 0))[..., :-1]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer over the vertical (v) and horizontal (h) streams.

    Vertical: v_pre at row r sees v rows r-k//2..r; it reaches h only shifted one row down.
    Horizontal: h at (r, c) sees h columns c-k//2..c of row r; the first layer shifts its input
    one column right so that a position never sees its own code ("mask A").
    """

    def __init__(self, cfg: PriorConfig, first: bool):
        super().__init__()
        C, R, k = cfg.channels, cfg.residual_channels, cfg.kernel_size
        self.first, self.half = first, k // 2
        self.v_conv = nn.Conv2d(C, 2 * C, (self.half + 1, k))
        self.h_conv = nn.Conv2d(C, 2 * C, (1, self.half + 1))
        self.v_to_h = nn.Conv2d(2 * C, 2 * C, 1)
        self.h_out = nn.Sequential(nn.Conv2d(C, R, 1), nn.ELU(), nn.Conv2d(R, C, 1))
        self.dropout = nn.Dropout(cfg.dropout)
        self.class_bias = nn.Embedding(cfg.num_classes, 4 * C) if cfg.num_classes else None
        self.condition_bias = nn.Conv2d(cfg.condition_channels, 4 * C, 1) if cfg.conditional else None

    def conditioning(self, labels, condition):
        """Gate biases (B, 4C, H or 1, W or 1) from the class and the condition map; None if neither."""
        bias = None
        if self.class_bias is not None:
            bias = self.class_bias(labels)[:, :, None, None]
        if self.condition_bias is not None:
            c = self.condition_bias(condition)
            bias = c if bias is None else bias + c
        return bias

    def forward(self, v, h, bias):
        half = self.half
        v_pre = self.v_conv(F.pad(v, (half, half, half, 0)))  # (B, 2C, H, W)
        h_in = right_shift(h) if self.first else h
        h_pre = self.h_conv(F.pad(h_in, (half, 0))) + self.v_to_h(down_shift(v_pre))
        return self._gate_v(v_pre, bias), self._gate_h(h_pre, h, bias)

    def _gate_v(self, v_pre, bias):
        return gate(v_pre if bias is None else v_pre + bias[:, : bias.shape[1] // 2])

    def _gate_h(self, h_pre, h, bias):
        out = gate(h_pre if bias is None else h_pre + bias[:, bias.shape[1] // 2 :])
        out = self.dropout(self.h_out(out))
        return out if self.first else h + out

    # Incremental forms for the fast sampler: same weights, one row or one position at a time.
    def step_v_row(self, v_rows, bias_row):
        """v_pre and the next v for one row; v_rows: (B, C, k//2+1, W + 2*(k//2)), zero-padded."""
        v_pre = self.v_conv(v_rows)  # (B, 2C, 1, W)
        return v_pre, self._gate_v(v_pre, bias_row)

    def step_h(self, h_window, h_here, v_pre_above, bias_here):
        """h at one position: h_window (B, C, 1, k//2+1) is the causal window of the h input
        (already shifted for the first layer), v_pre_above (B, 2C, 1, 1) is v_pre one row up."""
        h_pre = self.h_conv(h_window) + self.v_to_h(v_pre_above)
        return self._gate_h(h_pre, h_here, bias_here)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the raster sequence; position p attends to positions <= p.

    Attending to itself is causal here because the h stream at p depends only on codes before p.
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        C = cfg.channels
        self.num_heads = cfg.num_heads
        self.norm = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.dropout = cfg.dropout

    def _heads(self, x):  # (B, T, C) -> (B, heads, T, C // heads)
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def qkv_heads(self, x):
        """Queries, keys and values (B, heads, T, d) of a (B, T, C) sequence."""
        return [self._heads(t) for t in self.qkv(self.norm(x)).chunk(3, dim=-1)]

    def output(self, x, y):
        """Residual output from the attended values y (B, heads, T, d)."""
        B, T, C = x.shape
        y = y.transpose(1, 2).reshape(B, T, C)
        return x + F.dropout(self.proj(y), self.dropout, self.training)

    def forward(self, h):
        B, C, H, W = h.shape
        x = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv_heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.output(x, y).transpose(1, 2).reshape(B, C, H, W)


class ConditionStack(nn.Module):
    """Embeds the codes of the levels above and maps them, through residual blocks, onto this grid."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        Cc = cfg.condition_channels
        self.base_grid = cfg.condition_grids[-1]  # the nearest level above
        self.embeddings = nn.ModuleList(nn.Embedding(k, Cc) for k in cfg.condition_codebook_sizes)
        self.conv_in = nn.Conv2d(Cc * len(cfg.condition_grids), Cc, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ELU(), nn.Conv2d(Cc, Cc, 3, padding=1), nn.ELU(), nn.Conv2d(Cc, Cc, 3, padding=1))
            for _ in range(cfg.condition_residual_blocks)
        )
        factor = cfg.grid[0] // self.base_grid[0]
        if factor < 1 or factor & (factor - 1) or cfg.grid[1] != self.base_grid[1] * factor:
            raise ValueError(f"grid {cfg.grid} must be a power-of-two multiple of the level above {self.base_grid}")
        self.upsample = nn.Sequential(
            *[nn.ConvTranspose2d(Cc, Cc, 4, stride=2, padding=1) for _ in range(int(math.log2(factor)))]
        )

    def forward(self, codes_above: list[torch.Tensor]) -> torch.Tensor:
        """(B, condition_channels, H, W) from the code grids of the levels above, top first."""
        maps = [
            F.interpolate(emb(c.long()).permute(0, 3, 1, 2), size=self.base_grid, mode="nearest")
            for emb, c in zip(self.embeddings, codes_above)
        ]
        x = self.conv_in(torch.cat(maps, 1))
        for block in self.blocks:
            x = x + block(x)
        return self.upsample(x)


class CodePrior(nn.Module):
    """Autoregressive prior p(codes | class, levels above) over one level's code grid."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        C, H, W = cfg.channels, *cfg.grid
        self.embedding = nn.Embedding(cfg.codebook_size, C)
        self.position = nn.Parameter(torch.zeros(C, H, W))  # learned; breaks translation symmetry
        self.layers = nn.ModuleList(GatedLayer(cfg, first=(i == 0)) for i in range(cfg.num_layers))
        after = cfg.attention_after()
        self.attention = nn.ModuleDict({str(i): CausalSelfAttention(cfg) for i in sorted(after)})
        self.condition_stack = ConditionStack(cfg) if cfg.conditional else None
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(C, C, 1), nn.ELU(), nn.Conv2d(C, cfg.codebook_size, 1))
        nn.init.normal_(self.position, std=0.02)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H, W) codes -> (B, C, H, W) network input."""
        return self.embedding(codes.long()).permute(0, 3, 1, 2).contiguous() + self.position

    def condition_features(self, condition_codes):
        """The conditioning map for the levels above (None for the top prior)."""
        if self.condition_stack is None:
            return None
        if condition_codes is None:
            raise ValueError("this prior is conditioned on the levels above: pass condition_codes")
        return self.condition_stack(condition_codes)

    def logits_from_input(self, x, labels=None, condition=None) -> torch.Tensor:
        """Logits (B, K, H, W) from the embedded input x and the conditioning map."""
        v = h = x
        for i, layer in enumerate(self.layers):
            v, h = layer(v, h, layer.conditioning(labels, condition))
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return self.head(h)

    def forward(self, codes, labels=None, condition_codes=None) -> torch.Tensor:
        """Logits (B, K, H, W); the logits at a position depend only on codes before it in raster order."""
        self._check_labels(labels)
        return self.logits_from_input(self.embed(codes), labels, self.condition_features(condition_codes))

    def loss(self, codes, labels=None, condition_codes=None) -> torch.Tensor:
        """Mean cross-entropy in nats per code; divide by ln 2 for bits per dimension."""
        return F.cross_entropy(self(codes, labels, condition_codes), codes.long())

    def _check_labels(self, labels):
        if self.cfg.num_classes and labels is None:
            raise ValueError("this prior is class-conditional: pass labels")
