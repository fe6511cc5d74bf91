"""The paper's sample-quality metrics as pure functions of features and logits (numpy or torch in).

- FID: Frechet distance between Gaussians fitted to two feature sets (`fid`), from statistics
  (`frechet_distance`); the matrix square root by scipy.linalg.sqrtm (as pytorch-fid, torch-fidelity
  and fid-helper-pytorch do) or by a symmetric eigen-decomposition (`method="eigh"`, a second route
  the tests compare against).
- Inception Score from class logits (`inception_score`), mean and std over splits.
- Precision and recall (Kynkaanniemi et al. 2019): k-NN manifolds of each set, k=3.
- Top-k accuracy of logits against labels (`topk_accuracy`, `accuracy_scores`), for CAS.
- Validity (`Measurement`, `enough_points`): every FID and precision/recall value travels with the sizes of
  the two sets it compared, the feature dimension, whether those counts are enough for it to mean
  something, and its floor: the same metric between two disjoint sets of real images of the same sizes.

Feature extraction (pipeline/feature_nets.py) is separate: these functions take what the actor pool
collected, so the driver reduces without any network. Metric names carry their feature network via
`metric_name` (e.g. fid_inception_v3, is_efficientnet_lite0, is_classifier).

Why not torchmetrics / torch-fidelity: their FID and IS classes own the feature extractor (and
fetch its weights on first use); here features come from offline nets in an actor pool, and the
Frechet distance on given statistics is a few lines, validated against a closed form in the tests.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.asarray(x))


def metric_name(metric: str, net_name: str) -> str:
    """The tracked name of a metric on a feature network, e.g. ('fid', 'inception_v3') -> fid_inception_v3."""
    return f"{metric}_{net_name}"


# --- FID ------------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), in float64; covariance with N-1 (as np.cov)."""
    x = _numpy(features)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr(sqrt(sigma1 @ sigma2)) by scipy's sqrtm (Schur method), with the pytorch-fid fallbacks."""
    with warnings.catch_warnings():
        # A singular product (fewer samples than dimensions) is common and harmless here.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # No square root found: add eps to the diagonals (as pytorch-fid does).
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical error can leave a small imaginary part; a large one means something is wrong.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 @ sigma2)) = sum of sqrt(eigenvalues of s1^1/2 sigma2 s1^1/2), a symmetric PSD matrix."""
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "sqrtm", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

    method: "sqrtm" (scipy.linalg.sqrtm, the reference FID implementations' route) or "eigh"
    (a symmetric eigen-decomposition; exact for PSD inputs and faster for large D).
    """
    mu1, mu2 = _numpy(mu1).ravel(), _numpy(mu2).ravel()
    sigma1, sigma2 = np.atleast_2d(_numpy(sigma1)), np.atleast_2d(_numpy(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    if method == "sqrtm":
        trace_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'sqrtm' or 'eigh'")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical statistics


def fid(features1, features2, method: str = "sqrtm") -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        return 0.0  # identical sets: exactly zero, not sqrtm's rounding
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)


# --- Inception Score ------------------------------------------------------------------------------------


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))), p(y) the part's marginal.

    As in Salimans et al. 2016 and the reference implementations (which use 10 splits of 50k
    samples); the last part takes the remainder. Logits (N, C) are turned into probabilities by a
    softmax in float64. The parts are a seeded random partition, not runs of consecutive rows: rows
    come grouped by class (samples are drawn class by class), and a part of one class has its
    predictions for a marginal, so an IS of about 1 however good the samples.
    """
    logits = _tensor(logits).double()
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"need logits of shape (N, C), got {tuple(logits.shape)}")
    splits = max(1, min(splits, len(logits)))
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    order = torch.randperm(len(log_p), generator=torch.Generator().manual_seed(0))
    for part in torch.tensor_split(log_p[order], splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


# --- Precision and recall (Kynkaanniemi et al. 2019) ----------------------------------------------------


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = _tensor(features).double()
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(x)}")
    radii = []
    for chunk in x.split(batch_size):
        # The k+1 smallest include the point itself at distance 0.
        radii.append(_distances(chunk, x).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(reference, radii: torch.Tensor, queries, batch_size: int = 1024) -> float:
    """Fraction of `queries` inside the union of balls around `reference` points with the given radii."""
    reference, queries = _tensor(reference).double(), _tensor(queries).double()
    inside = 0
    for chunk in queries.split(batch_size):
        inside += (_distances(chunk, reference) <= radii.unsqueeze(0)).any(dim=1).sum().item()
    return inside / len(queries)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """(precision, recall): the fraction of fake samples inside the real k-NN manifold, and of real
    samples inside the fake one (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models"; k=3 as in the paper)."""
    real, fake = _tensor(real_features).double(), _tensor(fake_features).double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need feature sets (N, D) of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    precision = manifold_coverage(real, knn_radii(real, k, batch_size), fake, batch_size)
    recall = manifold_coverage(fake, knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


# --- Accuracy (CAS) -------------------------------------------------------------------------------------


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits (k capped at the class count)."""
    logits, labels = _tensor(logits), _tensor(labels).long()
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many logits as labels (> 0), got {len(logits)} and {len(labels)}")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels.unsqueeze(1)).any(dim=1).double().mean().item()


def accuracy_scores(logits, labels, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: the accuracies CAS reports (classifier trained on samples, tested on real)."""
    return {f"top{k}": topk_accuracy(logits, labels, k) for k in ks}


# --- Validity -------------------------------------------------------------------------------------------


def enough_points(n: int, ref_n: int, dim: int) -> bool:
    """Whether two sets of n and ref_n points of dim-d features are enough for FID or precision/recall.

    FID needs more points in each set than dimensions: below, the covariances are singular and the value
    is dominated by its bias, which grows as the counts fall (two sets of 96 real Fashion-MNIST images are
    93.5 apart on 2048-d Inception features). So do the k-NN manifolds of precision and recall: the balls
    around fewer points than dimensions cover next to nothing (both come out 0 at 96 Inception features).
    """
    return min(n, ref_n) > dim


@dataclass(frozen=True)
class Measurement:
    """A metric's value with what it was computed on: the sizes of the measured set (samples,
    reconstructions) and of the reference set (real images), the feature dimension, and the floor: the
    same metric between two disjoint sets of real images of those sizes (what a perfect model would get)."""

    value: float
    n: int
    ref_n: int
    dim: int
    floor: float | None = None

    @property
    def reliable(self) -> bool:
        return enough_points(self.n, self.ref_n, self.dim)

    def flat(self, name: str) -> dict[str, float]:
        """The tracked metrics: `name` and name_n, name_ref_n, name_dim, name_reliable (1 or 0), name_floor."""
        out = {name: self.value, f"{name}_n": self.n, f"{name}_ref_n": self.ref_n, f"{name}_dim": self.dim,
               f"{name}_reliable": float(self.reliable)}
        if self.floor is not None:
            out[f"{name}_floor"] = self.floor
        return out
