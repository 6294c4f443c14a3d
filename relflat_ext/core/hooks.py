"""Running the user's model without changing it: eval mode with parameters restored on any exit,
and a forward hook that captures a layer's input (and can cut the graph at its output)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Runs the body with the model in eval mode and no parameter requiring grad; restores the
    training flags, ``requires_grad`` and ``.grad`` of every parameter afterwards, on any exit.
    Eval mode makes samples independent (BatchNorm uses running statistics, dropout is off),
    which the per-sample Hessian identity needs."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


class NotVectorFeatures(ValueError):
    """The layer's input is not (n, m): the exact path cannot run, the stochastic estimator can."""


class SharedLayer(ValueError):
    """The layer runs more than once per forward pass: the exact paths see one use, the
    stochastic estimator and the autograd baseline every use."""


def check_vector_features(name: str, phi: torch.Tensor) -> None:
    if phi.dim() != 2:
        raise NotVectorFeatures(
            f"layer {name!r} receives input of shape {tuple(phi.shape)}; the exact path needs "
            "2-D per-sample features (n, m), or token features (n, seq, m) with token targets (n, seq); "
            "use method='stochastic' (or 'auto') for other sequence inputs.")


def is_token_targets(phi: torch.Tensor, targets: Optional[torch.Tensor]) -> bool:
    """Token targets: integer labels (n, seq, ...) for the layer's input (n, seq, ..., m)."""
    return (phi.dim() >= 3 and isinstance(targets, torch.Tensor) and not targets.is_floating_point()
            and tuple(targets.shape) == tuple(phi.shape[:-1]))


def sample_features(name: str, phi: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample features (n, m): ``phi`` itself, or with token targets the tokens as samples,
    (n * seq, m) (exact only where the rest of the model treats tokens independently, which the
    caller establishes)."""
    if phi.dim() != 2 and is_token_targets(phi, targets):
        return phi.reshape(-1, phi.shape[-1])
    check_vector_features(name, phi)
    if isinstance(targets, torch.Tensor) and targets.dim() and phi.shape[0] > targets.shape[0] \
            and phi.shape[0] != targets.numel():
        # More rows than samples: some sample has several (a model that flattens its tokens into
        # rows before the layer), and the cross-row terms of its Hessian are not per-sample terms.
        raise NotVectorFeatures(f"layer {name!r} receives {phi.shape[0]} feature vectors for {targets.shape[0]} "
                                "samples (the model puts several rows per sample into it): the exact path needs "
                                "one per sample; use method='stochastic' (or 'auto')")
    return phi


class LayerNotCalled(ValueError):
    """The model never runs the layer's forward: it uses the weight directly (as
    nn.MultiheadAttention does with out_proj), so the layer's input features cannot be seen; the
    stochastic estimator works from the weight alone."""


def not_called(name: str, what: str = "this path") -> LayerNotCalled:
    return LayerNotCalled(f"the model did not call layer {name!r}'s forward on a batch (it uses the weight "
                          "directly, as nn.MultiheadAttention does with out_proj, or routes the whole batch past "
                          f"it), so {what} cannot see its input features; relative_flatness(method='stochastic') "
                          "works from the weight alone")


class LayerTap:
    """Forward hook that records the layer's input features and, when ``replace_output``,
    substitutes a fresh leaf ``z`` (requires grad) for the layer's output, so the rest of the
    network becomes a differentiable function of z alone. Reading what the hook records after a
    forward pass that never ran the layer raises :class:`LayerNotCalled`."""

    def __init__(self, layer: nn.Module, name: str, replace_output: bool, copy_output: bool = False):
        self.name, self.replace_output, self.copy_output = name, replace_output, copy_output
        self._features: Optional[torch.Tensor] = None
        self._output: Optional[torch.Tensor] = None
        self._raw_output: Optional[torch.Tensor] = None  # the layer's own output object
        self.calls = 0
        self._handle = layer.register_forward_hook(self._hook)

    def _recorded(self, value):
        if self.calls == 0:
            raise not_called(self.name)
        return value

    @property
    def features(self) -> torch.Tensor:
        """The layer's input (n, m); :class:`NotVectorFeatures` if it has another shape."""
        return self.sample_features(None)

    def sample_features(self, targets: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's input as per-sample features: (n, m), or tokens as samples with token targets."""
        return sample_features(self.name, self._recorded(self._features), targets)

    @property
    def input(self) -> torch.Tensor:
        """The layer's input as the model passed it (any shape)."""
        return self._recorded(self._features)

    @property
    def output(self) -> torch.Tensor:
        return self._recorded(self._output)

    @property
    def raw_output(self):
        return self._recorded(self._raw_output)

    def _hook(self, module, args, out):
        self.calls += 1
        if self.calls > 1:
            raise SharedLayer(f"layer {self.name!r} is called more than once per forward pass (shared weights): "
                              "the per-sample identity sees one use; method='stochastic' or 'autograd' include "
                              "every use")
        self._features, self._raw_output = args[0].detach(), out
        if self.replace_output:
            self._output = out.detach().requires_grad_(True)
            # The model continues from a copy: it may work in place on it (ReLU(inplace=True) after
            # the layer), which autograd refuses on a leaf.
            return self._output.clone()
        # A copy where the output is read after the forward: the model may change it in place.
        self._output = out.detach().clone() if self.copy_output else out.detach()
        return None

    def reset(self):
        self.calls, self._features, self._output, self._raw_output = 0, None, None, None

    def remove(self):
        self._handle.remove()


@contextlib.contextmanager
def tapped(layer: nn.Module, name: str, replace_output: bool, copy_output: bool = False):
    tap = LayerTap(layer, name, replace_output, copy_output)
    try:
        yield tap
    finally:
        tap.remove()
