"""Theorem 4's reparameterization-invariant coordinates: features divided by their standard
deviations ``s`` (population, over all samples), the weight multiplied by them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from torch import nn

from ..core import dist
from ..core.data import IGNORE_INDEX
from ..core.hooks import NotVectorFeatures, preserved, tapped
from ..core.layers import LayerSpec, resolve_linear
from ..core.modes import measurement
from .problem import Problem


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1/s, and 0 where s = 0: a zero-spread feature (constant, a bias in disguise, or a dead unit)
    is dropped from the normalized measure, as the bias is from kappa; at scale 1 its weight
    column, which layer-wise rescalings change, would break the invariance (docs/design.md)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, 1.0 / safe, torch.zeros_like(scale))


def normalized(features: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``phi' = phi / s``, ``W' = W diag(s)``: the layer output is unchanged up to dropped features."""
    if scale is None:
        return features, weight
    return features * inverse_scale(scale), weight * scale


def scale_of(features: torch.Tensor) -> torch.Tensor:
    """Per-feature standard deviation of features (n, m)."""
    return features.std(dim=0, unbiased=False)


@measurement
def feature_scale(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                  batch_size: Optional[int] = None, distributed: Optional[bool] = None) -> torch.Tensor:
    """Per-feature standard deviation (m,) of the input of ``layer`` (population form, over all
    samples, and every rank's under torch.distributed): the ``V`` of Theorem 4. Zero-spread
    features get 0 (the normalized measure drops them)."""
    problem = Problem.build(model, layer, inputs, targets, batch_size=batch_size, distributed=distributed)
    resolve_linear(model, problem.name, "feature_scale (Theorem 4)")
    return scale_over_data(problem)


def scale_over_data(problem: Problem) -> torch.Tensor:
    """:func:`feature_scale` of a built problem."""
    total = sq_total = None
    n = 0
    with preserved(problem.model), tapped(problem.module, problem.name, replace_output=False) as tap, \
            torch.no_grad():
        for x, y in problem.batches():
            tap.reset()
            problem.forward(x)
            try:
                phi = tap.sample_features(y).double()  # tokens as samples with token targets
            except NotVectorFeatures as exc:
                raise ValueError(f"normalize_features (Theorem 4) needs per-sample feature vectors (n, m): {exc}"
                                 .split("; the exact path")[0]) from None
            if problem.loss.name == "cross_entropy" and not y.is_floating_point() and phi.shape[0] == y.numel():
                phi = phi[y.reshape(-1) != IGNORE_INDEX]  # the counted samples or tokens, as the paths sum over
            # other row counts: a layer that sees some of the samples (a routed expert), over those
            total = phi.sum(0) if total is None else total + phi.sum(0)
            sq_total = phi.pow(2).sum(0) if sq_total is None else sq_total + phi.pow(2).sum(0)
            n += phi.shape[0]
    if problem.distributed:
        count = torch.tensor(float(n), dtype=torch.float64, device=total.device)
        dist.all_reduce_sum([total, sq_total, count])
        n = count.item()
    mean = total / n
    return (sq_total / n - mean.pow(2)).clamp_min(0).sqrt().to(problem.module.weight.dtype)
