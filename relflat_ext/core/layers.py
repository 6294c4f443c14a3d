"""Finding a layer in a model and seeing its weight as the (d, m) matrix W that multiplies
feature vectors."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, List, Optional, Set, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

LayerSpec = Union[str, nn.Module, nn.Parameter]
PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel (whose forward adds gradient
    synchronization, not function) and inside torch.compile's wrapper (whose compiled graphs have
    no double backward, which every second-order path needs; the module computes the same
    function eagerly): measured directly, with its layers' plain names."""
    while True:
        if isinstance(model, PARALLEL_WRAPPERS):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _plain_name(names, layer: str) -> str:
    """A layer name as ``names`` (a model's) has it: "_orig_mod." (torch.compile) and "module."
    ((Distributed)DataParallel) prefixes added or dropped where that finds it."""
    if layer in names:
        return layer
    if f"_orig_mod.{layer}" in names:
        return f"_orig_mod.{layer}"
    for prefix in ("module.", "_orig_mod."):
        if layer.startswith(prefix):
            return _plain_name(names, layer[len(prefix):])
    return layer


def find_layer(model: nn.Module, layer: LayerSpec, wanted=lambda m: isinstance(m, nn.Linear),
               kind: str = "nn.Linear layers") -> Tuple[str, nn.Module]:
    """(name, module) of ``layer`` (a name or a submodule) inside ``model``; an unknown name gets an
    error listing the model's modules for which ``wanted`` holds (described as ``kind``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer = _parameter_name(model, layer)
    named = dict(model.named_modules())
    if isinstance(layer, str):
        layer = _plain_name(named, layer)  # a wrapper's names for its module's layers
        if layer not in named:
            candidates = [n for n, m in named.items() if wanted(m)]
            params = dict(model.named_parameters())
            if layer in params:  # a parameter where a module is needed, or a parameter that is no matrix
                shape = tuple(params[layer].shape)
                raise ValueError(f"layer {layer!r} is a parameter of shape {shape}, not a module: "
                                 + ("this needs a module and its per-sample input features (the estimator of "
                                    "kappa, feature robustness and the Hessian trace take a weight matrix named "
                                    "as a parameter)" if len(shape) in (2, 3) else
                                    "relative flatness needs a weight matrix")
                                 + f"; the model's {kind} are {candidates}")
            raise ValueError(f"layer {layer!r} is not in the model; its {kind} are {candidates}")
        return layer, named[layer]
    if isinstance(layer, nn.Module):
        matches = [n for n, m in named.items() if m is layer]
        if not matches:
            raise ValueError(f"layer (a {type(layer).__name__}) is not a submodule of the model")
        return matches[0], layer
    raise TypeError(f"layer must be an nn.Module inside model or its name, got {type(layer).__name__}")


def _parameter_name(model: nn.Module, layer: LayerSpec) -> LayerSpec:
    """A Parameter given as the layer -> the name of the module whose ``weight`` it is, or its own
    name (a parameter named directly); anything else unchanged."""
    if not isinstance(layer, nn.Parameter):
        return layer
    name = next((n for n, p in model.named_parameters() if p is layer), None)
    if name is None:
        raise ValueError(f"layer (a Parameter of shape {tuple(layer.shape)}) is not a parameter of the model")
    owner, _, attr = name.rpartition(".")
    return owner if attr == "weight" and owner else name


def resolve_linear(model: nn.Module, layer: LayerSpec, purpose: str = "") -> Tuple[str, nn.Module]:
    """Returns (name, module) of ``layer`` inside ``model``; it must be an ``nn.Linear`` (or
    transformers' Conv1D: :func:`acts_on_vectors`, its W from :func:`weight_matrix`). ``purpose``
    names what needs it (a function without a ``method`` argument); by default the error points
    to relative_flatness' stochastic method."""
    name, module = find_layer(model, layer)
    if not acts_on_vectors(module):
        what = purpose or "this path"
        hint = ("" if purpose else "; method='stochastic' (or 'auto') handles convolutions and other layers whose "
                "weight multiplies features")
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; {what} needs an nn.Linear layer (a weight "
                        f"acting on per-sample feature vectors){hint}")
    return name, module


@dataclasses.dataclass
class WeightView:
    """How a layer's weight is seen as the (d, m) matrix W that multiplies feature vectors:
    ``to_matrix(weight) -> (d, m)`` and ``from_matrix(matrix) -> weight.shape``."""
    to_matrix: Callable[[torch.Tensor], torch.Tensor]
    from_matrix: Callable[[torch.Tensor], torch.Tensor]


def matrix_view(module: nn.Module, name: str, view: Optional[WeightView] = None) -> WeightView:
    """The (d, m) view of a layer's weight: given, or known for Linear and Conv layers. A
    convolution's rows act on patches: (out, in/groups * prod(kernel)). A transposed convolution
    multiplies each input position's channel vector (the features, m = in/groups) by a
    (out/groups * prod(kernel), m) matrix per group and scatters the products into the output
    (a fixed linear map, part of the rest of the network): its rows are (out * prod(kernel), m).
    An embedding looks up rows of its (num, dim) table, ``one_hot(x) @ weight`` (a bag sums or
    averages them): W is ``weight.T`` (dim, num), its features the one-hot (or count) vectors."""
    if view is not None:
        return view
    weight = getattr(module, "weight", None)
    if isinstance(module, ParameterLayer):
        return module.view(name)
    if isinstance(module, nn.Linear):
        return WeightView(lambda w: w, lambda mat: mat)
    if isinstance(module, CONV_TYPES):
        shape = tuple(weight.shape)
        return WeightView(lambda w: w.reshape(shape[0], -1), lambda mat: mat.reshape(shape))
    if isinstance(module, TRANSPOSED_CONV_TYPES):
        shape, groups = tuple(weight.shape), module.groups  # weight: (in, out/groups, *kernel)
        per_group = shape[0] // groups  # m: input channels of a group

        def to_matrix(w: torch.Tensor) -> torch.Tensor:
            return w.reshape(groups, per_group, -1).transpose(1, 2).reshape(-1, per_group)

        def from_matrix(mat: torch.Tensor) -> torch.Tensor:
            return mat.reshape(groups, -1, per_group).transpose(1, 2).reshape(shape)
        return WeightView(to_matrix, from_matrix)
    if is_transposed_linear(module) or isinstance(module, EMBEDDING_TYPES):
        return WeightView(lambda w: w.T, lambda mat: mat.T)
    raise TypeError(f"layer {name!r} is a {type(module).__name__}; pass weight_view=WeightView(to_matrix, "
                    "from_matrix) saying how its weight multiplies feature vectors")


def has_matrix_view(module: nn.Module) -> bool:
    """A layer whose weight :func:`matrix_view` sees without being told: Linear, Conv, transposed
    Conv, Embedding, transformers' Conv1D, or a weight named as a parameter."""
    return isinstance(module, (nn.Linear, ParameterLayer, *CONV_TYPES, *TRANSPOSED_CONV_TYPES, *EMBEDDING_TYPES)) \
        or is_transposed_linear(module)


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): ``x @ weight + bias`` with weight (in, out),
    a Linear layer whose W is ``weight.T``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def acts_on_vectors(module: nn.Module) -> bool:
    """A layer whose weight multiplies each feature vector (the last dim of its input): nn.Linear,
    or transformers' Conv1D, its weight stored transposed. The exact paths need these."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (d, m) W of such a layer: its weight, or the transpose of a Conv1D's (in, out) weight."""
    return module.weight.T if is_transposed_linear(module) else module.weight


