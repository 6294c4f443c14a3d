"""The data every measurement iterates over: tensors chunked into batches, an iterable of (x, y)
batches, or Hugging Face style dict batches (the model's keyword arguments with the targets under
``"labels"``), checked once for shape and (unless the caller checks its result) finiteness; and
calling the model on a batch, taking the ``.logits`` of outputs that carry them."""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modes import plain

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]
Batch = Tuple[Inputs, torch.Tensor]
LABELS = "labels"
LABEL_ALIASES = ("label", "label_ids")
IGNORE_INDEX = -100
NOTHING_COUNTED = ("every target is -100, which cross entropy ignores (as F.cross_entropy does): no sample counts "
                   "toward the loss")


def is_dict_batch(x) -> bool:
    return isinstance(x, Mapping)


def batch_length(x: Inputs) -> int:
    """Samples in a batch: rows of a tensor, or of a dict batch's tensors."""
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    return next(v.shape[0] for v in x.values() if isinstance(v, torch.Tensor))


def take_rows(x: Inputs, rows: slice) -> Inputs:
    """Rows of a batch (every tensor of a dict batch)."""
    if is_dict_batch(x):
        return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x[rows]


def repeat_rows(x: Inputs, copies: int) -> Inputs:
    """The batch stacked ``copies`` times along dim 0 (every tensor of a dict batch)."""
    if is_dict_batch(x):
        return {k: repeat_rows(v, copies) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in x.items()}
    return x.repeat(copies, *([1] * (x.dim() - 1)))


def labels_key(batch: Mapping) -> Optional[str]:
    """Where a dict batch keeps its targets: "labels", or "label" / "label_ids", which transformers'
    data collators rename to "labels" (a tokenized dataset's column is usually "label")."""
    return next((k for k in (LABELS, *LABEL_ALIASES) if k in batch), None)


def split_labels(batch: Mapping, what: str) -> Batch:
    """A dict batch -> (the model's keyword arguments, the targets under :func:`labels_key`), checked."""
    key = labels_key(batch)
    if key is None:
        raise ValueError(f"{what} is a dict without {LABELS!r}: put the targets under {LABELS!r}, as transformers "
                         f"models take them (keys given: {sorted(batch)})")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    rows = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    if len(set(rows.values())) > 1 or 0 in rows.values():
        raise ValueError(f"{what}: every tensor of a dict batch needs the same number of samples in dim 0, got {rows}")
    return {k: v for k, v in batch.items() if k != key}, batch[key]


def call_model(model: nn.Module, x: Inputs):
    """The model's output on a batch: ``model(**x)`` for a dict batch, else ``model(x)``; the
    ``.logits`` (or ``["logits"]``) of an output object that carries them, as transformers models
    return."""
    if is_dict_batch(x):
        return output_logits(model(**model_arguments(model, x)), model)
    try:
        return output_logits(model(x), model)
    except TypeError as exc:  # a forward of several inputs, given one tensor: say how to give them all
        needed = _required_inputs(type(model))
        if len(needed) < 2:
            raise
        raise TypeError(f"{type(model).__name__}.forward takes {len(needed)} inputs ({', '.join(needed)}) but a batch "
                        f"gives it one tensor: pass each batch as a dict of them with the targets under {LABELS!r}, "
                        f"e.g. {{{', '.join(repr(n) + ': ...' for n in needed)}, {LABELS!r}: y}}") from exc


def model_arguments(model: nn.Module, x: Mapping) -> Dict:
    """A dict batch's entries that the model's forward names (a dataset's other columns, such as
    the raw text or an index, dropped as transformers' Trainer drops them); all of them for a
    forward that takes ``**kwargs``, except a transformers model's, whose ``**kwargs`` are
    options, not data (the Trainer keeps only the named arguments there too). A ValueError when
    the batch lacks an argument the forward requires (an ``nn.Sequential`` given ``{"image": ...}``)."""
    signature = _forward_signature(type(model))
    if signature is None:
        return dict(x)
    accepted, required = signature
    missing = sorted(required - set(x))
    if missing:
        raise ValueError(f"a dict batch is passed to {type(model).__name__}.forward as keyword arguments, but it has "
                         f"no {missing} (keys given: {sorted(x)}): name the keys after the forward's arguments, or "
                         "yield (x, y) pairs")
    return {k: v for k, v in x.items() if k in accepted}


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls) -> Optional[Tuple[inspect.Parameter, ...]]:
    """A module class' forward's parameters without self, or None where it has no signature."""
    try:
        return tuple(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _forward_signature(cls) -> Optional[Tuple[frozenset, frozenset]]:
    """(the names a module class' forward takes, those without a default), or None where it takes
    any (``**kwargs`` outside transformers, or no signature)."""
    params = _forward_parameters(cls)
    if params is None:
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params) and not cls.__module__.startswith("transformers."):
        return None
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return (frozenset(p.name for p in named),
            frozenset(p.name for p in named if p.default is inspect.Parameter.empty))


