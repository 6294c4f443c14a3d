"""Feature robustness (Petzka et al., Definition 1) by Monte Carlo, and Theorem 5's prediction.

``E_F(A) = (1/n) sum_i [ l(psi((I + A) phi_i), y_i) - l(f(x_i), y_i) ]`` with labels kept, for
``A = delta * U``: ``U`` Haar-orthogonal ("orthogonal") or i.i.d. ``N(0, 1/m)`` ("gaussian").
Both have ``E[U_ab U_cd] = [a=c][b=d] / m``, so ``E_U[E_F] = delta^2/(2m) kappa_Tr + O(delta^3)``
(Theorem 5). Away from an exact minimum the first-order term ``delta <grad, W U>`` has zero mean
but a standard deviation of order delta, which swamps the delta^2 signal; antithetic pairs
``(U, -U)`` cancel it (and every odd order) exactly, so they are on by default. For per-sample
feature vectors each ``U phi_i`` is drawn in law (:class:`_VectorDraws`); tokens, and layers
perturbed through the weight, take a matrix per draw (:class:`_Draws`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..core import dist
from ..core.data import batch_length, is_dict_batch, model_arguments, output_logits, repeat_rows
from ..core.hooks import not_called, preserved, tapped
from ..core.layers import LayerSpec, ParameterLayer, WeightView, acts_on_vectors, matrix_view
from ..core.losses import Loss, LossSpec
from ..core.modes import measurement
from ..core.progress import ProgressLine
from ..flatness import Problem, relative_flatness
from ..flatness import tail as _tail
from ..flatness.accumulator import NotFinite, explain_not_finite
from ..flatness.result import estimate_text

DISTRIBUTIONS = ("orthogonal", "gaussian")
# Rows (perturbed copies x samples) pushed through the model in one forward pass.
MAX_ROWS_PER_FORWARD = 1 << 15
MAX_OUTPUT_ELEMENTS_PER_FORWARD = 1 << 26  # 256 MiB of float32 outputs (an LM head's vocabulary)


@dataclasses.dataclass(repr=False)
class FeatureRobustnessResult:
    """value: mean of E_F over the perturbation draws (each an antithetic pair average when
    ``antithetic``); stderr: its standard error; predicted: ``delta^2/(2m) kappa_Tr`` (Theorem 5);
    samples (n_samples,): the per-draw estimates; n: the terms the loss averages (samples, or the
    counted tokens of token targets, as relative_flatness counts them); kappa_stderr: the standard
    error of kappa where it was estimated (``predicted``'s is ``delta^2/(2m)`` times it)."""
    delta: float
    value: float
    stderr: float
    predicted: float
    kappa: float
    samples: torch.Tensor
    distribution: str
    antithetic: bool
    n: int
    m: int
    layer: str
    kappa_stderr: Optional[float] = None

    def __repr__(self) -> str:
        scale = self.delta ** 2 / (2 * self.m)
        predicted_stderr = None if self.kappa_stderr is None else scale * self.kappa_stderr
        return (f"FeatureRobustnessResult(layer={self.layer!r}, delta={self.delta:.3g}, "
                f"value={estimate_text(self.value, self.stderr)}, "
                f"predicted={estimate_text(self.predicted, predicted_stderr)} (delta^2/(2m) kappa, "
                f"kappa={estimate_text(self.kappa, self.kappa_stderr)}), draws={self.samples.numel()} "
                f"{self.distribution}{' antithetic' if self.antithetic else ''}, n={self.n}, m={self.m})")


def random_perturbations(count: int, m: int, distribution: str, generator: torch.Generator,
                         dtype: torch.dtype, device) -> torch.Tensor:
    """``count`` matrices (count, m, m): Haar-orthogonal (QR of a Gaussian matrix with the signs of
    R's diagonal folded in, which makes Q exactly Haar) or i.i.d. N(0, 1/m) entries."""
    g = torch.randn((count, m, m), generator=generator, dtype=dtype, device=device)
    if distribution == "gaussian":
        return g / math.sqrt(m)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)