class ParameterLayer(nn.Module):
    """A weight named as a parameter of the model (``"layers.0.self_attn.in_proj_weight"``), used
    wherever the model uses it (inside ``F.multi_head_attention_forward``, a recurrent layer's fused
    op, a tied embedding, a custom function): a 2-D matrix, or 3-D experts stacked along dim 0
    (a mixture-of-experts layer's ``(experts, out, in)`` weights, whose rows all act on the same
    features, so W is the (experts * out, in) stack). ``layout`` says which way the model
    multiplies it (:mod:`~.usage`): "rows" (``F.linear(x, W)``, the default for a matrix),
    "columns" (``x @ W``, W stored (in, out)) or "lookup" (an embedding table, ``one_hot(x) @ W``:
    columns too); a stack needs it found. Only what needs the weight
    alone, not the features, measures it: the stochastic estimator (kappa, Tr H), the autograd
    baseline and feature robustness through the weight."""

    def __init__(self, weight: nn.Parameter, owner: str = ""):
        super().__init__()
        self.weight = weight
        self.owner = owner  # the type of the module that holds it, for tables
        self.layout: Optional[str] = "rows" if weight.dim() == 2 else None
        self.unexplained: Set[str] = set()  # functions the model used it in without multiplying it

    def view(self, name: str) -> WeightView:
        """The (d, m) view of the weight, as its layout says; rows where no use was seen (a fused
        recurrent op), with a warning where the uses seen were no products (the rows are a guess)."""
        shape = tuple(self.weight.shape)
        if self.unexplained and self.layout == "rows":
            warnings.warn(f"relflat_ext: parameter {name!r} {shape} is used by {', '.join(sorted(self.unexplained))} "
                          "and not seen multiplying features (F.linear, matmul, @, einsum, tensordot): taken as W "
                          "with rows acting on feature vectors, as F.linear takes it; pass "
                          "weight_view=WeightView(to_matrix, from_matrix) if the model multiplies it otherwise",
                          RuntimeWarning, stacklevel=2)
            self.unexplained = set()  # once
        if self.layout is None:
            raise TypeError(f"parameter {name!r} {shape}: the model does not multiply it as a matrix (or stack of "
                            "matrices) in a way seen on the first batch (F.linear, matmul, @); pass "
                            "weight_view=WeightView(to_matrix, from_matrix) saying how it multiplies features")
        if len(shape) == 2:  # "columns" or "lookup": W^T
            return (WeightView(lambda w: w, lambda mat: mat) if self.layout == "rows"
                    else WeightView(lambda w: w.T, lambda mat: mat.T))
        if self.layout == "rows":  # (experts, out, in)
            return WeightView(lambda w: w.reshape(-1, shape[2]), lambda mat: mat.reshape(shape))
        return WeightView(lambda w: w.transpose(1, 2).reshape(-1, shape[1]),  # (experts, in, out)
                          lambda mat: mat.reshape(shape[0], shape[2], shape[1]).transpose(1, 2))


