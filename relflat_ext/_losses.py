"""Loss names, their integer codes in the op schemas, and per-sample output Hessians.

The three built-in losses mean exactly ``F.cross_entropy``, ``F.mse_loss`` and
``F.binary_cross_entropy_with_logits`` with their default mean reductions. Their Hessians with
respect to the logits ``z`` do not depend on the targets, which is why the kernels take none:

- cross entropy (mean over samples): ``Hz_i = diag(p_i) - p_i p_i^T``, ``p_i = softmax(z_i)``
- MSE (mean over all ``n*d`` entries): ``Hz_i = (2/d) I``
- BCE with logits (mean over all ``n*d`` entries): ``Hz_i = (1/d) diag(sigma(z_i)(1 - sigma(z_i)))``

``Hz_i`` is always normalized so that the empirical risk is ``E = (1/n) sum_i l_i``.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

CROSS_ENTROPY = 0
MSE = 1
BCE_WITH_LOGITS = 2

LOSS_CODES = {"cross_entropy": CROSS_ENTROPY, "mse": MSE, "bce_with_logits": BCE_WITH_LOGITS}
LOSS_FUNCTIONS = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}

LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def loss_code(loss: str) -> int:
    """Integer code of a built-in loss name, with a clear error for anything else."""
    if not isinstance(loss, str) or loss not in LOSS_CODES:
        raise ValueError(
            f"loss must be one of {sorted(LOSS_CODES)} or a callable loss_fn(output, target) "
            f"with mean reduction, got {loss!r}")
    return LOSS_CODES[loss]


def resolve_loss(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The callable behind a loss spec (a built-in name or a user callable)."""
    if callable(loss):
        return loss
    return LOSS_FUNCTIONS[[k for k, v in LOSS_CODES.items() if v == loss_code(loss)][0]]


def output_hessian_diagonal(logits: torch.Tensor, code: int) -> torch.Tensor:
    """``Hz_i[s, s]`` for every sample (n, d), for the closed-form losses."""
    d = logits.shape[1]
    if code == CROSS_ENTROPY:
        p = torch.softmax(logits, dim=1)
        return p * (1 - p)
    if code == MSE:
        return torch.full_like(logits, 2.0 / d)
    s = torch.sigmoid(logits)
    return s * (1 - s) / d