def _required_inputs(cls) -> Tuple[str, ...]:
    """The positional arguments a module class' forward cannot do without, in order."""
    return tuple(p.name for p in _forward_parameters(cls) or () if p.default is inspect.Parameter.empty
                 and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def output_logits(out, model: nn.Module):
    """A model's output, or the ``.logits`` (``["logits"]``) of an output object that carries them,
    or the first entry of a transformers model's tuple output (``return_dict=False``: the logits
    come first when no labels are passed)."""
    if isinstance(out, torch.Tensor):
        return out
    if (isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor)
            and type(model).__module__.startswith("transformers.")):
        return out[0]
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal language model: its loss scores the logits at position t against the
    label at t + 1, which :func:`shift_labels` reproduces."""
    if not type(model).__module__.startswith("transformers."):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # a transformers without the registry: its naming convention
        return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return type(model).__name__ in {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                                    for name in ((names,) if isinstance(names, str) else names)}


def is_encoder_decoder(model: nn.Module) -> bool:
    """A transformers encoder-decoder model (T5, BART, ...): given only labels, it makes the
    decoder's inputs from them (the labels shifted right), and its logits score the labels as
    they are."""
    return (type(model).__module__.startswith("transformers.")
            and bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
            and hasattr(model, "prepare_decoder_input_ids_from_labels"))


def problem_type(model: nn.Module, labels: Optional[torch.Tensor] = None) -> str:
    """What a transformers sequence (or image, audio) classifier's own loss takes its task to be,
    decided as that loss decides it: ``config.problem_type`` where declared, else "regression" for
    one label, else "single_label_classification" for int64/int32 labels and
    "multi_label_classification" for others; "" for other models, or while several labels and no
    labels seen leave it open."""
    name = type(model).__name__
    if (not type(model).__module__.startswith("transformers.") or not name.endswith("Classification")
            or name.endswith("TokenClassification")):
        return ""
    config = getattr(model, "config", None)
    declared = getattr(config, "problem_type", None)
    if declared in MODEL_LOSSES:
        return declared
    if getattr(config, "num_labels", None) == 1:
        return "regression"
    if labels is None:
        return ""
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


# The built-in loss that is each problem type's own (transformers' MSELoss, BCEWithLogitsLoss and
# CrossEntropyLoss, all with mean reduction).
MODEL_LOSSES = {"regression": "mse", "multi_label_classification": "bce_with_logits",
                "single_label_classification": "cross_entropy"}


def model_loss(model: nn.Module, inputs=None, targets: Optional[torch.Tensor] = None) -> Tuple[str, str]:
    """(the built-in loss that is the model's own, why, for the result's reason where it is not
    cross entropy): a transformers classifier's by its :func:`problem_type` (the labels read from
    the data where that is free: a tensor, a dict batch or the first of a list of batches), else
    cross entropy."""
    kind = problem_type(model, first_labels(inputs, targets))
    loss = MODEL_LOSSES.get(kind, "cross_entropy")
    return loss, (f"loss {loss}, the model's own (problem_type {kind!r})" if loss != "cross_entropy" else "")


def first_labels(inputs, targets) -> Optional[torch.Tensor]:
    """The targets of the data, or of its first batch, without consuming an iterator or loading one."""
    inputs, targets = unpack_pair(inputs, targets)
    if isinstance(targets, torch.Tensor):
        return targets
    batch = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
    if is_dict_batch(batch):
        key = labels_key(batch)
        return batch[key] if key is not None and isinstance(batch[key], torch.Tensor) else None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def label_convention(model: nn.Module) -> str:
    """How a transformers model's own loss reads dict batches' labels: "causal" (next token),
    "seq2seq" (decoder inputs made from the labels), "regression" (one output: labels (n,) scored
    against the logits (n, 1)), or "" (as given)."""
    if is_causal_lm(model):
        return "causal"
    if is_encoder_decoder(model):
        return "seq2seq"
    if problem_type(model) == "regression" and getattr(model.config, "num_labels", None) == 1:
        return "regression"
    return ""


def as_the_model_takes(model: nn.Module, convention: str, x: Inputs, y: torch.Tensor) -> Batch:
    """A batch and its labels as the model's own loss pairs them (:func:`label_convention`): a
    one-output regressor's labels (n,) as (n, 1); the shifts and decoder inputs for dict batches
    only (tensor batches are taken as given)."""
    if convention == "regression":
        return x, regression_labels(y)
    if not is_dict_batch(x):
        return x, y
    if convention == "causal":
        return x, shift_labels(y)
    if convention == "seq2seq" and not {"decoder_input_ids", "decoder_inputs_embeds"} & x.keys():
        return {**x, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=y)}, y
    return x, y


def regression_labels(y: torch.Tensor) -> torch.Tensor:
    """A one-output regressor's labels (n,) as (n, 1), the logits' shape: its MSELoss squeezes both
    sides. Other shapes as given."""
    return y.unsqueeze(1) if y.dim() == 1 else y


def model_batches(model: nn.Module, inputs, targets: Optional[torch.Tensor], batch_size: Optional[int],
                  check_values: bool = True) -> Iterator[Batch]:
    """:func:`iterate_batches`, on the model's device (:func:`data_device`), with dict batches'
    labels as the model's own loss takes them."""
    convention, device = label_convention(model), data_device(model)
    for x, y in iterate_batches(inputs, targets, batch_size, check_values):
        yield as_the_model_takes(model, convention, *to_device(x, y, device))


