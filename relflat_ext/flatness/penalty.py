"""Relative flatness as a differentiable function of the features, the weight and the bias (and,
through a tail, of the layers after it): a penalty to add to a training loss.

``kappa_Tr = (1/n) sum_i ||phi_i||^2 <W W^T, Hz_i>`` (docs/design.md, "Derivatives"):

- the layer produces the output (no tail) with a built-in loss: the op ``last_layer_flatness``,
  whose backward is one fused pass (a custom kernel), exact in every input;
- a tail of Linear layers and elementwise activations after the layer: the second-order chain
  rule written so that autograd can differentiate it. With ``Q_i = P_i W`` the tail's Jacobian at
  sample i applied to W's columns (r, m), ``<W W^T, P^T S P> = <Q Q^T, S>``, so every source of
  curvature (the loss at the output; each activation, ``S = diag(sigma'' dl/dv)``) adds
  ``sum_r S_rr ||Q_r||^2`` or, for the softmax, ``1/2 sum_{s,t} p_s p_t ||Q_s - Q_t||^2``: tensor
  products only, so gradients flow through the features, the weight and the tail's parameters.
  A callable loss gets its output Hessian from k Hessian-vector products (create_graph).

Both equal kappa as :func:`relative_flatness` measures it (tests compare them, and their
gradients, with autograd through the dense layer Hessian in float64).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..core.losses import CallableLoss, DiagonalHessian, Loss, LossSpec, SoftmaxHessian, get_loss
from ..ops.stable_math import winner_and_rest
from . import tail as _tail
from .closed_form import WIDE_HEAD
from .normalization import inverse_scale, scale_of
from .problem import HALF_DTYPES


def flatness_penalty(features: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None,
                     loss: Union[LossSpec, Loss] = "cross_entropy", bias: Optional[torch.Tensor] = None,
                     normalize_features: bool = False, tail: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """Differentiable relative flatness ``kappa_Tr`` (0-dim tensor) of the layer ``z = weight phi + bias``.

    features (n, m): the layer's input for a batch (keep its graph: gradients flow into every
    earlier layer through it); weight (d, m); bias (d,) or None; targets: as the loss takes them
    (the closed form of a built-in loss at the last layer does not read them; a tail does).
    ``tail``: the modules after the layer, Linear layers and elementwise activations (nn.Tanh,
    nn.ReLU, nn.GELU..., BatchNorm1d in eval mode; Dropout counts as the identity), None or empty
    when the layer produces the output. ``normalize_features``: Theorem 4's normalized kappa, the
    per-feature standard deviation taken over this batch (and differentiated through).
    Half-precision inputs (autocast) are computed in float32; the result is float32 then.
    """
    return penalty(features, weight, targets, get_loss(loss), bias, normalize_features, tail, check_targets=True)


def penalty(features, weight, targets, loss_record: Loss, bias, normalize_features: bool, tail,
            check_targets: bool) -> torch.Tensor:
    """:func:`flatness_penalty` for a loss record; ``check_targets=False`` skips the targets' value
    checks (a pass over them, and a device synchronization on a GPU), which a training loop needs
    once, not at every step."""
    tail = list(tail or [])
    phi, w, b = _checked(features, weight, bias)
    for module in tail:
        if not (_tail.is_linear(module) or _tail.is_elementwise(module) or type(module) in _tail.PASS_THROUGH):
            raise ValueError(f"tail: a {type(module).__name__} is not supported; the penalty's tail may hold "
                             "nn.Linear layers, elementwise activations, BatchNorm1d in eval mode and Dropout")
    device_type = phi.device.type
    # Off for this computation where autocast is on (float32 throughout); entering the context
    # costs more than the small-batch kernel itself where it is not.
    with torch.autocast(device_type=device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else contextlib.nullcontext():
        if normalize_features:
            scale = scale_of(phi)  # torch's std has a zero gradient at zero spread: dead units are fine
            phi, w = phi * inverse_scale(scale), w * scale
        if not tail and loss_record.builtin:
            if targets is not None and check_targets:
                loss_record.check_targets(targets, (phi.shape[0], w.shape[0]))
            return _last_layer(phi, w, b, loss_record)
        if targets is None:
            raise ValueError("targets are needed for a penalty through a tail or with a callable loss")
        return _through_tail(phi, w, b, tail, targets, loss_record, check_targets)


def _checked(features, weight, bias):
    for name, t, dim in (("features", features, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if features.shape[0] == 0:
        raise ValueError("features must hold at least one sample, got shape (0, m)")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must be (d, m) with m = features.shape[1] = {features.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtype = torch.promote_types(features.dtype, weight.dtype)
    dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}")
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(features), cast(weight), cast(bias)


def _last_layer(phi, w, b, loss: Loss) -> torch.Tensor:
    n, (d, m) = phi.shape[0], w.shape
    if loss.name == "cross_entropy" and d > WIDE_HEAD and m >= d:  # as the measure: from the block sum
        _, block = ops.last_layer_flatness(phi, w, b, loss.name, True, per_sample=False)
        return ((w @ w.T) * block).sum() / n
    per_sample, _ = ops.last_layer_flatness(phi, w, b, loss.name, False)
    return per_sample.mean()


def _derivatives(module: nn.Module, u: torch.Tensor):
    """sigma(u), sigma'(u), sigma''(u), each differentiable in u (create_graph)."""
    v = module(u.clone())  # clone: an in-place activation must not overwrite u
    slope = torch.autograd.grad(v.sum(), u, create_graph=True)[0]
    curvature = None
    if slope.requires_grad:
        curvature = torch.autograd.grad(slope.sum(), u, create_graph=True, allow_unused=True)[0]
    return v, slope, torch.zeros_like(u) if curvature is None else curvature


