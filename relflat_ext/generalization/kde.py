"""Exact Gaussian kernel density estimation on top of the fused ``gaussian_kernel_reduce`` op.

``kde_log_density(train, test, h)`` is the exact log of ``(1/n) sum_k N(test_q; train_k, h^2 I)``,
the quantity scikit-learn's ``KernelDensity(kernel="gaussian", bandwidth=h).score_samples``
approximates with a tree. The tree drops small contributions, so at small bandwidths scikit-learn
can be off by 1e-6 or, for queries far from every training point, by whole units of log-density;
this module sums every pair, in log space, in one pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import torch

from .. import ops
from ..core.data import check_finite

Bandwidths = Union[float, Sequence[float], torch.Tensor]


def _as_points(name: str, x: torch.Tensor) -> torch.Tensor:
    """Points (n, m) in float32 or float64; half-precision points are computed in float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, m), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    check_finite(name, x)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _power_of_two_scale(*points: torch.Tensor) -> float:
    """A power of two s that brings the largest coordinate near 1 when it is far from it (squared
    distances would overflow or underflow in float32); else 1. Dividing points and bandwidths by s
    is exact and shifts every log-density by ``-m log s``."""
    top = max(float(p.abs().amax()) if p.numel() else 0.0 for p in points)
    if top == 0.0 or 2.0 ** -32 < top < 2.0 ** 32:
        return 1.0
    return 2.0 ** math.ceil(math.log2(top))


def _scaled_bandwidths(bw: torch.Tensor, scale: float) -> torch.Tensor:
    """bw / scale, checked: h^2 must neither underflow nor overflow in the data's dtype."""
    h = bw / scale
    h2 = h * h
    info = torch.finfo(h.dtype)
    if not bool(((h2 >= info.tiny) & torch.isfinite(h2)).all()):
        raise ValueError(f"bandwidths {bw.tolist()} are too far from the data's scale (about {scale:g}) for {h.dtype} "
                         "(h^2 underflows or overflows); use float64 or bandwidths nearer the data's scale")
    return h


def _as_bandwidths(bandwidth: Bandwidths, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(bandwidth, torch.Tensor) and bandwidth.dim() > 1:
        raise ValueError(f"bandwidth must be a number or a 1-D tensor of bandwidths, got shape {tuple(bandwidth.shape)}")
    bw = torch.as_tensor(bandwidth, dtype=ref.dtype, device=ref.device).reshape(-1)
    if bw.numel() == 0:
        raise ValueError("bandwidth must hold at least one value")
    if not bool(torch.isfinite(bw).all() and (bw > 0).all()):
        raise ValueError(f"bandwidth must be positive and finite, got {bw.tolist()}")
    return bw


def kde_log_density(train: torch.Tensor, test: torch.Tensor, bandwidth: Bandwidths) -> torch.Tensor:
    """Exact Gaussian KDE log-density of ``test`` (nq, m) under kernels on ``train`` (nk, m).

    bandwidth: a float (result shape (nq,)) or a 1-D tensor/sequence of B bandwidths (result (B, nq)),
    all evaluated from one pass over the pairs.
    """
    train, test = _as_points("train", train), _as_points("test", test)
    if train.shape[0] == 0:
        raise ValueError("train is empty: a kernel density needs at least one training point")
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"test must have m = {train.shape[1]} features like train, got shape {tuple(test.shape)}")
    bw = _as_bandwidths(bandwidth, train)
    test = test.to(train.dtype)
    scale = _power_of_two_scale(train, test)
    logdens, _ = ops.gaussian_kernel_reduce(test / scale, train / scale, None, _scaled_bandwidths(bw, scale))
    logdens = logdens - train.shape[1] * math.log(scale)
    return logdens[0, 0] if torch.as_tensor(bandwidth).dim() == 0 else logdens[0]


def kfold_ids(n: int, folds: int, device=None) -> torch.Tensor:
    """Fold id of each of n points for a contiguous k-fold split, as scikit-learn's ``KFold``
    (no shuffling) makes it: the first ``n % folds`` folds hold one point more."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if folds > n:
        raise ValueError(f"folds ({folds}) must not exceed the number of points ({n})")
    sizes = torch.full((folds,), n // folds, dtype=torch.long)
    sizes[: n % folds] += 1
    return torch.repeat_interleave(torch.arange(folds), sizes).to(device)


@dataclasses.dataclass
class BandwidthSelection:
    """bandwidth: the selected one; bandwidths (B,): the grid; scores (B,): mean over folds of the
    held-out fold's total log-likelihood (scikit-learn's ``KernelDensity.score``, as GridSearchCV
    averages it); fold_scores (folds, B)."""
    bandwidth: float
    bandwidths: torch.Tensor
    scores: torch.Tensor
    fold_scores: torch.Tensor


def select_bandwidth(x: torch.Tensor, bandwidths: Bandwidths, folds: int = 10) -> BandwidthSelection:
    """Pick the bandwidth with the highest held-out log-likelihood over a contiguous k-fold split,
    every fold and bandwidth from one fused pass. Matches ``GridSearchCV(KernelDensity(),
    {"bandwidth": grid}, cv=folds)`` (ties go to the first bandwidth in the grid, as there)."""
    x = _as_points("x", x)
    bw = _as_bandwidths(bandwidths, x)
    ids = kfold_ids(x.shape[0], folds, x.device)
    scale = _power_of_two_scale(x)
    logdens, _ = ops.gaussian_kernel_reduce(x / scale, x / scale, None, _scaled_bandwidths(bw, scale), None,
                                            ids[None], ids[None])
    logdens = logdens - x.shape[1] * math.log(scale)  # (1, B, n)
    fold_scores = x.new_zeros((folds, bw.numel())).index_add_(0, ids, logdens[0].T)
    scores = fold_scores.mean(0)
    best = int(torch.argmax(scores))  # first maximum
    return BandwidthSelection(float(bw[best]), bw, scores, fold_scores)
