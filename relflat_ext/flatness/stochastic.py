"""The multiplicative-probe estimator (docs/design.md, "The stochastic estimator") for any layer
whose weight acts linearly on features: ``nn.Linear`` on inputs of any shape (tokens included),
``nn.Conv1d/2d/3d`` (weight viewed as (out, in/groups * prod(kernel)) acting on patches),
``nn.ConvTranspose1d/2d/3d`` (as (out * prod(kernel), in/groups) acting on each input position's
channels), ``nn.Embedding`` (``weight.T`` acting on one-hot tokens), or any module through a
user-supplied view.

With ``A`` an m x m matrix of i.i.d. N(0, 1) entries, ``E_A[ D^2E(W)[W A, W A] ] = kappa_Tr`` exactly
(``E[A A^T] = m I`` turns the quadratic form into ``sum_{s,t} <w_s, w_t> Tr(H_{s,t})``). Only the
columns' covariance ``W W^T`` matters, so when m > d the probe is ``F A`` with ``A`` (d, m) and ``F`` the
symmetric square root of ``W W^T``: the same distribution for Gaussian ``A``, from d m instead of m^2
random numbers and d^2 m instead of d m^2 flops (9x fewer on a 512 x 4608 convolution). Each probe is
one Hessian-vector product of the empirical risk with respect to the layer weight; probes are
batched (``is_grads_batched``), the data are streamed, and rounds of probes are drawn until the
relative standard error reaches ``rel_tol`` or ``max_probes`` is reached. With the directions
replaced by i.i.d. N(0, 1) weight-space vectors the same machinery gives ``Tr(H)`` (Hutchinson).

Unbiasedness needs only ``E[A_aj A_bk] = [a=b][j=k]``. For wide layers (m >= 4 * HASHED_COLUMNS)
``A`` hashes its m columns into ``c = HASHED_COLUMNS`` Gaussian ones (a count sketch: column j is
``sign_j * Z[:, bucket_j]``), so ``F A = (F Z)`` with columns gathered and signed: d r c flops
instead of d r m (9x fewer at m = 4608), the same expectation, and a variance larger by at most
about 3/c kappa^2 (colliding columns; measured: within noise on a trained ResNet-18, bench/RESULTS.md).
ResNet-18's last convolutions on 32x32 images cost more in this map than in their Hessian-vector
products.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Set, Tuple

import torch
from torch import nn

from ..core import dist
from ..core.data import check_finite
from ..core.hooks import preserved
from ..core.hvp import check_reached, double_backward_kernels, hessian_quadratic_forms
from ..core.layers import LayerSpec, WeightView, acts_on_vectors, matrix_view
from ..core.linear_forms import LinearForms, ProbeDirections, matrix_layout
from ..core.losses import LossSpec
from ..core.modes import measurement
from ..core.progress import ProgressLine
from ..core.rng import standard_normal
from .accumulator import NotFinite, explain_not_finite
from .normalization import inverse_scale, scale_over_data
from .problem import Options, Problem
from .result import FlatnessResult, estimate_text

QUANTITIES = ("kappa", "hessian_trace")
# The CPU's quadratic forms contract the weights of F.linear, convolutions and Conv1D in the second
# backward (core.linear_forms); off, they come from the full products H V (the tests compare both).
CONTRACT = True
HASHED_COLUMNS = 512  # Gaussian columns a wide probe's columns are hashed into (module docstring)
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher")
ROUND_BYTES = 1 << 30  # a round's directions; fewer probes a round for weights too large for 32 of them


@dataclasses.dataclass(repr=False)
class StochasticEstimate:
    """value: the estimate; stderr: its standard error over probes; probes: how many were used;
    samples (probes,): the per-probe quadratic forms; converged: whether rel_tol was reached."""
    value: float
    stderr: float
    probes: int
    samples: torch.Tensor
    converged: bool
    n: int
    seconds: float

    def __repr__(self) -> str:
        return (f"StochasticEstimate(value={estimate_text(self.value, self.stderr)}, probes={self.probes}, "
                f"converged={self.converged}, n={self.n}, seconds={self.seconds:.3g})")


def _quadratic_forms(problem: Problem, weight, x, y, dirs: ProbeDirections,
                     mixed: Set[int]) -> Optional[torch.Tensor]:
    """n_b * <V_k, H_b V_k> for each of the K directions V_k of the one layer in ``dirs``, H_b the
    Hessian of the batch's mean loss with respect to the weight, n_b its number of terms; None
    where the batch's loss does not reach the weight through autograd. On the CPU contracted
    where the weight allows (:func:`contracted_quadratic_forms`, ``mixed`` as there)."""
    if CONTRACT and dirs.device.type != "cuda":
        forms, reached = contracted_quadratic_forms(problem, [weight], x, y, dirs, mixed)
        return forms[:, 0] * problem.count(y) if reached[0] else None
    directions = dirs.weight(0)
    loss = problem.loss
    with torch.enable_grad(), double_backward_kernels(problem.model):
        out = problem.forward(x)
        loss.check(out, y)
        value = loss.for_derivatives(out, y)
        grad = torch.autograd.grad(value, weight, create_graph=True, allow_unused=True)[0] \
            if value.requires_grad else None
        if grad is None:  # the batch's loss does not reach the weight
            return None
        if not grad.requires_grad:  # loss linear in the weight
            return directions.new_zeros(directions.shape[0])
        # Batched (vmap) HVPs pay off on GPUs; on the CPU vmap falls back to slow loops for
        # convolutions, and the per-probe loop is as fast or faster (bench/RESULTS.md).
        forms = hessian_quadratic_forms(grad, weight, directions, batched=directions.is_cuda)
    return forms * problem.count(y)


def probe_factor(w_mat: torch.Tensor) -> torch.Tensor:
    """(d, r) factor F of ``W W^T`` (F F^T = W W^T) for a (d, m) weight, r = min(d, m): W itself when
    m <= d, else the symmetric square root (eigendecomposition in float64, negative rounding clamped:
    a rank-deficient W, e.g. with pruned rows, is fine)."""
    d, m = w_mat.shape
    if m <= d:
        return w_mat
    gram = w_mat.double() @ w_mat.double().T
    lam, vec = torch.linalg.eigh(gram)
    return ((vec * lam.clamp_min(0).sqrt()) @ vec.T).to(w_mat.dtype)


@dataclasses.dataclass
class ProbeDraw:
    """``count`` probe coordinate matrices P (count, r, m) with E[P_aj P_bk] = [a=b][j=k]: column
    j of P is ``signs[:, j] * z[:, :, buckets[:, j]]`` (z (count, r, c) i.i.d.), or P = z where
    ``buckets`` is None (c = m)."""
    z: torch.Tensor
    buckets: Optional[torch.Tensor] = None  # (count, m) in [0, c)
    signs: Optional[torch.Tensor] = None  # (count, m) of +-1

    @staticmethod
    def draw(count: int, r: int, m: int, gen: torch.Generator, dtype: torch.dtype, device,
             distribution: str = "gaussian", hashed: bool = True) -> "ProbeDraw":
        c = HASHED_COLUMNS if hashed and m >= 4 * HASHED_COLUMNS else m
        z = standard_normal((count, r, c), gen, dtype, device)
        if distribution == "rademacher":
            z = torch.sign(z)
        if c == m:
            return ProbeDraw(z)
        buckets = torch.randint(0, c, (count, m), generator=gen, device=device)
        signs = torch.randint(0, 2, (count, m), generator=gen, device=device).to(dtype).mul_(2).sub_(1)
        return ProbeDraw(z, buckets, signs)

    def _spread(self, cols: torch.Tensor, out: Optional[torch.Tensor] = None, dim: int = 2) -> torch.Tensor:
        """(count, rows, c) -> (count, rows, m) (or, with ``dim=1``, (count, c, rows) -> (count, m,
        rows)): the hashed columns gathered and signed, as one selection from [cols, -cols] per
        probe into one buffer (a gather with a (rows, m) index, or stacking the selections, took
        3-5x longer on the CPU)."""
        if self.buckets is None:
            return cols
        c = cols.shape[dim]
        signed = torch.cat([cols, -cols], dim=dim)
        picks = self.buckets + c * (self.signs < 0)
        if out is None:
            shape = list(cols.shape)
            shape[dim] = picks.shape[1]
            out = cols.new_empty(shape)
        for i in range(cols.shape[0]):
            torch.index_select(signed[i], dim - 1, picks[i], out=out[i])
        return out

    def coordinates(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P (count, r, m), into ``out`` where given (and hashed)."""
        return self._spread(self.z, out)

    def mapped(self, factor: torch.Tensor, out: Optional[torch.Tensor] = None,
               transposed: bool = False) -> torch.Tensor:
        """F P (count, d, m) for F (d, r), from F z (d r c flops), into ``out`` where given: a
        reused buffer spares the page faults of a fresh one, which cost as much as the map. With
        ``transposed``, a view of a contiguous (count, m, d) buffer (``out`` has that shape), for a
        weight stored as W^T (:func:`stores_transposed`): its directions are then contiguous, and
        the map gathers rows instead of columns (a strided copy of every direction cost more than
        the Hessian-vector product on a 30522 x 256 embedding)."""
        if not transposed:
            if self.buckets is None:
                return torch.matmul(factor, self.z) if out is None else torch.matmul(factor, self.z, out=out)
            return self._spread(factor @ self.z, out)
        rows = torch.matmul(self.z.transpose(1, 2), factor.T)  # (count, c, d): (F z)^T
        if self.buckets is None:
            return (rows if out is None else out.copy_(rows)).transpose(1, 2)
        return self._spread(rows, out, dim=1).transpose(1, 2)


