"""How a model multiplies a parameter: watched during one forward pass, so that a weight named as
a parameter is seen as the (d, m) matrix that multiplies feature vectors the right way round.
``F.linear(x, W)`` (and ``W @ x``) use W's rows, ``x @ W`` its columns; slices (a stacked
expert's ``W[e]``) keep the orientation and transposes flip it. An embedding lookup is
``one_hot(x) @ W``, a use of the columns of its own kind: a table only looked up is seen that way,
and one also multiplied (a tied embedding, whose output head multiplies it) as the head uses it."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

ROWS, COLUMNS = "rows", "columns"  # W (out, in) as F.linear takes it; W (in, out) as x @ W takes it
LOOKUP = "lookup"  # an embedding table (num, dim): one_hot(x) @ W, so W^T as for COLUMNS

# Functions whose output is the tracked tensor re-shaped or sliced, and whether they swap its last
# two dims (then its rows are the original's columns).
_SAME = {torch.Tensor.__getitem__, torch.Tensor.select, torch.select, torch.Tensor.narrow, torch.narrow,
         torch.Tensor.index_select, torch.index_select, torch.Tensor.to, torch.Tensor.float, torch.Tensor.double,
         torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.contiguous, torch.Tensor.unsqueeze,
         torch.unsqueeze, torch.Tensor.expand, torch.Tensor.clone, torch.Tensor.chunk, torch.Tensor.split,
         torch.Tensor.unbind, torch.unbind, torch.chunk, torch.split}
_FLIP = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_TRANSPOSES = {torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes}
# (function, positions of the left and right operands)
_PRODUCTS = {torch.matmul: (0, 1), torch.Tensor.matmul: (0, 1), torch.Tensor.__matmul__: (0, 1),
             torch.Tensor.__rmatmul__: (1, 0), torch.mm: (0, 1), torch.Tensor.mm: (0, 1), torch.bmm: (0, 1),
             torch.Tensor.bmm: (0, 1), torch.addmm: (1, 2), torch.baddbmm: (1, 2)}
if hasattr(torch, "_grouped_mm"):
    _PRODUCTS[torch._grouped_mm] = (0, 1)
_LOOKUPS = {F.embedding: 1, torch.embedding: 0, F.embedding_bag: 1}  # function: position of the table
_IGNORED = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.shape.__get__,
            torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__}


class _Watch(TorchFunctionMode):
    def __init__(self, params: Dict[str, torch.Tensor]):
        super().__init__()
        self.tracked: Dict[int, tuple] = {id(p): (name, False, p) for name, p in params.items()}
        self.uses: Dict[str, Set[str]] = {name: set() for name in params}
        self.others: Dict[str, Set[str]] = {name: set() for name in params}  # functions of the "other" uses
        self.counts: Dict[str, int] = {name: 0 for name in params}  # calls that consumed it (views aside)

    def _track(self, out, name: str, flipped: bool) -> None:
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.tracked[id(t)] = (name, flipped, t)  # the tensor is kept: its id stays its own

    def _entry(self, t):
        return self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        source = self._entry(args[0]) if args else None
        if source is not None and func in _SAME:
            self._track(out, source[0], source[1])
        elif source is not None and func in _FLIP:
            self._track(out, source[0], not source[1])
        elif source is not None and func in _TRANSPOSES:
            dims = {d % args[0].dim() for d in (list(args[1:3]) or [kwargs.get("dim0"), kwargs.get("dim1")])}
            self._track(out, source[0], source[1] ^ (dims == {args[0].dim() - 1, args[0].dim() - 2}))
        elif func is F.linear or func is torch._C._nn.linear:
            weight = self._entry(args[1] if len(args) > 1 else kwargs.get("weight"))
            if weight is not None:
                self._use(weight[0], COLUMNS if weight[1] else ROWS)
            self._other_uses(args[2:] + tuple(v for k, v in kwargs.items() if k != "weight") + args[:1], func)
        elif func in _LOOKUPS:
            position = _LOOKUPS[func]
            table = self._entry(args[position] if len(args) > position else kwargs.get("weight"))
            if table is not None:
                self._use(table[0], ROWS if table[1] else LOOKUP)  # a transposed table: W one_hot(x)
            self._other_uses(tuple(a for i, a in enumerate(args) if i != position)
                             + tuple(v for k, v in kwargs.items() if k != "weight"), func)
        elif func in _PRODUCTS:
            left, right = (self._entry(args[i]) if i < len(args) else None for i in _PRODUCTS[func])
            if right is not None:
                self._use(right[0], ROWS if right[1] else COLUMNS)
            if left is not None:
                self._use(left[0], COLUMNS if left[1] else ROWS)
        elif func is F.multi_head_attention_forward:  # its projections, each through F.linear (unseen inside)
            for v in tuple(args) + tuple(kwargs.values()):
                entry = self._entry(v)
                if entry is not None:
                    self._use(entry[0], COLUMNS if entry[1] else ROWS)
        elif func is torch.einsum:
            self._einsum(args, func)
        elif func is torch.tensordot:
            self._tensordot(args, kwargs, func)
        elif func not in _IGNORED:
            self._other_uses(tuple(args) + tuple(kwargs.values()), func)
        return out

    def _other_uses(self, values, func) -> None:
        for v in values:
            entry = self._entry(v)
            if entry is not None:
                self._use(entry[0], "other")
                self.others[entry[0]].add(getattr(func, "__name__", str(func)))

    def _use(self, name: str, kind: str) -> None:
        self.uses[name].add(kind)
        self.counts[name] += 1

    def _contracted(self, entry, dims: List[int], func) -> None:
        """A tracked tensor multiplied over ``dims`` (non-negative, sorted): over its last dim it
        acts like F.linear's weight (its rows), over the one before like ``x @ W`` (its columns)."""
        name, flipped, t = entry
        last, before = t.dim() - 1, t.dim() - 2
        if before >= 0 and dims in ([last], [before]):
            self._use(name, ROWS if (dims == [last]) != flipped else COLUMNS)
        else:
            self._other_uses([t], func)

    def _einsum(self, args, func) -> None:
        """``torch.einsum("bi,oi->bo", x, W)``: the weight's letters shared with another operand
        and not kept in the output are the dims it is multiplied over."""
        if not args or not isinstance(args[0], str):  # the sublist format: not read
            self._other_uses(list(args), func)
            return
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        equation = args[0].replace(" ", "")
        inputs, arrow, output = equation.partition("->")
        subscripts = inputs.split(",")
        if not arrow:  # the implicit output: the letters that occur once
            output = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
        for i, t in enumerate(operands):
            entry = self._entry(t)
            if entry is None:
                continue
            sub = subscripts[i] if len(subscripts) == len(operands) else ""
            rest = "".join(s for j, s in enumerate(subscripts) if j != i)
            if len(sub) != t.dim() or len(set(sub)) != len(sub) or not sub.isalpha():  # "...", a diagonal
                self._other_uses([t], func)
            else:
                self._contracted(entry, [k for k, c in enumerate(sub) if c in rest and c not in output], func)

    def _tensordot(self, args, kwargs, func) -> None:
        """``torch.tensordot(x, W, dims=1)``: the dims of W it is multiplied over."""
        dims = args[2] if len(args) > 2 else kwargs.get("dims", 2)
        for position, t in enumerate(args[:2]):
            entry = self._entry(t)
            if entry is None:
                continue
            if isinstance(dims, int):
                over = list(range(t.dim() - dims, t.dim())) if position == 0 else list(range(dims))
            elif isinstance(dims, (list, tuple)) and len(dims) == 2:
                listed = dims[position]
                over = sorted(d % t.dim() for d in ([listed] if isinstance(listed, int) else listed))
            else:
                self._other_uses([t], func)
                continue
            self._contracted(entry, over, func)


