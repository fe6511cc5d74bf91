"""The EMA vector quantizer: nearest neighbours, EMA, restarts, straight-through, DDP sync."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.quantizer import VectorQuantizerEMA
from models.vqvae import VQVAE, vqvae_tiny


def test_codes_are_true_nearest_neighbours():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=37, dim=8).eval()
    z = torch.randn(3, 8, 5, 6)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(flat, vq.codebook).argmin(1).view(3, 5, 6)
    assert torch.equal(out.codes, expected)
    assert torch.allclose(out.quantized, vq.lookup(expected))


def test_ema_moves_codes_toward_assigned_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=4, dim=2, decay=0.9).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.initialized.fill_(True)  # keep the hand-set codebook (no draw from the first batch)
    target = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [9.0, 9.0]])
    z = (target[:, :, None, None] + 0.01 * torch.randn(4, 2, 8, 8)).permute(1, 0, 2, 3).reshape(1, 2, 4 * 8, 8)
    before = (vq.codebook - target).norm(dim=1)
    for _ in range(30):
        vq(z)
    after = (vq.codebook - target).norm(dim=1)
    assert (after < 0.2 * before).all(), (before, after)


def test_first_training_batch_initialises_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=16, dim=4).train()
    z = 0.01 * torch.randn(2, 4, 4, 4) + 5.0  # far from the N(0, 1) initial codebook
    out = vq(z)
    inputs = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(vq.codebook, inputs).min(1).values.max() < 0.05
    assert out.usage > 0.25 and bool(vq.initialized)
    resumed = VectorQuantizerEMA(num_codes=16, dim=4)
    resumed.load_state_dict(vq.state_dict())  # a resumed model keeps its codebook: no second draw
    assigned = resumed.train()(z + 1.0).codes.unique()
    moved = (resumed.codebook - vq.codebook).norm(dim=1) > 1e-4
    assert set(moved.nonzero().flatten().tolist()) <= set(assigned.tolist())  # only the EMA step moved codes


def test_eval_mode_leaves_codebook_alone():
    vq = VectorQuantizerEMA(num_codes=8, dim=4).eval()
    before = vq.codebook.clone()
    vq(torch.randn(2, 4, 3, 3))
    assert torch.equal(vq.codebook, before)


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=16, dim=4, restart_after=3).train()
    vq.codebook.zero_()
    vq.codebook[1:] += 100.0  # only code 0 is ever nearest to the data below
    vq.ema_sum.copy_(vq.codebook)
    vq.initialized.fill_(True)
    z = torch.randn(2, 4, 4, 4)
    for _ in range(2):
        assert vq(z).usage.item() == pytest.approx(1 / 16)
    vq(z)  # the third unused step restarts codes 1..15
    inputs = z.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = vq.codebook[1:]
    assert torch.cdist(restarted, inputs).min(1).values.max() < 1e-3  # every one is an input vector
    assert (vq.steps_unused == 0).all()
    assert vq(z).usage.item() > 1 / 16


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(3, 4, 1)
    vq = VectorQuantizerEMA(num_codes=8, dim=4).train()
    out = vq(encoder(torch.randn(2, 3, 4, 4)))
    (out.quantized.sum() + out.commitment_loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_commitment_loss_is_beta_times_distance():
    vq = VectorQuantizerEMA(num_codes=8, dim=4, beta=0.25).eval()
    z = torch.randn(2, 4, 3, 3)
    out = vq(z)
    assert out.commitment_loss.item() == pytest.approx(0.25 * F.mse_loss(z, vq.lookup(out.codes)).item(), rel=1e-5)


def _near_tie_inputs(pairs: int = 64, dim: int = 16):
    """A codebook of close pairs far from the origin, and one input beside each pair.

    Each input is nearer to one code of its pair by about 0.01 in squared distance, while
    |z| . |e| is about 1,600: bf16 (8 bits of mantissa) cannot tell the two codes apart.
    """
    g = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.randn(pairs, dim, generator=g)
    offsets = 0.05 * torch.randn(pairs, dim, generator=g)
    codebook = torch.stack([centres + offsets, centres - offsets], 1).reshape(2 * pairs, dim)
    z = centres + 0.1 * torch.randn(pairs, dim, generator=g)
    return codebook, z.T.reshape(1, dim, 8, pairs // 8)


def test_nearest_codes_are_searched_in_fp32_under_bf16_autocast():
    codebook, z = _near_tie_inputs()
    vq = VectorQuantizerEMA(num_codes=len(codebook), dim=codebook.shape[1]).eval()
    vq.codebook.copy_(codebook)
    fp32 = vq(z).codes
    flat = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert torch.equal(fp32.flatten(), torch.cdist(flat.double(), codebook.double()).argmin(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq(z).codes, fp32)
        assert torch.equal(vq.nearest_codes(flat), fp32.flatten())


def test_decoder_and_commitment_see_the_codebook_that_assigned():
    """In training the EMA step and restarts run after the lookup, on the next step's codebook."""
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=8, dim=2, decay=0.5, restart_after=1).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]] + [[100.0, 100.0]] * 5))
    vq.ema_sum.copy_(vq.codebook)
    vq.initialized.fill_(True)
    z = torch.tensor([[3.0, 1.0], [8.0, 2.0], [1.0, 7.0], [2.0, 2.0]]).T.reshape(1, 2, 2, 2)
    assigning = vq.codebook.clone()
    out = vq(z)
    assert not torch.allclose(vq.codebook[:3], assigning[:3], atol=0.1)  # the EMA moved the used codes
    assert not torch.allclose(vq.codebook[3:], assigning[3:])  # and restarted the unused ones
    expected = F.embedding(out.codes, assigning).permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, expected, atol=1e-6)
    assert out.commitment_loss.item() == pytest.approx(0.25 * F.mse_loss(z, expected).item(), rel=1e-6)


# --- DDP: two gloo processes on CPU ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # Quantizer alone: the synchronised EMA must equal one process seeing both ranks' data.
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=32, dim=4, restart_after=0).train()
    vq.initialized.fill_(True)  # compare the EMA arithmetic alone, from the same random codebook
    data = [torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    for _ in range(5):
        vq(data[rank])
    # The whole model under DDP, different data per rank, with dead-code restarts.
    torch.manual_seed(0)
    model = VQVAE(vqvae_tiny())
    for q in model.quantizers:
        q.restart_after = 2
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    # A random stream of its own per rank once the weights are built, as the trainers seed it
    # (training.seed_rank_stream): the codebook draws agree only through rank 0's broadcast.
    torch.manual_seed(1000 + rank)
    opt = torch.optim.Adam(ddp.parameters(), 1e-3)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * 2 - 1
    for _ in range(6):
        loss = ddp(images).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(
        {"vq_codebook": vq.codebook, "model_codebooks": [q.codebook for q in model.quantizers],
         "steps_unused": [q.steps_unused for q in model.quantizers]},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_codebooks_identical_across_two_ddp_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["vq_codebook"], r1["vq_codebook"])
    for a, b in zip(r0["model_codebooks"], r1["model_codebooks"]):
        assert torch.equal(a, b)
    for a, b in zip(r0["steps_unused"], r1["steps_unused"]):
        assert torch.equal(a, b)

    # Reference: one process, both ranks' data concatenated, same steps.
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=32, dim=4, restart_after=0).train()
    vq.initialized.fill_(True)
    both = torch.cat([torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(100 + r)) for r in range(2)])
    for _ in range(5):
        vq(both)
    assert torch.allclose(vq.codebook, r0["vq_codebook"], atol=1e-5)
