"""One probe set for every layer: every Hessian-vector product of the whole network serves all the
layers at once, and a low-rank sketch removes the cross-layer terms that would otherwise dominate.

Each layer's kappa is a partial trace. With ``F_l`` a (d, r) factor of ``W_l W_l^T`` (``W_l``
itself when m <= d, else the symmetric square root, so r = min(d, m)) and probe coordinates
``P_l`` (r, m) mapped to the weight as ``V_l = F_l P_l``, the operator
``M = R^T H R`` (R the block-diagonal map P -> V, H the Hessian of the loss in all the measured
weights) has ``Tr(M_ll) = Tr(H_ll W_l W_l^T) = kappa_l`` (with ``F_l = I`` the same gives the
Hessian trace of the layer). Plain joint probes ``<p_l, (M p)_l>`` are unbiased, but the
cross-layer terms ``<p_l, M_lk p_k>`` make their variance 10-1000x the per-layer one
(docs/design.md, "Shared probes"). Deflation (Hutch++, Meyer et al. 2021, per block):
with Q an orthonormal basis of ``M S`` for k random columns S,

    kappa_l = Tr(Q_l^T (M Q)_l) + E[<u_l, (M u)_l>],   u = (I - Q Q^T) g,  g ~ N(0, I),

the first term exact given Q and the second an unbiased estimate whose variance comes only from
the part of M outside Q's span. At a minimum the Hessian is close to the Gauss-Newton matrix,
whose rank is at most the number of outputs, so the residual is small: on trained networks the
variance per probe falls far below even the per-layer estimator's (bench/RESULTS.md)."""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..core import dist
from ..core.data import check_finite
from ..core.hooks import preserved
from ..core.hvp import check_reached, double_backward_kernels
from ..core.layers import LayerSpec, WeightView, matrix_view, resolve_weight_layer
from ..core.linear_forms import ProbeDirections, matrix_layout
from ..core.losses import LossSpec
from ..core.modes import measurement
from ..core.rng import standard_normal
from .accumulator import NotFinite, explain_not_finite
from . import stochastic
from .problem import Problem
from .stochastic import (QUANTITIES, ROUND_BYTES, ProbeDraw, StochasticEstimate, as_weights, probe_factor,
                         stores_transposed)

_BATCHED_OK = True
SKETCH_MEMORY_BYTES = 1 << 30  # the sketch holds two (k, total probe dimension) blocks
# The sketch's full products M S are taken a few columns at a time, each block's weight-shaped
# directions and products within this (a forward pass a block; all k at once held 4 GB more on a
# width-384 transformer)
SKETCH_BLOCK_BYTES = 1 << 28
# Directions per vmap'd backward pass (is_grads_batched) on GPUs; the CPU loops (bench/RESULTS.md).
BATCHED_DIRECTIONS = 8