def stores_transposed(view: WeightView, d: int, m: int) -> bool:
    """Whether the weight holds W (d, m) transposed (an embedding, transformers' Conv1D, a matrix
    used as ``x @ W``): ``from_matrix`` of a matrix laid out as its contiguous transpose is then a
    contiguous view of it (tried on a meta tensor: no data)."""
    if d < 2 or m < 2:
        return False
    probe = torch.empty((m, d), device="meta").T
    try:
        weight = view.from_matrix(probe)
    except Exception:  # noqa: BLE001 - a user's view that meta tensors do not support: the plain layout
        return False
    return weight.is_contiguous() and weight._base is probe._base


def as_weights(view: WeightView, mats: torch.Tensor) -> torch.Tensor:
    """(count, d, m) -> (count, *weight.shape), a view where ``from_matrix`` is one (vmap), else
    stacked (a user's view vmap cannot batch)."""
    try:
        return torch.vmap(view.from_matrix)(mats)
    except Exception:  # noqa: BLE001 - the same weights, one by one
        return torch.stack([view.from_matrix(mat) for mat in mats])


def _coordinate_directions(w_mat: torch.Tensor, view: WeightView, layout: str, count: int, gen: torch.Generator,
                           scale: Optional[torch.Tensor], distribution: str = "gaussian") -> ProbeDirections:
    """The probes of :func:`_directions` for a layer whose factor is W itself (m <= d) and whose
    weight multiplies rows (``layout``), kept as coordinates: V = W P, with P = S A S^{-1} in
    Theorem 4's coordinates (S = diag(s): F = W S), so that V = W S A S^{-1} as there."""
    m = w_mat.shape[1]
    p = ProbeDraw.draw(count, m, m, gen, w_mat.dtype, w_mat.device, distribution).coordinates()
    if scale is not None:
        p = scale[:, None] * p * inverse_scale(scale)
    return ProbeDirections([None], [p], [layout], lambda _, coordinates: as_weights(view, w_mat @ coordinates))


