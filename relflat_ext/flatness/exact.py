"""The exact path for any ``nn.Linear`` layer on (n, m) features: per-sample output Hessians
``Hz_i``, by the second-order chain rule through a tail of Linear and elementwise steps
(:mod:`.chain_rule`, where :mod:`.tail` finds one), else by batched Hessian-vector products with
respect to the layer output through the rest of the model (d probes, or the m columns of W
when m < d and neither the block traces nor lmax are asked)."""
from __future__ import annotations

import time
import warnings
from typing import Optional, Tuple

import torch

from .. import ops
from ..core.data import batch_length, take_rows
from ..core.hooks import NotVectorFeatures, preserved, tapped
from ..core.hvp import check_reached, double_backward_kernels, hessian_vector_products
from ..core.progress import ProgressLine
from . import chain_rule, tail as _tail
from .accumulator import Accumulator, explain_not_finite
from .closed_form import TOKENS_NOTE, counted_rows, has_token_targets, output_dim, prefix_features
from .normalization import inverse_scale, scale_over_data
from .problem import Options, Problem
from .result import FlatnessResult

# Elements of the (probes, samples, d) Hessian-vector-product block held at once: larger blocks
# are memory-bound and meet vmap's slow per-probe fallback (bench/RESULTS.md, "exact path").
HVP_BLOCK_ELEMENTS = 1 << 18
# On CPU, sub-batches of this many (samples x d) elements, which stay cache-resident.
EXACT_CPU_CHUNK_ELEMENTS = 1 << 19


