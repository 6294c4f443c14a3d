"""The problem object: what one measurement is about (model, layer, data, loss, distribution),
built and validated once by the front door and handed to whichever path runs; and the options
the paths share."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from ..core import dist
from ..core.data import (IGNORE_INDEX, NOTHING_COUNTED, Batch, Inputs, as_the_model_takes, batch_length, call_model,
                         check_data, check_forward_finite, check_parameters_finite, data_device, is_dict_batch,
                         iterate_batches, label_convention, model_arguments, model_loss, to_device, unpack_pair)
from ..core.hooks import preserved
from ..core.layers import (LayerSpec, ParameterLayer, WeightView,
                           acts_on_vectors, fold_derived_weights, has_derived_weights, has_matrix_view, matrix_view,
                           resolve_weight_layer, runs_custom_code, unwrap, weight_matrix, weight_uses)
from ..core.losses import Loss, LossSpec, get_loss
from ..core.usage import multiplication_layouts, traced_uses, use_counts
from . import tail as _tail

METHODS = ("auto", "closed_form", "exact", "autograd", "stochastic")
HALF_DTYPES = (torch.float16, torch.bfloat16)
GRAPH_BYTES = 2 << 30  # what one batch's autograd graph may hold on the CPU, with batch_size=None
INPUT_EXPANSION = 64  # data smaller than GRAPH_BYTES / this are one batch without measuring the graph


@dataclasses.dataclass(frozen=True)
class Options:
    """What to compute besides kappa_Tr, the stochastic estimator's stopping rule, and whether to
    show progress."""
    normalize_features: bool = False
    lmax: bool = False
    block_trace: bool = False
    rel_tol: float = 0.05
    max_probes: int = 1000
    seed: Optional[int] = None
    weight_view: Optional[WeightView] = None
    progress: bool = False  # a progress line on stderr for the products of the exact path and the estimator
    normalized_too: bool = False  # the exact path's Hessian-vector products also give Theorem 4's kappa


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
    weight_uses: int = 1
    note: str = ""  # the loss the model chose and what the measurement did to the model, for the reason
    half_copy: bool = False  # a half-precision model measured as a float32 copy: half inputs are cast
    labels: str = ""  # labels as the model's loss reads them: "causal", "seq2seq", "regression" or ""
    device: Optional[torch.device] = None  # where batches go first (a model on one accelerator), or None
    _weight_calls: Optional[int] = None  # weight_calls(), once counted
    _graph: object = False  # traced_graph(), once traced (None: the model cannot be)

    @classmethod
    def build(cls, model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None,
              loss: Optional[LossSpec] = None, batch_size: Optional[int] = None,
              distributed: Optional[bool] = None) -> "Problem":
        """Validates everything that can be checked without a pass over the data. A half-precision
        model (float16, bfloat16) is measured as a float32 copy, with its data cast to float32:
        second derivatives in half precision keep two or three digits, and several CPU kernels
        (QR, eigh) have none. A model with derived weights (parametrizations, pruning, the older
        hook-based weight_norm / spectral_norm) is measured as a copy in which each is the plain
        weight it computes: kappa is about the matrix that multiplies the features, and derivatives
        need it as a leaf. DataParallel / DistributedDataParallel: the module inside. loss None:
        the model's own (:func:`~relflat_ext.core.data.model_loss`: a transformers classifier's
        problem type, else cross entropy)."""
        model = unwrap(model)
        name, module = resolve_weight_layer(model, layer)
        inputs, targets = unpack_pair(inputs, targets)
        check_data(inputs, targets, batch_size)
        notes = []
        if loss is None:
            loss, why = model_loss(model, inputs, targets)
            notes += [why] if why else []
        loss = get_loss(loss)
        weight, problem_model = module.weight, model
        if weight.is_inference():
            raise ValueError(f"layer {name!r} has a weight made under torch.inference_mode(), which autograd cannot "
                             "differentiate: build or load the model outside inference mode")
        if weight.device.type == "meta":
            raise ValueError(f"layer {name!r} has its weight on the meta device (no values): load or materialize the "
                             "model's weights first")
        if has_derived_weights(model):  # weight_norm, spectral_norm, pruning: measured as the weights they compute
            model = fold_derived_weights(model)
            notes.append("measured on a copy with the parametrized or pruned weights folded into plain ones")
        if weight.dtype in HALF_DTYPES:
            half = f"computed in float32 from a {str(weight.dtype).replace('torch.', '')} model"
            warnings.warn(f"relflat_ext: {half} (a float32 copy; the model is left as it is)", RuntimeWarning,
                          stacklevel=3)
            model = (model if model is not problem_model else copy.deepcopy(model)).float()
            notes.append(half)
        if model is not problem_model:
            module = resolve_weight_layer(model, name)[1]
        note = "; ".join(notes)
        problem = cls(model, name, module, inputs, targets, batch_size, loss, dist.active(distributed),
                      weight_uses(model, module), note, half_copy=weight.dtype in HALF_DTYPES,
                      labels=label_convention(model), device=data_device(model))
        if isinstance(inputs, torch.Tensor) or is_dict_batch(inputs):
            problem._check_input(inputs, "inputs")
        problem.orient([(name, module)])
        if batch_size is None:
            problem._batch_for_memory()
        return problem

    def _batch_for_memory(self) -> None:
        """With data given whole (tensors or a dict batch, ``batch_size=None``), a batch size that
        keeps one batch's autograd graph within GRAPH_BYTES (on a GPU, an eighth of its free
        memory): a forward on 4 samples and on 2, the difference of what autograd saves, per
        sample. Before, 50000 CIFAR images went through a convolution's Hessian-vector products in
        one batch (4000 took 5.9 GB). Results are sums over batches, so they do not change."""
        n = self.sample_count()
        if n is None or n <= 4:
            return
        x = self.inputs if isinstance(self.inputs, torch.Tensor) else {
            k: v for k, v in self.inputs.items() if isinstance(v, torch.Tensor)}
        data_bytes = sum(t.numel() * t.element_size() for t in (x.values() if isinstance(x, dict) else [x]))
        budget = GRAPH_BYTES
        if self.device is not None and self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] // 8
        if data_bytes * INPUT_EXPANSION <= budget:
            return
        saved = [0, 0]
        try:
            with preserved(self.model):
                for p in self.model.parameters():
                    p.requires_grad_(True)
                for k, rows in enumerate((2, 4)):
                    batch, _ = next(iterate_batches(self.inputs, self.targets, rows, check_values=False))
                    batch = to_device(batch, torch.empty(0), self.device)[0]

                    def pack(t, k=k):
                        saved[k] += t.numel() * t.element_size()
                        return t
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
                        self.forward(batch)
        except Exception:  # noqa: BLE001 - a model that cannot take 2 samples: one batch, as asked
            return
        per_sample = max(1, (saved[1] - saved[0]) // 2)
        rows = max(1, budget // per_sample)
        if rows < n:
            self.batch_size = int(rows)
            note = (f"in batches of {rows} samples (the whole data's autograd graph would hold "
                    f"~{n * per_sample / 2**30:.1f} GiB)")
            self.note = f"{self.note}; {note}" if self.note else note

    def orient(self, layers: List[Tuple[str, nn.Module]]) -> None:
        """Sets the layout of each weight named as a parameter (:class:`ParameterLayer`) to the way
        the model multiplies it on the first batch (:func:`~relflat_ext.core.usage.multiplication_layouts`):
        a matrix the model uses as ``x @ W`` is seen transposed, a stack of experts as the model
        slices it. A matrix whose use is not seen (a fused recurrent op) keeps its rows."""
        params = {name: module.weight for name, module in layers if isinstance(module, ParameterLayer)}
        if not params:
            return
        others: Dict[str, Set[str]] = {}
        found = self.layouts(params, others)
        for name, module in layers:
            if isinstance(module, ParameterLayer) and (found[name] is not None or module.weight.dim() != 2):
                module.layout = found[name]
            elif isinstance(module, ParameterLayer):
                module.unexplained = others.get(name, set())  # its view warns that rows are a guess

    def weight_calls(self) -> int:
        """How many calls of a forward pass consume the weight of a layer acting on vectors
        (Linear, Conv1D), where the model runs code from outside torch.nn: a custom forward may use
        the weight again (``F.linear(h, self.fc.weight)``), and the exact paths, which see the
        module's inputs, would miss that use. Read from the torch.fx trace (milliseconds), else
        counted on a watched forward pass of the first batch. 1 where nothing else can use it,
        where the module alone does, or where the forward can be neither traced nor watched."""
        if self._weight_calls is None:
            self._weight_calls = 1
            if runs_custom_code(self.model) and acts_on_vectors(self.module) \
                    and not isinstance(self.module, ParameterLayer):
                graph = self.traced_graph()
                if graph is not None:
                    count = traced_uses(self.model, self.module, graph)
                else:
                    x, _ = next(iter(self.batches(check_values=False)))
                    with preserved(self.model):
                        counts = use_counts({self.name: self.module.weight}, lambda: self.forward(x))
                    count = None if counts is None else counts[self.name]
                self._weight_calls = max(1, count or 1)
        return self._weight_calls

    def traced_graph(self) -> Optional[fx.Graph]:
        """The model's forward traced by torch.fx in eval mode (once: a forward with side effects
        runs once for it), or None where it cannot be traced."""
        if self._graph is False:
            with preserved(self.model):
                self._graph = _tail.traced_graph(self.model)
        return self._graph

    def layouts(self, params: Dict[str, torch.Tensor], others: Optional[Dict[str, Set[str]]] = None
                ) -> Dict[str, Optional[str]]:
        """How the model multiplies each parameter on the first batch (rows, columns, lookup or
        None: :func:`~relflat_ext.core.usage.multiplication_layouts`, ``others`` as there)."""
        x, _ = next(iter(self.batches(check_values=False)))  # the measurement checks the values
        with preserved(self.model):
            return multiplication_layouts(params, lambda: self.forward(x), others)

    def forward(self, x: Inputs):
        """The model's output on a batch (its ``.logits`` where it returns an output object)."""
        return call_model(self.model, x)

    def count(self, y: torch.Tensor) -> int:
        """The number of terms the batch's mean loss averages: samples, or the labels that are not
        ignored (-100) for cross entropy on class indices (tokens, for a language model). Batch
        results are weighted by it, so the risk is the mean over every term of the data."""
        if self.loss.name == "cross_entropy" and not y.is_floating_point():
            return int((y != IGNORE_INDEX).sum())
        return y.shape[0]

    def positions(self, y: torch.Tensor) -> int:
        """What one sample's ``loss.per_sample`` averages over, ignored labels counting 0: its
        token positions for cross entropy on token indices, else 1. Per-sample losses times this,
        summed and divided by :meth:`count`, give the mean loss."""
        if self.loss.name == "cross_entropy" and not y.is_floating_point():
            return y[0].numel()
        return 1

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def matrix(self) -> torch.Tensor:
        """The (d, m) W of a layer acting on feature vectors (transformers' Conv1D stores W^T), of a
        weight named as a parameter, as the model multiplies it, of a convolution (rows acting on
        patches, or on a transposed convolution's input channel vectors) or of an embedding
        (:func:`~relflat_ext.core.layers.matrix_view`)."""
        if has_matrix_view(self.module) and not acts_on_vectors(self.module):
            return matrix_view(self.module, self.name).to_matrix(self.module.weight)
        return weight_matrix(self.module)

    def _check_input(self, x: Inputs, what: str) -> None:
        """Inputs the model can take: floating inputs in the model's dtype (half ones are cast when
        the model is measured as a float32 copy), integer inputs only into an embedding."""
        if is_dict_batch(x):
            model_arguments(self.model, x)  # raises where the forward cannot take the batch
            for key, value in x.items():
                if isinstance(value, torch.Tensor) and key != "labels":
                    self._check_input(value, f"{what}[{key!r}]")
            return
        dtype = self.weight.dtype
        if x.is_floating_point():
            if x.dtype != dtype and not (self.half_copy and x.dtype in HALF_DTYPES):
                computes = f"{dtype}" if not self.half_copy else "a half dtype (measured in a float32 copy)"
                raise TypeError(f"{what} has dtype {x.dtype} but the model computes in {computes}: convert one of "
                                f"them (e.g. inputs.to({dtype}))")
        elif not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in self.model.modules()):
            raise TypeError(f"{what} has dtype {x.dtype} but the model has no embedding to take integer inputs; "
                            f"convert them to {dtype}")

    def batches(self, check_values: bool = True) -> Iterator[Batch]:
        """The (x, y) batches; ``check_values=False`` skips the NaN/Inf scan for callers that check
        their result instead (a scan can cost more than the work)."""
        checked = isinstance(self.inputs, torch.Tensor) or is_dict_batch(self.inputs)
        counted = None  # cross entropy's labels that are not -100, summed without a sync per batch
        for k, (x, y) in enumerate(iterate_batches(self.inputs, self.targets, self.batch_size, check_values)):
            if not checked:
                self._check_input(x, f"inputs (batch {k})")
            if self.half_copy:
                x = {key: _float(v) for key, v in x.items()} if is_dict_batch(x) else _float(x)
                y = _float(y)
            x, y = as_the_model_takes(self.model, self.labels, *to_device(x, y, self.device))
            if self.loss.name == "cross_entropy" and not y.is_floating_point():
                counted = (y != IGNORE_INDEX).sum() + (0 if counted is None else counted)
            yield x, y
        if counted is not None and int(counted) == 0:  # else a NaN mean loss, or a division by zero
            raise ValueError(NOTHING_COUNTED)

    def sample_count(self) -> Optional[int]:
        """The number of samples where the data are tensors or a dict batch; None otherwise."""
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs.shape[0]
        return batch_length(self.inputs) if is_dict_batch(self.inputs) else None

    def batch_count(self) -> Optional[int]:
        """How many batches :meth:`batches` yields, where that is known without iterating (tensors,
        a dict batch, a DataLoader or list); None otherwise."""
        n = self.sample_count()
        if n is not None:
            return 1 if self.batch_size is None else -(-n // self.batch_size)
        try:
            return len(self.inputs)
        except TypeError:
            return None

    def check_outputs_finite(self) -> None:
        """Raises a ValueError naming the parameter that holds NaN or Inf, or else the first batch
        whose model output or loss does (a log or a division in the forward can make them from
        finite inputs and weights)."""
        check_parameters_finite(self.model)
        with torch.no_grad(), preserved(self.model):
            for k, (x, y) in enumerate(self.batches(check_values=False)):
                out = self.forward(x)
                check_forward_finite("output", out, k)
                check_forward_finite("loss", self.loss.for_derivatives(out, y), k)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The data (when given as tensors) and the model's parameters, by name: where to look
        when a result is not finite."""
        data = {"inputs": self.inputs, "targets": self.targets} if isinstance(self.inputs, torch.Tensor) else {}
        return {**data, **dict(self.model.named_parameters())}


def _float(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
