"""The paper's estimate of the generalization gap (Fig. 4): representativeness plus Theorem 5's
feature robustness ``delta^2/(2m) kappa_Tr``."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.hooks import preserved
from ..core.layers import LayerSpec
from ..core.modes import measurement
from ..flatness import FlatnessResult, Problem, relative_flatness
from ..flatness.result import estimate_text
from .representativeness import BandwidthSpec, RepresentativenessResult, representativeness


@dataclasses.dataclass(repr=False)
class BoundResult:
    """The paper's estimate of the generalization gap (Fig. 4): ``bound = representativeness +
    feature_robustness`` with ``feature_robustness = delta^2/(2m) kappa`` (Theorem 5), next to the
    empirical risk; ``risk_estimate = empirical_risk + bound``."""
    empirical_risk: float
    representativeness: float
    representativeness_stderr: float
    feature_robustness: float
    kappa: float
    bound: float
    risk_estimate: float
    delta: float
    m: int
    n: int
    layer: str
    details: Tuple[RepresentativenessResult, FlatnessResult]

    def __repr__(self) -> str:
        return (f"BoundResult(layer={self.layer!r}, bound={self.bound:.6g} = representativeness "
                f"{estimate_text(self.representativeness, self.representativeness_stderr)} + feature_robustness "
                f"{self.feature_robustness:.6g} (delta^2/(2m) kappa: delta={self.delta:.3g}, m={self.m}, "
                f"kappa={self.kappa:.6g}), empirical_risk={self.empirical_risk:.6g}, "
                f"risk_estimate={self.risk_estimate:.6g}, n={self.n})")


@measurement
def generalization_bound(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                         delta: float = 0.1, folds: int = 10, repeats: int = 1,
                         bandwidth: BandwidthSpec = "relative", loss: Optional[str] = None,
                         seed: Optional[int] = None, batch_size: Optional[int] = None,
                         held_out=None, labels: str = "train") -> BoundResult:
    """The paper's generalization-gap estimate ``Rep + delta^2/(2m) kappa_Tr`` for ``layer``, with
    its parts: representativeness (as :func:`representativeness`), feature robustness from
    Theorem 5 and kappa_Tr (as :func:`relative_flatness`), and the empirical risk."""
    rep = representativeness(model, layer, inputs, targets, delta=delta, folds=folds, repeats=repeats,
                             bandwidth=bandwidth, loss=loss, seed=seed, batch_size=batch_size,
                             held_out=held_out, labels=labels)
    flat = relative_flatness(model, layer, inputs, targets, loss=loss, batch_size=batch_size, block_trace=False)
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size)
    risk_sum, n = 0.0, 0
    with preserved(model), torch.no_grad():
        for x, y in problem.batches():
            out = problem.forward(x)  # the float32 copy of a half-precision model, as the batches are cast
            problem.loss.check(out, y)
            risk_sum += float(problem.loss.per_sample_float64(out, y).sum())
            n += out.shape[0]
    robustness = delta * delta / (2 * rep.m) * flat.kappa
    bound = rep.value + robustness
    return BoundResult(risk_sum / n, rep.value, rep.stderr, robustness, flat.kappa, bound, risk_sum / n + bound,
                       float(delta), rep.m, n, rep.layer, (rep, flat))
