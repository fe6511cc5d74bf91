"""Vector quantizer with an EMA codebook, commitment loss and dead-code restart."""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, H, W), straight-through: gradients flow to the input
    codes: torch.Tensor  # (B, H, W) int64
    commitment_loss: torch.Tensor  # scalar, already scaled by beta
    perplexity: torch.Tensor  # scalar, exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # scalar, fraction of the codebook used by this batch


def _autocast_off(device: torch.device):
    """A context with autocast disabled on device (meta tensors have no autocast to disable)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantization; the codebook follows an EMA of its assigned vectors.

    The codebook is a buffer, not a parameter: it is learned by the EMA update of van den Oord
    et al. (2017, appendix), which the VQ-VAE-2 paper uses in place of the codebook loss.
    Under torch.distributed the cluster statistics are all-reduced and restarts are broadcast
    from rank 0, so every rank keeps a bit-identical codebook.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        beta: float = 0.25,
        eps: float = 1e-5,
        restart_after: int = 0,
    ):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.beta, self.eps = decay, beta, eps
        self.restart_after = restart_after  # steps a code may go unused before a restart; 0 = never
        codebook = torch.randn(num_codes, dim)
        self.register_buffer("codebook", codebook)  # (K, D)
        self.register_buffer("ema_count", torch.ones(num_codes))  # (K,)
        self.register_buffer("ema_sum", codebook.clone())  # (K, D)
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))  # (K,)
        # Set once the codebook has been drawn from the first training batch (saved with the weights).
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized_seen = False  # avoids reading the buffer (a device sync) on every step

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of flat (N, D), with distances in fp32.

        Autocast would run the matmul in bf16, whose rounding (about 0.4% of |z|.|e|) decides
        near-ties differently from the fp32 encode stage; it is switched off here.
        """
        with _autocast_off(flat.device):
            flat, codebook = flat.float(), self.codebook.float()
            distances = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ codebook.t()
                + codebook.pow(2).sum(1)[None, :]
            )  # (N, K)
            return distances.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for codes (B, H, W) -> (B, D, H, W)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        if self.training and not self._initialized_seen:
            if not self.initialized:
                self._init_from_data(flat.detach())
            self._initialized_seen = True
        codes = self.nearest_codes(flat)
        # Looked up before the EMA step: the decoder and the commitment loss see the codebook that
        # made the assignment (as Sonnet does), not the one updated from this very batch.
        quantized = self.lookup(codes.view(B, H, W)).to(z.dtype)
        counts = torch.zeros(self.num_codes, device=z.device).index_add_(0, codes, torch.ones_like(flat[:, 0]))  # (K,)
        if self.training:
            counts = self._update_codebook(flat.detach(), codes, counts)
        commitment_loss = self.beta * F.mse_loss(z, quantized.detach())
        quantized = z + (quantized - z).detach()  # straight-through estimator
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(quantized, codes.view(B, H, W), commitment_loss, perplexity, usage)

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        """Draw the codebook from encoder outputs, so that no code starts far from the data."""
        picks = torch.randint(len(flat), (self.num_codes,), device=flat.device)
        codebook = flat[picks].contiguous()
        if _distributed():
            dist.broadcast(codebook, src=0)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA step of the cluster sizes and sums; returns the global (all-rank) counts."""
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, codes, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps unused codes from dividing by zero.
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.restart_after > 0:
            self._restart_dead_codes(flat, counts)
        return counts

    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-initialise codes unused for restart_after steps from current encoder outputs.

        Branch-free (a masked select over all codes) so that it never waits on the GPU.
        """
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.restart_after)[:, None]  # (K, 1), identical on every rank
        replacements = flat[torch.randint(len(flat), (self.num_codes,), device=flat.device)]
        if _distributed():
            dist.broadcast(replacements, src=0)
        self.codebook.copy_(torch.where(dead, replacements, self.codebook))
        self.ema_sum.copy_(torch.where(dead, replacements, self.ema_sum))
        self.ema_count.masked_fill_(dead[:, 0], 1.0)
        self.steps_unused.masked_fill_(dead[:, 0], 0)
