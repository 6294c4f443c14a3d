"""Sums over samples that make kappa, the block traces T and the lmax blocks, batch by batch and,
under torch.distributed, over ranks; and the error for a result that is not finite."""
from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Callable, Dict, Iterator, Optional

import torch

from ..core import dist
from ..core.data import check_finite
from .result import FlatnessResult

# Largest (d, m, m) stack of diagonal Hessian blocks built for lmax, in bytes.
LMAX_MAX_BYTES = 4 << 30


class NotFinite(ValueError):
    """A sum came out NaN or Inf; :func:`explain_not_finite` says which input caused it."""


@contextlib.contextmanager
def explain_not_finite(dtype: torch.dtype, tensors: Callable[[], Dict[str, Optional[torch.Tensor]]],
                       check_outputs: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Turns :class:`NotFinite` into an error naming the input (name -> tensor) that holds NaN/Inf,
    or the batch whose model output or loss does (``check_outputs`` raises it), or else saying the
    inputs are too large for ``dtype``. Checking the result costs nothing on good input; a scan of
    every input up front can cost more than the work."""
    try:
        yield
    except NotFinite as exc:
        for name, t in tensors().items():
            if isinstance(t, torch.Tensor):
                check_finite(name, t)
        if check_outputs is not None:
            check_outputs()
        raise ValueError(f"{exc}: the inputs are finite but too large for {dtype} (the squared feature norms or "
                         "the logits overflow); rescale them or use float64") from None


class Accumulator:
    """kappa_sum = sum_i a_i <G, Hz_i>, block = sum_i a_i Hz_i (when asked), the lmax blocks
    sum_i Hz_i[s, s] phi_i phi_i^T (when asked), and the sample count, for weight W (d, m)."""

    def __init__(self, weight: torch.Tensor, want_block: bool, lmax: bool, distributed: bool = False):
        d, m = weight.shape
        self.weight, self.n, self.kappa_sum = weight, 0, weight.new_zeros(())
        self.distributed = distributed
        self.block = weight.new_zeros((d, d)) if want_block else None
        if lmax and d * m * m * weight.element_size() > LMAX_MAX_BYTES:
            raise ValueError(f"lmax=True needs the {d} diagonal Hessian blocks of size {m}x{m} "
                             f"({d * m * m * weight.element_size() / 2**30:.1f} GiB); too large")
        self.diag_blocks = weight.new_zeros((d, m, m)) if lmax else None

    @functools.cached_property
    def gram(self) -> torch.Tensor:
        """G = W W^T (d, d), once per call (the exact paths contract every batch with it)."""
        return self.weight @ self.weight.T

    def add_diagonal(self, hdiag: torch.Tensor, features: torch.Tensor) -> None:
        """diag_blocks[s] += sum_i Hz_i[s, s] phi_i phi_i^T."""
        self.diag_blocks += torch.einsum("ns,ni,nj->sij", hdiag, features, features)

    def result(self, method: str, layer: str, scale, start: float) -> FlatnessResult:
        if self.distributed:  # every rank's partial sums, reduced: the result on the union of the shards
            dist.check_same_shapes("the layer's weight shape", tuple(self.weight.shape), self.weight.device)
            count = torch.tensor(float(self.n), dtype=torch.float64, device=self.weight.device)
            dist.all_reduce_sum([self.kappa_sum, count, self.block, self.diag_blocks])
            self.n = int(count.item())
        n = self.n
        if not math.isfinite(float(self.kappa_sum)):
            raise NotFinite(f"kappa is not finite ({float(self.kappa_sum)})")
        kappa_lmax = None
        if self.diag_blocks is not None:
            top = torch.linalg.eigvalsh(self.diag_blocks / n)[:, -1]
            kappa_lmax = float((self.weight.pow(2).sum(1) * top).sum())
            if not math.isfinite(kappa_lmax):
                raise NotFinite(f"kappa_lmax is not finite ({kappa_lmax})")
        return FlatnessResult(float(self.kappa_sum) / n, kappa_lmax,
                              None if self.block is None else self.block / n, method, n, layer, scale,
                              time.perf_counter() - start)
