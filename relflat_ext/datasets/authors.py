"""The authors' synthetic pipeline for Figs. 3 and 4, as their public code builds it (see
docs/reproduction.md), with its defects removed: scikit-learn's ``make_classification`` (10 features,
3 informative, 4 redundant, 1% label flips; a new random distribution per data set), psi a ridge
regression on the {0, 1} labels (the loss is the squared error against those labels), and phi their
untrained tanh MLP (784-512-128-16-10, Xavier-uniform weights) *exactly* inverted: every input
``x`` satisfies ``phi(x) = z`` for its feature vector ``z``, so ``f = psi o phi`` has the designed
features. Their code inverted the Linear layers by least squares and skipped the tanh steps, so
their f did not compute psi on the designed features.

Exact inversion through tanh needs each Linear layer's least-norm preimage inside (-1, 1); where it
is not, the layer's weight is scaled up by the needed factor (a different phi, which the
theory allows: kappa of psi does not depend on phi)."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Tuple

import torch
from torch import nn

FEATURES, INFORMATIVE, REDUNDANT, FLIP = 10, 3, 4, 0.01
WIDTHS = (784, 512, 128, 16, FEATURES)  # their simpleMLP
INSIDE = 0.9  # largest |preimage| allowed before atanh


def make_authors_data(separation: float, n_train: int, n_test: int, seed: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_train, y_train, z_test, y_test) in float64 / int64: one call of ``make_classification``
    seeded with ``seed`` (one distribution), its samples split into training and test."""
    from sklearn.datasets import make_classification
    if not separation > 0:
        raise ValueError(f"separation must be positive, got {separation!r}")
    z, y = make_classification(n_samples=n_train + n_test, n_features=FEATURES, n_informative=INFORMATIVE,
                               n_redundant=REDUNDANT, class_sep=float(separation), flip_y=FLIP, random_state=seed)
    z, y = torch.from_numpy(z), torch.from_numpy(y).long()  # make_classification shuffles
    return z[:n_train], y[:n_train], z[n_train:], y[n_train:]


def fit_ridge(z: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> nn.Linear:
    """psi: scikit-learn's Ridge on the {0, 1} labels, as a float64 nn.Linear(FEATURES, 1)."""
    from sklearn.linear_model import Ridge
    ridge = Ridge(alpha=alpha).fit(z.numpy(), y.double().numpy())
    psi = nn.Linear(z.shape[1], 1).double()
    with torch.no_grad():
        psi.weight.copy_(torch.as_tensor(ridge.coef_).reshape(1, -1))
        psi.bias.fill_(float(ridge.intercept_))
    return psi


@dataclasses.dataclass
class InvertedModel:
    """model: nn.Sequential fc1, tanh, fc2, tanh, fc3, tanh, fc4, psi (float64); x: inputs whose
    phi is exactly the given features; scaled: the factor each Linear layer was scaled by."""
    model: nn.Sequential
    x: torch.Tensor
    scaled: Tuple[float, ...]


@torch.no_grad()
def invert(z: torch.Tensor, psi: nn.Linear, seed: int) -> InvertedModel:
    """phi with the authors' widths, Xavier-uniform weights and PyTorch's default biases, seeded,
    then inputs for ``z`` by least-norm solves and atanh from the last layer back to the first."""
    gen = torch.Generator().manual_seed(seed)
    linears = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        lin = nn.Linear(a, b).double()
        bound = (6.0 / (a + b)) ** 0.5
        lin.weight.copy_((torch.rand(b, a, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        lin.bias.copy_((torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1) / a ** 0.5)
        linears.append(lin)
    target, scaled = z, []
    for k in range(len(linears) - 1, -1, -1):
        lin = linears[k]
        pre = (target - lin.bias) @ torch.linalg.pinv(lin.weight).T  # least-norm preimage (the layers narrow)
        factor = 1.0
        if k > 0 and pre.abs().max() >= INSIDE:  # the input of this layer is a tanh output
            factor = float(pre.abs().max()) / INSIDE
            lin.weight.mul_(factor)
            pre = pre / factor
        scaled.append(factor)
        target = torch.atanh(pre) if k > 0 else pre
    layers = []
    for k, lin in enumerate(linears):
        layers += [(f"fc{k + 1}", lin)] + ([(f"tanh{k + 1}", nn.Tanh())] if k < len(linears) - 1 else [])
    model = nn.Sequential(OrderedDict(layers + [("psi", psi)]))
    return InvertedModel(model.eval(), target, tuple(reversed(scaled)))
