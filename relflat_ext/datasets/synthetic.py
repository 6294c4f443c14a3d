"""The paper's synthetic data (Section 6, Figs. 3 and 4): binary classification in a feature space of
dimension m from 4 Gaussians (two per class, unit covariance) whose neighbouring means are
``separation`` apart, a linear classifier psi trained on a feature-space sample, a random 4-layer
MLP phi that is *exactly* invertible (square weights with singular values in [0.8, 1.25], and
LeakyReLU(0.5), whose inverse is closed form), inputs ``x = phi^{-1}(z)``, and the model
``f = psi o phi``. The authors' code recovered inputs by least squares, which does not invert phi
exactly; here ``f(x) = psi(z)`` holds to float tolerance (tested). ``sample`` draws fresh data from
the same distribution, so the true generalization gap can be estimated on a large sample.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.5  # LeakyReLU negative slope: invertible, and far from degenerate


class InvertibleMLP(nn.Sequential):
    """4 square Linear layers, each followed by LeakyReLU(SLOPE); ``inverse`` undoes it exactly."""

    def __init__(self, dim: int, depth: int = 4, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float64):
        layers = []
        for _ in range(depth):
            lin = nn.Linear(dim, dim).to(dtype)
            q1, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=dtype))
            q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=dtype))
            singular = 0.8 + 0.45 * torch.rand(dim, generator=generator, dtype=dtype)  # in [0.8, 1.25]
            with torch.no_grad():
                lin.weight.copy_(q1 @ torch.diag(singular) @ q2)
                lin.bias.copy_(0.1 * torch.randn(dim, generator=generator, dtype=dtype))
            layers += [lin, nn.LeakyReLU(SLOPE)]
        super().__init__(*layers)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        a = z
        for lin in reversed([m for m in self if isinstance(m, nn.Linear)]):
            a = torch.where(a >= 0, a, a / SLOPE)
            a = torch.linalg.solve(lin.weight, (a - lin.bias).T).T
        return a


class SyntheticTask:
    """One data distribution: feature-space mixture, its invertible feature map phi, and samplers."""

    def __init__(self, separation: float, dim: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64):
        if not (isinstance(separation, (int, float)) and separation >= 0):
            raise ValueError(f"separation must be a non-negative number, got {separation!r}")
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2 (two axes place the four means), got {dim!r}")
        self.separation, self.dim, self.dtype = float(separation), dim, dtype
        gen = torch.Generator().manual_seed(seed)
        # Means: class c at x0 = (2c-1) s/2, component j at x1 = (2j-1) s/2: neighbours are s apart.
        self.means = torch.zeros(4, dim, dtype=dtype)
        self.labels = torch.tensor([0, 0, 1, 1])
        for k, (c, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            self.means[k, 0] = (2 * c - 1) * separation / 2
            self.means[k, 1] = (2 * j - 1) * separation / 2
        self.phi = InvertibleMLP(dim, generator=gen, dtype=dtype)
        for p in self.phi.parameters():
            p.requires_grad_(False)

    def sample_features(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z (n, dim), y (n,)): equal-weight mixture of the four unit Gaussians."""
        comp = torch.randint(0, 4, (n,), generator=generator)
        z = self.means[comp] + torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return z, self.labels[comp]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y) in input space: x = phi^{-1}(z)."""
        z, y = self.sample_features(n, generator)
        return self.phi.inverse(z), y

    def fit_classifier(self, z: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3,
                       steps: int = 200) -> nn.Linear:
        """psi: logistic regression (2 logits, cross entropy) on feature-space samples, by L-BFGS."""
        psi = nn.Linear(self.dim, 2).to(self.dtype)
        opt = torch.optim.LBFGS(psi.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(psi(z), y) + weight_decay * psi.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        for p in psi.parameters():
            p.requires_grad_(False)
        return psi

    def model(self, psi: nn.Linear) -> nn.Sequential:
        """f = psi o phi as one nn.Sequential; its last layer (name "psi") is the feature layer."""
        f = nn.Sequential()
        f.add_module("phi", self.phi)
        f.add_module("psi", psi)
        return f


def make_dataset(separation: float, n: int = 500, dim: int = 2, seed: int = 0):
    """(task, model, x, y): one distribution (seeded), a training sample of n points, and psi o phi
    with psi trained on that sample's features."""
    task = SyntheticTask(separation, dim=dim, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z, y = task.sample_features(n, gen)
    psi = task.fit_classifier(z, y)
    return task, task.model(psi), task.phi.inverse(z), y
