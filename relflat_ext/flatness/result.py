"""What every relative-flatness path returns."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


def estimate_text(value: float, stderr: Optional[float] = None) -> str:
    """``value`` to six significant digits, with ``+- stderr`` (two) where there is one: the short
    form every result's repr uses."""
    return f"{value:.6g}" if stderr is None else f"{value:.6g} +- {stderr:.2g}"


def shape_text(t: torch.Tensor) -> str:
    return f"<tensor {tuple(t.shape)}>"


@dataclasses.dataclass(repr=False)
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

    def __repr__(self) -> str:
        how = self.method if self.probes is None else f"{self.method}, {self.probes} probes"
        parts = [f"layer={self.layer!r}", f"kappa={estimate_text(self.kappa, self.kappa_stderr)} [{how}]"]
        for name in ("kappa_lmax", "kappa_normalized"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name):.6g}")
        for name in ("block_trace", "feature_scale"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={shape_text(getattr(self, name))}")
        parts += [f"n={self.n}", f"seconds={self.seconds:.3g}", f"reason={self.reason!r}"]
        return f"FlatnessResult({', '.join(parts)})"
