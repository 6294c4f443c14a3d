"""Thin typed wrappers of the custom ops: validate, then call ``torch.ops.relflat.<op>``
(or the pure-PyTorch fallback in :mod:`.reference`, the specification, where no kernel runs on the
device). Fake (meta) kernels for tracing live in ``_fake``, the extension loader in ``_extension``.

All ops take float32 or float64 tensors, contiguous or not, on one device; outputs are on the
same device, in the same dtype, computed on the current stream. ``last_layer_flatness``,
``contract_output_hessians`` and ``dense_block_trace`` are differentiable in every tensor input
(first derivatives; backward formulas in :mod:`._autograd`, and for ``last_layer_flatness`` a
fused backward kernel registered in C++, csrc/autograd.cpp); the fallback is differentiable by
autograd through the specification.
``gaussian_kernel_reduce`` has no derivative: asking for one raises :class:`NoGradientError`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference as _reference
from ._extension import HAS_CUDA_KERNELS, HAS_EXTENSION, build_info, fallback_only, kernel_available
from .reference import LOSSES

__all__ = ["DIFFERENTIABLE_OPS", "HAS_CUDA_KERNELS", "HAS_EXTENSION", "LOSSES", "NoGradientError", "OPS", "build_info", "fallback_only",
           "kernel_available", "last_layer_flatness", "contract_output_hessians", "dense_block_trace",
           "gaussian_kernel_reduce"]

_FLOAT_DTYPES = (torch.float32, torch.float64)
OPS = ("last_layer_flatness", "contract_output_hessians", "dense_block_trace", "gaussian_kernel_reduce")
DIFFERENTIABLE_OPS = ("last_layer_flatness", "contract_output_hessians", "dense_block_trace")


class NoGradientError(RuntimeError):
    """A gradient was asked of an op that has no derivative."""


def _no_gradient(op: str):
    def backward(ctx, *grads):
        raise NoGradientError(f"relflat_ext.ops.{op} is not differentiable: its inputs must not need a "
                              "gradient (detach them, or call it under torch.no_grad())")
    return backward


class _Undifferentiable(torch.autograd.Function):
    """Runs the fallback of an op so that its outputs have a backward that raises, as the
    compiled op's does (otherwise gradients would flow on one device and not on another)."""

    @staticmethod
    def forward(ctx, op, *args):
        ctx.op = op
        return getattr(_reference, op)(*args)

    @staticmethod
    def backward(ctx, *grads):
        _no_gradient(ctx.op)(ctx, *grads)


def _run(op: str, device: torch.device, *args):
    """The compiled op where a kernel runs on ``device``, else the fallback."""
    if kernel_available(device):
        return getattr(torch.ops.relflat, op)(*args)
    if op not in DIFFERENTIABLE_OPS and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _Undifferentiable.apply(op, *args)
    return getattr(_reference, op)(*args)


