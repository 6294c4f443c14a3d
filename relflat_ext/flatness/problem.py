"""The problem object: what one measurement is about (model, layer, data, loss, distribution),
built and validated once by the front door and handed to whichever path runs; and the options
the paths share."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..core import dist
from ..core.data import Batch, check_data, iterate_batches
from ..core.layers import LayerSpec, WeightView, resolve_weight_layer
from ..core.losses import Loss, LossSpec, get_loss

METHODS = ("auto", "closed_form", "exact", "autograd", "stochastic")


@dataclasses.dataclass(frozen=True)
class Options:
    """What to compute besides kappa_Tr, and the stochastic estimator's stopping rule."""
    normalize_features: bool = False
    lmax: bool = False
    block_trace: bool = False
    rel_tol: float = 0.05
    max_probes: int = 1000
    seed: Optional[int] = None
    weight_view: Optional[WeightView] = None


@dataclasses.dataclass
class Problem:
    """The layer ``name`` (``module``, which has a weight) of ``model``, the data (tensors chunked by
    ``batch_size``, or an iterable of (x, y) batches with ``targets=None``), the loss record, and
    whether partial sums are all-reduced over a torch.distributed process group."""
    model: nn.Module
    name: str
    module: nn.Module
    inputs: object
    targets: Optional[torch.Tensor]
    batch_size: Optional[int]
    loss: Loss
    distributed: bool

    @classmethod
    def build(cls, model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None,
              loss: LossSpec = "cross_entropy", batch_size: Optional[int] = None,
              distributed: Optional[bool] = None) -> "Problem":
        """Validates everything that can be checked without a pass over the data."""
        name, module = resolve_weight_layer(model, layer)
        loss = get_loss(loss)
        check_data(inputs, targets, batch_size)
        return cls(model, name, module, inputs, targets, batch_size, loss, dist.active(distributed))

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def batches(self, check_values: bool = True) -> Iterator[Batch]:
        """The (x, y) batches; ``check_values=False`` skips the NaN/Inf scan for callers that check
        their result instead (a scan can cost more than the work)."""
        return iterate_batches(self.inputs, self.targets, self.batch_size, check_values)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The data (when given as tensors) and the model's parameters, by name: where to look
        when a result is not finite."""
        data = {"inputs": self.inputs, "targets": self.targets} if isinstance(self.inputs, torch.Tensor) else {}
        return {**data, **dict(self.model.named_parameters())}
