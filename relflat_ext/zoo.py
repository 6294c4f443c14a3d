"""Models and data sets the command line can name: built-in ones that need no download, torchvision
architectures, and anything importable as ``module:function``."""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BUILTIN_DATA = ("digits", "digits-flat", "synthetic-imagenet")


def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 in shape (two conv + pool stages, three Linear layers), sized for 1x8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes))


def _import(spec: str):
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {spec!r} ({exc}); expected module:function") from exc


def load_data(spec: str, batch_size: int = 256, samples: Optional[int] = None, seed: int = 0):
    """A DataLoader for a built-in data set ("digits": scikit-learn's 1797 8x8 images as (1, 8, 8);
    "digits-flat": the same as 64-vectors; "synthetic-imagenet": Gaussian 3x224x224 images with
    random labels, 512 unless ``samples``), or ``module:function`` returning a DataLoader."""
    if ":" in spec:
        return _import(spec)()
    g = torch.Generator().manual_seed(seed)
    if spec in ("digits", "digits-flat"):
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        if spec == "digits":
            x = x.reshape(-1, 1, 8, 8)
    elif spec == "synthetic-imagenet":
        n = samples or 512
        x, y = torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 1000, (n,), generator=g)
    else:
        raise ValueError(f"data must be one of {BUILTIN_DATA} or module:function, got {spec!r}")
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def train(model: nn.Module, loader, epochs: int, lr: float = 3e-3, log=print) -> nn.Module:
    """A few epochs of Adam on the cross-entropy (so built-in models are measured trained, not random)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log(f"  epoch {epoch + 1}/{epochs}: train loss {total / count:.4f}")
    return model.eval()


def load_model(spec: str, weights: Optional[str] = None, seed: int = 0) -> nn.Module:
    """"lenet5" (built in), a torchvision model name (random weights unless ``weights``, a local
    state_dict file), or ``module:function`` returning an nn.Module."""
    torch.manual_seed(seed)
    if ":" in spec:
        model = _import(spec)()
    elif spec == "lenet5":
        model = lenet5()
    else:
        try:
            import torchvision
        except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
            raise ValueError(f"model {spec!r} needs torchvision (pip install torchvision), or use 'lenet5' or "
                             "module:function") from exc
        if spec not in torchvision.models.list_models():
            raise ValueError(f"unknown model {spec!r}: 'lenet5', a torchvision model name or module:function")
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} did not give an nn.Module")
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model