def _directions(quantity: str, w_mat: torch.Tensor, factor: Optional[torch.Tensor], view: WeightView, count: int,
                gen: torch.Generator, scale: Optional[torch.Tensor], distribution: str = "gaussian") -> torch.Tensor:
    """count probe directions in weight space: ``F A`` for the factor F (d, r) of :func:`probe_factor`
    (of ``W diag(s)`` in Theorem 4's coordinates, mapped back to W by ``diag(1/s)``), ``A`` (r, m) a
    :class:`ProbeDraw`. Entries of A (or of the direction itself for the Hessian trace) are N(0, 1)
    or +-1: both have E[A_aj A_bk] = [a=b][j=k], all that unbiasedness needs; +-1 entries give
    quadratic forms a smaller variance."""
    d, m = w_mat.shape
    if quantity == "hessian_trace":
        a = standard_normal((count, d * m), gen, w_mat.dtype, w_mat.device)
        if distribution == "rademacher":
            a = torch.sign(a)
        return a.reshape(count, *view.from_matrix(w_mat).shape)
    draw = ProbeDraw.draw(count, factor.shape[1], m, gen, w_mat.dtype, w_mat.device, distribution)
    mats = draw.mapped(factor, transposed=stores_transposed(view, d, m))
    if scale is not None:
        mats = mats * inverse_scale(scale)  # zero-spread features dropped; the layout is kept
    return as_weights(view, mats)


