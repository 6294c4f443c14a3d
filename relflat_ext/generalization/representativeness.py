"""Representativeness in feature space (Petzka et al., Sections 2, 5, 6), estimated with the
fused Gaussian-KDE op.

Split S into ``folds`` random folds (``repeats`` independent times), or take an explicit
``held_out`` set. For every held-out point q, with the train points k (the other folds, or all of S),

    rep_q = l(f(x_q), y_q) - sum_k w_qk l(f(x_k), y_k),
    w_qk  = N(phi_q; phi_k, h_k^2 I) / sum_k' N(phi_q; phi_k', h_k'^2 I)      (normalized weights)

with ``phi`` the features entering the layer: the model's loss at a point it was not interpolated
from, minus the loss the local distributions around the train points carry to it. ``labels="train"``
(the default) keeps each train point's label, as Definition 1 does, so that ``gap = Rep + E_F``
is an identity; ``labels="held_out"`` uses the query's label (eq. 3 read literally).
``h_k = delta * ||phi_k||`` (``bandwidth="relative"``, Proposition 2's local distributions), or
one global bandwidth (a float, or ``"cv"``: held-out likelihood). The value is the mean of
``rep_q`` over all held-out points of all folds and repeats; the standard error is over the
per-fold means. All folds and repeats come from one call of the kernel. How this differs from the
authors' code, and why: docs/design.md, "Representativeness".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from ..core.hooks import NotVectorFeatures, is_token_targets, preserved, tapped
from ..core.layers import LayerSpec, resolve_linear
from ..core.modes import measurement
from ..flatness import Problem
from ..flatness.closed_form import counted_rows
from ..flatness.exact import check_token_wise
from ..flatness.result import estimate_text
from .kde import select_bandwidth

BandwidthSpec = Union[str, float]
# Grid for bandwidth="cv", in units of Scott's rule bandwidth sigma * n^(-1/(m+4)).
CV_GRID = torch.logspace(-1.0, 1.0, 21, dtype=torch.float64)


@dataclasses.dataclass(repr=False)
class RepresentativenessResult:
    """value: mean of rep_q over held-out points, folds and repeats (signed); stderr: standard error
    of the per-fold means (of the points, with an explicit held-out set); fold_values (repeats,
    folds); per_sample (repeats, n): rep_q of each point when held out ((1, n_held_out) with an
    explicit held-out set); bandwidth: "relative" or the global bandwidth used. Points are samples,
    or the counted tokens where the model's output is per token (an LM head; folds then hold out
    whole sequences); n counts them."""
    value: float
    stderr: float
    fold_values: torch.Tensor
    per_sample: torch.Tensor
    bandwidth: Union[str, float]
    delta: float
    folds: int
    repeats: int
    n: int
    m: int
    layer: str

    def __repr__(self) -> str:
        split = "a held-out set" if self.folds == 1 else f"{self.folds} folds x {self.repeats}"
        return (f"RepresentativenessResult(layer={self.layer!r}, value={estimate_text(self.value, self.stderr)}, "
                f"delta={self.delta:.3g}, bandwidth={self.bandwidth!r}, {split}, n={self.n}, m={self.m})")


def _collect(problem: Problem, lin: nn.Linear):
    """Over all batches: the features entering the layer (N, m), the model outputs (N, d), the
    targets and each row's sample (N,). Rows are samples, or, with token targets and a model that
    maps each token's layer output to that token's output alone (an LM head, a last MLP block;
    checked on every batch), the counted tokens, each with its sequence as its sample."""
    feats, outs, ys, samples = [], [], [], []
    seen = 0
    with preserved(problem.model):
        for x, y in problem.batches():
            maybe_tokens = y.dim() >= 2 and not y.is_floating_point()  # the token check needs a graph
            with tapped(lin, problem.name, replace_output=maybe_tokens) as tap, torch.set_grad_enabled(maybe_tokens):
                out = problem.forward(x)
                problem.loss.check(out, y)
                phi = tap.input
                tokens = phi.dim() == 3 and out.dim() == 3 and is_token_targets(phi, y)
                if tokens:
                    try:
                        check_token_wise(problem.name, out, tap.output)
                    except NotVectorFeatures as exc:
                        raise ValueError(str(exc).split("; use method")[0] + ": representativeness needs one "
                                         "feature vector per output") from None
            n = y.shape[0]
            owner = torch.arange(seen, seen + n, device=y.device)
            if tokens:  # the counted tokens as rows, each with its sequence
                y, phi, out, owner = counted_rows(problem.loss, y, phi.reshape(-1, phi.shape[-1]),
                                                  out.reshape(-1, out.shape[-1]), owner.repeat_interleave(y.shape[1]))
            else:
                if out.dim() != 2:
                    raise ValueError(f"the model output must be (n, d) for representativeness (one output per "
                                     f"sample, whose features the kernel compares), or (n, seq, d) with token "
                                     f"targets (n, seq), got {tuple(out.shape)}")
                if phi.dim() > 2:
                    raise ValueError(f"layer {problem.name!r} takes a feature vector per position "
                                     f"{tuple(phi.shape)} and the model gives one output per sample: "
                                     "representativeness needs one feature vector per sample (or per token, "
                                     "with a per-token output and token targets)")
                if phi.shape[0] != out.shape[0]:
                    raise ValueError(f"layer {problem.name!r} sees {phi.shape[0]} feature vectors for "
                                     f"{out.shape[0]} samples (the model routes samples through it, or puts "
                                     "several rows per sample into it): "
                                     "representativeness needs one feature vector per sample")
                y, phi, out, owner = counted_rows(problem.loss, y, phi, out, owner)  # no samples labelled -100
            feats.append(phi)
            outs.append(out.detach())
            ys.append(y)
            samples.append(owner)
            seen += n
    phi, out = torch.cat(feats), torch.cat(outs)
    if not (bool(torch.isfinite(phi).all()) and bool(torch.isfinite(out).all())):  # else the kernel's own error
        problem.check_outputs_finite()
        raise ValueError(f"the features entering layer {problem.name!r} are NaN or Inf on the data, whose inputs "
                         "and weights are finite: the forward itself computes them (a log or a division?)")
    return phi, out, torch.cat(ys), torch.cat(samples)


LABELS = ("train", "held_out")


def _random_folds(n: int, folds: int, repeats: int, seed: Optional[int], device) -> torch.Tensor:
    """(repeats, n) fold ids, each row a balanced random split of n samples."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.empty((repeats, n), dtype=torch.long)
    for r in range(repeats):
        ids[r, torch.randperm(n, generator=gen)] = torch.arange(n) % folds
    return ids.to(device)