def multiplication_layouts(params: Dict[str, torch.Tensor], run: Callable[[], object],
                           others: Optional[Dict[str, Set[str]]] = None) -> Dict[str, Optional[str]]:
    """For each parameter (by name), how ``run()`` (a forward pass) multiplies it: ROWS, COLUMNS,
    LOOKUP where it only looks it up (an embedding table), or None where it does not multiply it
    or multiplies it both ways. Products are F.linear, matmul and @ (and their batched forms),
    einsum, tensordot and MultiheadAttention's projections; other uses do not change the way
    (a tied embedding is seen as its output head multiplies it). ``F.linear(x, W * mask)``
    multiplies a product, not W: to W that is a use by ``mul`` (an activation added to a
    positional table of the same shape would look the same). ``others``, where given, gets by
    name the functions of the uses that are no products. A forward pass that fails only while
    watched (code that refuses torch-function modes) gives None for every parameter, with a
    warning."""
    watch = _watched(params, run)
    if watch is None:
        return {name: None for name in params}
    if others is not None:
        others.update(watch.others)
    return {name: _layout(uses) for name, uses in watch.uses.items()}


def use_counts(params: Dict[str, torch.Tensor], run: Callable[[], object]) -> Optional[Dict[str, int]]:
    """For each parameter (by name), how many calls of ``run()`` (a forward pass) consume it:
    products, lookups and any other function (views and transposes aside, and what only reads
    its size or dtype). One for a layer's weight that only its module's forward uses; more for a
    weight the model also uses elsewhere (``F.linear(h, self.fc.weight)``). None where the watch
    failed (with a warning)."""
    watch = _watched(params, run)
    return None if watch is None else dict(watch.counts)


def traced_uses(model: nn.Module, module: nn.Module, graph: fx.Graph) -> int:
    """What :func:`use_counts` counts for ``module``'s weight, read from the model's forward traced
    by torch.fx instead of run: the calls of the module, and the uses of each read of its weight
    (``self.fc.weight``) outside it."""
    modules = dict(model.named_modules())
    count = 0
    for node in graph.nodes:
        if node.op == "call_module" and modules.get(node.target) is module:
            count += 1
        elif node.op == "get_attr" and _attribute(model, node.target) is module.weight:
            count += len(node.users)
    return count


def _attribute(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _watched(params: Dict[str, torch.Tensor], run: Callable[[], object]) -> Optional[_Watch]:
    watch = _Watch(params)
    try:
        with watch, torch.no_grad():
            run()
    except Exception as exc:  # noqa: BLE001 - reported, and the caller falls back to what it knows
        warnings.warn(f"relflat_ext: could not watch how the model uses its parameters ({type(exc).__name__}: "
                      f"{exc}); weights named as parameters keep their stored orientation, and a layer's weight is "
                      "taken as used by its module alone", RuntimeWarning)
        return None
    return watch


def _layout(uses: Set[str]) -> Optional[str]:
    """One way of multiplying; uses of other kinds (a lookup of a tied table, a penalty on the
    weight computed in the forward) do not change it."""
    multiplied = uses & {ROWS, COLUMNS}
    if len(multiplied) == 1:
        return next(iter(multiplied))
    return LOOKUP if uses == {LOOKUP} else None
