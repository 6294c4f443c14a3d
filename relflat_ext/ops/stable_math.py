"""Cancellation-free pieces of the loss Hessians, shared by the ops' reference and the loss table.

At a confident prediction ``1 - p_k`` (k the winning class) and ``1 - sigma(z)`` round to 0 in
float32 from logit margins of about 17, and any formula that subtracts from 1 or from ``p_k``
loses every digit. These helpers compute the same quantities without that subtraction.
"""
from __future__ import annotations

from typing import Tuple

import torch


def winner_and_rest(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For probability rows p (n, d): ``k`` (n, 1), each row's largest entry, and ``rest`` (n, 1),
    the sum of the other entries: ``1 - p_k`` without the subtraction."""
    k = p.argmax(dim=1, keepdim=True)
    return k, p.scatter(1, k, 0.0).sum(dim=1, keepdim=True)


def softmax_complement(p: torch.Tensor) -> torch.Tensor:
    """``1 - p`` for probability rows p (n, d), accurate in every entry: ``rest`` at each row's
    largest entry; elsewhere ``p_s <= 1/2`` and ``1 - p_s`` is exact to rounding."""
    k, rest = winner_and_rest(p)
    return (1 - p).scatter(1, k, rest)


def sigmoid_curvature(z: torch.Tensor) -> torch.Tensor:
    """``sigma(z)(1 - sigma(z))`` as ``sigma(z) sigma(-z)``: no subtraction from 1."""
    return torch.sigmoid(z) * torch.sigmoid(-z)


def squared_distances(weight: torch.Tensor) -> torch.Tensor:
    """``D[s, t] = ||w_s - w_t||^2`` (d, d) from the Gram matrix, clamped at 0, zero diagonal.
    Its rounding error is relative to ``||w||^2`` (how alike two rows are), not to the margin."""
    gram = weight @ weight.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)
    return dist.fill_diagonal_(0)