class _Draws:
    """The n_samples perturbation matrices, drawn in fixed blocks of DRAW_BLOCK from seeds that
    depend only on the block (so every data batch, whatever its size, sees the same matrices, on
    every rank), kept in memory when they fit in CACHE_BYTES and redrawn otherwise."""
    DRAW_BLOCK = 16
    CACHE_BYTES = 256 << 20
    BLOCK_BYTES = 2 << 30  # a wider layer (an embedding of a large vocabulary) gets an error, not an OOM

    def __init__(self, n_samples, m, distribution, seed, dtype, device, layer):
        self.n_samples, self.m, self.distribution, self.seed = n_samples, m, distribution, seed
        self.dtype, self.device, self.layer = dtype, device, layer
        self.cache = {} if n_samples * m * m * torch.finfo(dtype).bits // 8 <= self.CACHE_BYTES else None

    def _block(self, j: int) -> torch.Tensor:
        if self.cache is not None and j in self.cache:
            return self.cache[j]
        gen = torch.Generator(device=self.device).manual_seed(self.seed + j)
        count = min(self.DRAW_BLOCK, self.n_samples - j * self.DRAW_BLOCK)
        need = count * self.m * self.m * torch.finfo(self.dtype).bits // 8
        if need > self.BLOCK_BYTES:
            raise ValueError(f"feature robustness of layer {self.layer!r} perturbs its m = {self.m} features with "
                             f"(m, m) matrices, {need / 2**30:.1f} GiB for a block of {count} draws (at most "
                             f"{self.BLOCK_BYTES / 2**30:.0f} GiB): too wide for this measurement (only an "
                             "nn.Linear given one feature vector per sample is perturbed vector by vector); its "
                             "kappa, and with it Theorem 5's prediction delta^2/(2m) kappa, come from "
                             "relative_flatness")
        mats = random_perturbations(count, self.m, self.distribution, gen, self.dtype, self.device)
        if self.cache is not None:
            self.cache[j] = mats
        return mats

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Draws [start, stop) as (stop - start, m, m)."""
        blocks = range(start // self.DRAW_BLOCK, (stop - 1) // self.DRAW_BLOCK + 1)
        mats = torch.cat([self._block(j) for j in blocks])
        offset = blocks[0] * self.DRAW_BLOCK
        return mats[start - offset:stop - offset]


class _VectorDraws:
    """Per feature vector, what ``U phi`` is in law, drawn directly: for Haar-orthogonal U a uniform
    direction of length ||phi||, for i.i.d. N(0, 1/m) entries ``N(0, ||phi||^2 / m I)``. E_F is a
    mean over the samples of expectations over U, each depending on U only through ``U phi_i``, so
    independent draws per vector have the same expectation as one matrix for all (and, measured on
    a trained MLP's three layers, standard errors 0.9-2.7x smaller), at n m random numbers a draw
    instead of m^2 (and an m^3 QR): what makes wide layers (a CNN's first fully connected layer, m
    in the thousands) feasible. Seeded by draw and by block of vectors (rows of the data, counted
    over the batches), so any batching gives the same draws. Blocks of 32 rows: a batch smaller
    than a block draws all of it (a DataLoader of 16 samples, m = 5408, 32 draws: 5.9 s with
    blocks of 256, 1.1 s now), and a generator per block costs about 4 us (0.4 s more for 50000
    samples and 64 draws in one batch)."""
    ROWS = 32

    def __init__(self, m, distribution, seed, dtype, device):
        self.m, self.distribution, self.seed, self.dtype, self.device = m, distribution, seed, dtype, device

    def _block(self, j: int, b: int) -> torch.Tensor:
        seed = (self.seed * 0x9E3779B1 + (j + 1) * 0x85EBCA77 + b) % (1 << 63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn((self.ROWS, self.m), generator=gen, dtype=self.dtype, device=self.device)

    def get(self, start: int, stop: int, phi: torch.Tensor, row0: int) -> torch.Tensor:
        """``U_j phi_i`` in law (stop - start, rows, m) for draws [start, stop) and the feature
        vectors phi (rows, m), which are rows [row0, row0 + rows) of the data."""
        rows = phi.shape[0]
        blocks = range(row0 // self.ROWS, (row0 + rows - 1) // self.ROWS + 1)
        offset = row0 - blocks[0] * self.ROWS
        g = torch.stack([torch.cat([self._block(j, b) for b in blocks])[offset:offset + rows]
                         for j in range(start, stop)])
        norms = phi.norm(dim=1, keepdim=True)
        if self.distribution == "gaussian":
            return g * (norms / math.sqrt(self.m))
        return g * (norms / g.norm(dim=2, keepdim=True))


def _per_sample_losses(loss: Loss, out: torch.Tensor, y: torch.Tensor, copies: int) -> torch.Tensor:
    """Per-sample losses (copies, n) of ``out`` (copies * n, ...) against y (n, ...) repeated."""
    n = y.shape[0]
    if not loss.builtin:  # a callable gives only the batch mean: one call per copy
        return torch.stack([loss.per_sample(_copy(out, c, copies, n), y) for c in range(copies)])
    # float64 losses of float32 outputs: E_F at small delta (1e-9 of a loss near 0.1 for a layer of
    # small kappa) lies far below float32's resolution of a loss; rounding the losses biased it
    # (a BERT query projection at delta = 0.01: -0.0024 +- 0.0005 against kappa 0.001).
    return loss.per_sample_float64(out, y.repeat(copies, *([1] * (y.dim() - 1)))).reshape(copies, n)


def _copies_per_forward(out, n: int, n_scales: int) -> int:
    """How many draws' perturbed copies (n_scales each) one forward pass takes: bounded by the
    output's rows (samples, or tokens) and by its elements (an LM head's vocabulary), of its
    largest tensor where it is a tuple or dict."""
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() > 1]
    rows = max([t.shape[:-1].numel() for t in tensors], default=n)
    elements = max([t.numel() for t in tensors], default=n)
    return max(1, min(MAX_ROWS_PER_FORWARD // (rows * n_scales),
                      MAX_OUTPUT_ELEMENTS_PER_FORWARD // (elements * n_scales)))


def _copy(out, c: int, copies: int, n: int):
    """Copy ``c`` of an output over the batch repeated ``copies`` times: of every tensor in it
    (a tuple or dict the callable loss picks from) whose first dim is copies * n."""
    def take(t):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == copies * n:
            return t.reshape(copies, n, *t.shape[1:])[c]
        return t
    return pytree.tree_map(take, out)


def _forward_with_features(problem: Problem, lin: nn.Linear, plan: Optional[_tail.TailPlan], x):
    """(the model's output on the batch, the layer's input features, whether ``plan``'s tail
    reproduces the output from them: False without a plan, or for a traced tail that does not)."""
    with tapped(lin, problem.name, replace_output=False, copy_output=plan is not None and plan.traced) as tap:
        out = problem.forward(x)
    if plan is None:
        return out, tap.input, False
    return out, tap.input, not plan.traced or _tail.reproduces(plan.run(tap.output), out)


def _perturbed_model_outputs(problem: Problem, lin: nn.Linear, name: str, x, copies: int,
                             change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The model on the batch repeated ``copies`` times, a forward pre-hook adding ``change(flat)``
    to the layer's input ``flat`` (copies, rows, m), in one pass."""
    calls = []

    def perturb(module, args):
        calls.append(1)
        phi = args[0]
        flat = phi.reshape(copies, -1, phi.shape[-1])
        return (flat + change(flat)).reshape(phi.shape), *args[1:]

    handle = lin.register_forward_pre_hook(perturb)
    try:
        outputs = problem.forward(repeat_rows(x, copies))
    finally:
        handle.remove()
    if not calls:  # no perturbation happened: E_F would be 0 without a word
        raise not_called(name, "feature robustness")
    return outputs


