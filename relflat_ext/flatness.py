"""Relative flatness (Petzka et al., Definition 3) of an ``nn.Linear`` layer, exactly.

Conventions (DESIGN.md section 1): mean-reduced loss over the n samples, Hessian with respect to
the layer's weight only (bias excluded), no 1/m factor:
``kappa_Tr(W) = sum_{s,t} <w_s, w_t> Tr(H_{s,t})`` and ``kappa_lmax = sum_s ||w_s||^2 lambda_max(H_{s,s})``.
Nothing of size (d*m)^2 is formed: ``H = (1/n) sum_i Hz_i (x) phi_i phi_i^T`` when samples do not
interact, so both need only the per-sample output Hessians ``Hz_i``: closed form for the last
layer; the second-order chain rule when the tail is a chain of Linear and elementwise steps
(:mod:`relflat_ext._tail` says when, :mod:`relflat_ext._chain_rule` does it with GEMMs);
``min(d, m)`` batched Hessian-vector products with respect to the layer output for any other model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _chain_rule, _dist, _tail, ops
from ._losses import CROSS_ENTROPY, LossSpec, loss_code, loss_for_derivatives, output_hessian_diagonal
from ._model import (LayerSpec, NotVectorFeatures, check_finite, check_vector_features, hessian_vector_products,
                     inverse_scale, iterate_batches, preserved, resolve_layer, tapped)
from .stochastic import WeightView, resolve_weight_layer, stochastic_estimate

METHODS = ("auto", "closed_form", "exact", "autograd", "stochastic")
# Elements of the (probes, samples, d) Hessian-vector-product block held at once by the exact path.
# 2^18 (1 MiB in float32) measured best on CPU: larger blocks are memory-bound and hit vmap's slow
# per-probe fallback for ops without batching rules (tanh_backward): 4.6 s vs 16.7 s at 2^24 for
# the 784-512-256-10 MLP's 256x512 layer, n = 10000, and 0.10 s vs 0.71 s for a 32x64 layer.
HVP_BLOCK_ELEMENTS = 1 << 18
# On CPU the HVP path works through sub-batches of this many (samples x d) elements, which stay
# cache-resident: for the case above 3.2 s vs 3.8 s unsplit (medians of 3 runs in one process;
# 2^18, 2^20 and 2^21 within noise of 2^19).
EXACT_CPU_CHUNK_ELEMENTS = 1 << 19
# Above this many outputs (and with m >= d) the closed form takes kappa from the block sum.
WIDE_HEAD = 64
# Largest (d, m, m) stack of diagonal Hessian blocks built for lmax, in bytes.
LMAX_MAX_BYTES = 4 << 30


@dataclasses.dataclass
class FlatnessResult:
    """kappa: kappa_Tr; kappa_lmax: max-eigenvalue variant (when asked); block_trace (d, d):
    ``T[s, t] = Tr(H_{s,t})`` (None when not asked); method: the path that ran; n: samples used;
    layer: the layer's name; feature_scale (m,): Theorem 4's per-feature standard deviations when
    ``normalize_features`` (0 for zero-spread features, which are dropped); seconds: wall time; for the
    stochastic method kappa_stderr (standard error) and probes; reason: why "auto" chose its path."""
    kappa: float
    kappa_lmax: Optional[float]
    block_trace: Optional[torch.Tensor]
    method: str
    n: int
    layer: str = ""
    feature_scale: Optional[torch.Tensor] = None
    seconds: float = 0.0
    kappa_stderr: Optional[float] = None
    probes: Optional[int] = None
    reason: str = ""


def check_targets(code: int, targets: torch.Tensor, n: int, d: int) -> None:
    """Targets as ``F.cross_entropy`` / ``F.mse_loss`` / ``F.binary_cross_entropy_with_logits`` take them."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} samples but the features have {n}")
    if code == CROSS_ENTROPY:
        if targets.dim() == 1 and not targets.is_floating_point():
            low, high = torch.aminmax(targets) if n else (0, 0)  # one pass, not min and max
            if int(low) < 0 or int(high) >= d:
                raise ValueError(f"targets must be class indices in [0, {d}) for cross_entropy")
            return
        if targets.dim() == 2 and targets.is_floating_point() and targets.shape[1] == d:
            if not torch.allclose(targets.sum(1), torch.ones_like(targets[:, 0]), atol=1e-4):
                raise ValueError("probability targets for cross_entropy must have rows summing to 1")
            return
        raise ValueError(f"targets for cross_entropy must be class indices (n,) or probabilities (n, {d}), "
                         f"got shape {tuple(targets.shape)} and dtype {targets.dtype}")
    if tuple(targets.shape) != (n, d) or not targets.is_floating_point():
        raise ValueError(f"targets must be a float tensor of shape ({n}, {d}) like the layer output, "
                         f"got shape {tuple(targets.shape)} and dtype {targets.dtype}")