def data_device(model: nn.Module) -> Optional[torch.device]:
    """Where the batches go before the model sees them: the device of a model held on one
    accelerator, since a DataLoader yields CPU tensors (and tensors given whole can then exceed
    the accelerator's memory, one batch at a time); None (the data stay where they are) for a
    CPU model or one spread over several devices."""
    devices = {p.device for p in model.parameters()}
    device = devices.pop() if len(devices) == 1 else None
    return device if device is not None and device.type not in ("cpu", "meta") else None


def to_device(x: Inputs, y: torch.Tensor, device: Optional[torch.device]) -> Batch:
    """The batch's CPU tensors moved to ``device`` (None: unchanged)."""
    if device is None:
        return x, y

    def move(t):
        return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
    return ({k: move(v) for k, v in x.items()} if is_dict_batch(x) else move(x)), move(y)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels (n, seq) -> the next token's label at each position, the last one ignored: the
    targets of a causal language model's logits (n, seq, vocab), as transformers shifts them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def unpack_pair(inputs, targets):
    """One ``(x, y)`` batch passed as ``inputs`` (a tuple or list of two tensors, as a DataLoader
    yields it) -> ``(x, y)``; anything else unchanged. Not ambiguous: an iterable of batches
    holds pairs or dicts, never bare tensors."""
    if (targets is None and isinstance(inputs, (tuple, list)) and len(inputs) == 2
            and all(isinstance(t, torch.Tensor) for t in inputs)):
        return inputs[0], inputs[1]
    return inputs, targets


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_parameters_finite(model: nn.Module) -> None:
    """Raises a ValueError naming the first parameter that holds NaN or Inf."""
    for name, p in model.named_parameters():
        check_finite(name, p)


