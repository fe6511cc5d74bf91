"""Ancestral sampling of code grids: a naive reference sampler and a fast cached one.

Both samplers draw position p of sample i by inverse-CDF from one uniform number that is
fixed in advance by that sample's seed, so equal logits give equal codes, a sample can be
reproduced alone from its seed, and the two samplers can be compared code for code.

The fast sampler follows Ramachandran et al. (2017), "Fast Generation for Convolutional
Autoregressive Models": every layer's input is kept in a cache, and each step computes only
the activations that the newest code changes. A horizontal layer recomputes one position from
its causal window; the vertical stack recomputes one row once that row's codes are all known;
attention keys and values are appended to a cache. The total work is about one forward pass
over the grid, against one forward pass per position for the naive sampler.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from models.prior import CodePrior


def sample_uniforms(seeds, sizes: list[int]) -> list[torch.Tensor]:
    """Per-sample uniforms for every level: a list over levels of (B, positions) float64."""
    per_sample = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        per_sample.append([torch.rand(n, generator=generator, dtype=torch.float64) for n in sizes])
    return [torch.stack([u[level] for u in per_sample]) for level in range(len(sizes))]


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int | None = None):
    """Codes (B,) from logits (B, K) by inverse CDF at the given uniforms (B,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.double() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(logits.shape[-1] - 1)


@contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_inputs(prior: CodePrior, labels, uniforms):
    if prior.cfg.num_classes and labels is None:
        raise ValueError("this prior is class-conditional: pass labels")
    if uniforms.shape[1] != prior.cfg.grid[0] * prior.cfg.grid[1]:
        raise ValueError(f"need one uniform per position of the {prior.cfg.grid} grid, got {uniforms.shape[1]}")


@torch.no_grad()
def sample_level_naive(prior: CodePrior, uniforms, labels=None, condition_codes=None,
                       temperature=1.0, top_k=None, max_positions=None) -> torch.Tensor:
    """Reference sampler: one full forward pass of the prior for every position."""
    _check_inputs(prior, labels, uniforms)
    H, W = prior.cfg.grid
    device = prior.embedding.weight.device
    codes = torch.zeros(len(uniforms), H, W, dtype=torch.long, device=device)
    with _eval_mode(prior):
        for p in range(min(H * W, max_positions or H * W)):
            r, c = divmod(p, W)
            logits = prior(codes, labels, condition_codes)[:, :, r, c]
            codes[:, r, c] = draw(logits, uniforms[:, p], temperature, top_k)
    return codes


@torch.no_grad()
def sample_level_fast(prior: CodePrior, uniforms, labels=None, condition_codes=None,
                      temperature=1.0, top_k=None, max_positions=None) -> torch.Tensor:
    """Cached sampler: draws the same codes as sample_level_naive at about one forward pass of cost."""
    _check_inputs(prior, labels, uniforms)
    cfg = prior.cfg
    (H, W), C, half, L = cfg.grid, cfg.channels, cfg.kernel_size // 2, cfg.num_layers
    B, device = len(uniforms), prior.embedding.weight.device
    dtype = prior.embedding.weight.dtype
    left = half + 1  # left padding of the horizontal caches: room for the first layer's shifted window
    # Caches of every layer's inputs, zero-padded the way the full convolutions pad.
    v_in = [torch.zeros(B, C, H + half, W + 2 * half, device=device, dtype=dtype) for _ in range(L)]
    h_in = [torch.zeros(B, C, H, W + left, device=device, dtype=dtype) for _ in range(L)]
    v_pre = [torch.zeros(B, 2 * C, H, W, device=device, dtype=dtype) for _ in range(L)]
    no_row_above = torch.zeros(B, 2 * C, 1, 1, device=device, dtype=dtype)
    d = C // cfg.num_heads
    kv = {
        name: (torch.zeros(B, cfg.num_heads, H * W, d, device=device, dtype=dtype),
               torch.zeros(B, cfg.num_heads, H * W, d, device=device, dtype=dtype))
        for name in prior.attention
    }
    codes = torch.zeros(B, H, W, dtype=torch.long, device=device)
    n = min(H * W, max_positions or H * W)

    with _eval_mode(prior):
        condition = prior.condition_features(condition_codes)
        for r in range(H):
            row_condition = None if condition is None else condition[:, :, r : r + 1]
            biases = [layer.conditioning(labels, row_condition) for layer in prior.layers]  # (B, 4C, 1, W|1)
            for c in range(min(W, n - r * W)):
                p = r * W + c
                for l, layer in enumerate(prior.layers):
                    start = c + (0 if layer.first else 1)
                    window = h_in[l][:, :, r : r + 1, start : start + half + 1]
                    here = h_in[l][:, :, r : r + 1, c + left : c + left + 1]
                    above = v_pre[l][:, :, r - 1 : r, c : c + 1] if r > 0 else no_row_above
                    bias = biases[l]
                    if bias is not None and bias.shape[-1] > 1:
                        bias = bias[..., c : c + 1]
                    h = layer.step_h(window, here, above, bias)  # (B, C, 1, 1)
                    if str(l) in prior.attention:
                        h = _attention_step(prior.attention[str(l)], h, *kv[str(l)], p)
                    if l + 1 < L:
                        h_in[l + 1][:, :, r, c + left] = h[:, :, 0, 0]
                code = draw(prior.head(h)[:, :, 0, 0], uniforms[:, p], temperature, top_k)
                codes[:, r, c] = code
                x = prior.embedding(code) + prior.position[:, r, c]  # (B, C)
                h_in[0][:, :, r, c + left] = x
                v_in[0][:, :, r + half, c + half] = x
            if (r + 1) * W > n:
                break
            # Row r is complete: advance the vertical stack by one row.
            for l, layer in enumerate(prior.layers):
                row_pre, row_next = layer.step_v_row(v_in[l][:, :, r : r + half + 1], biases[l])
                v_pre[l][:, :, r] = row_pre[:, :, 0]
                if l + 1 < L:
                    v_in[l + 1][:, :, r + half, half : half + W] = row_next[:, :, 0]
    return codes


def _attention_step(attention, h, keys, values, p):
    """Attention output at position p, appending its key and value to the caches."""
    x = h[:, :, 0, 0].unsqueeze(1)  # (B, 1, C)
    q, k, v = attention.qkv_heads(x)  # (B, heads, 1, d)
    keys[:, :, p] = k[:, :, 0]
    values[:, :, p] = v[:, :, 0]
    y = F.scaled_dot_product_attention(q, keys[:, :, : p + 1], values[:, :, : p + 1])
    return attention.output(x, y)[:, 0, :, None, None]


@torch.no_grad()
def sample_codes(priors: list[CodePrior], labels, seeds, temperature=1.0, top_k=None, fast=True):
    """Ancestral sampling of every level, top first; each lower level given the levels above.

    temperature and top_k are one value or one per level; seeds holds one integer per sample.
    """
    levels = len(priors)
    temperatures = temperature if isinstance(temperature, (list, tuple)) else [temperature] * levels
    top_ks = top_k if isinstance(top_k, (list, tuple)) else [top_k] * levels
    uniforms = sample_uniforms(seeds, [p.cfg.grid[0] * p.cfg.grid[1] for p in priors])
    sample_level = sample_level_fast if fast else sample_level_naive
    codes = []
    for prior, u, t, k in zip(priors, uniforms, temperatures, top_ks):
        n_above = len(prior.cfg.condition_grids)
        if n_above > len(codes):
            raise ValueError(f"prior {len(codes)} is conditioned on {n_above} levels above; priors go top first")
        condition = codes[len(codes) - n_above :] if n_above else None
        codes.append(sample_level(prior, u, labels, condition, t, k))
    return codes


@torch.no_grad()
def sample_images(vqvae, priors: list[CodePrior], labels, seeds, temperature=1.0, top_k=None, fast=True):
    """Codes of every level (top first) and the images one decoder pass makes of them."""
    codes = sample_codes(priors, labels, seeds, temperature, top_k, fast)
    with _eval_mode(vqvae):
        return codes, vqvae.decode_codes(codes)
