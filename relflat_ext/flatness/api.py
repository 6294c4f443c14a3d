"""The front door: relative flatness (Petzka et al., Definition 3) of a layer, exactly where it can
be computed and estimated where it cannot.

Conventions (docs/design.md, "Conventions"): mean-reduced loss over the n samples, Hessian with
respect to the layer's weight only (bias excluded), no 1/m factor:
``kappa_Tr(W) = sum_{s,t} <w_s, w_t> Tr(H_{s,t})`` and ``kappa_lmax = sum_s ||w_s||^2 lambda_max(H_{s,s})``.
:func:`relative_flatness` builds the :class:`~.problem.Problem` once (validation happens there),
chooses the path before touching the data (:func:`choose_path`), and hands the problem to it.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..core.data import NOTHING_COUNTED
from ..core.hooks import LayerNotCalled, NotVectorFeatures, SharedLayer, preserved, tapped
from ..core.layers import EMBEDDING_TYPES, LayerSpec, ParameterLayer, WeightView, acts_on_vectors, resolve_linear
from ..core.losses import LossSpec, get_loss, is_cross_entropy_after_log_softmax
from ..core.modes import measurement
from . import autograd, closed_form, exact, stochastic, tail as _tail
from .problem import HALF_DTYPES, METHODS, Options, Problem
from .result import FlatnessResult

PATHS: Dict[str, Callable[..., FlatnessResult]] = {"closed_form": closed_form.run, "exact": exact.run}


@measurement
def relative_flatness(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                      loss: Optional[LossSpec] = None, method: str = "auto", normalize_features: bool = False,
                      lmax: bool = False, block_trace: bool = False, batch_size: Optional[int] = None,
                      rel_tol: float = 0.05, max_probes: int = 1000, seed: Optional[int] = None,
                      weight_view: Optional[WeightView] = None, distributed: Optional[bool] = None,
                      progress: bool = False) -> FlatnessResult:
    """Relative flatness kappa_Tr of ``layer`` (a name, a submodule of ``model``, or its weight
    Parameter) on the data.

    inputs/targets: tensors (chunked by ``batch_size``; None: one batch, or batches that keep the
    autograd graph of one within 2 GiB, an eighth of a GPU's free memory, as ``result.reason``
    says), or ``inputs`` an iterable of (x, y) batches (a DataLoader) or one (x, y) pair with
    ``targets=None``; sums accumulate across batches.
    loss: "cross_entropy" | "mse" | "bce_with_logits" (the torch.nn.functional losses with their
    default mean reductions) or a callable ``loss_fn(output, target)`` averaging over samples;
    None: the model's own, which is cross entropy except for a transformers classifier whose
    ``problem_type`` says regression (MSE) or multi-label (BCE with logits).
    method (what each costs: docs/design.md, "Paths"):

    - "closed_form": the layer produces the model output and the loss is built in;
    - "exact": per-sample output Hessians, by the chain rule through a tail of Linear and
      elementwise steps (an nn.Sequential, or a model torch.fx traces), else by batched
      Hessian-vector products through the rest of the model;
    - "stochastic": the multiplicative-probe estimator for any layer whose weight multiplies
      features (Linear on any input shape, Conv1d/2d/3d, ConvTranspose1d/2d/3d, or a module with
      ``weight_view``), stopping at ``rel_tol`` relative standard error or ``max_probes``;
    - "autograd": the authors' full-Hessian baseline;
    - "auto": the closed form, else exact; the estimator where the exact path cannot run
      (convolutions, sequence inputs) or would need more than ``max_probes`` Hessian-vector
      products. ``result.reason`` says why.

    normalize_features: Theorem 4's rescaling by the features' standard deviations. lmax: also the
    max-eigenvalue variant. block_trace: also ``T[s, t] = Tr(H_{s,t})`` (d, d); off by default, as
    it can cost as much as kappa on wide layers. distributed: with torch.distributed initialized
    (None: auto; True: required), each rank's data is a shard and every rank gets the result on
    all of them. progress: a line on stderr counting the Hessian-vector products of the exact
    path and the estimator's probes (the paths that can take minutes on large layers). The model
    is measured in eval mode and left exactly as it was.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    options = Options(normalize_features=normalize_features, lmax=lmax, block_trace=block_trace, rel_tol=rel_tol,
                      max_probes=max_probes, seed=seed, weight_view=weight_view, progress=progress)
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size, distributed)
    result = _dispatch(problem, method, options)
    # Here, not in the estimator: the profile asks block traces of every layer, for Tr(H) where exact.
    missing = [(option, field) for option, field, asked in (("lmax", "kappa_lmax", lmax),
                                                            ("block_trace", "block_trace", block_trace)) if asked]
    if missing and result.method == "stochastic":
        options_asked, fields = (" and ".join(names) for names in zip(*missing))
        warnings.warn(f"relflat_ext: {options_asked} asked, but layer {problem.name!r} is estimated ({result.reason}); "
                      f"the estimator gives kappa_Tr only, so {fields} {'is' if len(missing) == 1 else 'are'} None",
                      RuntimeWarning, stacklevel=3)
    if problem.note:
        result.reason = f"{result.reason}; {problem.note}"
    return result


