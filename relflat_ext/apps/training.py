"""One training loop for the report, the reproduction, the profile command and the benchmarks:
minibatch cross entropy (or another loss) with a named optimizer, stopping early at a target
training loss."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from ..core.losses import LossSpec, get_loss

OPTIMIZERS = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    "plain_sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),  # the authors' Fig. 5
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "rmsprop": lambda params, lr, wd: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
}
DIVERGED = 10.0  # a training loss above this (or NaN) ends the run


@dataclasses.dataclass
class Fit:
    """model (in eval mode); epochs run; loss: the last training loss (on all the data for tensors,
    the mean over batches for a loader); reached: the loss went below ``stop_below`` (True when no
    target was set and training did not diverge)."""
    model: nn.Module
    epochs: int
    loss: float
    reached: bool


def fit(model: nn.Module, data, epochs: int, *, optimizer: str = "adam", lr: float = 3e-3, batch_size: int = 64,
        weight_decay: float = 0.0, seed: int = 0, stop_below: Optional[float] = None,
        log: Optional[Callable[[str], None]] = None, log_every: int = 10, loss: LossSpec = "cross_entropy") -> Fit:
    """Trains ``model`` on ``data``: an ``(x, y)`` pair of tensors (shuffled minibatches of
    ``batch_size`` from a generator seeded with ``seed``) or an iterable of batches (used as it
    is). Stops when the training loss goes below ``stop_below`` or above :data:`DIVERGED`. ``loss``
    as for :func:`relflat_ext.relative_flatness`."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    loss_fn = get_loss(loss)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr, weight_decay)
    tensors = isinstance(data, tuple)
    order = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        if tensors:
            x, y = data
            perm = torch.randperm(len(y), generator=order).to(x.device)
            batches = ((x[perm[s:s + batch_size]], y[perm[s:s + batch_size]]) for s in range(0, len(y), batch_size))
        else:
            batches = iter(data)
        total, count = 0.0, 0
        for xb, yb in batches:
            opt.zero_grad()
            batch_loss = loss_fn(model(xb), yb)
            batch_loss.backward()
            opt.step()
            if not tensors:
                total, count = total + batch_loss.item() * len(yb), count + len(yb)
        report = log is not None and (epoch % log_every == 0 or epoch == epochs)
        measured = not tensors or report or stop_below is not None or epoch == epochs
        if tensors and measured:
            model.eval()
            with torch.no_grad():
                loss_value = loss_fn(model(x), y).item()
        elif not tensors:
            loss_value = total / max(count, 1)
        if report:
            log(f"  epoch {epoch:3d}/{epochs}: train loss {loss_value:.4f}")
        if measured and not loss_value < DIVERGED:
            return Fit(model.eval(), epoch, loss_value, False)
        if measured and stop_below is not None and loss_value < stop_below:
            return Fit(model.eval(), epoch, loss_value, True)
    return Fit(model.eval(), epochs, loss_value, stop_below is None and loss_value < DIVERGED)