def _through_tail(phi, w, b, tail: List[nn.Module], targets, loss: Loss, check_targets: bool) -> torch.Tensor:
    n = phi.shape[0]
    with torch.enable_grad():
        z = F.linear(phi, w, b)
        if not z.requires_grad:  # nothing to differentiate, but the chain rule needs z's graph
            z = z.detach().requires_grad_(True)
        # Forward through the tail: values, and sigma', sigma'' at each activation.
        steps, u = [], z
        for module in tail:
            if _tail.is_linear(module):
                steps.append(("linear", module))
                u = module(u)
            elif _tail.is_elementwise(module):
                u_in = u
                u, slope, curvature = _derivatives(module, u_in)
                steps.append(("elementwise", slope, curvature))
        out = u
        if check_targets and not isinstance(loss, CallableLoss):  # a callable decides what it takes
            loss.check_targets(targets, tuple(out.shape))
        # dl_i/d(output) per sample (n x the mean's gradient), then back to each activation.
        grad = torch.autograd.grad(loss.for_derivatives(out, targets) * n, out, create_graph=True)[0]
        sources = []
        for step in reversed(steps):
            if step[0] == "linear":
                grad = grad @ step[1].weight
            else:
                sources.append(step[2] * grad)
                grad = grad * step[1]
        sources.reverse()
        # Forward again: Q_i = P_i W, diagonal (n, d) until the first Linear, then (n, r, m).
        diag, q, total, a = torch.ones_like(z), None, z.new_zeros(n), 0
        row_norms = w.pow(2).sum(1)
        for step in steps:
            if step[0] == "linear":
                weight = step[1].weight
                q = (torch.einsum("ab,nb,bm->nam", weight, diag, w) if q is None
                     else torch.einsum("ab,nbm->nam", weight, q))
            else:
                s = sources[a]
                a += 1
                if q is None:
                    total = total + (s * diag.pow(2) * row_norms).sum(1)
                    diag = diag * step[1]
                else:
                    total = total + (s * q.pow(2).sum(2)).sum(1)
                    q = q * step[1][:, :, None]
        if q is None:
            q = diag[:, :, None] * w[None]
        total = total + _loss_source(q, out, targets, loss)
        return (phi.pow(2).sum(1) * total).sum() / n


def _loss_source(q: torch.Tensor, out: torch.Tensor, targets, loss: Loss) -> torch.Tensor:
    """``<Q_i Q_i^T, S_i>`` (n,) for the loss' Hessian S_i in the output."""
    hessian = loss.output_hessian(out)
    if isinstance(hessian, SoftmaxHessian):
        # 1/2 sum_{s,t} p_s p_t ||q_s - q_t||^2 = sum_s p_s ||c_s||^2 - ||sum_s p_s c_s||^2 with rows
        # centred on the winning class (c_s = q_s - q_k): both terms are O(1 - p_k), no cancellation.
        p = hessian.p
        k, _ = winner_and_rest(p)
        centred = q - q.gather(1, k[:, :, None].expand(-1, 1, q.shape[2]))
        mean = torch.einsum("ns,nsm->nm", p, centred)
        return (p * centred.pow(2).sum(2)).sum(1) - mean.pow(2).sum(1)
    if isinstance(hessian, DiagonalHessian):
        return (hessian.values * q.pow(2).sum(2)).sum(1)
    n, k = out.shape
    grad = torch.autograd.grad(loss.for_derivatives(out, targets) * n, out, create_graph=True)[0]
    if not grad.requires_grad:  # the loss is linear in the output
        return out.new_zeros(n)
    rows = [torch.autograd.grad(grad[:, j].sum(), out, create_graph=True)[0] for j in range(k)]
    s = torch.stack(rows, 1)  # (n, k, k): per-sample Hessians (the loss must not mix samples)
    return torch.einsum("nst,nsm,ntm->n", s, q, q)
