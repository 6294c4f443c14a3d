"""Derivatives of the compiled ops ``contract_output_hessians`` and ``dense_block_trace``,
registered with ``torch.library.register_autograd``: both are linear or bilinear in their inputs
and differentiate with the ops themselves and a few tensor products. ``gaussian_kernel_reduce``
gets a backward that raises :class:`NoGradientError`.

``last_layer_flatness`` registers its derivative in C++ (csrc/autograd.cpp): its own backward op,
one fused pass per backend (formulas in csrc/flatness_backward.h and docs/design.md,
"Derivatives"), without the Python wrapper that would cost more than the kernels at a training
step's batch size. First derivatives only: differentiating that backward again raises a
RuntimeError that says so. The fallback needs none of this: the specification
(:mod:`.reference`) is differentiable by autograd and is what these formulas are tested against.
"""
from __future__ import annotations

import torch

from . import DIFFERENTIABLE_OPS, OPS, _no_gradient
from ._extension import HAS_EXTENSION


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
    torch.library.register_autograd("relflat::contract_output_hessians", _contract_backward,
                                    setup_context=_contract_setup)
    torch.library.register_autograd("relflat::dense_block_trace", _dense_backward, setup_context=_dense_setup)
    for _op in [op for op in OPS if op not in DIFFERENTIABLE_OPS]:
        torch.library.register_autograd(f"relflat::{_op}", _no_gradient(_op),
                                        setup_context=lambda ctx, inputs, output: None)