def resolve_weight_layer(model: nn.Module, layer: LayerSpec) -> Tuple[str, nn.Module]:
    """(name, module) of a layer with a ``weight`` parameter inside ``model``, or of a 2-D or
    stacked 3-D parameter named directly (wrapped in a :class:`ParameterLayer`)."""
    if isinstance(model, nn.Module):
        layer = _parameter_name(model, layer)
    if isinstance(layer, str) and isinstance(model, nn.Module):
        layer = _plain_name(dict(model.named_parameters()), layer)
        owner, _, attr = layer.rpartition(".")  # "a.b.in_proj_weight": a parameter of module "a.b"
        holder = dict(model.named_modules()).get(owner)
        param = getattr(holder, attr, None) if holder is not None and attr in holder._parameters else None
        if isinstance(param, nn.Parameter) and param.dim() in (2, 3):
            return layer, ParameterLayer(param, type(holder).__name__)
    name, module = find_layer(model, layer, has_weight, "layers with weights")
    if not has_weight(module):
        matrices = [f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False) if t.dim() == 2]
        hint = f"; name one of its weight matrices instead: {', '.join(map(repr, matrices))}" if matrices else ""
        raise TypeError(f"layer {name!r} ({type(module).__name__}) has no weight parameter; relative flatness "
                        "needs a layer whose weight multiplies feature vectors (nn.Linear, nn.Conv1d/2d/3d, "
                        f"nn.ConvTranspose1d/2d/3d, or any module with a weight_view){hint}")
    return name, module


def has_weight(module: nn.Module) -> bool:
    """A ``weight`` Parameter, or a weight computed from others (:func:`has_derived_weight`), which is
    measured as the weight it computes."""
    return isinstance(getattr(module, "weight", None), nn.Parameter) or has_derived_weight(module)


