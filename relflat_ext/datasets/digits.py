"""scikit-learn's handwritten digits: 1797 real 8x8 grey-level images in 10 classes, shipped with
scikit-learn (nothing is downloaded). Pixels are scaled to [0, 1]."""
from __future__ import annotations

from typing import Tuple

import torch


def load_digits(image: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x float32 (1797, 64), or (1797, 1, 8, 8) with ``image``; y int64 class labels."""
    from sklearn.datasets import load_digits as _sklearn_digits
    digits = _sklearn_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return (x.reshape(-1, 1, 8, 8) if image else x), y


def digits_split(seed: int = 0, test_fraction: float = 0.3, image: bool = False):
    """(x_train, y_train, x_test, y_test): a stratified split (scikit-learn's train_test_split)."""
    from sklearn.model_selection import train_test_split
    x, y = load_digits(image)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def synthetic_images(n: int = 512, seed: int = 0, classes: int = 1000, size: int = 224, channels: int = 3):
    """(x, y): Gaussian channels x size x size images with uniform random labels, for timing
    ImageNet-size models (no real ImageNet data can be loaded here)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
