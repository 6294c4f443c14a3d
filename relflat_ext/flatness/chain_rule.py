"""The second-order chain rule through a tail of Linear layers and elementwise activations: exact
output Hessians of a layer without Hessian-vector products.

For ``z -> f_1 -> ... -> f_L = output`` and a per-sample loss ``l_i``, the chain rule gives
``Hz_i = sum over sources of P_i^T S_i P_i``, with two kinds of source:

- the loss: ``S_i = d^2 l_i / d out^2`` and ``P_i = d out / dz`` (the tail's Jacobian);
- each elementwise activation ``v = sigma(u)``: ``S_i = diag(sigma''(u_i) * dl_i/dv_i)``, ``P_i = du/dz``.

Only ``T = sum_i c_i Hz_i`` (and ``diag(Hz_i)`` for lmax) is needed, so the Jacobians are carried
forward from z, as a per-sample diagonal until the first Linear and as a dense (r, n, d) stack
after it, and each source is contracted where it is met: a few GEMMs per chunk of samples instead
of d Hessian-vector products through the tail, every one a string of memory-bound passes.
Activation derivatives come from autograd on the model's own module or function (exact for GELU's
tanh form, Softplus' threshold, LeakyReLU's slope...). Which tails qualify: :mod:`.tail`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..core.hvp import hessian_vector_products
from ..core.losses import DiagonalHessian, Loss, SoftmaxHessian
from ..ops.stable_math import softmax_complement, winner_and_rest
from .tail import is_elementwise, is_linear

# Elements of the largest (r, samples, d) Jacobian stack or (samples, k, k) loss Hessian per chunk.
CHUNK_ELEMENTS = 1 << 22


def out_features(tail: List[nn.Module], d: int) -> int:
    """Width of the tail's output for a layer output of width d."""
    widths = [m.out_features for m in tail if is_linear(m)]
    return widths[-1] if widths else d


