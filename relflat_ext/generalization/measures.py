"""The measures the paper compares relative flatness with (Section 6, Fig. 5): the layer's Hessian
trace, the Fisher-Rao norm (Liang et al.), PAC-Bayes flatness (Jiang et al., "Fantastic
generalization measures") and the squared weight norm. Calling conventions follow
:func:`relative_flatness` (model, layer, inputs, targets or a DataLoader, loss)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..core.data import (IGNORE_INDEX, batch_length, call_model, check_forward_finite, check_parameters_finite,
                         first_labels, model_batches, model_loss, problem_type)
from ..core.hooks import preserved
from ..core.layers import (CONV_TYPES, TRANSPOSED_CONV_TYPES, LayerSpec, acts_on_vectors, resolve_weight_layer,
                           weight_matrix)
from ..core.losses import LossSpec, get_loss
from ..core.modes import measurement
from ..flatness import relative_flatness, stochastic_estimate


def weight_norm(layer: nn.Module) -> float:
    """Squared Frobenius norm of a layer's weight."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"layer must have a weight, got {type(layer).__name__}")
    return float(weight.detach().double().pow(2).sum())


@measurement
def hessian_trace(model: nn.Module, layer: LayerSpec, inputs, targets=None, *, loss: Optional[LossSpec] = None,
                  batch_size: Optional[int] = None, rel_tol: float = 0.05, max_probes: int = 1000,
                  seed: Optional[int] = 0) -> float:
    """Tr of the Hessian of the mean loss w.r.t. the layer's weight. Exact for nn.Linear on (n, m)
    features, through the per-sample identity with G = I: ``Tr(H) = sum_s T[s, s]`` from the block
    traces; otherwise a Hutchinson estimate to ``rel_tol`` (the stochastic estimator)."""
    _, module = resolve_weight_layer(model, layer)
    if acts_on_vectors(module):
        res = relative_flatness(model, layer, inputs, targets, loss=loss, batch_size=batch_size, block_trace=True,
                                max_probes=max(max_probes, weight_matrix(module).shape[0] + 1))
        if res.block_trace is not None:
            return float(torch.trace(res.block_trace))
    return stochastic_estimate(model, layer, inputs, targets, loss=loss, quantity="hessian_trace", rel_tol=rel_tol,
                               max_probes=max_probes, seed=seed, batch_size=batch_size).value


@dataclasses.dataclass
class FisherRao:
    """norm_sq = depth^2 * mean_i <dl/df(x_i), f(x_i)>^2 (Liang et al., eq. for the Fisher-Rao norm);
    norm = its square root; depth = the L + 1 used."""
    norm_sq: float
    norm: float
    depth: int


@measurement
def fisher_rao_norm(model: nn.Module, inputs, targets=None, *, loss: Optional[LossSpec] = None,
                    depth: Optional[int] = None, batch_size: Optional[int] = None) -> FisherRao:
    """Liang et al.'s Fisher-Rao norm ``(L+1)^2 mean_i <dl/df(x_i), f(x_i)>^2``, with ``L+1`` the
    number of weight layers (Linear, Conv, ConvTranspose) unless ``depth`` is given. For bias-free ReLU networks
    ``<theta, grad_theta l_i> = (L+1) <dl/df(x_i), f(x_i)>`` (positive homogeneity), so this equals
    ``mean_i <theta, grad_theta l_i>^2``."""
    if depth is None:
        depth = sum(isinstance(m, (nn.Linear, *CONV_TYPES, *TRANSPOSED_CONV_TYPES)) for m in model.modules())
        if depth == 0:
            raise ValueError("the model has no Linear or Conv layers: pass depth explicitly")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    record = get_loss(model_loss(model, inputs, targets)[0] if loss is None else loss)
    total, n = 0.0, 0
    check_parameters_finite(model)
    with preserved(model):
        for k, (x, y) in enumerate(model_batches(model, inputs, targets, batch_size)):
            with torch.no_grad():
                out = call_model(model, x)
            check_forward_finite("output", out, k)
            record.check(out, y)
            f = out.detach().requires_grad_(True)
            n_b = batch_length(x)
            with torch.enable_grad():
                # Mean loss over the batch: its gradient is (1/n_b) dl_i/df_i per sample.
                grad = torch.autograd.grad(record.for_derivatives(f, y), f)[0] * n_b
            inner = (grad * out).flatten(1).sum(1)
            total += float(inner.double().pow(2).sum())
            n += n_b
    norm_sq = depth ** 2 * total / n
    return FisherRao(norm_sq, math.sqrt(norm_sq), depth)


