"""The data every measurement iterates over: tensors chunked into batches, or an iterable of
(x, y) batches, checked once for shape and (unless the caller checks its result) finiteness."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch

Batch = Tuple[torch.Tensor, torch.Tensor]


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_data(inputs, targets, batch_size: Optional[int]) -> None:
    """The checks that need no pass over the data: types, sample counts, batch size."""
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(inputs, torch.Tensor):
        if targets is None or not isinstance(targets, torch.Tensor):
            raise TypeError("targets must be a tensor when inputs is a tensor "
                            "(pass inputs as an iterable of (x, y) batches with targets=None otherwise)")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError("inputs is empty: at least one sample is needed")
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets has {targets.shape[0] if targets.dim() else 0} samples but inputs has "
                             f"{inputs.shape[0]}")
        return
    if targets is not None:
        raise TypeError("targets must be None when inputs is an iterable of (x, y) batches")
    if not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a tensor or an iterable of (x, y) batches, got {type(inputs).__name__}")
    if isinstance(inputs, Iterator):  # a generator or iterator: a second pass would see nothing
        raise TypeError("inputs is a one-shot iterator; pass a re-iterable of (x, y) batches (a DataLoader or a list): "
                        "measurements pass over the data more than once")


def iterate_batches(inputs, targets: Optional[torch.Tensor], batch_size: Optional[int],
                    check_values: bool = True) -> Iterator[Batch]:
    """Yields (x, y) batches from tensors (chunked by ``batch_size``) or from an iterable of pairs
    (a DataLoader, with ``targets=None``). Checks shapes, and finiteness unless ``check_values`` is
    False (for callers that check their result instead: a scan can cost more than the work)."""
    check_data(inputs, targets, batch_size)
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