def _perturbed_weight_outputs(problem: Problem, parameter: str, view: WeightView, x, a_t: torch.Tensor
                              ) -> torch.Tensor:
    """The model on the batch once per matrix of ``a_t`` (copies, m, m), with the layer's W (d, m)
    replaced by ``W + W a_t[c]^T = W (I + A_c)``: exactly every feature vector the weight multiplies
    (a convolution's patches, each token, a recurrent step's state) perturbed as
    ``phi -> (I + A_c) phi``. One forward pass per copy (through ``functional_call``), concatenated
    as the repeated batch's outputs."""
    model = problem.model  # a compiled model's module: the wrapper would recompile for every new weight
    w = view.to_matrix(dict(model.named_parameters())[parameter])
    outputs = []
    for a in a_t:
        weights = {parameter: view.from_matrix(w + w @ a.T)}
        outputs.append(output_logits(torch.func.functional_call(
            model, weights, kwargs=model_arguments(model, x)) if is_dict_batch(x) else
            torch.func.functional_call(model, weights, (x,)), model))
    return torch.cat(outputs)


def _check_deltas(delta) -> List[float]:
    deltas = [delta] if isinstance(delta, (int, float)) else list(delta)
    if not deltas or not all(isinstance(d, (int, float)) and math.isfinite(d) and d > 0 for d in deltas):
        raise ValueError(f"delta must be a positive number or a non-empty list of them, got {delta!r}")
    return [float(d) for d in deltas]