def _cv_bandwidth(features: torch.Tensor, folds: int) -> float:
    n, m = features.shape
    sigma = features.var(0, unbiased=False).mean().sqrt().clamp_min(torch.finfo(features.dtype).tiny)
    grid = (CV_GRID * float(sigma) * n ** (-1.0 / (m + 4))).to(features.dtype)
    return select_bandwidth(features, grid, folds=folds).bandwidth


@measurement
def representativeness(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                       delta: float = 0.1, folds: int = 10, repeats: int = 1,
                       bandwidth: BandwidthSpec = "relative", loss: Optional[str] = None,
                       seed: Optional[int] = None, batch_size: Optional[int] = None,
                       held_out=None, labels: str = "train") -> RepresentativenessResult:
    """Representativeness of the data in the feature space entering ``layer`` (the estimator is
    described in this module's docstring): cross-validated over S, or against ``held_out``.

    inputs/targets as in :func:`relative_flatness`; loss a built-in name (every label's loss of a
    train prediction is needed, so callables are not accepted); delta > 0 sets the relative
    bandwidths ``delta * ||phi_k||``; folds in [2, n]; repeats >= 1 independent random splits;
    seed makes the splits reproducible; held_out: an ``(x, y)`` pair of tensors or an iterable of
    batches, compared against all of S instead of folds; labels: "train" or "held_out" (whose
    label the interpolated loss uses). The model is left exactly as it was.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size)
    if not problem.loss.builtin:
        raise ValueError("representativeness needs a built-in loss name (the loss of every label); for a model "
                         "that returns a tuple, measure a wrapper whose forward returns its logits (e.g. "
                         "model(x)[0]), naming its layers through the wrapper")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a positive number, got {delta!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    name, lin = resolve_linear(problem.model, problem.name, "representativeness")
    record = problem.loss
    phi, out, y, sample = _collect(problem, lin)
    n, m = phi.shape
    n_samples = int(sample[-1]) + 1
    if held_out is None and folds > n_samples:
        raise ValueError(f"folds ({folds}) must not exceed the number of samples ({n_samples})")
    # The kernel averages per-sample statistics in which every label's loss is affine. Both in
    # float64 before the kernel's dtype: losses near 0 (a confident minimum) keep their digits.
    losses, values = record.per_sample_float64(out, y), record.statistics_float64(out)
    kernel_loss = lambda wv: record.loss_from_statistics(wv, y)  # noqa: E731
    bw, key_scale, used = _bandwidth_args(bandwidth, phi, delta, folds)
    if labels == "train":
        values, kernel_loss = losses[:, None], (lambda wv: wv[..., 0])
    if held_out is not None:
        hx, hy = held_out if isinstance(held_out, (tuple, list)) else (held_out, None)
        held = Problem.build(model, name, hx, hy, record, batch_size)
        q_phi, q_out, q_y, _ = _collect(held, resolve_linear(held.model, name)[1])
        q_losses = record.per_sample_float64(q_out, q_y)
        q_kernel_loss = kernel_loss if labels == "train" else (lambda wv: record.loss_from_statistics(wv, q_y))
        _, wval = ops.gaussian_kernel_reduce(q_phi.to(phi.dtype), phi, values.to(phi.dtype), bw, key_scale)
        per_sample = q_losses.to(phi.dtype) - q_kernel_loss(wval[:, 0])  # (1, n_held_out)
        stderr = float(per_sample.std() / math.sqrt(per_sample.numel())) if per_sample.numel() > 1 else math.nan
        return RepresentativenessResult(float(per_sample.mean()), stderr, per_sample.mean(1, keepdim=True),
                                        per_sample, used, float(delta), 1, 1, n, m, name)
    # Folds of samples: a sequence's tokens are held out together (they share their context)
    ids = _random_folds(n_samples, folds, repeats, seed, phi.device)[:, sample]
    _, wval = ops.gaussian_kernel_reduce(phi, phi, values.to(phi.dtype), bw, key_scale, ids, ids)
    per_sample = losses.to(phi.dtype) - kernel_loss(wval[:, 0])  # (repeats, n)
    counts = torch.zeros((repeats, folds), dtype=phi.dtype, device=phi.device)
    sums = torch.zeros_like(counts)
    counts.scatter_add_(1, ids, torch.ones_like(per_sample))
    sums.scatter_add_(1, ids, per_sample)
    fold_values = sums / counts
    stderr = float(fold_values.std() / math.sqrt(fold_values.numel())) if fold_values.numel() > 1 else math.nan
    return RepresentativenessResult(float(per_sample.mean()), stderr, fold_values, per_sample, used,
                                    float(delta), folds, repeats, n, m, name)


def _bandwidth_args(bandwidth: BandwidthSpec, phi: torch.Tensor, delta: float, folds: int):
    """(bandwidths (1,), key_scale (n,) or None, what to report) for a bandwidth spec."""
    if bandwidth == "relative":
        norms = phi.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError("bandwidth='relative' needs nonzero features (h_k = delta * ||phi_k||); "
                             f"{int((norms == 0).sum())} samples have all-zero features: use a global bandwidth")
        return phi.new_tensor([delta]), norms, "relative"
    if bandwidth == "cv":
        h = _cv_bandwidth(phi, folds)
        return phi.new_tensor([h]), None, h
    if isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool):
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}")
        return phi.new_tensor([float(bandwidth)]), None, float(bandwidth)
    raise ValueError(f"bandwidth must be 'relative', 'cv' or a positive float, got {bandwidth!r}")