@measurement
def stochastic_estimate(model: nn.Module, layer: LayerSpec, inputs, targets=None, *,
                        loss: Optional[LossSpec] = None, quantity: str = "kappa", rel_tol: float = 0.05,
                        max_probes: int = 1000, probes_per_round: int = 32, seed: Optional[int] = None,
                        batch_size: Optional[int] = None, feature_scale: Optional[torch.Tensor] = None,
                        weight_view: Optional[WeightView] = None, progress: bool = False,
                        distributed: Optional[bool] = None, probe_distribution: str = "gaussian"
                        ) -> StochasticEstimate:
    """Unbiased estimate of kappa_Tr (``quantity="kappa"``) or of the layer's Hessian trace
    (``"hessian_trace"``), by rounds of ``probes_per_round`` Hessian-vector products over the whole
    data (fewer, at least 2, where their directions would pass ROUND_BYTES: an embedding of a large
    vocabulary), until ``stderr <= rel_tol * |value|`` or ``max_probes``. ``feature_scale`` (m,) gives
    Theorem 4's normalized kappa (directions ``W diag(s) A diag(1/s)``). Same seed, same probes
    (under torch.distributed every rank draws the same probes, from rank 0's seed if none is given,
    and the per-probe sums over the shards are all-reduced). The model is left exactly as it was."""
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size, distributed)
    return estimate(problem, quantity=quantity, rel_tol=rel_tol, max_probes=max_probes,
                    probes_per_round=probes_per_round, seed=seed, feature_scale=feature_scale,
                    weight_view=weight_view, progress=progress, probe_distribution=probe_distribution)


def run(problem: Problem, options: Options, reason: str) -> FlatnessResult:
    """kappa_Tr by the estimator, as a :class:`FlatnessResult` (the front door's stochastic path)."""
    scale = None
    if options.normalize_features:
        if not acts_on_vectors(problem.module):
            raise ValueError("normalize_features (Theorem 4) is defined here for nn.Linear layers (and transformers' "
                             "Conv1D)")
        scale = scale_over_data(problem)
    est = estimate(problem, rel_tol=options.rel_tol, max_probes=options.max_probes, seed=options.seed,
                   feature_scale=scale, weight_view=options.weight_view, progress=options.progress)
    return FlatnessResult(est.value, None, None, "stochastic", est.n, problem.name, scale, est.seconds,
                          kappa_stderr=est.stderr, probes=est.probes, reason=reason)


