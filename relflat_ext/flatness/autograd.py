"""The autograd baseline, as the authors compute relative flatness: the full Hessian of the mean
loss with respect to the layer weight, one double-backward pass per weight entry, then the
block-trace contraction (``ops.dense_block_trace``). O(d*m) backward passes and (d*m)^2 memory:
it is the reference the fast paths are tested against, not a tool for large layers."""
from __future__ import annotations

import time
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..core.hooks import preserved
from ..core.hvp import check_reached, double_backward_kernels
from ..core.layers import LayerSpec, acts_on_vectors, has_matrix_view, matrix_view, resolve_linear
from ..core.losses import LossSpec
from ..core.modes import measurement
from .accumulator import NotFinite, explain_not_finite
from .normalization import inverse_scale, scale_over_data
from .problem import Options, Problem
from .result import FlatnessResult

DEFAULT_MAX_HESSIAN_BYTES = 4 << 30


@measurement
def layer_hessian(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                  loss: Optional[LossSpec] = None, batch_size: Optional[int] = None,
                  vectorize: bool = False, max_hessian_bytes: int = DEFAULT_MAX_HESSIAN_BYTES
                  ) -> Tuple[torch.Tensor, int]:
    """(hessian, n): the dense Hessian (d*m, d*m) of the mean loss over all n samples w.r.t. the
    layer weight W (d, m), indexed by the row-major flattening of W (a convolution's W: its weight
    as (out, in/groups * prod(kernel)), rows acting on patches). ``vectorize=False`` is
    the authors' loop (one ``autograd.grad`` per entry); ``vectorize=True`` batches the rows with vmap."""
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size)
    return _hessian(problem, vectorize, max_hessian_bytes)


def _hessian(problem: Problem, vectorize: bool, max_hessian_bytes: int) -> Tuple[torch.Tensor, int]:
    name, lin = problem.name, problem.module
    if not has_matrix_view(lin):
        resolve_linear(problem.model, name)  # raises: the baseline takes a weight matrix
    dm = lin.weight.numel()
    need = dm * dm * lin.weight.element_size()
    if need > max_hessian_bytes:
        raise ValueError(f"the full Hessian of layer {name!r} ({dm} x {dm} entries, {need / 2**30:.1f} GiB) "
                         f"exceeds max_hessian_bytes={max_hessian_bytes}; use relative_flatness(method='exact'), "
                         "which never forms it")
    loss = problem.loss
    hessian = lin.weight.new_zeros((dm, dm))
    n, reached = 0, False
    with preserved(problem.model), torch.enable_grad(), double_backward_kernels(problem.model):
        weight = lin.weight
        weight.requires_grad_(True)
        for x, y in problem.batches():
            out = problem.forward(x)
            loss.check(out, y)
            value = loss(out, y)
            grad = torch.autograd.grad(value, weight, create_graph=True, allow_unused=True)[0] \
                if value.requires_grad else None
            weight_b = problem.count(y)  # batch means -> sums over terms; divided by n below
            n += weight_b
            if grad is None:  # the batch's loss does not reach the weight
                continue
            reached = True
            grad = grad.reshape(-1)
            if not grad.requires_grad:  # loss linear in the weight
                continue
            if vectorize:
                eye = torch.eye(dm, dtype=grad.dtype, device=grad.device)
                step = max(1, min(dm, (1 << 26) // max(dm, 1)))
                for r0 in range(0, dm, step):
                    rows = torch.autograd.grad(grad, weight, eye[r0:r0 + step], retain_graph=True,
                                               is_grads_batched=True)[0]
                    hessian[r0:r0 + step] += weight_b * rows.reshape(-1, dm)
            else:
                for r in range(dm):
                    hessian[r] += weight_b * torch.autograd.grad(grad[r], weight, retain_graph=True)[0].reshape(-1)
    check_reached([reached], [name], False, hessian.device)
    # Indexed by the weight's entries -> by W's (d, m) entries (Conv1D's and x @ W's transposes,
    # a stack of experts' rows): the position in the weight of each entry of W.
    order = matrix_view(lin, name).to_matrix(torch.arange(dm, device=hessian.device).reshape(lin.weight.shape))
    order = order.reshape(-1)
    if not torch.equal(order, torch.arange(dm, device=order.device)):
        hessian = hessian[order][:, order]
    return hessian / n, n


@measurement
def relative_flatness_autograd(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None,
                               *, loss: Optional[LossSpec] = None, lmax: bool = False,
                               normalize_features: bool = False, batch_size: Optional[int] = None,
                               vectorize: bool = False,
                               max_hessian_bytes: int = DEFAULT_MAX_HESSIAN_BYTES) -> FlatnessResult:
    """Relative flatness from the dense layer Hessian (the authors' method; see module docstring).

    With ``normalize_features`` the Hessian is transformed as Theorem 4 prescribes
    (``W' = W V``, so ``H'[(s,j),(t,k)] = H[(s,j),(t,k)] / (v_j v_k)``), which gives an independent
    check of the normalized fast paths.
    """
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size)
    result = run(problem, Options(normalize_features=normalize_features, lmax=lmax), vectorize=vectorize,
                 max_hessian_bytes=max_hessian_bytes)
    if problem.note:
        result.reason = f"{result.reason}; {problem.note}"
    return result


def run(problem: Problem, options: Options, reason: str = "autograd: the full Hessian, as the authors compute it",
        vectorize: bool = False, max_hessian_bytes: int = DEFAULT_MAX_HESSIAN_BYTES) -> FlatnessResult:
    start = time.perf_counter()
    hessian, n = _hessian(problem, vectorize, max_hessian_bytes)
    if not bool(torch.isfinite(hessian).all()):
        with explain_not_finite(hessian.dtype, problem.tensors, problem.check_outputs_finite):
            raise NotFinite("the Hessian is not finite")
    weight = problem.matrix.detach()
    scale = None
    if options.normalize_features:
        if not acts_on_vectors(problem.module):
            raise ValueError("normalize_features (Theorem 4) is defined here for nn.Linear layers (and transformers' "
                             "Conv1D)")
        scale = scale_over_data(problem)
        inv = inverse_scale(scale).repeat(weight.shape[0])
        hessian = hessian * inv[:, None] * inv[None, :]
        weight = weight * scale
    kappa, block_trace = ops.dense_block_trace(hessian, weight)
    kappa_lmax = None
    if options.lmax:
        d, m = weight.shape
        blocks = torch.stack([hessian[s * m:(s + 1) * m, s * m:(s + 1) * m] for s in range(d)])
        kappa_lmax = float((weight.pow(2).sum(1) * torch.linalg.eigvalsh(blocks)[:, -1]).sum())
    return FlatnessResult(float(kappa), kappa_lmax, block_trace, "autograd", n, problem.name, scale,
                          time.perf_counter() - start, reason=reason)
