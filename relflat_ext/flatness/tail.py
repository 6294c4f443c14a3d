"""Which models let the exact path use the second-order chain rule (:mod:`relflat_ext._chain_rule`)
instead of Hessian-vector products: those where everything after the layer is a chain of Linear
layers, elementwise activations, BatchNorm1d with running statistics (in eval mode, where we
measure, a per-feature affine map), dropout (the identity in eval mode) and identities.

Two ways to see the tail:
- a plain ``nn.Sequential`` (nested ones too, subclasses that keep its forward): the modules after
  the layer, and the modules before it give the features directly;
- any other model that ``torch.fx.symbolic_trace`` can trace: the nodes after the layer, when each
  has one user and they end at the output (``F.relu``, ``torch.tanh``, ``x.sigmoid()``... and
  ``F.dropout`` with training=False are accepted as well as modules). The trace is checked
  against the model: the tail must reproduce the model's output from the layer's output on the
  data, or the HVP path runs instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardswish,
               nn.LogSigmoid)  # not Hardsigmoid: autograd has no second derivative for it
PASS_THROUGH = (nn.Identity, nn.Dropout)  # dropout is the identity in eval mode, where we measure
ELEMENTWISE_FUNCTIONS = (torch.tanh, torch.sigmoid, torch.relu, F.tanh, F.sigmoid, F.relu, F.relu6, F.leaky_relu,
                         F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.softplus, F.softsign, F.tanhshrink,
                         F.hardtanh, F.hardswish, F.logsigmoid)
ELEMENTWISE_METHODS = ("tanh", "sigmoid", "relu")
LOG_SOFTMAX_FUNCTIONS = (F.log_softmax, torch.log_softmax)

_enabled = True


@contextlib.contextmanager
def hvp_only() -> Iterator[None]:
    """Within the block no model gets a tail plan: the exact path uses Hessian-vector products and
    feature robustness runs the whole model per perturbation (to check one strategy against the
    other, or to time the general one)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class Elementwise(nn.Module):
    """A traced elementwise call, ``fn(u, *args, **kwargs)``, as a tail step."""

    def __init__(self, fn, args=(), kwargs=None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.fn(u, *self.args, **self.kwargs)


def is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def is_elementwise(module: nn.Module) -> bool:
    return type(module) in ELEMENTWISE or type(module) is Elementwise or _frozen_batchnorm(module)


def _frozen_batchnorm(module: nn.Module) -> bool:
    """BatchNorm1d in eval mode with running statistics: a per-feature affine map, so elementwise."""
    return (type(module) is nn.BatchNorm1d and not module.training and module.track_running_stats
            and module.running_mean is not None)


def _supported(module: nn.Module) -> bool:
    return is_linear(module) or is_elementwise(module) or type(module) in PASS_THROUGH


@dataclasses.dataclass
class TailPlan:
    """``tail``: the steps after the layer. ``prefix``: the modules before it (a Sequential), or
    None when the features come from running the model (a trace, checked by ``reproduces``).
    ``log_softmax_dim``: the dim of a final log_softmax over the classes, left out of ``tail``
    (cross entropy of log_softmax(u) is the cross entropy of u, and nll_loss of it too) and
    applied by :meth:`run`."""
    layer: nn.Linear
    tail: List[nn.Module]
    prefix: Optional[List[nn.Module]]
    log_softmax_dim: Optional[int] = None

    @property
    def traced(self) -> bool:
        return self.prefix is None

    def run(self, z: torch.Tensor, keep_input: bool = True) -> torch.Tensor:
        """The model's output for the layer output z (forward only). ``keep_input``: z is left as it
        is, whatever the tail does in place (a copy first; not needed for a tensor made to be run)."""
        with torch.no_grad():
            z = z.clone() if keep_input and self.tail else z
            for module in self.tail:
                z = module(z)
            return z if self.log_softmax_dim is None else F.log_softmax(z, self.log_softmax_dim)

    def check_log_softmax(self, name: str, output_dim: int) -> None:
        """The folded log_softmax must run over the classes: the output's last dim."""
        if self.log_softmax_dim is not None and self.log_softmax_dim % output_dim != output_dim - 1:
            raise ValueError(f"the model ends in log_softmax over dim {self.log_softmax_dim} of a {output_dim}-D "
                             f"output, not over its classes (the last dim); layer {name!r} needs "
                             "method='stochastic' or 'autograd'")


def plan(model: nn.Module, name: str, layer: nn.Linear, trace: bool = True,
         final_log_softmax: bool = False, tracer: Optional[Callable[[], Optional[fx.Graph]]] = None
         ) -> Optional[TailPlan]:
    """The tail of ``layer`` (named ``name`` in ``model``) when the chain rule applies, else None;
    ``trace=False`` looks at plain Sequentials only; ``final_log_softmax`` accepts a log_softmax
    over dim 1 or -1 as the model's last step (for cross entropy or nll_loss, or to run the tail).
    ``tracer`` gives the model's torch.fx graph (or None) where the caller keeps one (a forward
    with side effects then runs once for all who trace it); by default :func:`traced_graph`.
    Call it with the model in the mode it is measured in (eval): a trace follows that mode."""
    if not _enabled or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    flat = _flatten(model)
    if flat is not None:
        if sum(m is layer for m in flat) != 1:
            return None  # a shared layer: the tap reports it
        at = next(i for i, m in enumerate(flat) if m is layer)
        tail, prefix = flat[at + 1:], flat[:at]
    else:
        graph = (tracer or (lambda: traced_graph(model)))() if trace else None
        tail, prefix = _traced_tail(model, name, graph) if graph is not None else None, None
    if tail is None:
        return None
    dim = None
    if final_log_softmax and tail and type(tail[-1]) is nn.LogSoftmax and tail[-1].dim in (1, -1):
        dim, tail = tail[-1].dim, tail[:-1]
    return TailPlan(layer, tail, prefix, dim) if all(_supported(m) for m in tail) else None


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(module: nn.Module) -> Optional[List[nn.Module]]:
    if not _plain_sequential(module):
        return None
    flat: List[nn.Module] = []
    for child in module:
        if _plain_sequential(child):
            flat += _flatten(child)
        else:
            flat.append(child)
    return flat


def traced_graph(model: nn.Module) -> Optional[fx.Graph]:
    """The model's forward traced by torch.fx, or None where it cannot be traced (or the instance
    has a forward of its own, which fx, tracing the class's, would not see)."""
    if "forward" in vars(model):
        return None
    try:
        return fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any untraceable forward just means: use HVPs
        return None


def _traced_tail(model: nn.Module, name: str, graph: fx.Graph) -> Optional[List[nn.Module]]:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return None
    modules = dict(model.named_modules())
    node, tail = calls[0], []
    while True:
        if len(node.users) != 1:
            return None  # the value is used twice (a skip connection, a second head...)
        user = next(iter(node.users))
        if user.op == "output":
            return tail if user.args[0] is node else None
        step = _step(user, node, modules)
        if step is None:
            return None
        tail.append(step)
        node = user


def _step(user: fx.Node, node: fx.Node, modules) -> Optional[nn.Module]:
    """The tail step that ``user`` applies to ``node``'s value, if it is a supported one."""
    rest, kwargs = user.args[1:], user.kwargs
    if not user.args or user.args[0] is not node or _has_node((rest, kwargs)):
        return None
    if user.op == "call_module":
        module = modules[user.target]
        kept = _supported(module) or type(module) is nn.LogSoftmax  # plan() decides on a final log_softmax
        return module if kept and not rest and not kwargs else None
    if user.op == "call_function" and user.target in ELEMENTWISE_FUNCTIONS:
        return Elementwise(user.target, rest, kwargs)
    if user.op == "call_function" and user.target is F.dropout:  # F.dropout(x, p, training, inplace)
        training = kwargs.get("training", rest[1] if len(rest) > 1 else True)
        return None if training else nn.Identity()
    if user.op == "call_method" and user.target in ELEMENTWISE_METHODS and not rest and not kwargs:
        return Elementwise(getattr(torch, user.target))
    if (user.op == "call_function" and user.target in LOG_SOFTMAX_FUNCTIONS) or \
            (user.op == "call_method" and user.target == "log_softmax"):
        dim = kwargs.get("dim", rest[0] if rest else None)
        extra = {k: v for k, v in kwargs.items() if k not in ("dim", "_stacklevel")}  # F.log_softmax's defaults
        if isinstance(dim, int) and len(rest) <= 1 and all(v is None for v in extra.values()):
            return nn.LogSoftmax(dim)
    return None


def _has_node(args) -> bool:
    found = []
    fx.node.map_arg(args, found.append)
    return bool(found)


def reproduces(tail_output: torch.Tensor, model_output) -> bool:
    """Whether a traced tail gives the model's own output (same ops, so equal up to rounding)."""
    if not isinstance(model_output, torch.Tensor) or model_output.shape != tail_output.shape:
        return False
    # NaN where the model's output is (a forward that computes NaN): the caller's result says so.
    scale = model_output.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if model_output.numel() else 0.0
    tol = 1e-4 if model_output.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-10
    return bool(torch.allclose(tail_output, model_output, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True))
