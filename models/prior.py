"""Autoregressive priors over code grids: PixelSNAIL-style top prior, conditional PixelCNN below.

One network serves both roles. Its core is the two-stream gated PixelCNN (van den Oord et al.
2016): a vertical stack sees the rows above, a horizontal stack sees the row so far, so the
receptive field has no blind spot. The top prior adds multi-head causal self-attention over
the raster sequence (PixelSNAIL, Chen et al. 2018); a lower-level prior adds a conditioning
stack over the codes of the levels above. Both are class-conditional.

Every layer is written twice over the same weights: `forward` for the whole grid (training,
naive sampling) and a per-position `step` (with a per-row part for the vertical stack) that the
fast sampler (models/sampling.py) drives. While sampling, a gated layer owns a cache of only the
rows its kernels still read, and an attention layer owns the keys and values of the positions so far.
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
        self.cache = None  # a GatedLayerCache while sampling

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

    # Sampling, one position at a time (models/sampling.py): the layer keeps in its cache only the
    # rows its kernels still read, so the cache does not grow with the number of rows.
    def start_sampling(self, batch: int, width: int, device, dtype) -> None:
        self.cache = GatedLayerCache(self, batch, width, device, dtype)

    def stop_sampling(self) -> None:
        self.cache = None

    def start_row(self, bias) -> None:
        """Fix what the row's h pre-activations share before its first code: the v stack one row
        up (down-shifted into h) with the convolutions' biases, and the class and condition biases."""
        cache = self.cache
        if bias is None:
            h_bias = cache.h_from_above.clone()  # (W, B, 2C)
        else:
            h_bias = cache.h_from_above + bias[:, bias.shape[1] // 2 :, 0].permute(2, 0, 1)  # (W or 1, B, 2C)
        cache.h_bias = h_bias.unbind(0)  # one (B, 2C) per column, the row's own: step adds into it
        cache.row_bias = bias

    def write(self, column: int, x: torch.Tensor) -> None:
        """Store this layer's h input x (B, C) at a column of the current row."""
        self.cache.input_at[column].copy_(x)

    def step(self, column: int) -> torch.Tensor:
        """This layer's h output (B, C) at a column of the current row, from the inputs written so far.

        The first layer's window ends one column before (mask A), so its input at the column may
        be written after the step; every other layer's window ends at the column itself.
        """
        cache = self.cache
        h_pre = cache.h_bias[column].addmm_(cache.window_at[column], cache.h_weight)  # (B, 2C)
        h_pre[:, : h_pre.shape[1] // 2].tanh_()
        gated = F.glu(h_pre, 1)  # gate(h_pre) in two ops: tanh(a) * sigmoid(b)
        inner = F.elu(torch.addmm(cache.in_bias, gated, cache.in_weight), inplace=True)  # (B, R)
        out = torch.addmm(cache.out_bias, inner, cache.out_weight)  # (B, C)
        return out if self.first else out.add_(cache.input_at[column])

    def end_row(self, v_row: torch.Tensor) -> torch.Tensor:
        """Advance the vertical stack by the completed row's v input (B, C, W); returns the next
        layer's v input for that row (B, C, W)."""
        cache, half = self.cache, self.half
        padded = F.pad(v_row, (half, half))[:, :, None]  # (B, C, 1, W + 2*half)
        cache.v_inputs = torch.cat([cache.v_inputs[:, :, 1:], padded], 2)  # the last k//2+1 rows
        v_pre = self.v_conv(cache.v_inputs)  # (B, 2C, 1, W)
        B, C2, _, W = v_pre.shape
        columns = v_pre[:, :, 0].permute(2, 0, 1).reshape(W * B, C2)
        cache.h_from_above = torch.addmm(cache.fixed_h_bias, columns, cache.v_to_h_weight).view(W, B, C2)
        return self._gate_v(v_pre, cache.row_bias)[:, :, 0]


class GatedLayerCache:
    """A gated layer's sampling state: only the rows its kernels still read, and its weights as matrices.

    h_inputs (B, k//2 + 1 + W, C): the current row's h inputs, channels last, with k//2 + 1 zero
    columns on the left (the first layer's window is shifted one column further left).
    v_inputs (B, C, k//2 + 1, W + 2*(k//2)): the last k//2 + 1 rows of v inputs, zero-padded.
    h_from_above (W, B, 2C): the next row's h pre-activations from the row above and the biases.
    """

    def __init__(self, layer: GatedLayer, batch: int, width: int, device, dtype):
        C, half = layer.v_conv.in_channels, layer.half
        left = half + 1
        self.h_inputs = torch.zeros(batch, left + width, C, device=device, dtype=dtype)
        self.v_inputs = torch.zeros(batch, C, half + 1, width + 2 * half, device=device, dtype=dtype)
        # v_to_h on the row above as a matrix product, with the biases every h pre-activation has.
        self.v_to_h_weight = layer.v_to_h.weight.flatten(1).t()
        self.fixed_h_bias = layer.v_to_h.bias + layer.h_conv.bias
        self.h_from_above = self.fixed_h_bias.expand(width, batch, -1)  # row 0: zeros above
        self.h_bias = self.row_bias = None  # set by start_row
        # Views made once: each column's input slot (B, C) and causal window (B, (k//2 + 1) * C).
        # Index j of h_inputs holds input column j - left; a window spans k//2 + 1 columns and ends
        # at its own column (one column before it in the first layer: mask A).
        shift = 0 if layer.first else 1
        self.input_at = [self.h_inputs[:, left + c] for c in range(width)]
        self.window_at = [self.h_inputs[:, c + shift : c + shift + half + 1].flatten(1) for c in range(width)]
        # The convolutions on a window as matrix products: (k//2+1) * C -> 2C, C -> R -> C.
        self.h_weight = layer.h_conv.weight[:, :, 0].permute(0, 2, 1).flatten(1).t()  # in the window's (column, C) order
        inner, outer = layer.h_out[0], layer.h_out[2]
        self.in_weight, self.in_bias = inner.weight.flatten(1).t(), inner.bias
        self.out_weight, self.out_bias = outer.weight.flatten(1).t(), outer.bias


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
        # While sampling: keys (B * heads, C // heads, positions), values (B * heads, positions, C // heads),
        # a view of each position's slot in them, and the projections as matrices.
        self.keys = self.values = self.key_at = self.value_at = None
        self.qkv_weight = self.qkv_bias = self.proj_weight = None

    def forward(self, h):
        B, C, H, W = h.shape
        x = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (t.view(B, H * W, self.num_heads, -1).transpose(1, 2)  # (B, heads, HW, d)
                   for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = F.dropout(self.proj(y.transpose(1, 2).reshape(B, H * W, C)), self.dropout, self.training)
        return (x + y).transpose(1, 2).reshape(B, C, H, W)

    # Sampling, one position at a time: keys and values of every position so far are cached.
    def start_sampling(self, batch: int, positions: int, device, dtype) -> None:
        C, heads = self.qkv.in_features, self.num_heads
        d = C // heads
        # The scores' 1/sqrt(d) folded into the query rows of the projection.
        scale = torch.ones(3 * C, device=device, dtype=dtype)
        scale[:C] = d ** -0.5
        self.qkv_weight, self.qkv_bias = (self.qkv.weight * scale[:, None]).t(), self.qkv.bias * scale
        self.proj_weight = self.proj.weight.t()
        # Keys transposed, so that a query's scores over all positions are one batched matrix product.
        self.keys = torch.zeros(batch * heads, d, positions, device=device, dtype=dtype)
        self.values = torch.zeros(batch * heads, positions, d, device=device, dtype=dtype)
        # Views made once: each position's key and value slot (B, heads, d).
        self.key_at = [self.keys[:, :, p].view(batch, heads, d) for p in range(positions)]
        self.value_at = [self.values[:, p].view(batch, heads, d) for p in range(positions)]

    def stop_sampling(self) -> None:
        self.keys = self.values = self.key_at = self.value_at = None
        self.qkv_weight = self.qkv_bias = self.proj_weight = None

    def step(self, h: torch.Tensor, position: int) -> torch.Tensor:
        """Output (B, C) at a raster position from its input h (B, C), caching its key and value."""
        B, C = h.shape
        x = F.layer_norm(h, (C,), self.norm.weight, self.norm.bias, self.norm.eps)
        q, k, v = torch.addmm(self.qkv_bias, x, self.qkv_weight).view(B, 3, self.num_heads, -1).unbind(1)
        self.key_at[position].copy_(k)
        self.value_at[position].copy_(v)
        n = position + 1
        scores = torch.bmm(q.reshape(B * self.num_heads, 1, -1), self.keys[:, :, :n])  # (B * heads, 1, n)
        y = torch.bmm(scores.softmax(-1), self.values[:, :n])  # (B * heads, 1, d)
        return torch.addmm(self.proj.bias, y.view(B, C), self.proj_weight).add_(h)


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
        if factor < 1 or factor & (factor - 1) or cfg.grid != (self.base_grid[0] * factor, self.base_grid[1] * factor):
            raise ValueError(f"grid {cfg.grid} must be a power-of-two multiple of the level above {self.base_grid}")
        self.upsample = nn.Sequential(
            *[nn.ConvTranspose2d(Cc, Cc, 4, stride=2, padding=1) for _ in range(int(math.log2(factor)))]
        )

    def forward(self, codes_above: list[torch.Tensor]) -> torch.Tensor:
        """(B, condition_channels, H, W) from the code grids of the levels above, top first."""
        # contiguous: a permuted (channels-last) input gives every convolution below channels-last weight
        # gradients, which DDP's buckets (laid out like the parameters) must copy, with a warning, every step.
        maps = [
            F.interpolate(emb(c.long()).permute(0, 3, 1, 2).contiguous(), size=self.base_grid, mode="nearest")
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
        # While sampling: each gated layer with the attention after it (or None), and the head's
        # 1x1 convolutions as matrices.
        self.sampling_stack = self.head_weights = None
        nn.init.normal_(self.position, std=0.02)

    def embed(self, codes: torch.Tensor, rows: slice = slice(None), columns: slice = slice(None)) -> torch.Tensor:
        """(B, h, w) codes at the given rows and columns of the grid -> (B, C, h, w) network input."""
        return self.embedding(codes.long()).permute(0, 3, 1, 2).contiguous() + self.position[:, rows, columns]

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

    # Sampling, one position at a time in raster order (models/sampling.py drives these). Every
    # layer keeps its own cache; the work done is about one forward pass over the grid.
    def start_sampling(self, batch: int) -> None:
        (H, W), device, dtype = self.cfg.grid, self.embedding.weight.device, self.embedding.weight.dtype
        for layer in self.layers:
            layer.start_sampling(batch, W, device, dtype)
        for attention in self.attention.values():
            attention.start_sampling(batch, H * W, device, dtype)
        self.sampling_stack = [(layer, self.attention[str(i)] if str(i) in self.attention else None)
                               for i, layer in enumerate(self.layers)]
        self.head_weights = [(conv.weight.flatten(1).t(), conv.bias) for conv in (self.head[1], self.head[3])]

    def stop_sampling(self) -> None:
        for layer in self.layers:
            layer.stop_sampling()
        for attention in self.attention.values():
            attention.stop_sampling()
        self.sampling_stack = self.head_weights = None

    def start_row(self, row: int, labels=None, condition=None) -> None:
        """Prepare every layer for a row; condition is the whole conditioning map (or None)."""
        row_condition = None if condition is None else condition[:, :, row : row + 1]
        for layer in self.layers:
            layer.start_row(layer.conditioning(labels, row_condition))

    def step(self, row: int, column: int) -> torch.Tensor:
        """Logits (B, K) at a position, given every code before it (written with write_code)."""
        h, position = None, row * self.cfg.grid[1] + column
        for layer, attention in self.sampling_stack:
            if h is not None:
                layer.write(column, h)
            h = layer.step(column)
            if attention is not None:
                h = attention.step(h, position)
        (w1, b1), (w2, b2) = self.head_weights
        return torch.addmm(b2, F.elu(torch.addmm(b1, F.elu(h), w1)), w2)

    def write_code(self, row: int, column: int, code: torch.Tensor) -> None:
        """Feed the code (B,) drawn at a position to the first layer's horizontal stack."""
        x = self.embed(code[:, None, None], slice(row, row + 1), slice(column, column + 1))  # (B, C, 1, 1)
        self.layers[0].write(column, x.flatten(1))

    def end_row(self, row: int, codes: torch.Tensor) -> None:
        """Advance every layer's vertical stack by the completed row's codes (B, W)."""
        v = self.embed(codes[:, None], slice(row, row + 1))[:, :, 0]  # (B, C, W)
        for layer in self.layers:
            v = layer.end_row(v)

    def _check_labels(self, labels):
        if self.cfg.num_classes and labels is None:
            raise ValueError("this prior is class-conditional: pass labels")