# Forward pre-hooks that recompute ``weight`` from other tensors before every forward, with the
# function that folds each into a plain Parameter: pruning (weight_orig * weight_mask) and the
# older torch.nn.utils.weight_norm / spectral_norm.
_WEIGHT_HOOKS = ((prune.BasePruningMethod, "_tensor_name", lambda m: prune.remove(m, "weight")),
                 (WeightNorm, "name", lambda m: remove_weight_norm(m, "weight")),
                 (SpectralNorm, "name", lambda m: remove_spectral_norm(m, "weight")))


def _weight_hook_remover(module: nn.Module) -> Optional[Callable[[nn.Module], None]]:
    for hook in module._forward_pre_hooks.values():
        for kind, attr, remover in _WEIGHT_HOOKS:
            if isinstance(hook, kind) and getattr(hook, attr, None) == "weight":
                return remover
    return None


def has_derived_weight(module: nn.Module) -> bool:
    """A weight computed from other tensors: by a parametrization (torch.nn.utils.parametrize:
    weight_norm, spectral_norm, orthogonal), by pruning (a mask times the original) or by the
    older hook-based weight_norm and spectral_norm."""
    return parametrize.is_parametrized(module, "weight") or _weight_hook_remover(module) is not None


def has_derived_weights(model: nn.Module) -> bool:
    return any(has_derived_weight(m) for m in model.modules())


def fold_derived_weights(model: nn.Module) -> nn.Module:
    """A copy of the model in which every derived ``weight`` (:func:`has_derived_weight`) is a plain
    Parameter holding the value it has now: the same function, and a weight that derivatives can be
    taken in. Relative flatness is about the matrix that multiplies the features, whatever computes
    it (a pruned entry is a zero of that matrix, which feature perturbations move like any other).
    The original is untouched: ``remove_parametrizations`` on a deep copy would delete the weight
    property from the generated class that the copy shares with the original."""
    # A hook-computed weight is a non-leaf tensor, which deepcopy refuses: the copy gets a detached
    # alias, replaced below by the value computed from the copy's own tensors.
    memo = {id(m.weight): m.weight.detach() for m in model.modules() if _weight_hook_remover(m) is not None}
    folded = copy.deepcopy(model, memo)
    for name, module in folded.named_modules():
        remover = _weight_hook_remover(module)
        if remover is not None:
            remover(module)
        if not parametrize.is_parametrized(module, "weight"):
            continue
        others = [t for t in module.parametrizations.keys() if t != "weight"]
        if others:
            raise ValueError(f"layer {name!r} has parametrized tensors besides its weight ({others}): fold them "
                             "first (torch.nn.utils.parametrize.remove_parametrizations on the model to measure)")
        with torch.no_grad():
            value = module.weight.detach().clone()
        del module._modules["parametrizations"]
        module.__class__ = module.__class__.__bases__[0]  # the class parametrize derived from
        module.weight = nn.Parameter(value)
    return folded


def runs_custom_code(model: nn.Module) -> bool:
    """Whether some module's forward comes from outside torch.nn (a user's or a library's class),
    which may use a layer's weight outside the layer: a model of torch.nn modules alone cannot."""
    return any(not type(m).__module__.startswith("torch.nn.") for m in model.modules())


def weight_uses(model: nn.Module, module: nn.Module) -> int:
    """How many places in the model hold the layer's weight Parameter: more than one for tied
    weights, or a module registered under two names."""
    weight = module.weight
    return sum(p is weight for _, m in model.named_modules(remove_duplicate=False) for p in m._parameters.values())


def weight_layers(model: nn.Module) -> List[str]:
    """What is measured by default: the Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers (and
    transformers' Conv1D), and the weight matrices the model uses without a module's forward (named
    as parameters): every nn.MultiheadAttention's input projections (packed, or q/k/v apart when
    the key and value sizes differ) and every recurrent layer's (nn.RNN, nn.LSTM, nn.GRU) input,
    hidden and projection matrices, each layer and direction."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, *CONV_TYPES, *TRANSPOSED_CONV_TYPES)) or is_transposed_linear(m):
            names.append(n)
        elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
            names += [f"{n}.{p}" if n else p for p, t in m.named_parameters(recurse=False)
                      if t.dim() == 2 and "weight" in p]
    return names
