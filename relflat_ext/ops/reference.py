"""Pure-PyTorch fallback of every custom op: the specification the kernels are tested against.

Conventions shared by all ops (docs/design.md, "Conventions"):
``a_i = ||phi_i||^2`` are the squared feature norms, ``Hz_i`` the Hessian of sample i's loss with
respect to the layer output (normalized so that ``E = (1/n) sum_i l_i``), ``G = W W^T``.
Ops return *sums over samples*, not means, so that chunks and batches add up; callers divide by n.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .stable_math import sigmoid_curvature, softmax_complement, squared_distances

LOSSES = ("cross_entropy", "mse", "bce_with_logits")


def _empty_block(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty((0, 0))


def cross_entropy_block(p: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i (diag(p_i) - p_i p_i^T)`` (d, d) with the diagonal ``sum_i a_i p_is (1 - p_is)``
    from the accurate complement, not from the difference of the two terms."""
    weighted = p * sq_norms[:, None]
    block = -(weighted.T @ p)
    block.diagonal().copy_((weighted * softmax_complement(p)).sum(0))
    return block


def _cross_entropy_terms(features, weight, bias, sq_norms, block_trace):
    """``<G, diag(p) - p p^T> = 1/2 sum_{s,t} p_s p_t ||w_s - w_t||^2``: non-negative terms only
    (``sum_s p_s G_ss - p^T G p`` subtracts two nearly equal numbers when p is nearly one-hot)."""
    p = torch.softmax(F.linear(features, weight, bias), dim=1)
    per_sample = sq_norms * 0.5 * ((p @ squared_distances(weight)) * p).sum(1)
    return per_sample, cross_entropy_block(p, sq_norms) if block_trace else _empty_block(features)


def _mse_terms(features, weight, bias, sq_norms, block_trace):
    """``Hz = (2/d) I``: no logits needed."""
    d = weight.shape[0]
    per_sample = sq_norms * (2.0 / d) * weight.pow(2).sum()
    if not block_trace:
        return per_sample, _empty_block(features)
    return per_sample, torch.eye(d, dtype=features.dtype, device=features.device) * (2.0 / d * sq_norms.sum())


def _bce_terms(features, weight, bias, sq_norms, block_trace):
    """``Hz = diag(sigma(z) sigma(-z)) / d``."""
    h = sigmoid_curvature(F.linear(features, weight, bias)) / weight.shape[0]
    per_sample = sq_norms * (h @ weight.pow(2).sum(1))
    return per_sample, torch.diag((h * sq_norms[:, None]).sum(0)) if block_trace else _empty_block(features)


_LAST_LAYER_TERMS = {"cross_entropy": _cross_entropy_terms, "mse": _mse_terms, "bce_with_logits": _bce_terms}


