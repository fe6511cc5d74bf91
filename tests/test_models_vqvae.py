"""The hierarchical VQ-VAE: paper grid shapes, wiring, encode/decode, and that it learns."""

import pytest
import torch
import torch.nn.functional as F

from models.vqvae import VQVAE, VQVAEConfig, vqvae_ffhq1024, vqvae_imagenet256, vqvae_tiny


@pytest.mark.parametrize(
    "preset, size, grids",
    [
        (vqvae_imagenet256, 256, [(32, 32), (64, 64)]),
        (vqvae_ffhq1024, 1024, [(32, 32), (64, 64), (128, 128)]),
        (vqvae_tiny, 32, [(4, 4), (8, 8)]),
    ],
)
def test_presets_have_the_paper_grids(preset, size, grids):
    cfg = preset()
    assert cfg.grid_shapes(size) == grids
    with torch.device("meta"):  # the paper's sizes without allocating them
        model = VQVAE(cfg)
        images = torch.empty(1, 3, size, size)
        codes = model.encode(images)
        assert [tuple(c.shape[1:]) for c in codes] == grids
        assert all(c.dtype == torch.long for c in codes)
        assert model.decode_codes(codes).shape == images.shape
        out = model.eval()(images)
        assert out.reconstruction.shape == images.shape and len(out.levels) == cfg.levels


def test_imagenet_preset_matches_the_paper_hyperparameters():
    cfg = vqvae_imagenet256()
    assert (cfg.codebook_size, cfg.code_dim, cfg.hidden_channels, cfg.residual_channels) == (512, 64, 128, 64)
    assert (cfg.num_residual_layers, cfg.beta, cfg.ema_decay) == (2, 0.25, 0.99)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_any_number_of_levels_round_trips_on_cpu(levels):
    torch.manual_seed(0)
    cfg = VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, code_dim=8,
                      codebook_size=16, levels=levels, bottom_downsample=2)
    model = VQVAE(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    codes = model.encode(x)
    assert [tuple(c.shape[1:]) for c in codes] == cfg.grid_shapes(16)
    assert model.decode_codes(codes).shape == x.shape
    model.eval()  # in eval mode forward quantizes with the same codebook as encode
    assert torch.allclose(model(x).reconstruction, model.decode_codes(codes), atol=1e-5)
    assert all(s.perplexity >= 1 and 0 < s.usage <= 1 for s in out.levels)


def test_lower_level_sees_the_decoded_level_above():
    """Changing only the top codes' path changes the bottom codes: the bottom is quantized
    from its features concatenated with the decoded top."""
    torch.manual_seed(0)
    model = VQVAE(vqvae_tiny()).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    before = model.encode(x)
    with torch.no_grad():
        model.condition_decoders[0].net[-1].bias.add_(5.0)
    after = model.encode(x)
    assert torch.equal(before[0], after[0])  # the top does not depend on the level below
    assert not torch.equal(before[1], after[1])


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="bottom_downsample"):
        VQVAEConfig(bottom_downsample=3)
    with pytest.raises(ValueError, match="levels"):
        VQVAEConfig(levels=0)
    with pytest.raises(ValueError, match="does not divide"):
        VQVAEConfig(levels=3).grid_shapes(8)
    # 34 px floored to 8x8 bottom codes, and the decoder gave back 32x32 images (a shape error in the loss).
    with pytest.raises(ValueError, match="multiple of 8"):
        vqvae_tiny().grid_shapes(34)
    with pytest.raises(ValueError, match="code grids"):
        VQVAE(vqvae_tiny()).decode_codes([torch.zeros(1, 4, 4, dtype=torch.long)])


def _smooth_images(n: int) -> torch.Tensor:
    """Low-frequency colour fields with sharp vertical stripes: structured, not noise."""
    g = torch.Generator().manual_seed(0)
    fields = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear", align_corners=False)
    stripes = 0.3 * torch.sign(torch.sin(torch.linspace(0, 12, 32)))[None, None, None, :]
    return (fields + stripes).clamp(-1, 1)


def test_tiny_vqvae_overfits_a_small_batch():
    torch.manual_seed(0)
    x = _smooth_images(8)
    model = VQVAE(vqvae_tiny())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        out = model(x)
        first = first if first is not None else out.reconstruction_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    final = F.mse_loss(model.decode_codes(model.encode(x)), x).item()
    assert final < first / 10, (first, final)
    assert all(s.usage > 0.1 for s in model(x).levels)  # restarts keep the codebooks in use
