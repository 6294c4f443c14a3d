"""The shared probes' quadratic forms ``<V_l, (H V)_l>`` for weights the model uses only through
``F.linear``, with four matrix products a layer per direction instead of six.

A double backward computes ``(H V)_l`` in full and the caller contracts it with ``V_l``. For
``y = x W^T`` the two products that form the weight's part of ``H V`` (``b^T x`` from the
forward, ``delta^T a`` from the backward's ``delta W``) are not needed for the contraction:

    <V, b^T x + delta^T a> = <b, x V^T> + <delta V, a>,

and ``x V^T`` and ``delta V`` are what the second backward computes anyway, as the adjoints of
``delta`` and ``x`` from the gradient ``delta^T x``. So each such layer gets a scalar ``tau_l``
(value 0, the coefficient of ``V_l`` in the weight) and the second backward is taken with
respect to the taus: the custom functions below return ``<b, x V^T>`` and ``<delta V, a>`` as
their taus' gradients and skip the weight's (docs/design.md, "Shared probes").

``F.linear`` is replaced by an intercepting function only during the forward pass this module
drives (``nn.Linear`` and ``F.multi_head_attention_forward`` both call it through the module's
attribute). A weight the forward also uses some other way (a tied embedding, ``W.t()`` in custom
code) is found in the autograd graph and measured through the plain double backward. The
second backward runs one direction at a time: the per-direction loop of the CPU."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Set

import torch
import torch.nn.functional as F

_LINEAR = torch._C._nn.linear  # the real op, whatever F.linear is while a forward is intercepted


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1))  # (rows, k) each: one pass, no temporary


class LinearForms:
    """One forward pass's contracted weights (``weights[l]`` for l in :attr:`contracted` after
    :meth:`settle`), their taus, and the current direction of the second backward."""

    def __init__(self, weights: Sequence[torch.Tensor], excluded: Set[int]):
        self.weights = list(weights)
        self.candidates = {id(w): l for l, w in enumerate(weights) if l not in excluded}
        self.taus = [torch.zeros((), dtype=w.dtype, device=w.device, requires_grad=True) for w in weights]
        self.used: Set[int] = set()  # layers whose weight went through the intercepting F.linear
        self.contracted: List[int] = []
        self.second = False  # the second backward is running
        self.directions: Optional[List[torch.Tensor]] = None  # per layer, this pass's V_l
        self._products = {}  # x V^T of each intercepted call, for this direction

    @contextlib.contextmanager
    def intercepting(self) -> Iterator[None]:
        """Routes ``F.linear`` on a candidate weight through :class:`_Linear` (restored on exit)."""
        original = F.linear

        def linear(input, weight, bias=None):
            l = self.candidates.get(id(weight))
            if l is None:
                return original(input, weight, bias)
            self.used.add(l)
            # as rows: every product below one GEMM (a strided batch of rows, as attention's
            # transposed inputs are, made torch.matmul batch them), the copy made once
            rows = _Linear.apply(input.reshape(-1, input.shape[-1]), weight, bias, self.taus[l], self, l)
            return rows.view(*input.shape[:-1], rows.shape[-1])

        F.linear = linear
        try:
            yield
        finally:
            F.linear = original

    def settle(self, output: torch.Tensor) -> List[int]:
        """Walks the graph behind ``output``: the intercepted layers whose weight has an edge from
        any other node (used some other way too) are returned, for the caller to exclude and run
        the forward again; the others become :attr:`contracted`."""
        owners = {id(w): l for l, w in enumerate(self.weights) if l in self.used}
        mixed: Set[int] = set()
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                if child is None:
                    continue
                leaf = getattr(child, "variable", None)
                if leaf is not None and id(leaf) in owners and not isinstance(node, _Linear._backward_cls):
                    mixed.add(owners[id(leaf)])
                stack.append(child)
        self.contracted = sorted(self.used - mixed)
        return sorted(mixed)

    def direct(self, directions: List[torch.Tensor]) -> None:
        """The per-layer V_l (weight-shaped) of the next second backward."""
        self.second, self.directions, self._products = True, directions, {}

    def product(self, key: int, x: torch.Tensor, l: int) -> torch.Tensor:
        """x V_l^T of one intercepted call, computed once per direction by whichever of its two
        nodes the second backward reaches first."""
        out = self._products.get(key)
        if out is None:
            out = self._products[key] = x @ self.directions[l].t()
        return out


class _Linear(torch.autograd.Function):
    """y = F.linear(x, W, b), whose backward builds its weight gradient through
    :class:`_LinearGrad`; in the second backward it returns <b_y, x V^T> for tau instead of the
    weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, forms: LinearForms, layer: int):
        ctx.forms, ctx.layer = forms, layer
        ctx.save_for_backward(x, weight)
        return _LINEAR(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        forms, layer = ctx.forms, ctx.layer
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        if not forms.second:
            grads = _LinearGrad.apply(gy, x, weight, ctx.forms.taus[layer], forms, layer, id(ctx), need_x)
            gx, gw = grads if need_x else (None, grads)
            return gx, gw, gy.sum(0) if need_bias else None, None, None, None
        gx = gy @ weight if need_x else None
        return gx, None, None, _inner(gy, forms.product(id(ctx), x, layer)), None, None


class _LinearGrad(torch.autograd.Function):
    """(delta W, delta^T x) from delta = dL/dy (only delta^T x where x needs no gradient); its
    backward gets (a, V) and returns the adjoints of delta and x, and <delta V, a> for tau."""

    @staticmethod
    def forward(ctx, gy, x, weight, tau, forms: LinearForms, layer: int, key: int, need_x: bool):
        ctx.forms, ctx.layer, ctx.key, ctx.need_x = forms, layer, key, need_x
        ctx.save_for_backward(gy, x, weight)
        gw = gy.t() @ x
        return (gy @ weight, gw) if need_x else gw

    @staticmethod
    def backward(ctx, *adjoints):
        gy, x, weight = ctx.saved_tensors
        a, v = adjoints if ctx.need_x else (None, adjoints[0])
        forms, need_gy, need_x = ctx.forms, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        a_gy = gyv = tau = None
        if need_gy:  # x V^T (the adjoint of delta^T x) plus a W^T (of delta W)
            a_gy = None if v is None else forms.product(ctx.key, x, ctx.layer)
            if a is not None:
                a_gy = a @ weight.t() if a_gy is None else torch.addmm(a_gy, a, weight.t())
        if a is not None:  # delta V: x's adjoint (where V came) and tau's gradient
            gyv = gy @ forms.directions[ctx.layer]
            tau = _inner(gyv, a)
        elif v is not None and need_x:
            gyv = gy @ v
        return a_gy, (gyv if v is not None and need_x else None), None, tau, None, None, None, None
