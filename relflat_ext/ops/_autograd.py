"""Derivatives of the compiled ops, registered with ``torch.library.register_autograd``.

``last_layer_flatness`` differentiates through its own backward op (one fused pass; the formulas
are in csrc/flatness_backward.h and docs/design.md, "Derivatives"). The other two are linear or
bilinear in their inputs and differentiate with the ops themselves and a few tensor products.
First derivatives only: differentiating a backward again raises :class:`NoGradientError`, as does
any gradient of ``gaussian_kernel_reduce``. The fallback needs none of this: the specification
(:mod:`.reference`) is differentiable by autograd and is what these formulas are tested against.
"""
from __future__ import annotations

import torch

from . import DIFFERENTIABLE_OPS, OPS, _no_gradient
from ._extension import HAS_EXTENSION


def _given(grad, output_numel: int, empty_shape, like: torch.Tensor) -> torch.Tensor:
    """The upstream gradient of an output, or an empty tensor (the backward op's "none") when the
    output was empty or got no gradient."""
    if grad is None or output_numel == 0:
        return like.new_empty(empty_shape)
    return grad.contiguous()


def _last_layer_setup(ctx, inputs, output):
    features, weight, bias, loss = inputs[:4]
    ctx.save_for_backward(features, weight, bias)
    ctx.loss = loss
    ctx.output_numels = (output[0].numel(), output[1].numel())


def _last_layer_backward(ctx, grad_per_sample, grad_block):
    features, weight, bias = ctx.saved_tensors
    grad_features, grad_weight, grad_bias = torch.ops.relflat.last_layer_flatness_backward(
        _given(grad_per_sample, ctx.output_numels[0], (0,), features),
        _given(grad_block, ctx.output_numels[1], (0, 0), features), features, weight, bias, ctx.loss)
    return grad_features, grad_weight, (grad_bias if bias is not None else None), None, None, None


def _contract_setup(ctx, inputs, output):
    sq_norms, hz, gram, _block_trace = inputs
    ctx.save_for_backward(sq_norms, hz, gram)
    ctx.has_block = output[1].numel() > 0


def _contract_backward(ctx, grad_per_sample, grad_block):
    """per_sample_i = a_i <gram, hz_i>, block = sum_i a_i hz_i."""
    sq_norms, hz, gram = ctx.saved_tensors
    op = torch.ops.relflat.contract_output_hessians
    g = grad_per_sample if grad_per_sample is not None else torch.zeros_like(sq_norms)
    ones = torch.ones_like(sq_norms)
    grad_sq = g * op(ones, hz, gram, False)[0]
    grad_hz = (g * sq_norms)[:, None, None] * gram
    grad_gram = op(g * sq_norms, hz, gram, True)[1]
    if ctx.has_block and grad_block is not None:
        grad_sq = grad_sq + op(ones, hz, grad_block.contiguous(), False)[0]
        grad_hz = grad_hz + sq_norms[:, None, None] * grad_block
    return grad_sq, grad_hz, grad_gram, None


def _dense_setup(ctx, inputs, output):
    hessian, weight = inputs
    ctx.save_for_backward(weight, output[1])


def _dense_backward(ctx, grad_kappa, grad_block):
    """kappa = <W W^T, T>, T[s, t] = sum_k H[(s, k), (t, k)]: H's gradient is M kron I_m with
    M = grad_kappa W W^T + grad_block, W's is grad_kappa (T + T^T) W."""
    weight, block_trace = ctx.saved_tensors
    d, m = weight.shape
    gk = grad_kappa if grad_kappa is not None else weight.new_zeros(())
    coupling = gk * (weight @ weight.T)
    if grad_block is not None:
        coupling = coupling + grad_block
    eye = torch.eye(m, dtype=weight.dtype, device=weight.device)
    grad_hessian = torch.einsum("st,kl->sktl", coupling, eye).reshape(d * m, d * m)
    return grad_hessian, gk * ((block_trace + block_trace.T) @ weight)


if HAS_EXTENSION:
    torch.library.register_autograd("relflat::last_layer_flatness", _last_layer_backward,
                                    setup_context=_last_layer_setup)
    torch.library.register_autograd("relflat::contract_output_hessians", _contract_backward,
                                    setup_context=_contract_setup)
    torch.library.register_autograd("relflat::dense_block_trace", _dense_backward, setup_context=_dense_setup)
    for _op in [op for op in OPS if op not in DIFFERENTIABLE_OPS] + ["last_layer_flatness_backward"]:
        torch.library.register_autograd(f"relflat::{_op}", _no_gradient(_op),
                                        setup_context=lambda ctx, inputs, output: None)
