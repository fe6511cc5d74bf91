"""The priors: causality (by gradients), conditioning, paper presets, and that they learn."""

import math

import pytest
import torch

from models.prior import (
    CodePrior,
    PriorConfig,
    prior_ffhq1024,
    prior_imagenet256_bottom,
    prior_imagenet256_top,
    prior_tiny_lower,
    prior_tiny_top,
)


def _randomised(prior: CodePrior) -> CodePrior:
    """Weights large enough that no dependence vanishes by accident; eval mode, no dropout."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.2)
    return prior.eval()


def _condition(prior: CodePrior, batch: int):
    if not prior.cfg.conditional:
        return None
    return [torch.randint(k, (batch, *g)) for g, k in zip(prior.cfg.condition_grids, prior.cfg.condition_codebook_sizes)]


def _assert_causal(prior: CodePrior):
    H, W = prior.cfg.grid
    codes = torch.randint(prior.cfg.codebook_size, (1, H, W))
    labels = torch.tensor([3])
    condition = prior.condition_features(_condition(prior, 1))
    x = prior.embed(codes).detach().requires_grad_(True)
    logits = prior.logits_from_input(x, labels, condition)  # (1, K, H, W)
    for i in range(H * W):
        r, c = divmod(i, W)
        (grad,) = torch.autograd.grad(logits[0, :, r, c].sum(), x, retain_graph=True)
        seen = grad.abs().sum(1)[0].flatten()  # (H*W,) dependence on each input position
        assert torch.all(seen[i:] == 0), f"logits at {i} depend on positions {seen[i:].nonzero().flatten() + i}"
        if c > 0:
            assert seen[i - 1] > 0, f"logits at {i} ignore their left neighbour"
        if r > 0:
            assert seen[i - W] > 0, f"logits at {i} ignore the position above (blind spot)"


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_top_prior_with_attention_is_causal(kernel_size):
    cfg = prior_tiny_top(grid=(5, 6))
    cfg.kernel_size = kernel_size
    prior = _randomised(CodePrior(cfg))
    assert len(prior.attention) == 2
    _assert_causal(prior)


def test_lower_prior_is_causal():
    _assert_causal(_randomised(CodePrior(prior_tiny_lower(grid=(6, 6), above=((3, 3),)))))


def test_lower_prior_sees_the_whole_condition():
    """Every position of the level above reaches even the first position's logits."""
    prior = _randomised(CodePrior(prior_tiny_lower(grid=(8, 8), above=((4, 4),))))
    codes = torch.randint(64, (1, 8, 8))
    labels = torch.tensor([0])
    (above,) = _condition(prior, 1)
    base = prior(codes, labels, [above])[0, :, 0, 0]
    for j in range(16):
        changed = above.clone()
        changed.view(-1)[j] = (changed.view(-1)[j] + 1) % 64
        assert not torch.allclose(prior(codes, labels, [changed])[0, :, 0, 0], base), f"condition position {j} unseen"


@pytest.mark.parametrize("make", [prior_tiny_top, prior_tiny_lower])
def test_every_gradient_has_its_parameters_layout(make):
    """DDP reduces gradients into buckets laid out like the parameters; a gradient in another layout (a
    channels-last one, from a permuted input) makes it warn "Grad strides do not match bucket view strides" and
    copy every step."""
    prior = CodePrior(make())
    codes = torch.randint(64, (2, *prior.cfg.grid))
    prior.loss(codes, torch.tensor([1, 2]), _condition(prior, 2)).backward()
    for name, param in prior.named_parameters():
        assert param.grad.stride() == param.stride(), name


def test_class_label_changes_the_first_logits():
    prior = _randomised(CodePrior(prior_tiny_top()))
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    logits = prior(codes, torch.tensor([0, 1]))
    assert not torch.allclose(logits[0, :, 0, 0], logits[1, :, 0, 0])


def test_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="labels"):
        CodePrior(prior_tiny_top())(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="condition_codes"):
        CodePrior(prior_tiny_lower())(torch.zeros(1, 8, 8, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="odd"):
        PriorConfig(kernel_size=4)
    with pytest.raises(ValueError, match="power-of-two"):
        CodePrior(prior_tiny_lower(grid=(8, 8), above=((3, 3),)))
    with pytest.raises(ValueError, match="power-of-two"):  # built, then a shape error at the first forward
        CodePrior(prior_tiny_lower(grid=(5, 4), above=((2, 2),)))


@pytest.mark.parametrize(
    "cfg, above",
    [
        (prior_imagenet256_top(), []),
        (prior_imagenet256_bottom(), [(32, 32)]),
        (prior_ffhq1024("top"), []),
        (prior_ffhq1024("bottom"), [(32, 32), (64, 64)]),
    ],
)
def test_paper_presets_build_with_the_paper_shapes(cfg, above):
    with torch.device("meta"):
        prior = CodePrior(cfg)
        codes = torch.zeros(1, *cfg.grid, dtype=torch.long)
        labels = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        condition = [torch.zeros(1, *g, dtype=torch.long) for g in above] or None
        assert prior(codes, labels, condition).shape == (1, 512, *cfg.grid)
    assert cfg.channels == 512 and cfg.num_layers == 20


def test_imagenet_top_prior_matches_the_paper_table():
    cfg = prior_imagenet256_top()
    assert (cfg.channels, cfg.residual_channels, cfg.num_layers) == (512, 2048, 20)
    assert (cfg.attention_layers, cfg.num_heads, cfg.kernel_size, cfg.dropout) == (4, 8, 5, 0.1)
    assert len(cfg.attention_after()) == 4
    bottom = prior_imagenet256_bottom()
    assert (bottom.residual_channels, bottom.attention_layers, bottom.condition_residual_blocks) == (1024, 0, 20)


def test_prior_learns_below_the_uniform_baseline():
    """A few hundred steps on structured codes take the NLL well under log2(K) bits."""
    torch.manual_seed(0)
    prior = CodePrior(prior_tiny_top(codebook_size=16, grid=(4, 4), num_classes=2))
    # Class 0: rows of a constant code; class 1: a checkerboard of two codes.
    rows = torch.arange(4)[None, :, None].expand(32, 4, 4) + torch.randint(4, (32, 1, 1)) * 4
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 7 + torch.randint(2, (32, 1, 1))
    codes = torch.cat([rows, checker]) % 16
    labels = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        loss = prior.loss(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bits = loss.item() / math.log(2)
    assert bits < 0.5 * math.log2(16), bits