def _dispatch(problem: Problem, method: str, options: Options,
              estimate: Callable[[Problem, Options, str], object] = stochastic.run):
    """Runs the path for ``method``; where the estimator is the one to use, calls ``estimate(problem,
    options, reason)`` (the profile defers those layers to one shared estimate)."""
    if method == "autograd":
        return autograd.run(problem, options)
    try:
        path, plan, reason = choose_path(problem, method, options)
        if path == "stochastic":
            return estimate(problem, options, reason)
        if plan is not None and plan.log_softmax_dim is not None:  # the loss of the logits before it
            problem = dataclasses.replace(problem, loss=get_loss("cross_entropy"))
            reason += "; the model's final log_softmax taken into the cross entropy"
        return PATHS[path](problem, options, plan, reason)
    except NotVectorFeatures:
        if method != "auto":
            raise
        return estimate(problem, options, "stochastic: the layer's input is not one feature vector per sample")
    except SharedLayer:
        if method != "auto":
            raise
        return estimate(problem, options, "stochastic: the layer runs more than once per forward pass, and every use "
                                          "counts (the exact paths see one)")
    except LayerNotCalled:
        if method != "auto":
            raise
        return estimate(problem, options, "stochastic: the model did not call the layer's forward on a batch (it "
                                          "uses the weight directly, or routes the batch past it): no per-sample "
                                          "features to see")