def _derivatives(module: nn.Module, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma(u), sigma'(u), sigma''(u) of an elementwise module, by autograd through the module."""
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        v = module(leaf.clone())  # clone: in-place activations must not write into the leaf
        first = torch.autograd.grad(v.sum(), leaf, create_graph=True)[0]
        second = (torch.autograd.grad(first.sum(), leaf, allow_unused=True)[0]
                  if first.requires_grad else None)
    second = torch.zeros_like(u) if second is None else second
    return v.detach(), first.detach(), second


class _Jacobian:
    """d u / d z for every sample of the chunk: ``diag`` (n, d) while the tail has been elementwise
    (P_i = diag(diag_i)), then ``dense`` (r, n, d) (P_i = dense[:, i, :])."""

    def __init__(self, n: int, d: int, like: torch.Tensor):
        self.diag: Optional[torch.Tensor] = like.new_ones((n, d))
        self.dense: Optional[torch.Tensor] = None

    @classmethod
    def of_stack(cls, dense: torch.Tensor) -> "_Jacobian":
        """The Jacobian given as its dense (r, n, d) stack."""
        jac = cls.__new__(cls)
        jac.diag, jac.dense = None, dense
        return jac

    def linear(self, weight: torch.Tensor) -> None:
        if self.diag is not None:
            self.dense, self.diag = weight[:, None, :] * self.diag[None], None
        else:
            r, n, d = self.dense.shape
            self.dense = (weight @ self.dense.reshape(r, n * d)).reshape(weight.shape[0], n, d)

    def elementwise(self, slope: torch.Tensor) -> None:  # slope (n, r)
        if self.diag is not None:
            self.diag = self.diag * slope
        else:  # in place: the stack is this object's own (made by linear), and the largest tensor here
            self.dense.mul_(slope.T[:, :, None])


class _Sum:
    """T = sum_i c_i P_i^T S_i P_i over the sources, and diag(P_i^T S_i P_i) per sample (lmax)."""

    def __init__(self, weights: torch.Tensor, d: int, want_diag: bool):
        self.weights = weights
        self.total = weights.new_zeros((d, d))
        self.diag = weights.new_zeros((weights.shape[0], d)) if want_diag else None

    def diagonal_source(self, jac: _Jacobian, s: torch.Tensor) -> None:
        """S_i = diag(s_i), s (n, r)."""
        if jac.diag is not None:
            p2 = jac.diag.pow(2)
            self.total.diagonal().add_((self.weights[:, None] * s * p2).sum(0))
            if self.diag is not None:
                self.diag += s * p2
            return
        self._dense_diagonal_source(jac.dense, s)

    def _dense_diagonal_source(self, p: torch.Tensor, s: torch.Tensor) -> None:
        """S_i = diag(s_i) through the dense Jacobian stack p (r, n, d)."""
        scaled = p * (self.weights[:, None] * s).T[:, :, None]
        self.total += scaled.flatten(0, 1).T @ p.flatten(0, 1)
        if self.diag is not None:
            self.diag += torch.einsum("nr,rnd->nd", s, p.pow(2))

    def softmax_source(self, jac: _Jacobian, p: torch.Tensor) -> None:
        """S_i = diag(p_i) - p_i p_i^T, p (n, r) softmax rows, without cancellation at confident rows:
        P^T S P = sum_s p_s c_s c_s^T with the centred rows ``c_s = (P_s - P_k) - P^T delta``,
        ``delta = p - e_k`` (k the winning class, ``delta_k = -sum_{t != k} p_t``): every term >= 0
        and ``c_k = -P^T delta`` exact (``J^T diag(p) J - (J^T p)(J^T p)^T`` loses every digit)."""
        if jac.diag is not None:  # P_i = diag(j_i): the entries themselves, the diagonal from 1 - p done right
            q = p * jac.diag
            outer = (q * self.weights[:, None]).T @ q
            outer.diagonal().zero_()
            on_diag = jac.diag.pow(2) * p * softmax_complement(p)
            self.total -= outer
            self.total.diagonal().add_((self.weights[:, None] * on_diag).sum(0))
            if self.diag is not None:
                self.diag += on_diag
            return
        k, rest = winner_and_rest(p)
        delta = p.scatter(1, k, -rest)
        dense = jac.dense  # (r, n, d)
        winner = dense.gather(0, k.T[:, :, None].expand(1, -1, dense.shape[2]))  # (1, n, d): P_k
        centred = (dense - winner) - torch.einsum("nr,rnd->nd", delta, dense)[None]
        self._dense_diagonal_source(centred, p)

    def dense_source(self, jac: _Jacobian, s: torch.Tensor) -> None:
        """S_i = s[i] (n, r, r)."""
        if jac.diag is not None:
            p = jac.diag
            self.total += torch.einsum("n,ns,nst,nt->st", self.weights, p, s, p)
            if self.diag is not None:
                self.diag += p.pow(2) * s.diagonal(dim1=1, dim2=2)
            return
        p = jac.dense
        sp = torch.einsum("nab,bnd->and", s, p)
        self.total += (sp * self.weights[None, :, None]).flatten(0, 1).T @ p.flatten(0, 1)
        if self.diag is not None:
            self.diag += (sp * p).sum(0)


def _loss_source(acc: _Sum, jac: _Jacobian, out: torch.Tensor, y, loss: Loss):
    """The loss' own Hessian in the output, per sample (l_i with E = mean_i l_i): in the loss
    record's structured form, or from k Hessian-vector products in the output (n, k, k)."""
    hessian = loss.output_hessian(out)
    if isinstance(hessian, SoftmaxHessian):
        acc.softmax_source(jac, hessian.p)
    elif isinstance(hessian, DiagonalHessian):
        acc.diagonal_source(jac, hessian.values)
    else:
        loss.check(out, y)
        k = out.shape[1]
        with torch.enable_grad():
            leaf = out.detach().requires_grad_(True)
            grad = torch.autograd.grad(loss.for_derivatives(leaf, y), leaf, create_graph=True)[0]
        if not grad.requires_grad:  # linear in the output
            return
        probes = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(-1, out.shape[0], -1)
        hess = hessian_vector_products(grad, leaf, probes) * out.shape[0]  # (k, n, k): mean -> per sample
        acc.dense_source(jac, hess.permute(1, 2, 0))


def output_hessian_sums(tail: List[nn.Module], z: torch.Tensor, y, loss: Loss, weights: torch.Tensor,
                        want_diag: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(sum_i weights_i Hz_i (d, d), diag(Hz_i) (n, d) or None)`` for the layer output z (n, d)
    through ``tail``. The loss' gradient (:meth:`Loss.for_derivatives`) feeds the activations'
    terms; its Hessian in the output is the record's structured form, or k Hessian-vector
    products for a callable."""
    n, d = z.shape
    heights = [m.out_features for m in tail if is_linear(m)]  # of the dense Jacobian stack
    k = heights[-1] if heights else d
    per_sample = max([d] + [r * d for r in heights] + [0 if loss.builtin else k * k])
    step = max(1, CHUNK_ELEMENTS // per_sample)
    total = z.new_zeros((d, d))
    diags = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        part, diag = _chunk(tail, z[rows], y[rows], loss, weights[rows], want_diag)
        total += part
        diags.append(diag)
    return total, (torch.cat(diags) if want_diag else None)


def _chunk(tail, z, y, loss: Loss, weights, want_diag):
    n, d = z.shape
    # Forward: the output, and sigma', sigma'' at every activation.
    u, slopes, curvatures = z, [], []
    with torch.no_grad():
        for module in tail:
            if is_elementwise(module):
                u, slope, curvature = _derivatives(module, u)
                slopes.append(slope)
                curvatures.append(curvature)
            elif is_linear(module):
                u = module(u)
    out = u  # (n, k): Linear and elementwise steps keep z's two dimensions
    # Backward: dl_i/dv at each activation output, for the activations' sources.
    with torch.enable_grad():
        leaf = out.detach().requires_grad_(True)
        grad = torch.autograd.grad(loss.for_derivatives(leaf, y), leaf, allow_unused=True)[0]
    grad = torch.zeros_like(out) if grad is None else grad * n  # mean -> per-sample losses
    sources = []
    a = len(slopes)
    for module in reversed(tail):
        if is_linear(module):
            grad = grad @ module.weight.detach()
        elif is_elementwise(module):
            a -= 1
            sources.append(curvatures[a] * grad)
            grad = grad * slopes[a]
    sources.reverse()
    acc = _Sum(weights, d, want_diag)
    active = [bool(source.any()) for source in sources]  # ReLU-like steps have no curvature: no source
    if not any(active) and reverse_is_cheaper(tail, d, out.shape[1]):
        jac = _reverse_jacobian(tail, slopes, n)
    else:
        # Forward again: carry dz -> du, contract each source where it is met.
        jac = _Jacobian(n, d, z)
        a = 0
        for module in tail:
            if is_linear(module):
                jac.linear(module.weight.detach())
            elif is_elementwise(module):
                if active[a]:
                    acc.diagonal_source(jac, sources[a])
                jac.elementwise(slopes[a])
                a += 1
    _loss_source(acc, jac, out, y, loss)
    return acc.total, acc.diag


def _multiply_adds(tail: List[nn.Module], d: int, k: int, reverse: bool) -> int:
    """Multiply-adds per sample of carrying d out / dz through the tail from z (``reverse=False``:
    d columns carried, rows r_l) or from the output (k rows carried, columns r_l): diagonal until the
    first Linear met, a broadcast at it, a GEMM at every later one."""
    carried = k if reverse else d
    width, dense, cost = carried, False, 0
    for module in (reversed(tail) if reverse else tail):
        if is_linear(module):
            near, far = (module.out_features, module.in_features) if reverse else \
                (module.in_features, module.out_features)
            cost += carried * far * (near if dense else 1)
            dense, width = True, far
        else:
            cost += carried * width if dense else width
    return cost


def reverse_is_cheaper(tail: List[nn.Module], d: int, k: int) -> bool:
    """Where only the loss is a source, the Jacobian d out / dz (k, n, d) can be carried from either
    end: from z (stacks of r_l x d per sample) or from the output (k x r_l). The cheaper one wins:
    a ReLU network's hidden layer of width 256 under a 10-class head carries 10 rows, not 128."""
    if not any(is_linear(m) for m in tail):
        return False
    return _multiply_adds(tail, d, k, reverse=True) < _multiply_adds(tail, d, k, reverse=False)


def _reverse_jacobian(tail: List[nn.Module], slopes: List[torch.Tensor], n: int) -> _Jacobian:
    """d out / dz as the dense (k, n, d) stack, carried from the output back to z."""
    rows: Optional[torch.Tensor] = None  # (k, n, width): d out / d (the current step's output)
    a = len(slopes)
    for module in reversed(tail):
        if is_linear(module):
            w = module.weight.detach()  # (r_out, r_in)
            rows = w[:, None, :].expand(-1, n, -1) if rows is None else \
                (rows.reshape(-1, w.shape[0]) @ w).reshape(rows.shape[0], n, w.shape[1])
        elif is_elementwise(module):
            a -= 1
            rows = torch.diag_embed(slopes[a]).transpose(0, 1) if rows is None else rows * slopes[a][None]
    return _Jacobian.of_stack(rows)