class NotFinite(ValueError):
    """A sum came out NaN or Inf; the caller says which input caused it."""


def _explain_not_finite(exc: NotFinite, dtype: torch.dtype, tensors: dict) -> ValueError:
    """The error for a non-finite result: the input (name -> tensor) holding NaN/Inf, or else "too large"."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            check_finite(name, t)
    return ValueError(f"{exc}: the inputs are finite but too large for {dtype} (the squared feature norms or "
                      "the logits overflow); rescale them or use float64")


class _Accumulator:
    """Sums over samples that make kappa, T and the lmax blocks, batch by batch."""

    def __init__(self, weight: torch.Tensor, want_block: bool, lmax: bool, distributed: bool = False):
        d, m = weight.shape
        self.weight, self.n, self.kappa_sum = weight, 0, weight.new_zeros(())
        self.distributed = distributed
        self.block = weight.new_zeros((d, d)) if want_block else None
        if lmax and d * m * m * weight.element_size() > LMAX_MAX_BYTES:
            raise ValueError(f"lmax=True needs the {d} diagonal Hessian blocks of size {m}x{m} "
                             f"({d * m * m * weight.element_size() / 2**30:.1f} GiB); too large")
        self.diag_blocks = weight.new_zeros((d, m, m)) if lmax else None

    @functools.cached_property
    def gram(self) -> torch.Tensor:
        """G = W W^T (d, d), once per call (the exact paths contract every batch with it)."""
        return self.weight @ self.weight.T

    def add_diagonal(self, hdiag: torch.Tensor, features: torch.Tensor) -> None:
        """diag_blocks[s] += sum_i Hz_i[s, s] phi_i phi_i^T."""
        self.diag_blocks += torch.einsum("ns,ni,nj->sij", hdiag, features, features)

    def result(self, method: str, layer: str, scale, start: float) -> FlatnessResult:
        if self.distributed:  # every rank's partial sums, reduced: the result on the union of the shards
            _dist.check_same_shapes("the layer's weight shape", tuple(self.weight.shape), self.weight.device)
            count = torch.tensor(float(self.n), dtype=torch.float64, device=self.weight.device)
            _dist.all_reduce_sum([self.kappa_sum, count, self.block, self.diag_blocks])
            self.n = int(count.item())
        n = self.n
        if not math.isfinite(float(self.kappa_sum)):
            raise NotFinite(f"kappa is not finite ({float(self.kappa_sum)})")
        kappa_lmax = None
        if self.diag_blocks is not None:
            top = torch.linalg.eigvalsh(self.diag_blocks / n)[:, -1]
            kappa_lmax = float((self.weight.pow(2).sum(1) * top).sum())
        return FlatnessResult(float(self.kappa_sum) / n, kappa_lmax,
                              None if self.block is None else self.block / n, method, n, layer, scale,
                              time.perf_counter() - start)


def _normalized(features: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]):
    """Theorem 4: phi' = phi / s, W' = W diag(s) (the layer output is unchanged up to dropped
    zero-spread features)."""
    if scale is None:
        return features, weight
    return features * inverse_scale(scale), weight * scale


def relative_flatness_from_features(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    loss: str = "cross_entropy", bias: Optional[torch.Tensor] = None,
                                    lmax: bool = False, normalize_features: bool = False,
                                    block_trace: bool = False) -> FlatnessResult:
    """Relative flatness of a last layer ``z = W phi + b`` from its features, in closed form.

    features (n, m), weight (d, m), targets as the loss takes them (class indices (n,) or
    probabilities (n, d) for cross entropy; (n, d) floats for MSE and BCE), bias (d,) or None.
    The targets are validated but do not enter: these losses' Hessians in z do not depend on them.
    block_trace: also return ``T`` (d, d) (an extra n*d*d GEMM for cross entropy).
    """
    start = time.perf_counter()
    code = loss_code(loss)
    for name, t, dim in (("features", features, 2), ("weight", weight, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor")
    if features.shape[0] == 0:
        raise ValueError("features is empty: at least one sample is needed")
    check_targets(code, targets, features.shape[0], weight.shape[0])
    scale = _feature_scale_from(features) if normalize_features else None
    phi, w = _normalized(features, weight, scale)
    acc = _Accumulator(w, block_trace, lmax)
    _closed_form_batch(acc, phi, w, bias, code)
    try:
        return acc.result("closed_form", "", scale, start)
    except NotFinite as exc:
        # Any NaN/Inf in the inputs reaches kappa through ||phi_i||^2 or the softmax, so this check
        # after the fact costs nothing on good input (a scan up front cost more than the kernel).
        raise _explain_not_finite(exc, features.dtype, {"features": features, "weight": weight, "bias": bias}) from None


def _closed_form_batch(acc: _Accumulator, phi: torch.Tensor, w: torch.Tensor, bias, code: int) -> None:
    d, m = w.shape
    # Wide cross-entropy heads: kappa from the block sum, a symmetric product (about n*d*d/2 work)
    # instead of per-sample terms (n*d*min(d, m)).
    by_block = code == CROSS_ENTROPY and d > WIDE_HEAD and m >= d
    per_sample, block = ops.last_layer_flatness(phi, w, bias, code, acc.block is not None, per_sample=not by_block)
    acc.kappa_sum = acc.kappa_sum + ((acc.gram * block).sum() if by_block else per_sample.sum())
    acc.n += phi.shape[0]
    if acc.block is not None:
        acc.block += block
    if acc.diag_blocks is not None:  # z = W' phi' + b = W phi + b
        acc.add_diagonal(output_hessian_diagonal(F.linear(phi, w, bias), code), phi)


def _feature_scale_from(features: torch.Tensor) -> torch.Tensor:
    return features.std(dim=0, unbiased=False)


def feature_scale(model: nn.Module, layer: LayerSpec, inputs, targets=None,
                  batch_size: Optional[int] = None, distributed: Optional[bool] = None) -> torch.Tensor:
    """Per-feature standard deviation (population, over all samples) of the layer's input: the
    ``V`` of Theorem 4 (DESIGN.md: standard deviation, not variance). Zero-spread features get 0
    and are dropped from the normalized measure (see :func:`inverse_scale`).
    Under torch.distributed, over the samples of every rank."""
    name, lin = resolve_layer(model, layer)
    total = sq_total = None
    n = 0
    with preserved(model), tapped(lin, name, replace_output=False) as tap, torch.no_grad():
        for x, y in iterate_batches(inputs, targets, batch_size):
            tap.reset()
            model(x)
            phi = tap.features.double()
            total = phi.sum(0) if total is None else total + phi.sum(0)
            sq_total = phi.pow(2).sum(0) if sq_total is None else sq_total + phi.pow(2).sum(0)
            n += phi.shape[0]
    if _dist.active(distributed):
        count = torch.tensor(float(n), dtype=torch.float64, device=total.device)
        _dist.all_reduce_sum([total, sq_total, count])
        n = count.item()
    mean = total / n
    return (sq_total / n - mean.pow(2)).clamp_min(0).sqrt().to(lin.weight.dtype)


def relative_flatness(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None,
                      loss: LossSpec = "cross_entropy", method: str = "auto",
                      normalize_features: bool = False, lmax: bool = False,
                      batch_size: Optional[int] = None, block_trace: bool = False,
                      rel_tol: float = 0.05, max_probes: int = 1000, seed: Optional[int] = None,
                      weight_view: Optional[WeightView] = None, distributed: Optional[bool] = None) -> FlatnessResult:
    """Relative flatness kappa_Tr of ``layer`` (an ``nn.Linear`` in ``model``) on the data.

    inputs/targets: tensors (chunked by ``batch_size``), or ``inputs`` an iterable of (x, y)
    batches (a DataLoader) with ``targets=None``; sums accumulate across batches.
    loss: "cross_entropy" | "mse" | "bce_with_logits" (the torch.nn.functional losses with their
    default mean reductions) or a callable ``loss_fn(output, target)`` averaging over samples.
    method: "closed_form" (layer produces the model output, built-in loss), "exact" (per-sample
    output Hessians: propagated by the chain rule through a tail that is a chain of Linear and
    elementwise steps, in an nn.Sequential or a model torch.fx traces; otherwise batched HVPs w.r.t. the layer output, d probes, or m probes with the columns
    of W when m < d and neither ``block_trace`` nor ``lmax`` is asked; ``result.reason`` says
    which), "autograd" (the
    authors' full-Hessian baseline), or "auto" (closed form when possible, else exact).
    "stochastic": the multiplicative-probe estimator (:mod:`relflat_ext.stochastic`) for any layer
    whose weight acts linearly on features (Linear on any input shape, Conv1d/2d/3d, or a module
    with ``weight_view``), stopping at ``rel_tol`` relative standard error or ``max_probes``;
    "auto" uses it where the exact path cannot run (convolutions, sequence inputs), or would need more
    than ``max_probes`` Hessian-vector products (never where the closed form or the chain rule
    applies: they cost GEMMs), and says why in ``result.reason``. normalize_features: Theorem 4's rescaling by the features' standard deviations.
    distributed: with torch.distributed initialized (None: auto; True: required), each rank's data is
    a shard and the partial sums are all-reduced: every rank gets the result on all the data.
    The model is measured in eval mode (BatchNorm running statistics, no dropout) and is left
    exactly as it was: training flags, requires_grad, .grad and weights.
    block_trace: also return ``T[s, t] = Tr(H_{s,t})`` (d, d); off by default, since it can cost as
    much as kappa itself on wide layers (an n*d*d GEMM, and d instead of m probes on the HVP path).
    """
    distributed = _dist.active(distributed)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not callable(loss):
        loss_code(loss)
    if method == "autograd":
        from .baseline import relative_flatness_autograd
        return relative_flatness_autograd(model, layer, inputs, targets, loss=loss, lmax=lmax,
                                          normalize_features=normalize_features, batch_size=batch_size)
    if method == "stochastic" or (method == "auto" and not _is_linear(model, layer)):
        reason = "" if method == "stochastic" else "stochastic: the layer is not nn.Linear (no per-sample feature vectors)"
        return _stochastic(model, layer, inputs, targets, loss, normalize_features, batch_size, rel_tol, max_probes,
                           seed, weight_view, reason, distributed)
    if method == "auto":
        name, lin = resolve_layer(model, layer)
        d, m = lin.weight.shape
        exact_probes = m if (m < d and not block_trace and not lmax) else d
        if exact_probes > max_probes and not lmax and not _exact_without_hvps(model, name, lin):
            return _stochastic(model, layer, inputs, targets, loss, normalize_features, batch_size, rel_tol,
                               max_probes, seed, weight_view, f"stochastic: cheaper than the exact path's "
                               f"{exact_probes} Hessian-vector products per batch (max_probes={max_probes})",
                               distributed)
        try:
            res = _linear_layer(model, layer, inputs, targets, loss, None, normalize_features, lmax, batch_size,
                                block_trace, distributed)
        except NotVectorFeatures:
            return _stochastic(model, layer, inputs, targets, loss, normalize_features, batch_size, rel_tol,
                               max_probes, seed, weight_view, "stochastic: the layer's input is not (n, m)",
                               distributed)
        return res
    return _linear_layer(model, layer, inputs, targets, loss, method, normalize_features, lmax, batch_size,
                         block_trace, distributed)


def _exact_without_hvps(model: nn.Module, name: str, lin: nn.Linear) -> bool:
    """Whether the exact path runs without Hessian-vector products (closed form or chain rule:
    its cost is a few GEMMs, whatever d), so "auto" must not trade it for an estimate. Models
    neither a Sequential nor traceable are not run to find out: they keep the probe count rule."""
    with preserved(model):
        return _tail.plan(model, name, lin) is not None


def _linear_layer(model, layer, inputs, targets, loss, method: Optional[str], normalize_features, lmax,
                  batch_size, block_trace, distributed) -> FlatnessResult:
    """The closed-form and exact paths for an nn.Linear layer; ``method=None`` picks the closed form
    when the layer produces the model output and the loss is built in, else exact."""
    start = time.perf_counter()
    name, lin = resolve_layer(model, layer)
    if method == "closed_form" and callable(loss):
        raise ValueError("method='closed_form' needs a built-in loss name, not a callable")
    scale = feature_scale(model, name, inputs, targets, batch_size, distributed) if normalize_features else None
    weight = lin.weight.detach()
    w = weight if scale is None else weight * scale
    bias = lin.bias.detach() if lin.bias is not None else None
    acc = _Accumulator(w, block_trace, lmax, distributed)
    with preserved(model):
        # In eval mode: a trace follows the mode. The closed form only looks for a plain Sequential.
        tail_plan = _tail.plan(model, name, lin, trace=method != "closed_form")
        chosen = method
        ends_sequential = tail_plan is not None and not tail_plan.traced and not tail_plan.tail
        if chosen is None and tail_plan is not None and (tail_plan.tail or callable(loss)):
            chosen = "exact"  # no need to run the model to see
        elif chosen is None and ends_sequential:
            chosen = "closed_form"
        # The layer ends a plain Sequential: its input is the prefix's output, and the model's own
        # output (the logits the kernel computes again) is never needed. (A trace's view of the
        # output is checked by running the model.)
        prefix_only = chosen == "closed_form" and ends_sequential
        try:
            for x, y in iterate_batches(inputs, targets, batch_size, check_values=not prefix_only):
                if prefix_only:
                    phi = _prefix_features(tail_plan, name, x)
                elif chosen in (None, "closed_form"):
                    with tapped(lin, name, replace_output=False) as tap, torch.no_grad():
                        out = model(x)
                    phi = tap.features
                    is_last = out is tap.raw_output
                    if chosen is None:
                        chosen = "closed_form" if is_last and not callable(loss) else "exact"
                    elif not is_last:
                        raise ValueError(f"method='closed_form' needs layer {name!r} to produce the model "
                                         "output; use method='exact'")
                if chosen == "closed_form":
                    check_targets(loss_code(loss), y, x.shape[0], w.shape[0])
                    _closed_form_batch(acc, phi if scale is None else phi * inverse_scale(scale), w, bias,
                                       loss_code(loss))
                else:
                    tail_plan = _exact_batch(acc, model, name, lin, x, y, loss, w, scale, tail_plan)
            result = acc.result(chosen, name, scale, start)
        except NotFinite as exc:
            data = {"inputs": inputs, "targets": targets} if isinstance(inputs, torch.Tensor) else {}
            raise _explain_not_finite(exc, weight.dtype, {**data, **dict(model.named_parameters())}) from None
    if chosen == "closed_form":
        result.reason = "closed_form: the layer produces the model output and the loss is built in"
    elif tail_plan is not None:
        result.reason = ("exact: second derivatives propagated by the chain rule through the tail "
                         f"(Linear and elementwise steps, {'traced' if tail_plan.traced else 'Sequential'})")
    else:
        result.reason = "exact: Hessian-vector products through the model's tail"
    return result


def _prefix_features(plan: _tail.TailPlan, name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's input, from the modules before it in a plain Sequential."""
    with torch.no_grad():
        for module in plan.prefix:
            x = module(x)
    check_vector_features(name, x)
    return x


def _is_linear(model: nn.Module, layer: LayerSpec) -> bool:
    return isinstance(resolve_weight_layer(model, layer)[1], nn.Linear)


def _stochastic(model, layer, inputs, targets, loss, normalize_features, batch_size, rel_tol, max_probes, seed,
                weight_view, reason, distributed) -> FlatnessResult:
    name, module = resolve_weight_layer(model, layer)
    scale = None
    if normalize_features:
        if not isinstance(module, nn.Linear):
            raise ValueError("normalize_features (Theorem 4) is defined here for nn.Linear layers")
        scale = feature_scale(model, name, inputs, targets, batch_size, distributed)
    est = stochastic_estimate(model, name, inputs, targets, loss=loss, rel_tol=rel_tol, max_probes=max_probes,
                              seed=seed, batch_size=batch_size, feature_scale=scale, weight_view=weight_view,
                              distributed=distributed)
    return FlatnessResult(est.value, None, None, "stochastic", est.n, name, scale, est.seconds,
                          kappa_stderr=est.stderr, probes=est.probes, reason=reason)


def _exact_batch(acc: _Accumulator, model, name, lin, x, y, loss: LossSpec, w: torch.Tensor,
                 scale: Optional[torch.Tensor], tail_plan: Optional[_tail.TailPlan]) -> Optional[_tail.TailPlan]:
    """Adds the batch by the chain rule through ``tail_plan`` or by HVPs; returns the plan to use for
    the next batches (None once a traced tail failed to reproduce the model)."""
    if tail_plan is not None:
        if _exact_tail_batch(acc, tail_plan, model, name, lin, x, y, loss, w, scale):
            return tail_plan
        warnings.warn(f"relflat_ext: the traced tail of layer {name!r} does not reproduce the model's output; "
                      "using Hessian-vector products (same result, slower)", RuntimeWarning)
    # On CPU, sub-batches whose (samples, d) tensors stay cache-resident: each HVP is a handful of
    # memory-bound elementwise passes (samples are independent, so the split is exact).
    step = max(1, EXACT_CPU_CHUNK_ELEMENTS // w.shape[0]) if x.device.type == "cpu" else x.shape[0]
    for start in range(0, x.shape[0], step):
        _exact_chunk(acc, model, name, lin, x[start:start + step], y[start:start + step], loss, w, scale)
    return None


def _exact_tail_batch(acc: _Accumulator, tail_plan: _tail.TailPlan, model, name: str, lin, x, y,
                      loss: LossSpec, w: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """The chain-rule exact path (see _chain_rule); False, with nothing added, if a traced tail
    does not reproduce the model's output."""
    with torch.no_grad():
        if tail_plan.traced:
            with tapped(lin, name, replace_output=False) as tap:
                out = model(x)
            phi, z = tap.features, tap.output
            if not _tail.reproduces(_chain_rule.run_tail(tail_plan.tail, z), out):
                return False
        else:
            phi = _prefix_features(tail_plan, name, x)
            z = lin(phi)
    code = None if callable(loss) else loss_code(loss)
    if code is not None:
        check_targets(code, y, z.shape[0], _chain_rule.out_features(tail_plan.tail, z.shape[1]))
    phi = phi if scale is None else phi * inverse_scale(scale)
    total, hdiag = _chain_rule.output_hessian_sums(tail_plan.tail, z, y, loss_for_derivatives(loss), code,
                                                   phi.pow(2).sum(1), acc.diag_blocks is not None)
    acc.n += z.shape[0]
    acc.kappa_sum = acc.kappa_sum + (acc.gram * total).sum()
    if acc.block is not None:
        acc.block += total
    if hdiag is not None:
        acc.add_diagonal(hdiag, phi)
    return True


def _exact_chunk(acc: _Accumulator, model, name, lin, x, y, loss: LossSpec, w: torch.Tensor,
                 scale: Optional[torch.Tensor]) -> None:
    loss_fn = loss_for_derivatives(loss)
    with tapped(lin, name, replace_output=True) as tap, torch.enable_grad():
        out = model(x)
        if not callable(loss):
            check_targets(loss_code(loss), y, out.shape[0], out.shape[1] if out.dim() == 2 else 1)
        batch_loss = loss_fn(out, y)
        if batch_loss.dim() != 0:
            raise ValueError(f"loss must return a scalar (mean over samples), got shape {tuple(batch_loss.shape)}")
        z = tap.output
        grad_z = torch.autograd.grad(batch_loss, z, create_graph=True)[0]
    phi = tap.features if scale is None else tap.features * inverse_scale(scale)
    n_b, d = z.shape
    m = w.shape[1]
    # Batch mean loss: d^2 E_b / dz_i^2 = Hz_i / n_b, so the weights carry the factor n_b.
    sq_norms = phi.pow(2).sum(1) * n_b
    acc.n += n_b
    if not grad_z.requires_grad:  # loss linear in z: Hz = 0, nothing to add
        return
    use_weight_probes = m < d and acc.block is None and acc.diag_blocks is None
    probe_dirs = w if use_weight_probes else torch.eye(d, dtype=w.dtype, device=w.device)
    num_probes = probe_dirs.shape[1]
    k_block = max(1, min(num_probes, HVP_BLOCK_ELEMENTS // max(1, n_b * d)))
    hdiag = phi.new_empty((n_b, d)) if acc.diag_blocks is not None else None
    for c0 in range(0, num_probes, k_block):
        cols = slice(c0, min(c0 + k_block, num_probes))
        dirs = probe_dirs[:, cols].T  # (k, d)
        probes = dirs[:, None, :].expand(-1, n_b, -1)
        hz = hessian_vector_products(grad_z, z, probes).permute(1, 2, 0)  # (n_b, d, k): Hz_i / n_b
        gram_cols = w[:, cols] if use_weight_probes else acc.gram[:, cols]
        per_sample, block = ops.contract_output_hessians(sq_norms, hz, gram_cols, acc.block is not None)
        acc.kappa_sum = acc.kappa_sum + per_sample.sum()
        if acc.block is not None:
            acc.block[:, cols] += block
        if hdiag is not None:
            idx = torch.arange(cols.start, cols.stop, device=hz.device)
            hdiag[:, cols] = hz[:, idx, idx - cols.start] * n_b
    if hdiag is not None:
        acc.add_diagonal(hdiag, phi)