def _check_tensor(name: str, t: torch.Tensor, dim: int, ref: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the other inputs have {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {ref.device}")


def _check_size(name: str, t: torch.Tensor, axis: int, size: int, expected: str) -> None:
    if t.shape[axis] != size:
        raise ValueError(f"{name} must be {expected}, got {tuple(t.shape)}")


def last_layer_flatness(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        loss: str, block_trace: bool = False, per_sample: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form per-sample flatness terms of a last layer.

    features (n, m), weight (d, m), bias (d,) or None, loss: "cross_entropy", "mse" or
    "bce_with_logits". Returns per_sample (n,) ``= ||phi_i||^2 <W W^T, Hz_i>`` and, if ``block_trace``, the
    sum over samples ``sum_i ||phi_i||^2 Hz_i`` (d, d); otherwise an empty (0, 0) tensor.
    kappa_Tr = per_sample.sum() / n and T = block / n. ``per_sample=False`` skips the per-sample
    terms (first output (0,)) and always returns the block: ``kappa_Tr = <W W^T, block> / n`` then
    costs a symmetric product, about half the per-sample terms' n*d*min(d, m) for wide heads.
    Differentiable in features, weight and bias (the backward op, one fused pass; docs/design.md).
    """
    _check_tensor("features", features, 2)
    _check_tensor("weight", weight, 2, features)
    _check_size("weight", weight, 1, features.shape[1], f"(d, m) with m = features.shape[1] = {features.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must be (d, m) with d >= 1 outputs, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, features)
        _check_size("bias", bias, 0, weight.shape[0], f"({weight.shape[0]},)")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return _run("last_layer_flatness", features.device, features, weight, bias, loss, block_trace, per_sample)


def contract_output_hessians(sq_norms: torch.Tensor, hz: torch.Tensor, gram: torch.Tensor,
                             block_trace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Contract per-sample output Hessians (or their products with probes) with a Gram matrix.

    sq_norms (n,), hz (n, d, k), gram (d, k). Returns per_sample (n,)
    ``= sq_norms[i] * <gram, hz[i]>_F`` and, if ``block_trace``, ``sum_i sq_norms[i] hz[i]`` (d, k).
    """
    _check_tensor("sq_norms", sq_norms, 1)
    _check_tensor("hz", hz, 3, sq_norms)
    _check_tensor("gram", gram, 2, sq_norms)
    if hz.shape[0] != sq_norms.shape[0] or tuple(hz.shape[1:]) != tuple(gram.shape):
        raise ValueError(f"hz must be (n, d, k) = ({sq_norms.shape[0]}, {gram.shape[0]}, "
                         f"{gram.shape[1]}) to match sq_norms and gram, got {tuple(hz.shape)}")
    return _run("contract_output_hessians", hz.device, sq_norms, hz, gram, block_trace)


def dense_block_trace(hessian: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block traces ``T[s, t] = Tr(H_{s,t})`` (d, d) of a dense (d*m, d*m) layer Hessian and
    ``kappa = <W W^T, T>`` (0-dim), reading only the d*d*m entries needed."""
    _check_tensor("weight", weight, 2)
    _check_tensor("hessian", hessian, 2, weight)
    dm = weight.numel()
    if tuple(hessian.shape) != (dm, dm):
        raise ValueError(f"hessian must be (d*m, d*m) = ({dm}, {dm}) for weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    return _run("dense_block_trace", hessian.device, hessian, weight)


def _check_positive(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"{name} must be positive and finite, got min {t.min().item():g}, max {t.max().item():g}")


def gaussian_kernel_reduce(queries: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                           bandwidths: torch.Tensor, key_scale: Optional[torch.Tensor] = None,
                           query_split: Optional[torch.Tensor] = None, key_split: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched Gaussian kernel density and Nadaraya-Watson sums, fused (never forms nq x nk).

    queries (nq, m), keys (nk, m), values (nk, c) or None, bandwidths (B,) > 0, key_scale (nk,) > 0
    or None (per-key bandwidth ``h_k = bandwidths[b] * key_scale[k]``), query_split (R, nq) and
    key_split (R, nk) integer split ids or both None. In split r, key k is visible to query q when
    their ids differ (so one call evaluates all folds of a k-fold split, and R repeated splits).

    Returns ``logdens`` (R, B, nq): ``log((1/|V|) sum_{k in V} N(q; k, h_k^2 I))`` over the visible
    keys V, and ``wval`` (R, B, nq, c): the visible keys' values weighted by their normalized kernel
    terms (c = 0 without values). A query that sees no key gets ``-inf`` and zeros.
    """
    _check_tensor("queries", queries, 2)
    _check_tensor("keys", keys, 2, queries)
    _check_size("keys", keys, 1, queries.shape[1], f"(nk, m) with m = queries.shape[1] = {queries.shape[1]}")
    if values is not None:
        _check_tensor("values", values, 2, queries)
        _check_size("values", values, 0, keys.shape[0], f"(nk, c) with nk = {keys.shape[0]}")
    _check_tensor("bandwidths", bandwidths, 1, queries)
    if bandwidths.shape[0] == 0:
        raise ValueError("bandwidths must hold at least one bandwidth")
    _check_positive("bandwidths", bandwidths)
    if key_scale is not None:
        _check_tensor("key_scale", key_scale, 1, queries)
        if key_scale.shape[0] != keys.shape[0]:
            raise ValueError(f"key_scale must be ({keys.shape[0]},), got {tuple(key_scale.shape)}")
        _check_positive("key_scale", key_scale)
    if (query_split is None) != (key_split is None):
        raise ValueError("query_split and key_split must be given together or not at all")
    if query_split is not None:
        for name, split, n in (("query_split", query_split, queries.shape[0]),
                               ("key_split", key_split, keys.shape[0])):
            if not isinstance(split, torch.Tensor) or split.dtype.is_floating_point or split.dtype.is_complex \
                    or split.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of split ids")
            if split.dim() != 2 or split.shape[1] != n or split.shape[0] < 1:
                raise ValueError(f"{name} must be (R, {n}) with R >= 1, got {tuple(split.shape)}")
            if split.device != queries.device:
                raise ValueError(f"{name} is on {split.device} but queries are on {queries.device}")
        if query_split.shape[0] != key_split.shape[0]:
            raise ValueError(f"query_split and key_split must have the same number of splits R, got "
                             f"{query_split.shape[0]} and {key_split.shape[0]}")
        query_split, key_split = query_split.long(), key_split.long()
    return _run("gaussian_kernel_reduce", queries.device, queries, keys, values, bandwidths, key_scale,
                query_split, key_split)


from . import _fake  # noqa: E402,F401 (registers the fake kernels)
from . import _autograd  # noqa: E402,F401 (registers the backward formulas, and the raising one)
