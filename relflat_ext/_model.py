"""Model plumbing shared by every measurement: finding the layer, iterating the data, capturing
the layer's input features, and leaving the user's model exactly as it was."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

LayerSpec = Union[str, nn.Module]
Batch = Tuple[torch.Tensor, torch.Tensor]


def find_layer(model: nn.Module, layer: LayerSpec, wanted=lambda m: isinstance(m, nn.Linear),
               kind: str = "nn.Linear layers") -> Tuple[str, nn.Module]:
    """(name, module) of ``layer`` (a name or a submodule) inside ``model``; an unknown name gets an
    error listing the model's modules for which ``wanted`` holds (described as ``kind``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in named:
            candidates = [n for n, m in named.items() if wanted(m)]
            raise ValueError(f"layer {layer!r} is not in the model; its {kind} are {candidates}")
        return layer, named[layer]
    if isinstance(layer, nn.Module):
        matches = [n for n, m in named.items() if m is layer]
        if not matches:
            raise ValueError(f"layer (a {type(layer).__name__}) is not a submodule of the model")
        return matches[0], layer
    raise TypeError(f"layer must be an nn.Module inside model or its name, got {type(layer).__name__}")


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1/s, and 0 where s = 0: a zero-spread feature (constant, a bias in disguise, or a dead unit)
    is dropped from the normalized measure, as the bias is from kappa. Keeping it at scale 1 would
    let its weight column, which any layer-wise rescaling changes, enter G: measured on digits,
    that broke the reparameterization invariance Theorem 4 is for (up to 12x on ReLU MLPs)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, 1.0 / safe, torch.zeros_like(scale))


def resolve_layer(model: nn.Module, layer: LayerSpec) -> Tuple[str, nn.Linear]:
    """Returns (name, module) of ``layer`` inside ``model``; it must be an ``nn.Linear``."""
    name, module = find_layer(model, layer)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; this path needs an nn.Linear layer "
                        "(feature matrix W acting on per-sample feature vectors); method='stochastic' (or "
                        "'auto') handles convolutions and other layers whose weight multiplies features")
    return name, module


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def iterate_batches(inputs, targets: Optional[torch.Tensor], batch_size: Optional[int],
                    check_values: bool = True) -> Iterator[Batch]:
    """Yields (x, y) batches from tensors (chunked by ``batch_size``) or from an iterable of pairs
    (a DataLoader, with ``targets=None``). Checks shapes, and finiteness unless ``check_values`` is
    False (for callers that check their result instead: a scan can cost more than the work)."""
    if isinstance(inputs, torch.Tensor):
        if targets is None or not isinstance(targets, torch.Tensor):
            raise TypeError("targets must be a tensor when inputs is a tensor "
                            "(pass inputs as an iterable of (x, y) batches with targets=None otherwise)")
        if inputs.shape[0] == 0:
            raise ValueError("inputs is empty: at least one sample is needed")
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets has {targets.shape[0]} samples but inputs has {inputs.shape[0]}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if check_values:
            check_finite("inputs", inputs)
            check_finite("targets", targets)
        step = inputs.shape[0] if batch_size is None else batch_size
        for start in range(0, inputs.shape[0], step):
            yield inputs[start:start + step], targets[start:start + step]
        return
    if targets is not None:
        raise TypeError("targets must be None when inputs is an iterable of (x, y) batches")
    if not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a tensor or an iterable of (x, y) batches, got {type(inputs).__name__}")
    seen = 0
    for k, batch in enumerate(inputs):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"batch {k} of inputs must be an (x, y) pair, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch {k}: targets has {y.shape[0]} samples but inputs has {x.shape[0]}")
        if check_values:
            check_finite(f"inputs (batch {k})", x)
            check_finite(f"targets (batch {k})", y)
        seen += x.shape[0]
        if x.shape[0]:
            yield x, y
    if seen == 0:
        raise ValueError("inputs is empty: the iterable yielded no samples")


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


_BATCHED_HVP_OK = True


def hessian_vector_products(grad: torch.Tensor, wrt: torch.Tensor, vectors: torch.Tensor,
                            batched: bool = True) -> torch.Tensor:
    """Products of the Hessian behind ``grad`` (a gradient w.r.t. ``wrt`` built with create_graph)
    with k vectors (k, *wrt.shape) -> (k, *wrt.shape). ``batched`` uses one vmap'd backward
    (``is_grads_batched``); it falls back for good to one backward per vector the first time an op
    of the model has no vmap rule. One vector is always a plain double backward."""
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


class NotVectorFeatures(ValueError):
    """The layer's input is not (n, m): the exact path cannot run, the stochastic estimator can."""


def check_vector_features(name: str, phi: torch.Tensor) -> None:
    if phi.dim() != 2:
        raise NotVectorFeatures(
            f"layer {name!r} receives input of shape {tuple(phi.shape)}; the exact path needs "
            "2-D per-sample features (n, m); use method='stochastic' (or 'auto') for sequence inputs.")


class LayerTap:
    """Forward hook that records the layer's input features and, when ``replace_output``,
    substitutes a fresh leaf ``z`` (requires grad) for the layer's output, so the rest of the
    network becomes a differentiable function of z alone."""

    def __init__(self, layer: nn.Module, name: str, replace_output: bool):
        self.name, self.replace_output = name, replace_output
        self.features: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.raw_output: Optional[torch.Tensor] = None  # the layer's own output object
        self.calls = 0
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(f"layer {self.name!r} is called more than once per forward pass (shared "
                               "weights); the per-sample identity needs a layer used once")
        phi = args[0]
        check_vector_features(self.name, phi)
        self.features, self.raw_output = phi.detach(), out
        if self.replace_output:
            self.output = out.detach().requires_grad_(True)
            return self.output
        self.output = out.detach()
        return None

    def reset(self):
        self.calls, self.features, self.output, self.raw_output = 0, None, None, None

    def remove(self):
        self._handle.remove()


@contextlib.contextmanager
def tapped(layer: nn.Module, name: str, replace_output: bool):
    tap = LayerTap(layer, name, replace_output)
    try:
        yield tap
    finally:
        tap.remove()
