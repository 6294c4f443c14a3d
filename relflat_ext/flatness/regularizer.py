"""A relative-flatness penalty for training loops: taps a layer's input during the ordinary
forward pass and returns the differentiable kappa of that batch (:func:`.penalty.flatness_penalty`)."""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.data import label_convention, model_loss, output_logits, regression_labels
from ..core.hooks import check_vector_features
from ..core.layers import LayerSpec, resolve_linear, runs_custom_code, unwrap, weight_matrix, weight_uses
from ..core.usage import traced_uses
from ..core.losses import Loss, LossSpec, get_loss, is_cross_entropy_after_log_softmax
from . import tail as _tail
from .penalty import penalty as _penalty


class FlatnessRegularizer:
    """``reg = FlatnessRegularizer(model, "fc3")``; in the loop, after ``out = model(x)``:
    ``loss = criterion(out, y) + lam * reg.penalty(y)``.

    The layer must be an ``nn.Linear`` that produces the model's output (the closed form, with its
    fused backward kernel) or one followed, in a plain ``nn.Sequential`` (or a model torch.fx can
    trace), by Linear layers and elementwise activations only (the differentiable chain rule); a
    final log_softmax counts as part of cross entropy or nll_loss.
    ``loss``: the training loss (a built-in name or a callable with mean reduction); None: the
    model's own (a transformers classifier's problem type, else cross entropy). A transformers
    model's output object counts by its ``.logits``.

    - No second forward pass: a forward hook keeps the layer's input of the latest call.
    - ``torch.autocast``: the penalty is computed in float32 from the half-precision features.
    - DistributedDataParallel: give the wrapped model (or its module); each rank's penalty is that of
      its own batch, as its loss is, and DDP averages the gradients. DataParallel: the replicas'
      chunks are combined into the penalty of the whole batch.
    - The targets' values are checked on the first penalty only (the check reads them all, and
      synchronizes a GPU); their shape is the loss' business after that.
    - The model's parameters are never changed here; ``remove()`` (or leaving a ``with`` block)
      takes the hooks off again.
    """

    def __init__(self, model: nn.Module, layer: LayerSpec, loss: Union[LossSpec, Loss, None] = None,
                 normalize_features: bool = False):
        inner = unwrap(model)
        self.name, self.layer = resolve_linear(inner, layer, "FlatnessRegularizer")
        self.loss = get_loss(model_loss(inner)[0] if loss is None else loss)
        self._labels = label_convention(inner)
        self.normalize_features = bool(normalize_features)
        graph = _check_one_use(inner, self.name, self.layer)
        # Before our hooks exist (plan() avoids hooked models). A final log_softmax is taken into the
        # loss where cross entropy or nll_loss absorbs it: CE(log_softmax(u)) = CE(u).
        plan = _tail.plan(inner, self.name, self.layer,
                          final_log_softmax=is_cross_entropy_after_log_softmax(self.loss),
                          tracer=(lambda: graph) if graph is not False else None)
        if plan is not None and plan.log_softmax_dim is not None:
            self.loss = get_loss("cross_entropy")
        self._plan = plan
        self._tail: Optional[List[nn.Module]] = plan.tail if plan is not None else None
        self._tail_checked = plan is not None and not plan.traced
        self._lock = threading.Lock()  # DataParallel runs the replicas' hooks in threads
        self._calls: List[Tuple[torch.Tensor, torch.Tensor, nn.Module]] = []
        self._output = None
        self._targets_checked = False
        # DataParallel's replicas share the hooks of `inner`: begin and end a pass on the wrapper.
        self._replica_hooks = isinstance(model, nn.DataParallel)
        outer = model if self._replica_hooks else inner
        self._handles = [outer.register_forward_pre_hook(self._start),
                         self.layer.register_forward_hook(self._record),
                         outer.register_forward_hook(self._finish)]

    # Hooks
    def _start(self, module, args):
        with self._lock:
            self._calls, self._output = [], None

    def _record(self, module, args, out):
        check_vector_features(self.name, args[0])
        with self._lock:
            self._calls.append((args[0], out, module))

    def _finish(self, module, args, out):
        with self._lock:
            self._output = output_logits(out, module)

    def penalty(self, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable kappa_Tr (0-dim, float32 or the layer's dtype) of the latest forward pass'
        batch; ``targets`` as the loss takes them (needed through a tail or with a callable loss)."""
        if not self._handles:
            raise RuntimeError("this FlatnessRegularizer was removed; create a new one")
        with self._lock:
            calls, output = list(self._calls), self._output
        if not calls:
            raise RuntimeError(f"no forward pass through layer {self.name!r} since the last model call began: "
                               "call the model on the batch before reg.penalty(targets)")
        if len(calls) > 1 and not self._replica_hooks:
            raise ValueError(f"layer {self.name!r} was called {len(calls)} times in one forward pass (shared "
                             "weights): the penalty covers a layer used once")
        if len(calls) == 1:
            is_output = output is not None and calls[0][1] is output
            tail = None if is_output else self._checked_tail(calls[0][1], output)
        else:  # DataParallel replicas: the gathered output is a new tensor, so the plan decides
            if self._tail is None:
                raise ValueError(f"under DataParallel the layer {self.name!r} must be the last module of a plain "
                                 "nn.Sequential, or followed there by Linear layers and activations only")
            tail = self._tail
        if targets is not None and self._labels == "regression":
            targets = regression_labels(targets)
        if not self._targets_checked and not self.loss.builtin and output is not None:
            self.loss.check(output.detach(), targets)  # a callable: that it averages over the samples
        total, n = None, 0
        for features, _, module in calls:  # one chunk per replica under DataParallel, else one
            chunk_targets = targets
            if targets is not None and len(calls) > 1:
                chunk_targets = targets[n:n + features.shape[0]].to(features.device)
            value = _penalty(features, weight_matrix(module), chunk_targets, self.loss, module.bias,
                             self.normalize_features, tail, check_targets=not self._targets_checked) * features.shape[0]
            total = value if total is None else total + value.to(total.device)
            n += features.shape[0]
        self._targets_checked |= targets is not None  # their values once; a training loop's are alike
        return total / n

    def _checked_tail(self, layer_output: torch.Tensor, model_output) -> List[nn.Module]:
        if self._tail is None:
            raise ValueError(f"layer {self.name!r} neither produces the model output nor is followed by Linear "
                             "layers and elementwise activations only (in a plain nn.Sequential or a model "
                             "torch.fx can trace); the penalty supports those two cases")
        for module in self._tail:
            if not (_tail.is_linear(module) or _tail.is_elementwise(module) or type(module) in _tail.PASS_THROUGH):
                raise ValueError(f"the modules after layer {self.name!r} include a {type(module).__name__} in its "
                                 "current mode (BatchNorm1d counts as elementwise only in eval mode)")
        if isinstance(model_output, torch.Tensor):
            self._plan.check_log_softmax(self.name, model_output.dim())
        if not self._tail_checked:  # a traced tail: must give the model's own output, once
            if not _tail.reproduces(self._plan.run(layer_output.detach()), model_output):
                raise ValueError(f"the traced modules after layer {self.name!r} do not reproduce the model output; "
                                 "the penalty cannot follow this model's forward")
            self._tail_checked = True
        return self._tail

    def remove(self) -> None:
        """Takes the hooks off the model and drops the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._calls, self._output = [], [], None

    def __enter__(self) -> "FlatnessRegularizer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_one_use(model: nn.Module, name: str, layer: nn.Module):
    """Refuses a layer whose weight the forward uses more than once (tied to another module, or read
    outside its own, as in ``F.linear(h, self.fc.weight)``): the penalty's exact kappa comes from
    the module's inputs and would miss the other uses. Returns the torch.fx graph it traced (None:
    untraceable), or False where the model runs torch.nn code only and needed no trace."""
    uses, graph = weight_uses(model, layer), False
    if uses == 1 and runs_custom_code(model):
        graph = _tail.traced_graph(model)
        uses = traced_uses(model, layer, graph) if graph is not None else 1
    if uses > 1:
        raise ValueError(f"the weight of layer {name!r} is used {uses} times in a forward pass (tied to another "
                         "module, or read outside its own): the penalty's exact kappa sees the module's inputs "
                         "only, so it would miss the other uses; relative_flatness measures such a layer (by "
                         "the estimator, every use)")
    return graph