def check_forward_finite(what: str, value: torch.Tensor, batch: int) -> None:
    """For a model output (or loss) computed from finite inputs and weights: NaN or Inf there is
    the forward's own doing, and no measure of the loss is defined."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the model's {what} is NaN or Inf on batch {batch} of the data, whose inputs and weights "
                         "are finite: the forward itself computes it (a log or a division?), so no derivative of "
                         "the loss is defined there")


def check_data(inputs, targets, batch_size: Optional[int]) -> None:
    """The checks that need no pass over the data: types, sample counts, batch size."""
    for what, value in (("inputs", inputs), ("targets", targets)):
        _check_not_array(what, value)
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if is_dict_batch(inputs):
        if targets is not None:
            raise TypeError("inputs is a dict (the model's keyword arguments); its targets go under "
                            f"{LABELS!r} in the dict, with targets=None")
        split_labels(inputs, "inputs")
        return
    if isinstance(inputs, torch.Tensor):
        if targets is None or not isinstance(targets, torch.Tensor):
            raise TypeError("targets must be a tensor when inputs is a tensor (pass inputs as an iterable of "
                            "(x, y) batches, or one (x, y) pair, with targets=None otherwise)")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError("inputs is empty: at least one sample is needed")
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets has {targets.shape[0] if targets.dim() else 0} samples but inputs has "
                             f"{inputs.shape[0]}")
        return
    if targets is not None:
        raise TypeError("targets must be None when inputs is an iterable of (x, y) batches")
    if isinstance(inputs, torch.utils.data.Dataset):  # its items are single samples, not batches
        raise TypeError(f"inputs is a {type(inputs).__name__}, whose items are single samples: pass "
                        "torch.utils.data.DataLoader(dataset, batch_size=...) to measure it in batches")
    if not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a tensor or an iterable of (x, y) batches, got {type(inputs).__name__}")
    if isinstance(inputs, Iterator):  # a generator or iterator: a second pass would see nothing
        raise TypeError("inputs is a one-shot iterator; pass a re-iterable of (x, y) batches (a DataLoader or a list): "
                        "measurements pass over the data more than once")


def _check_not_array(what: str, value) -> None:
    """A numpy (or other array-protocol) object where a tensor goes: iterated, it would look like
    a sequence of batches and fail further in with a misleading message."""
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} is a {type(value).__module__}.{type(value).__name__}; pass a torch tensor "
                        f"(torch.as_tensor({what}))")


def _check_batch_types(k: int, x, y) -> None:
    if not (isinstance(x, torch.Tensor) or is_dict_batch(x)) or not isinstance(y, torch.Tensor):
        hint = (f"; for a model that takes several inputs, pass each batch as a dict of its keyword arguments "
                f"with the targets under {LABELS!r}" if isinstance(x, (tuple, list)) else "")
        raise TypeError(f"batch {k} of inputs must hold tensors (x a tensor or a dict of them, y a tensor), got "
                        f"({type(x).__name__}, {type(y).__name__}){hint}")


def _check_finite_inputs(name: str, x: Inputs) -> None:
    for key, value in (x.items() if is_dict_batch(x) else [("", x)]):
        if isinstance(value, torch.Tensor):
            check_finite(f"{name}[{key!r}]" if key else name, value)


def iterate_batches(inputs, targets: Optional[torch.Tensor], batch_size: Optional[int],
                    check_values: bool = True) -> Iterator[Batch]:
    """Yields (x, y) batches from tensors (chunked by ``batch_size``), from a dict batch (its
    tensors chunked, the targets under "labels"), or from an iterable of (x, y) pairs or of dict
    batches (a DataLoader, with ``targets=None``). Checks shapes, and finiteness unless
    ``check_values`` is False (for callers that check their result instead: a scan can cost more
    than the work). Tensors come detached (:func:`~.modes.plain`)."""
    for x, y in _batches(inputs, targets, batch_size, check_values):
        yield ({k: plain(v) for k, v in x.items()} if is_dict_batch(x) else plain(x)), plain(y)


def _batches(inputs, targets: Optional[torch.Tensor], batch_size: Optional[int],
             check_values: bool) -> Iterator[Batch]:
    inputs, targets = unpack_pair(inputs, targets)
    check_data(inputs, targets, batch_size)
    if is_dict_batch(inputs):
        x, y = split_labels(inputs, "inputs")
        if check_values:
            _check_finite_inputs("inputs", x)
        n = y.shape[0]
        step = n if batch_size is None else batch_size
        for start in range(0, n, step):
            yield ({k: v[start:start + step] if isinstance(v, torch.Tensor) else v for k, v in x.items()},
                   y[start:start + step])
        return
    if isinstance(inputs, torch.Tensor):
        if check_values:
            check_finite("inputs", inputs)
            check_finite("targets", targets)
        step = inputs.shape[0] if batch_size is None else batch_size
        for start in range(0, inputs.shape[0], step):
            yield inputs[start:start + step], targets[start:start + step]
        return
    seen = 0
    for k, batch in enumerate(inputs):
        if is_dict_batch(batch):
            x, y = split_labels(batch, f"batch {k} of inputs")
        elif not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"batch {k} of inputs must be an (x, y) pair or a dict with {LABELS!r}, got "
                            f"{type(batch).__name__}")
        else:
            x, y = batch[0], batch[1]
            if len(batch) > 2 and k == 0:
                warnings.warn(f"relflat_ext: the batches hold {len(batch)} entries; the first is taken as the "
                              "inputs and the second as the targets, the rest ignored (for a model of several "
                              f"inputs, pass dict batches with the targets under {LABELS!r})", RuntimeWarning,
                              stacklevel=3)
        _check_batch_types(k, x, y)
        if batch_length(x) != y.shape[0]:
            raise ValueError(f"batch {k}: targets has {y.shape[0]} samples but inputs has {batch_length(x)}")
        if check_values:
            _check_finite_inputs(f"inputs (batch {k})", x)
            check_finite(f"targets (batch {k})", y)
        seen += y.shape[0]
        if y.shape[0]:
            yield x, y
    if seen == 0:
        raise ValueError("inputs is empty: the iterable yielded no samples")
