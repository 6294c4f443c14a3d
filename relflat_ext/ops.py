"""Thin typed wrappers of the custom ops: validate, then call ``torch.ops.relflat.<op>``
(or the pure-PyTorch fallback in ``_reference`` where no kernel was compiled for the device).

All ops take float32 or float64 tensors, contiguous or not, on one device; outputs are on the
same device, in the same dtype, computed on the current stream.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _reference
from ._ext import HAS_EXTENSION, kernel_available

_FLOAT_DTYPES = (torch.float32, torch.float64)


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


def last_layer_flatness(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        loss: int, block_trace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form per-sample flatness terms of a last layer.

    features (n, m), weight (d, m), bias (d,) or None, loss: 0 cross entropy, 1 MSE, 2 BCE with
    logits. Returns per_sample (n,) ``= ||phi_i||^2 <W W^T, Hz_i>`` and, if ``block_trace``, the
    sum over samples ``sum_i ||phi_i||^2 Hz_i`` (d, d); otherwise an empty (0, 0) tensor.
    kappa_Tr = per_sample.sum() / n and T = block / n.
    """
    _check_tensor("features", features, 2)
    _check_tensor("weight", weight, 2, features)
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must be (d, m) with m = features.shape[1] = {features.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, features)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if loss not in (0, 1, 2):
        raise ValueError(f"loss code must be 0, 1 or 2, got {loss}")
    if kernel_available(features.device):
        return torch.ops.relflat.last_layer_flatness(features, weight, bias, loss, block_trace)
    return _reference.last_layer_flatness(features, weight, bias, loss, block_trace)


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
    if kernel_available(hz.device):
        return torch.ops.relflat.contract_output_hessians(sq_norms, hz, gram, block_trace)
    return _reference.contract_output_hessians(sq_norms, hz, gram, block_trace)


def dense_block_trace(hessian: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block traces ``T[s, t] = Tr(H_{s,t})`` (d, d) of a dense (d*m, d*m) layer Hessian and
    ``kappa = <W W^T, T>`` (0-dim), reading only the d*d*m entries needed."""
    _check_tensor("weight", weight, 2)
    _check_tensor("hessian", hessian, 2, weight)
    dm = weight.numel()
    if tuple(hessian.shape) != (dm, dm):
        raise ValueError(f"hessian must be (d*m, d*m) = ({dm}, {dm}) for weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if kernel_available(hessian.device):
        return torch.ops.relflat.dense_block_trace(hessian, weight)
    return _reference.dense_block_trace(hessian, weight)


if HAS_EXTENSION:
    # Shapes for tracing / torch.compile (FakeTensor): mirrors the kernels' outputs.
    @torch.library.register_fake("relflat::last_layer_flatness")
    def _(features, weight, bias, loss, block_trace):
        d = weight.shape[0] if block_trace else 0
        return features.new_empty(features.shape[0]), features.new_empty((d, d))

    @torch.library.register_fake("relflat::contract_output_hessians")
    def _(sq_norms, hz, gram, block_trace):
        shape = tuple(gram.shape) if block_trace else (0, 0)
        return sq_norms.new_empty(hz.shape[0]), hz.new_empty(shape)

    @torch.library.register_fake("relflat::dense_block_trace")
    def _(hessian, weight):
        d = weight.shape[0]
        return weight.new_empty(()), weight.new_empty((d, d))