def choose_path(problem: Problem, method: str, options: Options) -> Tuple[str, Optional[_tail.TailPlan], str]:
    """(path, tail plan, reason), decided before the data are iterated: the tail of the layer is
    read from the model's structure, and only a model neither Sequential nor traceable is run once
    on the first batch to see whether the layer produces its output."""
    if method == "stochastic":
        return "stochastic", None, "stochastic: asked for"
    if isinstance(problem.module, ParameterLayer):
        if method == "auto":
            return "stochastic", None, "stochastic: a parameter named directly (no module whose input to see)"
        raise ValueError(f"{problem.name!r} is a parameter, not a module: the exact paths need an nn.Linear's "
                         "per-sample input features; method='stochastic' (or 'auto') works from the weight")
    if not acts_on_vectors(problem.module):
        if method == "auto":
            what = ("an embedding (its features, one-hot token vectors, are never formed)"
                    if isinstance(problem.module, EMBEDDING_TYPES) else "not nn.Linear (no per-sample feature vectors)")
            return "stochastic", None, f"stochastic: the layer is {what}"
        resolve_linear(problem.model, problem.name)  # raises the error that says what to use
    if method == "closed_form" and not problem.loss.builtin:
        raise ValueError("method='closed_form' needs a built-in loss name, not a callable")
    if problem.weight_uses > 1:
        if method == "auto":
            return "stochastic", None, (f"stochastic: the layer's weight is held in {problem.weight_uses} places (tied "
                                        "weights); kappa is a function of the parameter, so every use counts, and "
                                        "the estimator in parameter space sees them all")
        raise ValueError(f"layer {problem.name!r} shares its weight with other modules (tied weights, "
                         f"{problem.weight_uses} places): method={method!r} would measure one use only; "
                         "method='stochastic' or 'autograd' include every use")
    calls = problem.weight_calls()
    if calls > 1:
        if method == "auto":
            return "stochastic", None, (f"stochastic: the layer's weight is used {calls} times in a forward pass (the "
                                        "module runs more than once, or the model uses the weight outside it, as in "
                                        "F.linear(h, layer.weight)); every use counts, and the estimator in "
                                        "parameter space sees them all")
        raise ValueError(f"the weight of layer {problem.name!r} is used {calls} times in a forward pass (the module "
                         f"runs more than once, or the model uses the weight outside it): method={method!r} would "
                         "measure the module's inputs only; method='stochastic' or 'autograd' include every use")
    with preserved(problem.model):  # in eval mode: a trace follows the mode
        plan = _tail.plan(problem.model, problem.name, problem.module,
                          final_log_softmax=is_cross_entropy_after_log_softmax(problem.loss),
                          tracer=problem.traced_graph)
    folded = plan is not None and plan.log_softmax_dim is not None  # the loss becomes cross entropy
    if method in ("auto", "closed_form") and (problem.loss.builtin or folded):
        last = (not plan.tail) if plan is not None else _produces_output(problem)
        if last:
            return "closed_form", plan, "closed_form: the layer produces the model output and the loss is built in"
        if method == "closed_form":
            raise ValueError(f"method='closed_form' needs layer {problem.name!r} to produce the model output; "
                             "use method='exact'")
    if plan is not None:
        how = "traced" if plan.traced else "Sequential"
        return "exact", plan, ("exact: second derivatives propagated by the chain rule through the tail "
                               f"(Linear and elementwise steps, {how})")
    d, m = problem.matrix.shape
    probes = m if (m < d and not options.block_trace and not options.lmax) else d
    if method == "auto" and probes > options.max_probes and not options.lmax:
        return "stochastic", None, (f"stochastic: cheaper than the exact path's {probes} Hessian-vector products "
                                    f"per batch (max_probes={options.max_probes})")
    return "exact", None, "exact: Hessian-vector products through the model's tail"


def _produces_output(problem: Problem) -> bool:
    """Whether the layer's output object is the model's output, on the first batch."""
    x, _ = next(iter(problem.batches()))
    with preserved(problem.model), tapped(problem.module, problem.name, replace_output=False) as tap, \
            torch.no_grad():
        out = problem.forward(x)
    return out is tap.raw_output


def relative_flatness_from_features(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                    loss: str = "cross_entropy", bias: Optional[torch.Tensor] = None,
                                    lmax: bool = False, normalize_features: bool = False,
                                    block_trace: bool = False) -> FlatnessResult:
    """Relative flatness of a last layer ``z = W phi + b`` from its features, in closed form.

    features (n, m), weight (d, m), targets as the loss takes them (class indices (n,) or
    probabilities (n, d) for cross entropy; (n, d) floats for MSE and BCE), bias (d,) or None.
    The targets are validated but do not enter, these losses' Hessians in z not depending on them,
    except that samples labelled -100 do not count (cross entropy ignores them, as the model-level
    call and ``F.cross_entropy`` do).
    block_trace: also return ``T`` (d, d) (an extra n*d*d GEMM for cross entropy).
    """
    record = get_loss(loss)
    if not record.builtin:
        raise ValueError("relative_flatness_from_features needs a built-in loss name, not a callable")
    for name, t, dim in (("features", features, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if features.shape[0] == 0:
        raise ValueError("features is empty: at least one sample is needed")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one row and one column, got shape {tuple(weight.shape)}")
    record.check_targets(targets, (features.shape[0], weight.shape[0]))
    targets, features = closed_form.counted_rows(record, targets, features)  # as the model-level call counts
    if features.shape[0] == 0:
        raise ValueError(NOTHING_COUNTED)
    note = ""
    half = [t.dtype for t in (features, weight, bias) if t is not None and t.dtype in HALF_DTYPES]
    if half:
        note = f"computed in float32 from {str(half[0]).replace('torch.', '')} inputs"
        features, weight = features.float(), weight.float()
        bias = None if bias is None else bias.float()
    result = closed_form.from_features(features, weight, bias, record, Options(
        normalize_features=normalize_features, lmax=lmax, block_trace=block_trace))
    result.reason = "closed_form: features and weight given" + (f"; {note}" if note else "")
    return result
