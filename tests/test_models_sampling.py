"""Ancestral sampling: the fast cached sampler draws exactly what the naive one draws."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models.prior import CodePrior, prior_tiny_lower, prior_tiny_top
from models.sampling import draw, sample_codes, sample_images, sample_level_fast, sample_level_naive, sample_uniforms
from models.vqvae import VQVAE, vqvae_tiny


def _priors(kernel_size=3, grid_top=(4, 5)):
    torch.manual_seed(0)
    top_cfg = prior_tiny_top(grid=grid_top)
    lower_cfg = prior_tiny_lower(grid=(2 * grid_top[0], 2 * grid_top[1]), above=(grid_top,))
    top_cfg.kernel_size = lower_cfg.kernel_size = kernel_size
    priors = [CodePrior(top_cfg), CodePrior(lower_cfg)]
    with torch.no_grad():  # peaked, input-dependent logits: a wrong cache shows up as a wrong code
        for prior in priors:
            for p in prior.parameters():
                p.normal_(0, 0.3)
    return priors


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 5), (1.5, None)])
def test_fast_and_naive_samplers_draw_identical_codes(kernel_size, temperature, top_k):
    priors = _priors(kernel_size)
    labels, seeds = torch.tensor([0, 3, 7, 9]), [11, 12, 13, 14]
    naive = sample_codes(priors, labels, seeds, temperature, top_k, fast=False)
    fast = sample_codes(priors, labels, seeds, temperature, top_k, fast=True)
    for a, b in zip(naive, fast):
        assert torch.equal(a, b)
    assert len(torch.unique(fast[0])) > 5 and len(torch.unique(fast[1])) > 5  # not a degenerate draw


def test_partial_sampling_agrees_too():
    top = _priors()[0]
    (u,) = sample_uniforms([1, 2], [20])
    labels = torch.tensor([1, 2])
    for n in (3, 7, 13):
        assert torch.equal(sample_level_naive(top, u, labels, max_positions=n), sample_level_fast(top, u, labels, max_positions=n))


def test_samplers_run_in_full_float32_and_restore_the_settings(monkeypatch):
    # On a GPU, torch's default TF32 convolutions made the naive sampler's logits differ from the fast
    # sampler's float32 matrix products and flipped codes (an H100: 0 of 8 64x64 samples equal).
    top = _priors()[0]
    seen = []
    record = lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    top.register_forward_hook(record)
    step = top.step
    monkeypatch.setattr(top, "step", lambda *a: (record(), step(*a))[1])
    (u,) = sample_uniforms([1], [20])
    defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # both TF32, as a user may set
    try:
        sample_level_naive(top, u, torch.tensor([1]), max_positions=3)
        sample_level_fast(top, u, torch.tensor([1]), max_positions=3)
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults
    assert len(seen) == 6 and set(seen) == {(False, False)}
    assert after == (True, True)


def test_a_sample_is_reproduced_alone_from_its_seed():
    priors = _priors()
    batch = sample_codes(priors, torch.tensor([1, 2, 3]), [101, 102, 103])
    alone = sample_codes(priors, torch.tensor([2]), [102])
    for level_batch, level_alone in zip(batch, alone):
        assert torch.equal(level_batch[1:2], level_alone)
    other = sample_codes(priors, torch.tensor([2]), [999])
    assert not torch.equal(other[0], alone[0])


def _peak_tensor_bytes(fn) -> int:
    """Peak bytes of the tensors allocated while fn runs and not yet freed (torch's memory profiler:
    an allocation counts on the op that made it, a free is a [memory] event of negative size)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("attention_layers", [0, 2])
def test_fast_sampler_memory_does_not_grow_with_rows(attention_layers):
    """The gated layers keep only the rows their kernels still read: sampling 32 rows holds no more
    than sampling 8 rows of the same width, beyond the codes returned and, with attention, one
    key and value per extra position (which attention must keep)."""
    batch, width, labels = 2, 4, torch.tensor([1, 2])
    peaks = {}
    for rows in (32, 8):
        cfg = prior_tiny_top(grid=(rows, width))
        cfg.attention_layers = attention_layers
        torch.manual_seed(0)
        prior = CodePrior(cfg)
        (u,) = sample_uniforms([1, 2], [rows * width])
        peaks[rows] = _peak_tensor_bytes(lambda: sample_level_fast(prior, u, labels))
    extra_positions = (32 - 8) * width
    allowed = batch * extra_positions * (8 + attention_layers * 2 * cfg.channels * 4)  # int64 codes, fp32 k and v
    assert peaks[32] - peaks[8] <= allowed, (peaks, allowed)
    # 8 rows are many more than the k//2 + 1 rows a layer keeps: rows have left its buffers.
    assert torch.equal(sample_level_fast(prior, u, labels), sample_level_naive(prior, u, labels))


def test_draw_honours_top_k_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4000, 4)
    u = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert set(draw(logits, u, top_k=2).tolist()) == {2, 3}
    assert set(draw(logits, u, top_k=1).tolist()) == {3}
    cold, hot = draw(logits, u, temperature=0.25), draw(logits, u, temperature=4.0)
    assert (cold == 3).float().mean() > 0.95 > (hot == 3).float().mean()
    freq = torch.bincount(draw(logits, u), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.03)
    with pytest.raises(ValueError, match="temperature"):
        draw(logits, u, temperature=0)


def test_draw_never_picks_a_code_of_probability_zero():
    # A uniform of exactly 0.0 (probability 2^-53 a draw) used to pick code 0 whatever its probability.
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [-1e4, 0.0, 0.0, 0.0]])
    at_ends = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
    for u in at_ends:
        uniforms = u.expand(2)
        assert draw(logits, uniforms, top_k=2)[0].item() in (1, 2)  # top-2 keeps codes 1 and 2
        assert draw(logits, uniforms)[1].item() != 0  # exp(-1e4) is 0 in float64


def test_sample_images_decodes_every_level():
    torch.manual_seed(0)
    vqvae = VQVAE(vqvae_tiny())
    priors = [CodePrior(prior_tiny_top()), CodePrior(prior_tiny_lower())]
    codes, images = sample_images(vqvae, priors, torch.tensor([0, 1]), [1, 2])
    assert [tuple(c.shape) for c in codes] == [(2, 4, 4), (2, 8, 8)]
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, vqvae.decode_codes(codes))


def test_priors_out_of_order_are_rejected():
    priors = _priors()
    with pytest.raises(ValueError, match="top first"):
        sample_codes(priors[::-1], torch.tensor([0]), [0])