def estimate(problem: Problem, quantity: str = "kappa", rel_tol: float = 0.05, max_probes: int = 1000,
             probes_per_round: int = 32, seed: Optional[int] = None, feature_scale: Optional[torch.Tensor] = None,
             weight_view: Optional[WeightView] = None, progress: bool = False,
             probe_distribution: str = "gaussian") -> StochasticEstimate:
    """:func:`stochastic_estimate` on a built problem."""
    start = time.perf_counter()
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if probe_distribution not in PROBE_DISTRIBUTIONS:
        raise ValueError(f"probe_distribution must be one of {PROBE_DISTRIBUTIONS}, got {probe_distribution!r}")
    if not (isinstance(rel_tol, (int, float)) and rel_tol > 0):
        raise ValueError(f"rel_tol must be a positive number, got {rel_tol!r}")
    if not isinstance(max_probes, int) or max_probes < 2:
        raise ValueError(f"max_probes must be an integer >= 2, got {max_probes!r}")
    if not isinstance(probes_per_round, int) or probes_per_round < 2:
        raise ValueError(f"probes_per_round must be an integer >= 2, got {probes_per_round!r}")
    model, name, module = problem.model, problem.name, problem.module
    view = matrix_view(module, name, weight_view)
    weight = module.weight
    w_mat = view.to_matrix(weight.detach())
    check_finite(f"the weight of {name!r}", w_mat)  # before the probe factor's eigendecomposition
    if feature_scale is not None and tuple(feature_scale.shape) != (w_mat.shape[1],):
        raise ValueError(f"feature_scale must be ({w_mat.shape[1]},), got {tuple(feature_scale.shape)}")
    if problem.distributed:
        dist.check_same_shapes("the layer's weight shape", tuple(w_mat.shape), w_mat.device)
        base_seed = dist.shared_seed(seed, w_mat.device)
    else:
        base_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
    scaled = w_mat if feature_scale is None else w_mat * feature_scale
    factor = None if quantity == "hessian_trace" else probe_factor(scaled)
    # V = W P (m <= d) on rows, on the CPU's contracted path: kept as P (core.linear_forms)
    layout = matrix_layout(weight.detach(), w_mat) if factor is scaled and CONTRACT and not w_mat.is_cuda else None
    samples: List[torch.Tensor] = []
    n = 0
    value = stderr = math.nan
    converged = False
    report = ProgressLine(f"stochastic {quantity} of {name!r}", "probes") if progress else None
    per_round = max(2, min(probes_per_round, ROUND_BYTES // (weight.numel() * weight.element_size())))
    mixed: Set[int] = set()  # {0} once a forward shows the weight used besides a contracted product
    with preserved(model):
        weight.requires_grad_(True)
        for rnd in range(math.ceil(max_probes / per_round)):
            count = min(per_round, max_probes - rnd * per_round)
            gen = torch.Generator(device=w_mat.device).manual_seed(base_seed + rnd)
            dirs = _coordinate_directions(w_mat, view, layout, count, gen, feature_scale, probe_distribution) \
                if layout else ProbeDirections.plain([_directions(quantity, w_mat, factor, view, count, gen,
                                                                  feature_scale, probe_distribution)])
            total, n, reached = torch.zeros(count, dtype=torch.float64, device=w_mat.device), 0, False
            for x, y in problem.batches():
                forms = _quadratic_forms(problem, weight, x, y, dirs, mixed)
                if forms is not None:
                    total += forms.double()
                    reached = True
                n += problem.count(y)
            if rnd == 0:
                check_reached([reached], [name], problem.distributed, w_mat.device)
            if problem.distributed:
                count = torch.tensor(float(n), dtype=torch.float64, device=total.device)
                dist.all_reduce_sum([total, count])
                n = int(count.item())
            samples.append(total / n)
            allq = torch.cat(samples)
            value = float(allq.mean())
            stderr = float(allq.std() / math.sqrt(allq.numel()))
            if not math.isfinite(value):
                with explain_not_finite(weight.dtype, problem.tensors, problem.check_outputs_finite):
                    raise NotFinite(f"the estimate of {quantity} is not finite ({value})")
            converged = stderr <= rel_tol * abs(value)
            if report:
                report(allq.numel(), max_probes, f"{quantity} {value:.5g} +- {stderr:.2g}")
            if converged:
                break
    if report:
        report.close()
    return StochasticEstimate(value, stderr, int(sum(s.numel() for s in samples)), torch.cat(samples).to(w_mat.dtype),
                              converged, n, time.perf_counter() - start)


def contracted_quadratic_forms(problem: Problem, weights: List[torch.Tensor], x, y, dirs: ProbeDirections,
                               mixed: Set[int]) -> Tuple[torch.Tensor, List[bool]]:
    """(k, L) float64 ``<V_l, (H_b V)_l>`` for the k joint directions ``dirs``, H_b the Hessian of
    the batch's mean loss, one second backward a direction, with the layers the model uses only
    through ``F.linear``, a convolution or ``Conv1D`` contracted in it (core.linear_forms, from
    probe coordinates where ``dirs`` has them); and whether the batch's loss reached each layer.
    ``mixed`` collects the layers whose weight the forward also uses otherwise, which get the full
    product (the forward runs again once, the first time)."""
    loss = problem.loss
    k = dirs.count
    result = torch.zeros(k, len(weights), dtype=torch.float64, device=dirs.device)
    with torch.enable_grad(), double_backward_kernels(problem.model):
        while True:
            forms = LinearForms(weights, mixed, [layout if p is not None else None
                                                 for layout, p in zip(dirs.layouts, dirs.coordinates)])
            with forms.intercepting():
                out = problem.forward(x)
            loss.check(out, y)
            value = loss.for_derivatives(out, y)
            found = forms.settle(value) if forms.used and value.requires_grad else []
            if not found:
                break
            mixed.update(found)
        grads = torch.autograd.grad(value, weights, create_graph=True, allow_unused=True) if value.requires_grad \
            else [None] * len(weights)
        reached = [g is not None for g in grads]
        live = [l for l, g in enumerate(grads) if g is not None and g.requires_grad]  # else H V = 0
        if not live:
            return result, reached
        contracted = [l for l in live if l in forms.contracted]
        plain = [l for l in live if l not in forms.contracted]
        # V_l where a product needs it; else its coordinates serve, and the gradient's adjoint
        # (only its presence matters then) is a broadcast zero
        needs = [l in plain or l in forms.unperturbed or dirs.coordinates[l] is None for l in range(len(weights))]
        vs = [dirs.weight(l) if needs[l] else None for l in range(len(weights))]
        stand_ins = {l: weights[l].new_zeros(()).expand(weights[l].shape) for l in live if not needs[l]}
        inputs = [forms.taus[l] for l in contracted] + [weights[l] for l in plain]
        for j in range(k):
            forms.direct([None if v is None else v[j] for v in vs],
                         [None if p is None else p[j] for p in dirs.coordinates])
            parts = torch.autograd.grad([grads[l] for l in live], inputs,
                                        grad_outputs=[stand_ins[l] if l in stand_ins else vs[l][j] for l in live],
                                        retain_graph=True, allow_unused=True)
            for l, part in zip(contracted + plain, parts):
                if part is not None:  # a full product in place (it is ours), summed in its dtype
                    result[j, l] = part.double() if l in contracted else part.mul_(vs[l][j]).sum().double()
    return result, reached