@dataclasses.dataclass
class PacBayes:
    """sigma: the largest noise standard deviation (found by bisection) whose Monte Carlo mean
    accuracy drop is at most target_drop; flatness = 1 / sigma^2; bound = ||w||^2 / (4 sigma^2)
    + log(n / sigma) + 10 (Jiang et al.'s "pacbayes.flatness" bound form); accuracy and
    noisy_accuracy at sigma."""
    sigma: float
    flatness: float
    bound: float
    accuracy: float
    noisy_accuracy: float
    weight_norm_sq: float
    n: int


def _accuracy(model, inputs, targets, batch_size, finite: bool = False) -> (float, int):
    """Top-1 accuracy over the counted predictions (samples, or tokens not labelled -100) and their
    count. ``finite``: the outputs must be finite (the model's own weights; noisy ones may overflow,
    and a non-finite output then counts as the wrong prediction it gives)."""
    correct, n = 0, 0
    with torch.no_grad():
        for k, (x, y) in enumerate(model_batches(model, inputs, targets, batch_size)):
            out = call_model(model, x)
            if finite:
                check_forward_finite("output", out, k)
            pred = out.argmax(-1)
            labels = y.argmax(-1) if y.is_floating_point() else y
            if labels.shape != pred.shape:
                raise ValueError(f"targets of shape {tuple(y.shape)} do not match predictions of shape "
                                 f"{tuple(pred.shape)} (the model output's argmax over its last dimension)")
            counted = labels != IGNORE_INDEX
            correct += int(((pred == labels) & counted).sum())
            n += int(counted.sum())
    if n == 0:
        raise ValueError("every label is ignored (-100): there is no prediction to score")
    return correct / n, n


@measurement
def pacbayes_flatness(model: nn.Module, inputs, targets=None, *, target_drop: float = 0.1, draws: int = 10,
                      sigma_max: float = 2.0, iterations: int = 15, seed: int = 0,
                      batch_size: Optional[int] = None) -> PacBayes:
    """PAC-Bayes flatness (Jiang et al. 2020): the largest sigma such that Gaussian noise
    ``N(0, sigma^2)`` added to every parameter lowers the training accuracy by at most
    ``target_drop`` on average over ``draws`` noise draws, by ``iterations`` bisection steps on
    [0, sigma_max] (the same seeded draws at every sigma: common random numbers keep the
    bisection monotone). The authors' code draws noise with standard deviation sigma^2; this
    follows Jiang et al.'s paper (standard deviation sigma). The model is restored afterwards."""
    if not (0 < target_drop < 1):
        raise ValueError(f"target_drop must be in (0, 1), got {target_drop!r}")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    kind = problem_type(model, first_labels(inputs, targets))
    if kind in ("regression", "multi_label_classification"):
        raise ValueError(f"pacbayes_flatness scores top-1 accuracy; the model's problem_type is {kind!r}")
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError("the model has no parameters")
    check_parameters_finite(model)
    w_sq = float(sum(p.detach().double().pow(2).sum() for p in params))
    with preserved(model):
        base, n = _accuracy(model, inputs, targets, batch_size, finite=True)
        originals = [p.detach().clone() for p in params]
        unit = []
        for k in range(draws):  # unit-variance directions, reused at every sigma
            g = torch.Generator(device=params[0].device).manual_seed(seed * 100003 + k)
            unit.append([torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device) for p in params])

        def noisy_accuracy(sigma: float) -> float:
            accs = []
            try:
                for noise in unit:
                    with torch.no_grad():
                        for p, p0, e in zip(params, originals, noise):
                            p.copy_(p0 + sigma * e)
                    accs.append(_accuracy(model, inputs, targets, batch_size)[0])
            finally:
                with torch.no_grad():
                    for p, p0 in zip(params, originals):
                        p.copy_(p0)
            return sum(accs) / len(accs)

        lo, hi = 0.0, float(sigma_max)
        acc_hi = noisy_accuracy(hi)
        if base - acc_hi <= target_drop:
            lo, acc_lo = hi, acc_hi  # even sigma_max keeps the accuracy: report it
        else:
            acc_lo = base
            for _ in range(iterations):
                mid = 0.5 * (lo + hi)
                acc = noisy_accuracy(mid)
                if base - acc <= target_drop:
                    lo, acc_lo = mid, acc
                else:
                    hi = mid
    sigma = max(lo, 1e-12)
    return PacBayes(sigma, 1.0 / sigma ** 2, w_sq / (4 * sigma ** 2) + math.log(n / sigma) + 10, base, acc_lo,
                    w_sq, n)
