"""Batched Hessian-vector products through autograd."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from . import dist

_BATCHED_HVP_OK = True


class WeightNotInLoss(ValueError):
    """The loss does not reach these layers' weights through autograd (``names``)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        super().__init__(
            f"the loss does not depend on the weight of {', '.join(map(repr, self.names))} through autograd: the "
            "model's forward (in eval mode) does not use it, or uses it where gradients cannot follow (under "
            "torch.no_grad(), after .detach(), or inside torch.utils.checkpoint(use_reentrant=True), which "
            "torch.autograd.grad cannot differentiate: use use_reentrant=False)")


def check_reached(reached: Sequence[bool], names: Sequence[str], distributed: bool, device) -> None:
    """Raises :class:`WeightNotInLoss` for the layers whose weight no batch's loss reached (on any
    rank: a mixture-of-experts layer may sit out some batches, not all of them)."""
    if distributed:
        flags = torch.tensor([float(r) for r in reached], dtype=torch.float64, device=device)
        dist.all_reduce_sum([flags])
        reached = [bool(f > 0) for f in flags]
    missing = [name for name, r in zip(names, reached) if not r]
    if missing:
        raise WeightNotInLoss(missing)


def hessian_vector_products(grad: torch.Tensor, wrt: torch.Tensor, vectors: torch.Tensor,
                            batched: bool = True) -> torch.Tensor:
    """Products of the Hessian behind ``grad`` (a gradient w.r.t. ``wrt`` built with create_graph)
    with k vectors (k, *wrt.shape) -> (k, *wrt.shape). ``batched`` uses one vmap'd backward
    (``is_grads_batched``); it falls back for good to one backward per vector the first time an op
    of the model has no vmap rule. One vector is always a plain double backward."""
    try:
        return _products(grad, wrt, vectors, batched)
    except NotImplementedError as exc:
        _explain_missing_double_backward(exc)
        raise


def _products(grad: torch.Tensor, wrt: torch.Tensor, vectors: torch.Tensor, batched: bool) -> torch.Tensor:
    global _BATCHED_HVP_OK
    if vectors.shape[0] == 1:
        return torch.autograd.grad(grad, wrt, vectors[0], retain_graph=True)[0].unsqueeze(0)
    if batched and _BATCHED_HVP_OK:
        try:
            return torch.autograd.grad(grad, wrt, vectors, retain_graph=True, is_grads_batched=True)[0]
        except RuntimeError as exc:
            _BATCHED_HVP_OK = False
            warnings.warn(f"relflat_ext: batched Hessian-vector products failed ({exc}); falling back to "
                          "one backward pass per probe (same result, slower)", RuntimeWarning)
    return torch.stack([torch.autograd.grad(grad, wrt, v, retain_graph=True)[0] for v in vectors])


def hessian_quadratic_forms(grad: torch.Tensor, wrt: torch.Tensor, vectors: torch.Tensor,
                            batched: bool = True, block_bytes: int = 1 << 30) -> torch.Tensor:
    """(k,) float64: ``<v_j, H v_j>`` for the k vectors (k, *wrt.shape), H the Hessian behind
    ``grad`` (as :func:`hessian_vector_products`), each product reduced as soon as it is made:
    one at a time on the per-vector path, blocks of at most ``block_bytes`` batched, never the k
    products at once (k copies of a vocabulary-wide weight)."""
    k = vectors.shape[0]
    per_vector = max(1, vectors[0].numel() * vectors.element_size())
    block = max(1, min(k, block_bytes // per_vector)) if batched else 1
    out = torch.empty(k, dtype=torch.float64, device=vectors.device)
    for j0 in range(0, k, block):
        v = vectors[j0:j0 + block]
        # in place, and summed in the vectors' dtype (a cascade sum): sum(dtype=float64) would
        # first copy every product to float64
        out[j0:j0 + block] = hessian_vector_products(grad, wrt, v, batched).mul_(v).flatten(1).sum(1)
    return out


_NO_DOUBLE_BACKWARD = ("relflat_ext: second derivatives differentiate the model's backward pass, and torch has no "
                       "derivative for this op's backward (no double backward), so no Hessian reaches through it: "
                       "write that part of the model with ops that have one (nn.EmbeddingBag: an nn.Embedding "
                       "followed by .sum or .mean over the bag)")


def _explain_missing_double_backward(exc: NotImplementedError) -> None:
    """Adds the note above to torch's "the derivative for '...' is not implemented", once."""
    if "derivative for" in str(exc) and _NO_DOUBLE_BACKWARD not in getattr(exc, "__notes__", ()):
        exc.add_note(_NO_DOUBLE_BACKWARD)


@contextlib.contextmanager
def double_backward_kernels(model: nn.Module) -> Iterator[None]:
    """Runs the model through kernels that have a double backward, which Hessian-vector products
    need: scaled-dot-product attention through its math backend (the fused flash and
    memory-efficient kernels have none), and, where the model has a recurrent layer, without cuDNN
    (whose RNN has none, and whose backward refuses eval mode; without it, CUDA's fused RNN cells
    switch to their differentiable backward when a graph is built). cuDNN stays on otherwise: its
    convolutions are the fast ones. The caller's choices are restored on exit. An op that has no
    double backward in torch (nn.EmbeddingBag's) raises torch's error with a note on what to do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cudnn = torch.backends.cudnn.enabled  # set alone: cudnn.flags() would reset the other flags too
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except NotImplementedError as exc:
        _explain_missing_double_backward(exc)
        raise
    finally:
        torch.backends.cudnn.enabled = cudnn
