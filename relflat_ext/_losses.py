"""Loss names, their integer codes in the op schemas, and per-sample output Hessians.

The three built-in losses mean exactly ``F.cross_entropy``, ``F.mse_loss`` and
``F.binary_cross_entropy_with_logits`` with their default mean reductions. Their Hessians with
respect to the logits ``z`` do not depend on the targets, which is why the kernels take none:

- cross entropy (mean over samples): ``Hz_i = diag(p_i) - p_i p_i^T``, ``p_i = softmax(z_i)``
- MSE (mean over all ``n*d`` entries): ``Hz_i = (2/d) I``
- BCE with logits (mean over all ``n*d`` entries): ``Hz_i = (1/d) diag(sigma(z_i)(1 - sigma(z_i)))``

``Hz_i`` is always normalized so that the empirical risk is ``E = (1/n) sum_i l_i``.

At a confident minimum ``1 - p_k`` (k the winning class) and ``1 - sigma(z)`` round to 0 in float32
from margins of about 17, and every formula that subtracts from 1 or from ``p_k`` loses all its
digits. Everything here is written without that subtraction: complements are sums of the small
entries (:func:`softmax_complement`), ``sigma(z)(1 - sigma(z)) = sigma(z) sigma(-z)``, and
:func:`loss_for_derivatives` gives the losses with gradients and Hessian-vector products in the
same form, for the paths that differentiate through autograd.
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
    loss_code(loss)
    return LOSS_FUNCTIONS[loss]


def winner_and_rest(p: torch.Tensor):
    """For probability rows p (n, d): ``k`` (n, 1), each row's largest entry, and ``rest`` (n, 1),
    the sum of the other entries: ``1 - p_k`` without the subtraction that keeps no digit once
    ``p_k`` rounds to 1."""
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


def output_hessian_diagonal(logits: torch.Tensor, code: int) -> torch.Tensor:
    """``Hz_i[s, s]`` for every sample (n, d), for the closed-form losses."""
    d = logits.shape[1]
    if code == CROSS_ENTROPY:
        p = torch.softmax(logits, dim=1)
        return p * softmax_complement(p)
    if code == MSE:
        return torch.full_like(logits, 2.0 / d) if d else logits.new_empty(logits.shape)
    return sigmoid_curvature(logits) / d


def _probabilities(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Class-index targets as one-hot rows; probability targets as they are."""
    if target.dim() == like.dim() and target.is_floating_point():
        return target
    return torch.zeros_like(like).scatter_(1, target.long().unsqueeze(1), 1.0)


def cross_entropy_gradient(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``p - y`` per sample (n, d), with the winning class' entry ``(1 - y_k) - sum_{t != k} p_t``."""
    p = torch.softmax(logits, dim=1)
    y = _probabilities(target, logits)
    k, rest = winner_and_rest(p)
    return (p - y).scatter(1, k, (1 - y.gather(1, k)) - rest)


def bce_gradient(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sigma(z) - y`` per entry as ``sigma(z)(1 - y) - y sigma(-z)`` (exact for 0/1 targets)."""
    return torch.sigmoid(logits) * (1 - target) - target * torch.sigmoid(-logits)


class _CrossEntropyGradient(torch.autograd.Function):
    """(p - y) / n, whose derivative along v is ``p * (v - <p, v>) / n``, with
    ``v_s - <p, v> = (v_s - v_k) - sum_t p_t (v_t - v_k)`` (k the winning class): no cancellation
    at the winning class, the entry that carries the signal at a confident minimum."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target):
        return cross_entropy_gradient(logits, target) / logits.shape[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _ = inputs
        ctx.save_for_backward(torch.softmax(logits, dim=1))

    @staticmethod
    def backward(ctx, v):
        (p,) = ctx.saved_tensors
        k = p.argmax(dim=1, keepdim=True)
        dv = v - v.gather(1, k)
        centred = dv - (p * dv).sum(dim=1, keepdim=True)
        return p * centred / p.shape[0], None


class _BceGradient(torch.autograd.Function):
    """(sigma(z) - y) / N, whose derivative is ``sigma(z) sigma(-z) / N`` elementwise."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target):
        return bce_gradient(logits, target) / logits.numel()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(sigmoid_curvature(inputs[0]) / inputs[0].numel())

    @staticmethod
    def backward(ctx, v):
        (curvature,) = ctx.saved_tensors
        return v * curvature, None


def _with_gradient(loss_fn, gradient):
    """``loss_fn`` (logits, target) -> mean loss, whose gradient is the Function ``gradient``: so
    Hessian-vector products through it use that Function's backward."""

    class _Loss(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(logits, target):
            return loss_fn(logits, target)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            logits, target = ctx.saved_tensors
            return grad * gradient.apply(logits, target), None

    return _Loss


_CrossEntropy = _with_gradient(F.cross_entropy, _CrossEntropyGradient)
_Bce = _with_gradient(F.binary_cross_entropy_with_logits, _BceGradient)


def _stable_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Other layouts (n, d, ...) and ignored labels (-100): autograd's own derivatives.
    if output.dim() != 2 or (not target.is_floating_point() and bool((target < 0).any())):
        return F.cross_entropy(output, target)
    return _CrossEntropy.apply(output, target)


def _stable_bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not (output.is_floating_point() and target.is_floating_point() and output.shape == target.shape):
        return F.binary_cross_entropy_with_logits(output, target)
    return _Bce.apply(output, target)


_FOR_DERIVATIVES = {"cross_entropy": _stable_cross_entropy, "mse": F.mse_loss, "bce_with_logits": _stable_bce}


def loss_for_derivatives(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss to differentiate (gradients, Hessian-vector products): the same values as
    :func:`resolve_loss`, with first and second derivatives of the built-in losses computed without
    cancellation at confident predictions. A callable is returned as it is."""
    if callable(loss):
        return loss
    loss_code(loss)
    return _FOR_DERIVATIVES[loss]