def run(problem: Problem, options: Options, plan: Optional[_tail.TailPlan], reason: str) -> FlatnessResult:
    start = time.perf_counter()
    lin = problem.module
    scale = scale_over_data(problem) if options.normalize_features else None
    w = problem.matrix.detach() if scale is None else problem.matrix.detach() * scale
    acc = Accumulator(w, options.block_trace, options.lmax, problem.distributed)
    report = ProgressLine(f"exact kappa of {problem.name!r}") if options.progress and plan is None else None
    # The normalized kappa from the same products: the output Hessians do not depend on the scale.
    normalized = None
    if options.normalized_too and scale is None and plan is None:
        try:
            normalized_scale = scale_over_data(problem)
            normalized = (Accumulator(w * normalized_scale, False, False, problem.distributed), normalized_scale)
        except ValueError:  # no per-sample feature vectors: the products below say so, for the caller's fallback
            pass
    with preserved(problem.model), explain_not_finite(lin.weight.dtype, problem.tensors, problem.check_outputs_finite):
        tokens, reached, counted = False, plan is not None, False
        for x, y in problem.batches():
            tokens = tokens or has_token_targets(problem.loss, y)
            if plan is not None:
                plan.check_log_softmax(problem.name, output_dim(y))
            if plan is not None and not _chain_rule_batch(acc, problem, plan, x, y, w, scale):
                warnings.warn(f"relflat_ext: the traced tail of layer {problem.name!r} does not reproduce the "
                              "model's output; using Hessian-vector products (same result, slower)", RuntimeWarning)
                plan, reason = None, "exact: Hessian-vector products through the model's tail"
            if plan is None:
                # Samples are independent, so splitting the batch is exact.
                n_x = batch_length(x)
                step = max(1, EXACT_CPU_CHUNK_ELEMENTS // w.shape[0]) if w.device.type == "cpu" else n_x
                for s in range(0, n_x, step):
                    chunk_reached = _hvp_chunk(acc, problem, take_rows(x, slice(s, s + step)), y[s:s + step], w,
                                               scale, report, normalized)
                    counted |= chunk_reached is not None
                    reached |= bool(chunk_reached)
        # No counted term at all (every label -100) is not evidence either way: the count's error follows.
        check_reached([reached or not counted], [problem.name], problem.distributed, w.device)
        result = acc.result("exact", problem.name, scale, start)
        if normalized is not None:
            result.kappa_normalized = normalized[0].result("exact", problem.name, normalized[1], start).kappa
    if report:
        report.close()
    result.reason = reason + (TOKENS_NOTE if tokens else "")
    return result


def _chain_rule_batch(acc: Accumulator, problem: Problem, plan: _tail.TailPlan, x, y, w: torch.Tensor,
                      scale: Optional[torch.Tensor]) -> bool:
    """Adds the batch by the chain rule; False, with nothing added, if a traced tail does not
    reproduce the model's output."""
    name, lin = problem.name, problem.module
    with torch.no_grad():
        if plan.traced:
            with tapped(lin, name, replace_output=False, copy_output=True) as tap:
                out = problem.forward(x)
            phi, z = tap.sample_features(y), tap.output
            if not _tail.reproduces(plan.run(z), out):
                return False
            z = z.reshape(phi.shape[0], -1)  # tokens as samples: the tail is Linear and elementwise steps
        else:
            phi = prefix_features(plan, name, x, y)
            z = lin(phi)
    y, phi, z = counted_rows(problem.loss, y, phi, z)
    problem.loss.check_targets(y, (z.shape[0], chain_rule.out_features(plan.tail, z.shape[1])))
    phi = phi if scale is None else phi * inverse_scale(scale)
    total, hdiag = chain_rule.output_hessian_sums(plan.tail, z, y, problem.loss, phi.pow(2).sum(1),
                                                  acc.diag_blocks is not None)
    acc.n += z.shape[0]
    acc.kappa_sum = acc.kappa_sum + (acc.gram * total).sum()
    if acc.block is not None:
        acc.block += total
    if hdiag is not None:
        acc.add_diagonal(hdiag, phi)
    return True


def check_token_wise(name: str, out: torch.Tensor, z: torch.Tensor) -> None:
    """Tokens are samples for the per-sample identity only if the model maps each token's layer
    output to that token's output alone (an LM head, a last MLP block; no attention after the
    layer). Checked on the batch by two vector-Jacobian products: for a block-diagonal Jacobian,
    flipping the signs of some tokens' cotangents flips the same tokens' gradients and nothing else."""
    if tuple(out.shape[:z.dim() - 1]) != tuple(z.shape[:-1]):
        raise NotVectorFeatures(f"layer {name!r} has token outputs {tuple(z.shape)} but the model's output is "
                                f"{tuple(out.shape)}: tokens are not samples; use method='stochastic' (or 'auto')")
    gen = torch.Generator(device=out.device).manual_seed(0)
    u = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
    flip = torch.randint(0, 2, z.shape[:-1] + (1,), generator=gen, device=out.device).to(out.dtype) * 2 - 1
    g1, = torch.autograd.grad(out, z, u, retain_graph=True, allow_unused=True)
    g2, = torch.autograd.grad(out, z, u * flip.reshape(flip.shape + (1,) * (out.dim() - z.dim())),
                              retain_graph=True, allow_unused=True)
    if g1 is None or g2 is None:
        return
    tol = 1e-5 if out.dtype == torch.float64 else 1e-3
    if float((g2 - g1 * flip).norm()) > tol * float(g1.norm()):
        raise NotVectorFeatures(f"layer {name!r} feeds a part of the model that mixes tokens (attention after the "
                                "layer): tokens are not independent samples; use method='stochastic' (or 'auto')")


def _hvp_chunk(acc: Accumulator, problem: Problem, x, y, w: torch.Tensor, scale: Optional[torch.Tensor],
               report: Optional[ProgressLine] = None,
               normalized: Optional[Tuple[Accumulator, torch.Tensor]] = None) -> Optional[bool]:
    """Adds the chunk's samples to ``acc`` (and, given ``normalized`` = (accumulator, Theorem 4's
    scale s), to the normalized kappa's sums from the same products: the features become phi / s
    and the weight W diag(s); a product along W's column k becomes s_k times itself). False where
    the chunk's loss does not reach the layer's output through autograd (its terms are then 0),
    None where the chunk has no counted term."""
    loss = problem.loss
    n_b = problem.count(y)  # terms of the batch mean: samples, or counted tokens
    if n_b == 0:
        return None
    with tapped(problem.module, problem.name, replace_output=True) as tap, torch.enable_grad(), \
            double_backward_kernels(problem.model):
        out = problem.forward(x)
        loss.check(out, y)
        batch_loss = loss.for_derivatives(out, y)
        z = tap.output
        phi = tap.sample_features(y)
        if z.dim() > 2:
            check_token_wise(problem.name, out, z)
        # Not reached (a .detach() or torch.no_grad() after the layer): no grad_fn to differentiate.
        grad_z = torch.autograd.grad(batch_loss, z, create_graph=True, allow_unused=True)[0] \
            if batch_loss.requires_grad else None
    if grad_z is None:
        acc.n += n_b
        if normalized is not None:
            normalized[0].n += n_b
        return False
    phi = phi if scale is None else phi * inverse_scale(scale)
    d, m = w.shape
    # Batch mean loss: d^2 E_b / dz_i^2 = Hz_i / n_b, so the weights carry the factor n_b.
    # Rows whose term does not count (ignored tokens) get Hz_i = 0 from the products themselves.
    sq_norms = phi.pow(2).sum(1) * n_b
    acc.n += n_b
    if normalized is not None:
        acc_n, s_n = normalized
        sq_norms_n = (phi * inverse_scale(s_n)).pow(2).sum(1) * n_b
        acc_n.n += n_b
    if not grad_z.requires_grad:  # loss linear in z: Hz = 0, nothing to add
        return True
    use_weight_probes = m < d and acc.block is None and acc.diag_blocks is None
    probe_dirs = w if use_weight_probes else torch.eye(d, dtype=w.dtype, device=w.device)
    num_probes = probe_dirs.shape[1]
    rows = phi.shape[0]
    k_block = max(1, min(num_probes, HVP_BLOCK_ELEMENTS // max(1, rows * d)))
    hdiag = phi.new_empty((rows, d)) if acc.diag_blocks is not None else None
    for c0 in range(0, num_probes, k_block):
        cols = slice(c0, min(c0 + k_block, num_probes))
        dirs = probe_dirs[:, cols].T  # (k, d)
        probes = dirs.reshape(-1, *[1] * (z.dim() - 1), d).expand(-1, *z.shape)
        hz = hessian_vector_products(grad_z, z, probes).reshape(dirs.shape[0], -1, d).permute(1, 2, 0)  # (rows, d, k)
        gram_cols = w[:, cols] if use_weight_probes else acc.gram[:, cols]
        per_sample, block = ops.contract_output_hessians(sq_norms, hz, gram_cols, acc.block is not None)
        acc.kappa_sum = acc.kappa_sum + per_sample.sum()
        if normalized is not None:
            cols_n = w[:, cols] * s_n[cols].pow(2) if use_weight_probes else acc_n.gram[:, cols]
            acc_n.kappa_sum = acc_n.kappa_sum + ops.contract_output_hessians(sq_norms_n, hz, cols_n, False)[0].sum()
        if acc.block is not None:
            acc.block[:, cols] += block
        if hdiag is not None:
            idx = torch.arange(cols.start, cols.stop, device=hz.device)
            hdiag[:, cols] = hz[:, idx, idx - cols.start] * n_b
        if report:
            report.add(dirs.shape[0], note=f"{acc.n} samples so far")
    if hdiag is not None:
        acc.add_diagonal(hdiag, phi)
    return True
