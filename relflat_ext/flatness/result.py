"""What every relative-flatness path returns."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class FlatnessResult:
    """kappa: kappa_Tr; kappa_lmax: max-eigenvalue variant (when asked); block_trace (d, d):
    ``T[s, t] = Tr(H_{s,t})`` (None when not asked); method: the path that ran; n: samples used;
    layer: the layer's name; feature_scale (m,): Theorem 4's per-feature standard deviations when
    ``normalize_features`` (0 for zero-spread features, which are dropped); seconds: wall time; for the
    stochastic method kappa_stderr (standard error) and probes; reason: why this path ran;
    kappa_normalized: Theorem 4's normalized kappa where it was computed alongside kappa, from the
    same Hessian-vector products (the profile asks it of the exact path)."""
    kappa: float
    kappa_lmax: Optional[float]
    block_trace: Optional[torch.Tensor]
    method: str
    n: int
    layer: str = ""
    feature_scale: Optional[torch.Tensor] = None
    seconds: float = 0.0
    kappa_stderr: Optional[float] = None
    probes: Optional[int] = None
    reason: str = ""
    kappa_normalized: Optional[float] = None