@measurement
def stochastic_estimate_layers(model: nn.Module, layers: Sequence[LayerSpec], inputs, targets=None, *,
                               loss: Optional[LossSpec] = None, quantity: str = "kappa", rel_tol: float = 0.05,
                               max_probes: int = 1000, probes_per_round: int = 32, sketch: Union[str, int] = "auto",
                               seed: Optional[int] = None, batch_size: Optional[int] = None,
                               distributed: Optional[bool] = None,
                               progress: Optional[Callable[[int, int], None]] = None,
                               give_up: bool = False) -> Dict[str, StochasticEstimate]:
    """Unbiased estimates of kappa_Tr (or of each layer's Hessian trace) for every layer at once,
    each Hessian-vector product of the whole network serving all of them. ``sketch`` columns (k)
    first deflate the dominant part of the Hessian (2k products, "auto": up to 32 within
    ``max_probes // 4`` and 1 GiB; 0: plain joint probes); then rounds of ``probes_per_round``
    residual probes (fewer, at least 2, where their directions would pass 1 GiB) until every
    layer's relative standard error reaches ``rel_tol`` or the products reach ``max_probes`` (the
    sketch's included). Layers as for :func:`stochastic_estimate` (Linear, Conv, Embedding,
    transformers' Conv1D, or a 2-D parameter by name), each its own weight.
    ``progress(done, budget)`` is called after each block of products. ``give_up``: stop early once
    no unconverged layer is on course to converge within the remaining products (predicted from
    its variance so far), leaving those layers to another estimator. Returns, by layer name,
    the estimate; its ``samples`` are the per-probe values (exact part plus residual), its
    ``probes`` the products used in all."""
    start = time.perf_counter()
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if not layers:
        raise ValueError("layers must name at least one layer")
    if not (isinstance(rel_tol, (int, float)) and rel_tol > 0):
        raise ValueError(f"rel_tol must be a positive number, got {rel_tol!r}")
    if not isinstance(max_probes, int) or max_probes < 2 or not isinstance(probes_per_round, int) \
            or probes_per_round < 2:
        raise ValueError(f"max_probes and probes_per_round must be integers >= 2, got {max_probes!r}, "
                         f"{probes_per_round!r}")
    if not (sketch == "auto" or (isinstance(sketch, int) and not isinstance(sketch, bool) and sketch >= 0)):
        raise ValueError(f"sketch must be 'auto' or a number of columns >= 0, got {sketch!r}")
    problem = Problem.build(model, layers[0], inputs, targets, loss, batch_size, distributed)
    resolved = [resolve_weight_layer(problem.model, layer) for layer in layers]
    problem.orient(resolved)
    names = [name for name, _ in resolved]
    weights = [module.weight for _, module in resolved]
    if len({id(w) for w in weights}) < len(weights):
        raise ValueError("two of the layers share one weight: name each weight once")
    views = [matrix_view(module, name) for name, module in resolved]
    for name, w in zip(names, weights):  # before the probe factors' eigendecompositions
        check_finite(f"the weight of {name!r}", w.detach())
    space = _ProbeSpace([w.detach() for w in weights], views, quantity)
    if sketch == "auto":
        fits = SKETCH_MEMORY_BYTES // (2 * space.dim * space.dtype.itemsize)
        sketch = min(32, max_probes // 4, fits)
        sketch = sketch if sketch >= 4 else 0
    if 2 * sketch >= max_probes:
        raise ValueError(f"sketch={sketch} needs {2 * sketch} Hessian-vector products, max_probes={max_probes} allows "
                         "fewer: raise max_probes or lower sketch")
    sketch = min(sketch, space.dim)
    device = space.device
    base_seed = (dist.shared_seed(seed, device) if problem.distributed else
                 int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed))
    gen = torch.Generator(device=device).manual_seed(base_seed)
    used, samples = 0, []
    exact = torch.zeros(len(names), dtype=torch.float64, device=device)
    converged = [False] * len(names)
    with preserved(problem.model):
        for w in weights:
            w.requires_grad_(True)
        operator = _Operator(problem, weights, space)
        basis = mapped_basis = None
        weight_bytes = sum(w.numel() * w.element_size() for w in weights)
        if sketch:
            block = max(1, min(sketch, SKETCH_BLOCK_BYTES // weight_bytes))
            columns = space.randn(sketch, gen)
            sketched = torch.cat([operator(columns[i:i + block]) for i in range(0, sketch, block)])
            del columns
            basis = torch.linalg.qr(sketched.T).Q.T  # (k, dim), orthonormal rows
            del sketched
            check_reached(operator.reached, names, problem.distributed, device)  # after the first pass
            used += sketch
            # R Q (where directions are not kept as coordinates), to deflate the residual probes'
            mapped_basis = space.to_matrices(basis, mapped_only=True)
            exact = operator.quadratic_forms(space.directions(basis, mapped_basis)).sum(0)
            used += sketch
            if progress:
                progress(used, max_probes)
        per_round = max(2, min(probes_per_round, ROUND_BYTES // weight_bytes))  # a round's directions
        while used < max_probes:
            count = min(per_round, max_probes - used)
            dirs = space.residual_directions(count, gen, basis, mapped_basis)
            samples.append(operator.quadratic_forms(dirs))  # (count, L)
            if basis is None and len(samples) == 1:  # after the first pass over the data
                check_reached(operator.reached, names, problem.distributed, device)
            used += count
            if progress:
                progress(used, max_probes)
            allq = torch.cat(samples)
            if allq.shape[0] < 2:
                continue
            values = exact + allq.mean(0)
            if not bool(torch.isfinite(values).all()):
                bad = [name for name, v in zip(names, values) if not math.isfinite(float(v))]
                with explain_not_finite(space.dtype, problem.tensors, problem.check_outputs_finite):
                    raise NotFinite(f"the estimates of {', '.join(map(repr, bad))} are not finite")
            errors = allq.std(0) / math.sqrt(allq.shape[0])
            converged = [bool(e <= rel_tol * abs(v)) for e, v in zip(errors, values)]
            if all(converged):
                break
            if give_up:  # residual probes each layer needs in all: variance / (rel_tol * value)^2
                needed = allq.var(0) / (rel_tol * values).pow(2).clamp_min(1e-300)
                on_course = [not c and float(k) <= max_probes - used + allq.shape[0]
                             for c, k in zip(converged, needed)]
                if not any(on_course):
                    break
    seconds = time.perf_counter() - start
    allq = torch.cat(samples) + exact
    out = {}
    for l, name in enumerate(names):
        q = allq[:, l]
        out[name] = StochasticEstimate(float(q.mean()), float(q.std() / math.sqrt(q.numel())), used,
                                       q.to(space.dtype), converged[l], operator.n, seconds)
    return out


class _ProbeSpace:
    """Concatenated probe coordinates of all layers, and the maps between them and the weights."""

    def __init__(self, weights: List[torch.Tensor], views: List[WeightView], quantity: str):
        self.views, self.factors, self.shapes, self.transposed, self.layouts = views, [], [], [], []
        for weight, view in zip(weights, views):
            w = view.to_matrix(weight)
            d, m = w.shape
            # V = F P with P (r, m): W P when m <= d, else (W W^T)^{1/2} P, the smaller space;
            # no factor (V = P) for the Hessian trace
            factor = None if quantity == "hessian_trace" else probe_factor(w)
            self.factors.append(factor)
            self.shapes.append((d if factor is None else factor.shape[1], m))
            # F P built as (F P)^T for a weight stored transposed: contiguous directions
            self.transposed.append(factor is not None and stores_transposed(view, d, m))
            # V = W P on the CPU's contracted path: kept as P, the products perturbing inputs
            perturbs = factor is w and stochastic.CONTRACT and not w.is_cuda
            self.layouts.append(matrix_layout(weight, w) if perturbs else None)
        self.sizes = [r * m for r, m in self.shapes]
        self._buffers: Dict[Tuple[str, int], torch.Tensor] = {}  # the residual rounds' (see _buffer)
        self.dim = sum(self.sizes)
        self.dtype, self.device = weights[0].dtype, weights[0].device

    def randn(self, count: int, gen: torch.Generator) -> torch.Tensor:
        return standard_normal((count, self.dim), gen, self.dtype, self.device)

    def residual_directions(self, count: int, gen: torch.Generator, basis: Optional[torch.Tensor],
                            mapped_basis: Optional[List[Optional[torch.Tensor]]]) -> ProbeDirections:
        """Per layer, R u for count isotropic probes g (a :class:`ProbeDraw` a layer: a wide layer's
        columns hashed, so that R g costs d r c instead of d r m flops) and u = (I - Q Q^T) g, as
        R g - (R Q)(Q^T g) with ``mapped_basis`` = R Q (per layer, (k, d, m) matrices), or u = g
        without a basis; for a layer with a layout (V = W P on rows), u itself."""
        draws = [ProbeDraw.draw(count, r, m, gen, self.dtype, self.device, hashed=f is not None)
                 for f, (r, m) in zip(self.factors, self.shapes)]  # the Hessian trace's probes cost no map
        mats = []
        for l, (d, f, (r, m), flip, layout) in enumerate(zip(draws, self.factors, self.shapes, self.transposed,
                                                             self.layouts)):
            if f is None or layout:  # P itself: the Hessian trace's (never hashed), a layout's coordinates
                mats.append(d.z if d.buckets is None else d.coordinates(out=self._buffer("coordinates", l, count, r, m)))
            else:  # F P into a kept buffer
                shape = (m, f.shape[0]) if flip else (f.shape[0], m)
                mats.append(d.mapped(f, out=self._buffer("mat", l, count, *shape), transposed=flip))
        if basis is not None:
            coef = torch.zeros((count, basis.shape[0]), dtype=self.dtype, device=self.device)  # Q^T g
            blocks = torch.split(basis, self.sizes, dim=1)
            for l, (d, (r, m), block, layout) in enumerate(zip(draws, self.shapes, blocks, self.layouts)):
                g = mats[l] if layout else \
                    d.z if d.buckets is None else d.coordinates(out=self._buffer("coordinates", l, count, r, m))
                coef.addmm_(g.reshape(count, -1), block.T)
            for mat, rq, block, flip, layout in zip(mats, mapped_basis, blocks, self.transposed, self.layouts):
                if layout:  # in coordinates
                    mat.view(count, -1).addmm_(coef, block, alpha=-1)
                    continue
                mat, rq = (mat.transpose(1, 2), rq.transpose(1, 2)) if flip else (mat, rq)  # the buffers' layout
                mat.view(count, -1).addmm_(coef, rq.reshape(rq.shape[0], -1), alpha=-1)
        return self._directions(mats)

    def _buffer(self, kind: str, layer: int, *shape: int) -> torch.Tensor:
        """A buffer kept from round to round: a fresh one's page faults cost as much as the map."""
        key = (kind, layer)
        if key not in self._buffers or tuple(self._buffers[key].shape) != shape:
            self._buffers[key] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._buffers[key]

    def to_matrices(self, p: torch.Tensor, mapped_only: bool = False) -> List[Optional[torch.Tensor]]:
        """(k, dim) -> per layer, (k, d, m): the matrices F P (P itself for the Hessian trace), views
        of contiguous (k, m, d) ones for weights stored transposed; with ``mapped_only``, None for
        the layers whose directions stay coordinates."""
        return [None if mapped_only and self.layouts[l] else self._map(l, block.reshape(p.shape[0], *self.shapes[l]))
                for l, block in enumerate(torch.split(p, self.sizes, dim=1))]

    def _map(self, l: int, coordinates: torch.Tensor) -> torch.Tensor:
        """(k, r, m) -> (k, d, m) for layer l."""
        f = self.factors[l]
        if f is None:
            return coordinates
        return (coordinates.transpose(1, 2) @ f.T).transpose(1, 2) if self.transposed[l] else f @ coordinates

    def directions(self, p: torch.Tensor, mats: List[Optional[torch.Tensor]]) -> ProbeDirections:
        """The directions R p for p (k, dim), given the layers' matrices where ``to_matrices`` formed
        them (coordinates are kept for the others)."""
        blocks = torch.split(p, self.sizes, dim=1)
        return self._directions([block.reshape(p.shape[0], *shape) if layout else mat for block, shape, layout, mat
                                 in zip(blocks, self.shapes, self.layouts, mats)])

    def _directions(self, mats: List[torch.Tensor]) -> ProbeDirections:
        """Per layer (k, d, m) matrices, or (k, m, m) coordinates for a layer with a layout."""
        return ProbeDirections([None if layout else as_weights(view, mat)
                                for mat, view, layout in zip(mats, self.views, self.layouts)],
                               [mat if layout else None for mat, layout in zip(mats, self.layouts)],
                               list(self.layouts), lambda l, coordinates: as_weights(self.views[l],
                                                                                     self._map(l, coordinates)))

    def to_weights(self, p: torch.Tensor) -> List[torch.Tensor]:
        """(k, dim) -> per layer, (k, *weight.shape) directions R p (one batched product a layer)."""
        return self.as_weights(self.to_matrices(p))

    def as_weights(self, mats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per layer (k, d, m) matrices -> (k, *weight.shape)."""
        return [as_weights(view, m) for m, view in zip(mats, self.views)]

    def from_weights(self, hv: List[torch.Tensor]) -> torch.Tensor:
        """Per layer (k, *weight.shape) -> (k, dim), the adjoint map R^T."""
        out = []
        for block, f, view in zip(hv, self.factors, self.views):
            mats = torch.vmap(view.to_matrix)(block)
            out.append((mats if f is None else f.T @ mats).reshape(block.shape[0], -1))
        return torch.cat(out, dim=1)


class _Operator:
    """p -> M p = R^T H R p for the mean loss over all the data (batches weighted by their terms,
    summed over ranks under torch.distributed), and the partial quadratic forms <p_l, (M p)_l>."""

    def __init__(self, problem: Problem, weights: List[torch.Tensor], space: _ProbeSpace):
        self.problem, self.weights, self.space, self.n = problem, weights, space, 0
        self.reached = [False] * len(weights)  # whether some batch's loss reached each weight
        self.mixed: Set[int] = set()  # layers whose weight the forward also uses besides a contracted product

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        dirs = self.space.to_weights(p)
        total = [torch.zeros_like(d) for d in dirs]
        for count, hvs in self._batches(dirs, _hvps_reached):
            for acc, rows in zip(total, hvs):
                for j, hv in enumerate(rows or ()):
                    acc[j].add_(hv, alpha=count)
        n = self._total_count(total)
        return self.space.from_weights([t / n for t in total])

    def quadratic_forms(self, directions: ProbeDirections) -> torch.Tensor:
        """Joint directions V = R p -> (k, L) float64: <p_l, (M p)_l> = <V_l, (H V)_l>, taken in
        weight space, so without the adjoint map R^T (as costly as R: a (d, d) x (d, m) product per
        probe and layer) and all-reducing k x L numbers instead of the vectors."""
        k, layers = directions.count, len(self.weights)
        total = torch.zeros(k, layers, dtype=torch.float64, device=directions.device)
        if stochastic.CONTRACT and directions.device.type != "cuda":  # the CPU's per-direction loop
            for count, forms in self._batches(directions, self._contracted_forms):
                total.add_(forms, alpha=count)
            return total / self._total_count([total])
        dirs = [directions.weight(l) for l in range(layers)]
        for count, hvs in self._batches(dirs, _hvps_reached):
            for l, (v, rows) in enumerate(zip(dirs, hvs)):
                for j, hv in enumerate(rows or ()):
                    # in place (the product is ours), a cascade sum in the weight's dtype (with
                    # dtype=float64 it would copy the product first), accumulated in float64
                    total[j, l] += hv.mul_(v[j]).sum().double() * count
        return total / self._total_count([total])

    def _contracted_forms(self, problem: Problem, weights: List[torch.Tensor], x, y, dirs: ProbeDirections):
        return stochastic.contracted_quadratic_forms(problem, weights, x, y, dirs, self.mixed)

    def _batches(self, dirs, per_batch):
        """(terms, result) for each batch with terms, ``per_batch(problem, weights, x, y, dirs)``
        returning (result, whether the batch's loss reached each layer); counts the terms in self.n."""
        self.n = 0
        for x, y in self.problem.batches():
            count = self.problem.count(y)
            if count:
                self.n += count
                result, reached = per_batch(self.problem, self.weights, x, y, dirs)
                self.reached = [r or now for r, now in zip(self.reached, reached)]
                yield count, result

    def _total_count(self, sums: List[torch.Tensor]) -> int:
        """The number of terms over all ranks, all-reducing ``sums`` in place on the way."""
        if self.problem.distributed:
            count_t = torch.tensor(float(self.n), dtype=torch.float64, device=sums[0].device)
            dist.all_reduce_sum([*sums, count_t])
            self.n = int(count_t.item())
        return self.n


def _hvps_reached(problem: Problem, weights: List[torch.Tensor], x, y, dirs: List[torch.Tensor]):
    hvs = _batch_hvps(problem, weights, x, y, dirs)
    return hvs, [rows is not None for rows in hvs]


def _batch_hvps(problem: Problem, weights: List[torch.Tensor], x, y, dirs: List[torch.Tensor],
                batched: Optional[bool] = None) -> List[Optional[List[torch.Tensor]]]:
    """Per layer, the k products H_b V_j (each weight-shaped) for the k joint directions
    V_j = (dirs[0][j], ...), H_b the Hessian of the batch's mean loss; an empty list for a weight
    the loss is linear in, None for one it does not reach through autograd. A list, not a stacked
    tensor: the callers consume them one by one.
    ``batched`` (default: on CUDA) runs blocks of directions through one vmap'd backward pass,
    falling back to one pass per direction where an op has no batching rule."""
    global _BATCHED_OK
    batched = dirs[0].is_cuda if batched is None else batched
    loss = problem.loss
    with torch.enable_grad(), double_backward_kernels(problem.model):
        out = problem.forward(x)
        loss.check(out, y)
        value = loss.for_derivatives(out, y)
        grads = torch.autograd.grad(value, weights, create_graph=True, allow_unused=True) if value.requires_grad \
            else [None] * len(weights)
        live = [l for l, g in enumerate(grads) if g is not None and g.requires_grad]
        # None: the loss does not reach the weight; []: it is linear in it (both contribute zeros)
        result: List[Optional[List[torch.Tensor]]] = [None if g is None else [] for g in grads]
        if not live:
            return result
        rows = [[] for _ in live]
        k = dirs[0].shape[0]
        if batched and _BATCHED_OK:
            try:
                for j0 in range(0, k, BATCHED_DIRECTIONS):
                    hv = torch.autograd.grad([grads[l] for l in live], [weights[l] for l in live],
                                             grad_outputs=[dirs[l][j0:j0 + BATCHED_DIRECTIONS] for l in live],
                                             retain_graph=True, allow_unused=True, is_grads_batched=True)
                    for r, (l, h) in enumerate(zip(live, hv)):
                        block = min(BATCHED_DIRECTIONS, k - j0)
                        rows[r].extend(torch.zeros((block, *weights[l].shape), dtype=weights[l].dtype,
                                                   device=weights[l].device) if h is None else h.detach())
                k = 0  # done
            except RuntimeError as exc:
                _BATCHED_OK = False
                rows = [[] for _ in live]
                warnings.warn(f"relflat_ext: batched Hessian-vector products failed ({exc}); falling back to one "
                              "backward pass per direction (same result, slower)", RuntimeWarning)
        for j in range(k):
            hv = torch.autograd.grad([grads[l] for l in live], [weights[l] for l in live],
                                     grad_outputs=[dirs[l][j] for l in live], retain_graph=True, allow_unused=True)
            for r, (l, h) in enumerate(zip(live, hv)):
                rows[r].append(torch.zeros_like(weights[l]) if h is None else h.detach())
    for r, l in enumerate(live):
        result[l] = rows[r]
    return result