def last_layer_flatness(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        loss: str, block_trace: bool, per_sample: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form relative flatness of the last layer.

    features (n, m), weight (d, m), bias (d,) or None, loss one of :data:`LOSSES`.
    Returns ``per_sample`` (n,) with ``per_sample[i] = a_i <G, Hz_i>_F`` and, when ``block_trace``,
    ``sum_i a_i Hz_i`` (d, d) (the block traces times n), else an empty (0, 0) tensor.
    ``per_sample=False``: an empty (0,) first output and the block always (kappa = <G, block> / n).
    """
    if loss not in _LAST_LAYER_TERMS:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not per_sample:
        return features.new_empty(0), last_layer_flatness(features, weight, bias, loss, True)[1]
    return _LAST_LAYER_TERMS[loss](features, weight, bias, features.pow(2).sum(1), block_trace)


def contract_output_hessians(sq_norms: torch.Tensor, hz: torch.Tensor, gram: torch.Tensor,
                             block_trace: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample contraction of output Hessians (or their products with probe vectors).

    sq_norms (n,), hz (n, d, k), gram (d, k). Returns ``per_sample`` (n,) with
    ``per_sample[i] = sq_norms[i] * <gram, hz[i]>_F`` and, when ``block_trace``,
    ``sum_i sq_norms[i] * hz[i]`` (d, k), else an empty (0, 0) tensor.
    With ``hz[i] = Hz_i[:, cols]`` and ``gram = G[:, cols]`` this gives the block traces' columns;
    with ``hz[i] = Hz_i W[:, cols]`` and ``gram = W[:, cols]`` it gives kappa's terms (m probes).
    """
    per_sample = sq_norms * torch.einsum("ndk,dk->n", hz, gram)
    block = torch.einsum("n,ndk->dk", sq_norms, hz) if block_trace else _empty_block(hz)
    return per_sample, block


def dense_block_trace(hessian: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block traces of a dense layer Hessian and their contraction with ``G = W W^T``.

    hessian (d*m, d*m) indexed by the row-major flattening of weight (d, m).
    Returns ``kappa`` (0-dim) ``= <G, T>_F`` and ``T`` (d, d), ``T[s, t] = Tr(H_{s,t})``.
    """
    d, m = weight.shape
    blocks = hessian.reshape(d, m, d, m)
    block_trace = torch.diagonal(blocks, dim1=1, dim2=3).sum(-1)
    kappa = (weight @ weight.T * block_trace).sum()
    return kappa, block_trace


# Queries per chunk in the KDE fallback: bounds the (R, B, chunk, nk) logits it materializes.
_KDE_CHUNK_ELEMENTS = 1 << 24


def gaussian_kernel_reduce(queries: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                           bandwidths: torch.Tensor, key_scale: Optional[torch.Tensor],
                           query_split: Optional[torch.Tensor], key_split: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian kernel density and Nadaraya-Watson sums of every query under the keys it may see.

    queries (nq, m), keys (nk, m), values (nk, c) or None, bandwidths (B,), key_scale (nk,) or None,
    query_split (R, nq) and key_split (R, nk) integer split ids, or both None (R = 1, every key
    visible). In split r, key k is visible to query q when ``key_split[r, k] != query_split[r, q]``.
    With ``h = bandwidths[b] * key_scale[k]`` and ``V`` the visible keys:

    - ``logdens[r, b, q] = log( (1/|V|) sum_{k in V} N(queries[q]; keys[k], h^2 I) )``
    - ``wval[r, b, q, :] = sum_{k in V} w_k values[k]``, ``w_k`` the normalized kernel weights
      (each key's density term over their sum).

    A query that sees no key gets ``logdens = -inf`` and ``wval = 0``. Distances are exact
    differences (no ``|q|^2 + |k|^2 - 2 q.k`` expansion), so this is the accuracy reference.
    """
    nq, m = queries.shape
    nk = keys.shape[0]
    n_bw = bandwidths.shape[0]
    n_splits = 1 if query_split is None else query_split.shape[0]
    c = 0 if values is None else values.shape[1]
    logdens = queries.new_full((n_splits, n_bw, nq), float("-inf"))
    wval = queries.new_zeros((n_splits, n_bw, nq, c))
    if nq == 0 or nk == 0:
        return logdens, wval
    scale = key_scale if key_scale is not None else keys.new_ones(nk)
    h = bandwidths[:, None] * scale[None, :]  # (B, nk)
    coef = -0.5 / h.square()
    lognorm = -m * torch.log(h) - 0.5 * m * math.log(2 * math.pi)
    chunk = max(1, _KDE_CHUNK_ELEMENTS // (n_splits * n_bw * nk))
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        d2 = torch.cdist(queries[start:stop], keys, compute_mode="donot_use_mm_for_euclid_dist").square()
        logits = (d2[None] * coef[:, None, :] + lognorm[:, None, :]).unsqueeze(0)  # (1, B, q, nk)
        if query_split is None:
            visible = torch.ones(1, stop - start, nk, dtype=torch.bool, device=keys.device)
        else:
            visible = query_split[:, start:stop, None] != key_split[:, None, :]  # (R, q, nk)
        logits = logits.masked_fill(~visible[:, None], float("-inf"))  # (R, B, q, nk)
        lse = torch.logsumexp(logits, dim=-1)  # (R, B, q); -inf where nothing is visible
        n_visible = visible.sum(-1).to(queries.dtype)  # (R, q)
        seen = (n_visible > 0)[:, None, :]
        logdens[:, :, start:stop] = torch.where(seen, lse - torch.log(n_visible)[:, None, :], float("-inf"))
        if c:
            weights = torch.exp(logits - torch.where(seen, lse, 0.0)[..., None])  # 0 where unseen
            wval[:, :, start:stop] = weights @ values
    return logdens, wval