@measurement
def feature_robustness(model: nn.Module, layer: LayerSpec, inputs, targets: Optional[torch.Tensor] = None, *,
                       delta: Union[float, Sequence[float]] = 0.01, loss: Optional[LossSpec] = None,
                       distribution: str = "orthogonal", n_samples: int = 64, antithetic: bool = True,
                       seed: Optional[int] = None, batch_size: Optional[int] = None,
                       kappa: Optional[float] = None, distributed: Optional[bool] = None,
                       progress: bool = False) -> Union[FeatureRobustnessResult, List[FeatureRobustnessResult]]:
    """Monte Carlo feature robustness of ``layer``'s input features, with Theorem 5's prediction.

    Perturbs the features entering ``layer`` as ``phi -> (I + delta U) phi`` with labels kept, for
    ``n_samples`` draws of U (each also at -U when ``antithetic``). For an ``nn.Linear`` (or
    Conv1D) this is batched: the data batch is repeated once per draw (and sign and delta) and
    pushed through the model in one forward pass (or only through the tail after the layer),
    each copy's matrix applied with one batched matmul. For any other layer kappa measures (a
    convolution's patches, a transposed convolution, a weight matrix named as a parameter) the
    same perturbation of every vector the weight multiplies is ``W -> W (I + delta U)`` in the
    (d, m) view kappa uses: one forward pass per copy. The built-in losses of float32 outputs are
    taken in float64: at small delta E_F lies below float32's resolution of a loss (a callable
    loss computes in its own precision).
    delta: a float, or a list (one result per value, all from the same draws). The same draws
    serve every data batch, so a DataLoader (re-iterable) or tensors with ``batch_size`` stream.
    kappa: kappa_Tr if already known (else computed with :func:`relative_flatness`) for
    ``predicted = delta^2/(2m) kappa``. Under torch.distributed every rank draws the same matrices
    and the sums over the shards are all-reduced. progress: a line on stderr counting the draws
    done over the data batches (minutes for large models, where each copy is a forward pass). The
    model is left exactly as it was.
    """
    problem = Problem.build(model, layer, inputs, targets, loss, batch_size, distributed)
    deltas = _check_deltas(delta)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a standard error needs two), got {n_samples!r}")
    user_model, model = model, problem.model  # a float32 copy for a half-precision model
    name, lin = problem.name, problem.module
    # Else perturbed through the weight, W -> W (I + A): also for a weight held in several places,
    # whose every use kappa counts (a hook on one module would perturb one use).
    features_seen = acts_on_vectors(lin) and problem.weight_uses == 1 and problem.weight_calls() == 1
    view = matrix_view(lin, name)
    parameter = name if isinstance(lin, ParameterLayer) else f"{name}.weight"
    m = view.to_matrix(lin.weight).shape[1]
    dtype, device = lin.weight.dtype, lin.weight.device
    signs = [1.0, -1.0] if antithetic else [1.0]
    scales = torch.tensor([d * s for d in deltas for s in signs], dtype=dtype, device=device)  # (S,)
    n_scales = scales.numel()
    if problem.distributed:
        base_seed = dist.shared_seed(seed, device)
    else:
        base_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)

    draws = _Draws(n_samples, m, distribution, base_seed, dtype, device, name)
    vector_draws = _VectorDraws(m, distribution, base_seed, dtype, device)
    sums = torch.zeros((n_scales, n_samples), dtype=torch.float64, device=device)
    n = 0
    with preserved(model), torch.no_grad():
        # Where the rest of the model is a tail of Linear and elementwise steps (a Sequential, or a
        # trace checked against the model), the perturbed copies run only that tail from the
        # features of one forward pass; otherwise the whole model runs on the repeated batch.
        plan = _tail.plan(model, name, lin, final_log_softmax=True, tracer=problem.traced_graph) \
            if features_seen else None
        report = ProgressLine(f"feature robustness of {name!r}", "draws x batches") if progress else None
        total = n_samples * problem.batch_count() if problem.batch_count() else None
        # Feature vectors of the batches (and ranks) before: where each batch's vector draws start.
        rows_seen = dist.row_offset(problem.sample_count(), device) if problem.distributed else 0
        for x, y in problem.batches():
            n_b = batch_length(x)
            phi, tail = None, False
            if features_seen:
                out, phi, tail = _forward_with_features(problem, lin, plan, x)
                if plan is not None and not tail:
                    warnings.warn(f"relflat_ext: the traced tail of layer {name!r} does not reproduce the "
                                  "model's output; running the whole model per perturbation (same result, "
                                  "slower)", RuntimeWarning)
                    plan = None
            else:
                out = problem.forward(x)
            # A vector per sample: per-sample draws. Tokens, or rows several per sample (a model that
            # flattens its tokens), keep one matrix a copy: a sample's loss depends on its rows jointly.
            vectors = phi is not None and phi.dim() == 2 and phi.shape[0] == n_b
            problem.loss.check(out, y)
            base = _per_sample_losses(problem.loss, out, y, 1)[0]  # (n_b,)
            per_forward = _copies_per_forward(out, n_b, n_scales)
            for d0 in range(0, n_samples, per_forward):
                k = min(per_forward, n_samples - d0)
                copies = n_scales * k  # copy order: scale-major, then draw: A = scales[s] * U_j
                if vectors:
                    u = vector_draws.get(d0, d0 + k, phi, rows_seen)  # (k, rows, m)
                    shifts = (scales[:, None, None, None] * u[None]).reshape(copies, *phi.shape)
                    if tail:
                        outputs = plan.run(lin((phi[None] + shifts).reshape(-1, m)), keep_input=False)
                    else:
                        outputs = _perturbed_model_outputs(problem, lin, name, x, copies, lambda flat: shifts)
                else:
                    mats = draws.get(d0, d0 + k)  # (k, m, m), the same matrices for every batch
                    a_t = (scales[:, None, None, None] * mats.transpose(1, 2)[None]).reshape(-1, m, m)
                    if tail:
                        flat = phi.reshape(1, -1, m)
                        perturbed = (flat + torch.matmul(flat, a_t)).reshape(-1, *phi.shape[1:])
                        outputs = plan.run(lin(perturbed), keep_input=False)
                    elif features_seen:
                        outputs = _perturbed_model_outputs(problem, lin, name, x, copies,
                                                           lambda flat: torch.bmm(flat, a_t))
                    else:
                        outputs = _perturbed_weight_outputs(problem, parameter, view, x, a_t)
                pert = _per_sample_losses(problem.loss, outputs, y, copies)  # (copies, n_b)
                diff = (pert - base).sum(1).double().reshape(n_scales, k) * problem.positions(y)
                sums[:, d0:d0 + k] += diff
                if report:
                    report(report.state[0] + k, total)
            n += problem.count(y)  # samples, or counted tokens: E_F is a change of the mean loss
            rows_seen += phi.shape[0] if vectors else 0
        if report:
            report.close()
    if problem.distributed:
        count = torch.tensor(float(n), dtype=torch.float64, device=device)
        dist.all_reduce_sum([sums, count])
        n = int(count.item())
    kappa_stderr = None
    if kappa is None:
        measured = relative_flatness(user_model, name, inputs, targets, loss=loss, batch_size=batch_size,
                                     block_trace=False, seed=seed, distributed=problem.distributed)
        kappa, kappa_stderr = measured.kappa, measured.kappa_stderr
    if not bool(torch.isfinite(sums).all()):
        with explain_not_finite(dtype, problem.tensors, problem.check_outputs_finite):
            raise NotFinite("the perturbed losses are not finite")
    per_draw = (sums / n).reshape(len(deltas), len(signs), n_samples).mean(1)  # pair averages
    results = []
    for j, d in enumerate(deltas):
        draws = per_draw[j].to(dtype)
        results.append(FeatureRobustnessResult(
            delta=d, value=float(draws.mean()), stderr=float(draws.std() / math.sqrt(n_samples)),
            predicted=d * d / (2 * m) * kappa, kappa=kappa, samples=draws, distribution=distribution,
            antithetic=antithetic, n=n, m=m, layer=name, kappa_stderr=kappa_stderr))
    return results[0] if isinstance(delta, (int, float)) else results
