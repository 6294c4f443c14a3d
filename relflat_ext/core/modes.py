"""The global modes a measurement runs under, whatever the caller's: gradients on, inference mode
off and autocast off, so that a call made inside a user's ``torch.no_grad()`` evaluation block,
``torch.inference_mode()`` or ``torch.autocast`` region returns what it returns outside one (the
measurement differentiates the model twice, and in the model's own precision)."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")
F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def default_modes() -> Iterator[None]:
    """Gradients enabled, inference mode and autocast disabled, restored on exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def measurement(function: F) -> F:
    """Runs ``function`` under :func:`default_modes`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with default_modes():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def plain(t):
    """A tensor of the data as a measurement uses it: detached (kappa is not a function of the
    inputs' graph) and, if made under inference mode, copied into a normal tensor, which autograd
    can save. Anything else is returned as it is."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.clone() if t.is_inference() else t.detach()
