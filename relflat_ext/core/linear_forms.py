"""The shared probes' quadratic forms ``<V_l, (H V)_l>`` for weights the model uses only through
``F.linear``, a convolution or ``torch.addmm``, with four products a layer per direction instead
of six.

A double backward computes ``(H V)_l`` in full and the caller contracts it with ``V_l``. For a
product bilinear in input and weight, ``y = op(x, W)`` (``x W^T``, a convolution), the two
products that form the weight's part of ``H V`` (``weight_grad(b, x)`` from the forward,
``weight_grad(delta, a)`` from the backward's ``input_grad(delta, W)``) are not needed for the
contraction:

    <V, weight_grad(b, x) + weight_grad(delta, a)> = <b, op(x, V)> + <input_grad(delta, V), a>,

and ``op(x, V)`` and ``input_grad(delta, V)`` are what the second backward computes anyway, as
the adjoints of ``delta`` and ``x`` from the gradient ``weight_grad(delta, x)``. So each such
layer gets a scalar ``tau_l`` (value 0, the coefficient of ``V_l`` in the weight) and the second
backward is taken with respect to the taus: the custom functions below return those two inner
products as their taus' gradients and skip the weight's (docs/design.md, "Shared probes").

``F.linear``, ``F.conv{1,2,3}d`` and ``torch.addmm`` are replaced by intercepting functions only
during the forward pass this module drives (``nn.Linear``, ``F.multi_head_attention_forward``,
the ``nn.Conv*d`` modules and transformers' ``Conv1D`` call them through the modules'
attributes). A weight the forward also uses
some other way (a tied embedding, ``W.t()`` in custom code, a convolution with ``padding="same"``)
is found in the autograd graph and measured through the plain double backward. The second
backward runs one direction at a time: the per-direction loop of the CPU.

Where the direction is ``V = W P`` (the probe factor is W itself, m <= d) and the call multiplies
rows of features by the layer's (d, m) matrix (``F.linear`` on W, ``torch.addmm`` on W^T), the
perturbed weight is a perturbed input, ``op(x, V) = op(x P^T, W)``, and
``input_grad(delta, V) = input_grad(delta, W) P``: the four products of d m flops a row become two,
plus two of m m (the paper's view of multiplicative weight perturbations as feature
perturbations), and V itself is never formed (:class:`ProbeDirections`)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, List, Optional, Sequence, Set

import torch
import torch.nn.functional as F

# the real ops, whatever F's attributes are while a forward is intercepted
_LINEAR = torch._C._nn.linear
_ADDMM = torch._C._VariableFunctions.addmm
_CONVOLUTIONS = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1))  # (rows, k) each: one pass, no temporary


def matrix_layout(weight: torch.Tensor, matrix: torch.Tensor) -> Optional[str]:
    """How a layer's (d, m) matrix (its view of ``weight``) multiplies rows of features inside the
    contracted products: "rows" where it is the weight itself (``F.linear(x, W)``), "columns"
    where it is the weight's transpose (``torch.addmm(bias, x, W^T)``, transformers' Conv1D),
    None otherwise (a convolution, a packed view)."""
    if weight.dim() != 2 or matrix.data_ptr() != weight.data_ptr():
        return None
    if matrix.shape == weight.shape and matrix.stride() == weight.stride():
        return "rows"
    if matrix.shape == weight.T.shape and matrix.stride() == weight.T.stride():
        return "columns"
    return None


@dataclasses.dataclass
class ProbeDirections:
    """k joint directions, per layer: ``weights[l]`` V_l (k, *weight.shape), or, where V_l = W_l P_l
    and ``layouts[l]`` (:func:`matrix_layout`) says how W_l multiplies rows, only the coordinates
    ``coordinates[l]`` P_l (k, m, m): the contracted products then perturb the layer's input, and
    V_l is formed by ``to_weights(l, P_l)`` only where some product needs it."""
    weights: List[Optional[torch.Tensor]]
    coordinates: List[Optional[torch.Tensor]]
    layouts: List[Optional[str]]
    to_weights: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None

    @staticmethod
    def plain(weights: Sequence[torch.Tensor]) -> "ProbeDirections":
        return ProbeDirections(list(weights), [None] * len(weights), [None] * len(weights))

    @property
    def count(self) -> int:
        return next(t for t in self.weights + self.coordinates if t is not None).shape[0]

    @property
    def device(self) -> torch.device:
        return next(t for t in self.weights + self.coordinates if t is not None).device

    def weight(self, l: int) -> torch.Tensor:
        """V_l (k, *weight.shape), formed from the coordinates the first time it is asked for."""
        if self.weights[l] is None:
            self.weights[l] = self.to_weights(l, self.coordinates[l])
        return self.weights[l]


class LinearForms:
    """One forward pass's contracted weights (``weights[l]`` for l in :attr:`contracted` after
    :meth:`settle`), their taus, and the current direction of the second backward."""

    def __init__(self, weights: Sequence[torch.Tensor], excluded: Set[int],
                 layouts: Optional[Sequence[Optional[str]]] = None):
        self.weights = list(weights)
        self.candidates = {id(w): l for l, w in enumerate(weights) if l not in excluded}
        self.layouts = list(layouts or [None] * len(weights))  # where probe coordinates can perturb inputs
        self.taus = [torch.zeros((), dtype=w.dtype, device=w.device, requires_grad=True) for w in weights]
        self.used: Set[int] = set()  # layers whose weight went through an intercepting function
        self.unperturbed: Set[int] = set()  # ... in some call whose product needs V_l itself
        self.contracted: List[int] = []
        self.second = False  # the second backward is running
        self.directions: List[Optional[torch.Tensor]] = []  # per layer, this pass's V_l (where needed)
        self.coordinates: List[Optional[torch.Tensor]] = []  # ... and its P_l, where V_l = W_l P_l
        self._products = {}  # op(x, V) (or x P^T) of each intercepted call, for this direction

    def _use(self, l: int, layout: Optional[str]) -> bool:
        """Records a call of layer l's weight; whether its products can come from coordinates."""
        self.used.add(l)
        perturbs = layout is not None and self.layouts[l] == layout
        if not perturbs:
            self.unperturbed.add(l)
        return perturbs

    @contextlib.contextmanager
    def intercepting(self) -> Iterator[None]:
        """Routes ``F.linear``, ``F.conv{1,2,3}d`` and ``torch.addmm(bias, x, W)`` on a candidate
        weight through :class:`_Contracted` (the functions restored on exit)."""
        originals = {name: getattr(F, name) for name in ("linear", "conv1d", "conv2d", "conv3d")}

        def linear(input, weight, bias=None):
            l = self.candidates.get(id(weight))
            if l is None:
                return originals["linear"](input, weight, bias)
            # as rows: every product below one GEMM (a strided batch of rows, as attention's
            # transposed inputs are, made torch.matmul batch them), the copy made once
            rows = _Contracted.apply(input.reshape(-1, input.shape[-1]), weight, bias, self.taus[l], self, l, _ROWS,
                                     self._use(l, "rows"))
            return rows.view(*input.shape[:-1], rows.shape[-1])

        def convolution(dims: int):
            original = originals[f"conv{dims}d"]

            def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
                l = self.candidates.get(id(weight))
                if l is None or isinstance(padding, str) or input.dim() != dims + 2:  # "same", unbatched: as is
                    return original(input, weight, bias, stride, padding, dilation, groups)
                op = _Convolution(dims, stride, padding, dilation, groups)
                return _Contracted.apply(input, weight, bias, self.taus[l], self, l, op, self._use(l, None))
            return conv

        def addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
            l = self.candidates.get(id(mat2))
            if l is None or beta != 1 or alpha != 1 or out is not None or input.dim() != 1 or mat1.dim() != 2:
                return original_addmm(input, mat1, mat2, beta=beta, alpha=alpha, out=out)
            return _Contracted.apply(mat1, mat2, input, self.taus[l], self, l, _COLUMNS, self._use(l, "columns"))

        original_addmm = torch.addmm
        replacements = {"linear": linear, **{f"conv{d}d": convolution(d) for d in (1, 2, 3)}}
        for name, function in replacements.items():
            setattr(F, name, function)
        torch.addmm = addmm
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(F, name, function)
            torch.addmm = original_addmm

    def settle(self, output: torch.Tensor) -> List[int]:
        """Walks the graph behind ``output``: the intercepted layers whose weight has an edge from
        any other node, or into a contracted product other than as its weight (used some other
        way too), are returned, for the caller to exclude and run
        the forward again; the others become :attr:`contracted`."""
        owners = {id(w): l for l, w in enumerate(self.weights) if l in self.used}
        mixed: Set[int] = set()
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            ours = isinstance(node, _Contracted._backward_cls)
            for position, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                leaf = getattr(child, "variable", None)
                if leaf is not None and id(leaf) in owners and not (ours and position == 1):  # 1: the weight
                    mixed.add(owners[id(leaf)])
                stack.append(child)
        self.contracted = sorted(self.used - mixed)
        return sorted(mixed)

    def direct(self, directions: List[Optional[torch.Tensor]], coordinates: List[Optional[torch.Tensor]]) -> None:
        """The per-layer V_l (weight-shaped; None where no product needs it) and P_l ((m, m), where
        V_l = W_l P_l; else None) of the next second backward."""
        self.second, self.directions, self.coordinates, self._products = True, directions, coordinates, {}

    def product(self, key: int, x: torch.Tensor, l: int, op: "_Product") -> torch.Tensor:
        """op(x, V_l) of one intercepted call, computed by whichever of its two nodes the second
        backward reaches first and handed to the other (then dropped: one output-sized product a
        call held at a time, not one a layer for the whole pass)."""
        return self._shared(key, lambda: op(x, self.directions[l]))

    def perturbed_input(self, key: int, x: torch.Tensor, l: int) -> torch.Tensor:
        """x P_l^T (rows, m) of one intercepted call, shared by its two nodes as :meth:`product`
        (where x needs a gradient: both nodes combine it with other terms)."""
        return self._shared(key, lambda: x @ self.coordinates[l].T)

    def perturbed_product(self, key: int, x: torch.Tensor, l: int, op: "_Product", weight: torch.Tensor
                          ) -> torch.Tensor:
        """op(x P_l^T, W) = op(x, V_l), shared as :meth:`product` (where x needs no gradient)."""
        return self._shared(key, lambda: op(x @ self.coordinates[l].T, weight))

    def _shared(self, key: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = self._products.pop(key, None)
        if out is None:
            out = self._products[key] = compute()
        return out


class _Product:
    """y = op(x, W) + bias, bilinear in (x, W), with the two adjoints the contraction uses:
    ``input_grad(g, W)`` = d<g, op(x, W)>/dx and ``weight_grad(g, x)`` = d<g, op(x, W)>/dW."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def input_grad(self, g: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def weight_grad(self, g: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def plus(self, base: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """base + op(x, W), base being the caller's."""
        return self(x, weight).add_(base)


class _Rows(_Product):
    """F.linear on a (rows, m) input: one GEMM each."""

    def __call__(self, x, weight, bias=None):
        return _LINEAR(x, weight, bias)

    def input_grad(self, g, weight, x_shape):
        return g @ weight

    def weight_grad(self, g, x, weight_shape):
        return g.t() @ x

    def bias_grad(self, g):
        return g.sum(0)

    def plus(self, base, x, weight):
        return _ADDMM(base, x, weight.t())


class _Columns(_Product):
    """``torch.addmm(bias, x, W)``, W (m, d) stored as x multiplies it (transformers' Conv1D)."""

    def __call__(self, x, weight, bias=None):
        return x @ weight if bias is None else _ADDMM(bias, x, weight)

    def input_grad(self, g, weight, x_shape):
        return g @ weight.t()

    def weight_grad(self, g, x, weight_shape):
        return x.t() @ g

    def bias_grad(self, g):
        return g.sum(0)

    def plus(self, base, x, weight):
        return _ADDMM(base, x, weight)


class _Convolution(_Product):
    """F.conv{1,2,3}d with numeric padding, the adjoints through ATen's convolution backward."""

    def __init__(self, dims: int, stride, padding, dilation, groups: int):
        self.dims, self.stride, self.padding, self.dilation, self.groups = dims, stride, padding, dilation, groups
        self._conv = _CONVOLUTIONS[dims]
        self._input = getattr(torch.nn.grad, f"conv{dims}d_input")
        self._weight = getattr(torch.nn.grad, f"conv{dims}d_weight")

    def __call__(self, x, weight, bias=None):
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, g, weight, x_shape):
        return self._input(x_shape, weight, g, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad(self, g, x, weight_shape):
        return self._weight(x, weight_shape, g, self.stride, self.padding, self.dilation, self.groups)

    def bias_grad(self, g):
        return g.sum([0, *range(2, g.dim())])


class _Contracted(torch.autograd.Function):
    """y = op(x, W) + b, whose backward builds the weight's gradient through :class:`_Gradients`;
    in the second backward it returns <b_y, op(x, V)> for tau instead of the weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, forms: "LinearForms", layer: int, op: _Product, perturbs: bool):
        ctx.forms, ctx.layer, ctx.op, ctx.perturbs = forms, layer, op, perturbs
        ctx.save_for_backward(x, weight)
        return op(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        forms, layer, op = ctx.forms, ctx.layer, ctx.op
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        if not forms.second:
            grads = _Gradients.apply(gy, x, weight, forms.taus[layer], forms, layer, op, id(ctx), need_x, ctx.perturbs)
            gx, gw = grads if need_x else (None, grads)
            return gx, gw, op.bias_grad(gy) if need_bias else None, None, None, None, None, None
        if ctx.perturbs and forms.coordinates[layer] is not None:  # <gy, op(x, V)> = <gy, op(x P^T, W)>
            if not need_x:  # op(x P^T, W) is delta's adjoint too (no a)
                return None, None, None, _inner(gy, forms.perturbed_product(id(ctx), x, layer, op, weight)), \
                    None, None, None, None
            gx = op.input_grad(gy, weight, x.shape)  # = <input_grad(gy, W), x P^T>, with x's adjoint
            return gx, None, None, _inner(gx, forms.perturbed_input(id(ctx), x, layer)), None, None, None, None
        gx = op.input_grad(gy, weight, x.shape) if need_x else None
        return gx, None, None, _inner(gy, forms.product(id(ctx), x, layer, op)), None, None, None, None


class _Gradients(torch.autograd.Function):
    """(input_grad(delta, W), weight_grad(delta, x)) from delta = dL/dy (only the weight's where x
    needs no gradient); its backward gets (a, V) and returns the adjoints of delta (op(x, V) +
    op(a, W)) and of x (input_grad(delta, V)), and <input_grad(delta, V), a> for tau."""

    @staticmethod
    def forward(ctx, gy, x, weight, tau, forms: "LinearForms", layer: int, op: _Product, key: int, need_x: bool,
                perturbs: bool):
        ctx.forms, ctx.layer, ctx.op, ctx.key, ctx.need_x, ctx.perturbs = forms, layer, op, key, need_x, perturbs
        gw = op.weight_grad(gy, x, weight.shape)
        if not need_x:
            ctx.save_for_backward(gy, x, weight)
            return gw
        gx = op.input_grad(gy, weight, x.shape)
        # input_grad(delta, W), kept where input_grad(delta, V) = input_grad(delta, W) P
        ctx.save_for_backward(gy, x, weight, *((gx,) if perturbs else ()))
        return gx, gw

    @staticmethod
    def backward(ctx, *adjoints):
        gy, x, weight, *kept = ctx.saved_tensors
        a, v = adjoints if ctx.need_x else (None, adjoints[0])
        forms, op, need_gy, need_x = ctx.forms, ctx.op, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        p = forms.coordinates[ctx.layer] if ctx.perturbs else None
        if p is not None:  # V = W P: the products from x P^T and input_grad(delta, W) (module docstring)
            a_gy = None
            if need_gy and not ctx.need_x:  # op(x, V) alone
                a_gy = forms.perturbed_product(ctx.key, x, ctx.layer, op, weight) if v is not None else None
            elif need_gy:  # op(x, V) + op(a, W) = op(x P^T + a, W)
                xp = forms.perturbed_input(ctx.key, x, ctx.layer) if v is not None else None
                ins = a if xp is None else xp if a is None else xp + a
                a_gy = None if ins is None else op(ins, weight)
            gyv = kept[0] @ p if kept and (a is not None or (v is not None and need_x)) else None
            tau = _inner(gyv, a) if a is not None else None
            return a_gy, (gyv if v is not None and need_x else None), None, tau, None, None, None, None, None, None
        a_gy = gyv = tau = None
        if need_gy:  # op(x, V), the adjoint from weight_grad(delta, x), plus op(a, W), from input_grad(delta, W)
            a_gy = None if v is None else forms.product(ctx.key, x, ctx.layer, op)
            if a is not None:
                a_gy = op(a, weight) if a_gy is None else op.plus(a_gy, a, weight)
        if a is not None:  # input_grad(delta, V): x's adjoint (where V came) and tau's gradient
            gyv = op.input_grad(gy, forms.directions[ctx.layer], x.shape)
            tau = _inner(gyv, a)
        elif v is not None and need_x:
            gyv = op.input_grad(gy, v, x.shape)
        return a_gy, (gyv if v is not None and need_x else None), None, tau, None, None, None, None, None, None


_ROWS = _Rows()
_COLUMNS = _Columns()
