"""The closed form for a layer that produces the model output, with a built-in loss:
``kappa_Tr = (1/n) sum_i ||phi_i||^2 <W W^T, Hz_i>`` from the features alone, by the op
``last_layer_flatness`` (one fused pass over the samples)."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..core.data import IGNORE_INDEX
from ..core.hooks import preserved, sample_features, tapped
from ..core.losses import Loss
from . import tail as _tail
from .accumulator import Accumulator, explain_not_finite
from .normalization import inverse_scale, normalized, scale_of, scale_over_data
from .problem import Options, Problem
from .result import FlatnessResult

# Above this many outputs (and with m >= d) kappa comes from the block sum: a symmetric product
# (about n*d*d/2 work) instead of per-sample terms (n*d*min(d, m)).
WIDE_HEAD = 64


def add_batch(acc: Accumulator, phi: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
              loss: Loss) -> None:
    """Adds one batch of features phi (n, m) for the layer ``z = w phi + bias``."""
    d, m = w.shape
    by_block = loss.name == "cross_entropy" and d > WIDE_HEAD and m >= d
    per_sample, block = ops.last_layer_flatness(phi, w, bias, loss.name, acc.block is not None,
                                                per_sample=not by_block)
    acc.kappa_sum = acc.kappa_sum + ((acc.gram * block).sum() if by_block else per_sample.sum())
    acc.n += phi.shape[0]
    if acc.block is not None:
        acc.block += block
    if acc.diag_blocks is not None:  # z = W' phi' + b = W phi + b
        acc.add_diagonal(loss.output_hessian_diagonal(F.linear(phi, w, bias)), phi)


def from_features(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], loss: Loss,
                  options: Options) -> FlatnessResult:
    """The closed form on given features (n, m) of the layer ``z = weight phi + bias``."""
    start = time.perf_counter()
    scale = scale_of(features) if options.normalize_features else None
    phi, w = normalized(features, weight, scale)
    acc = Accumulator(w, options.block_trace, options.lmax)
    add_batch(acc, phi, w, bias, loss)
    with explain_not_finite(features.dtype, lambda: {"features": features, "weight": weight, "bias": bias}):
        return acc.result("closed_form", "", scale, start)


def prefix_features(plan: _tail.TailPlan, name: str, x: torch.Tensor, targets: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """The layer's input, from the modules before it in a plain Sequential, as per-sample
    features (tokens as samples with token targets: the tail is Linear and elementwise steps)."""
    with torch.no_grad():
        for module in plan.prefix:
            x = module(x)
    return sample_features(name, x, targets)


TOKENS_NOTE = ("; tokens as samples (token targets, and each token's output depends on its own layer output "
               "alone: the tail is token-wise)")


def output_dim(y: torch.Tensor) -> int:
    """The dims of the logits that cross-entropy targets go with: class indices have one fewer."""
    return y.dim() + (0 if y.is_floating_point() else 1)


def has_token_targets(loss: Loss, y: torch.Tensor) -> bool:
    return loss.name == "cross_entropy" and not y.is_floating_point() and y.dim() > 1


def counted_rows(loss: Loss, y: torch.Tensor, *tensors: torch.Tensor):
    """(y, *tensors) with tokens flattened into rows and the rows whose loss term does not count
    left out: cross entropy ignores labels -100, as ``F.cross_entropy`` does."""
    if loss.name == "cross_entropy" and not y.is_floating_point():
        y = y.reshape(-1)
        # One reduction decides (labels below -100 are invalid and fail the targets' check next);
        # the mask, two more passes, only where some label is ignored.
        if y.numel() and int(y.min()) == IGNORE_INDEX:
            keep = y != IGNORE_INDEX
            return (y[keep], *(t[keep] for t in tensors))
    return (y, *tensors)


def run(problem: Problem, options: Options, plan: Optional[_tail.TailPlan], reason: str) -> FlatnessResult:
    """The closed form over the problem's data. With ``plan`` for a plain Sequential the features
    come from the modules before the layer (the model's output is never needed); otherwise from a
    hook during the model's forward pass, checking that the layer's output is the model's."""
    start = time.perf_counter()
    name, lin, loss = problem.name, problem.module, problem.loss
    scale = scale_over_data(problem) if options.normalize_features else None
    w = problem.matrix.detach() if scale is None else problem.matrix.detach() * scale
    bias = lin.bias.detach() if lin.bias is not None else None
    acc = Accumulator(w, options.block_trace, options.lmax, problem.distributed)
    from_prefix = plan is not None and not plan.traced
    with preserved(problem.model), explain_not_finite(lin.weight.dtype, problem.tensors, problem.check_outputs_finite):
        tokens = False
        for x, y in problem.batches(check_values=not from_prefix):
            tokens = tokens or has_token_targets(loss, y)
            if plan is not None:
                plan.check_log_softmax(name, output_dim(y))
            if from_prefix:
                phi = prefix_features(plan, name, x, y)
            else:
                replayed = plan is not None and plan.log_softmax_dim is not None
                with tapped(lin, name, replace_output=False, copy_output=replayed) as tap, torch.no_grad():
                    out = problem.forward(x)
                produced = (_tail.reproduces(plan.run(tap.output), out) if replayed  # log_softmax(z): z's loss
                            else out is tap.raw_output)
                if not produced:
                    raise ValueError(f"method='closed_form' needs layer {name!r} to produce the model "
                                     "output; use method='exact'")
                phi = tap.sample_features(y)  # tokens as samples: each token's logits are its own
            y, phi = counted_rows(loss, y, phi)
            loss.check_targets(y, (phi.shape[0], w.shape[0]))
            add_batch(acc, phi if scale is None else phi * inverse_scale(scale), w, bias, loss)
        result = acc.result("closed_form", name, scale, start)
    result.reason = reason + (TOKENS_NOTE if tokens else "")
    return result
