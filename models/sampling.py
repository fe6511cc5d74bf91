"""Ancestral sampling of code grids: a naive reference sampler and a fast cached one.

Both samplers draw position p of sample i by inverse-CDF from one uniform number that is
fixed in advance by that sample's seed, so equal logits give equal codes, a sample can be
reproduced alone from its seed, and the two samplers can be compared code for code.

The fast sampler follows Ramachandran et al. (2017), "Fast Generation for Convolutional
Autoregressive Models": each step computes only the activations that the newest code changes.
A horizontal layer computes one position from its causal window; the vertical stack advances
one row once that row's codes are all known; attention appends one key and value. The layers
own these caches and steps (models/prior.py: `CodePrior.start_sampling`, `step`, `end_row`);
a gated layer keeps only the rows its kernels still read, so its memory does not grow with the
grid's height. The total work is about one forward pass over the grid, against one forward pass
per position for the naive sampler.
"""

from contextlib import contextmanager

import torch

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
    logits = logits.double()
    if temperature != 1:
        logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    # Above 0, so that a uniform of exactly 0 cannot pick a leading code of probability 0 (masked by top-k).
    target = (uniforms * cdf[:, -1]).clamp_min(torch.finfo(cdf.dtype).tiny).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(logits.shape[-1] - 1)


@contextmanager
def full_float32():
    """CUDA convolutions and matrix products in full float32 (TF32 off) inside the block, restored after.

    The naive sampler's logits come from convolutions and the fast sampler's from matrix products.
    torch's defaults run CUDA convolutions in TF32 (10-bit mantissa) but matrix products in float32,
    and that difference flips codes: on an H100, 0 of 8 samples of a 64x64 prior came out equal.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _start_level(prior: CodePrior, uniforms, labels, max_positions) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The checked inputs of a sampler: uniforms on the prior's device, a (B, H, W) grid of codes to fill,
    and how many positions to draw."""
    if prior.cfg.num_classes and labels is None:
        raise ValueError("this prior is class-conditional: pass labels")
    H, W = prior.cfg.grid
    if uniforms.shape[1] != H * W:
        raise ValueError(f"need one uniform per position of the {prior.cfg.grid} grid, got {uniforms.shape[1]}")
    device = prior.embedding.weight.device
    codes = torch.zeros(len(uniforms), H, W, dtype=torch.long, device=device)
    return uniforms.to(device), codes, min(H * W, max_positions or H * W)


@torch.no_grad()
def sample_level_naive(prior: CodePrior, uniforms, labels=None, condition_codes=None,
                       temperature=1.0, top_k=None, max_positions=None) -> torch.Tensor:
    """Reference sampler: one full forward pass of the prior for every position."""
    uniforms, codes, n = _start_level(prior, uniforms, labels, max_positions)
    with _eval_mode(prior), full_float32():
        for p in range(n):
            r, c = divmod(p, prior.cfg.grid[1])
            logits = prior(codes, labels, condition_codes)[:, :, r, c]
            codes[:, r, c] = draw(logits, uniforms[:, p], temperature, top_k)
    return codes


@torch.no_grad()
def sample_level_fast(prior: CodePrior, uniforms, labels=None, condition_codes=None,
                      temperature=1.0, top_k=None, max_positions=None) -> torch.Tensor:
    """Cached sampler: draws the same codes as sample_level_naive at about one forward pass of cost."""
    uniforms, codes, n = _start_level(prior, uniforms, labels, max_positions)
    H, W = prior.cfg.grid
    with _eval_mode(prior), full_float32(), _sampling(prior, len(uniforms)):
        condition = prior.condition_features(condition_codes)
        for r in range(H):
            prior.start_row(r, labels, condition)
            for c in range(min(W, n - r * W)):
                code = draw(prior.step(r, c), uniforms[:, r * W + c], temperature, top_k)
                codes[:, r, c] = code
                prior.write_code(r, c, code)
            if (r + 1) * W >= n:
                break
            prior.end_row(r, codes[:, r])
    return codes


@contextmanager
def _sampling(prior: CodePrior, batch: int):
    prior.start_sampling(batch)
    try:
        yield
    finally:
        prior.stop_sampling()


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
