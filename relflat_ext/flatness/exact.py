"""The exact path for any ``nn.Linear`` layer on (n, m) features: per-sample output Hessians
``Hz_i``, by the second-order chain rule through a tail of Linear and elementwise steps
(:mod:`.chain_rule`, where :mod:`.tail` finds one), else by batched Hessian-vector products with
respect to the layer output through the rest of the model (d probes, or the m columns of W
when m < d and neither the block traces nor lmax are asked)."""
from __future__ import annotations

import time
import warnings
from typing import Optional

import torch

from .. import ops
from ..core.hooks import preserved, tapped
from ..core.hvp import differentiable_attention, hessian_vector_products
from . import chain_rule, tail as _tail
from .accumulator import Accumulator, explain_not_finite
from .closed_form import prefix_features
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
    w = lin.weight.detach() if scale is None else lin.weight.detach() * scale
    acc = Accumulator(w, options.block_trace, options.lmax, problem.distributed)
    with preserved(problem.model), explain_not_finite(lin.weight.dtype, problem.tensors):
        for x, y in problem.batches():
            if plan is not None and not _chain_rule_batch(acc, problem, plan, x, y, w, scale):
                warnings.warn(f"relflat_ext: the traced tail of layer {problem.name!r} does not reproduce the "
                              "model's output; using Hessian-vector products (same result, slower)", RuntimeWarning)
                plan, reason = None, "exact: Hessian-vector products through the model's tail"
            if plan is None:
                # Samples are independent, so splitting the batch is exact.
                step = max(1, EXACT_CPU_CHUNK_ELEMENTS // w.shape[0]) if x.device.type == "cpu" else x.shape[0]
                for s in range(0, x.shape[0], step):
                    _hvp_chunk(acc, problem, x[s:s + step], y[s:s + step], w, scale)
        result = acc.result("exact", problem.name, scale, start)
    result.reason = reason
    return result


def _chain_rule_batch(acc: Accumulator, problem: Problem, plan: _tail.TailPlan, x, y, w: torch.Tensor,
                      scale: Optional[torch.Tensor]) -> bool:
    """Adds the batch by the chain rule; False, with nothing added, if a traced tail does not
    reproduce the model's output."""
    name, lin = problem.name, problem.module
    with torch.no_grad():
        if plan.traced:
            with tapped(lin, name, replace_output=False) as tap:
                out = problem.model(x)
            phi, z = tap.features, tap.output
            if not _tail.reproduces(chain_rule.run_tail(plan.tail, z), out):
                return False
        else:
            phi = prefix_features(plan, name, x)
            z = lin(phi)
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


def _hvp_chunk(acc: Accumulator, problem: Problem, x, y, w: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
    loss = problem.loss
    with tapped(problem.module, problem.name, replace_output=True) as tap, torch.enable_grad(), \
            differentiable_attention():
        out = problem.model(x)
        loss.check(out, y)
        batch_loss = loss.for_derivatives(out, y)
        z = tap.output
        grad_z = torch.autograd.grad(batch_loss, z, create_graph=True)[0]
    phi = tap.features if scale is None else tap.features * inverse_scale(scale)
    n_b, d = z.shape
    m = w.shape[1]
    # Batch mean loss: d^2 E_b / dz_i^2 = Hz_i / n_b, so the weights carry the factor n_b.
    sq_norms = phi.pow(2).sum(1) * n_b
    acc.n += n_b
    if not grad_z.requires_grad:  # loss linear in z: Hz = 0, nothing to add
        return
    use_weight_probes = m < d and acc.block is None and acc.diag_blocks is None
    probe_dirs = w if use_weight_probes else torch.eye(d, dtype=w.dtype, device=w.device)
    num_probes = probe_dirs.shape[1]
    k_block = max(1, min(num_probes, HVP_BLOCK_ELEMENTS // max(1, n_b * d)))
    hdiag = phi.new_empty((n_b, d)) if acc.diag_blocks is not None else None
    for c0 in range(0, num_probes, k_block):
        cols = slice(c0, min(c0 + k_block, num_probes))
        dirs = probe_dirs[:, cols].T  # (k, d)
        probes = dirs[:, None, :].expand(-1, n_b, -1)
        hz = hessian_vector_products(grad_z, z, probes).permute(1, 2, 0)  # (n_b, d, k): Hz_i / n_b
        gram_cols = w[:, cols] if use_weight_probes else acc.gram[:, cols]
        per_sample, block = ops.contract_output_hessians(sq_norms, hz, gram_cols, acc.block is not None)
        acc.kappa_sum = acc.kappa_sum + per_sample.sum()
        if acc.block is not None:
            acc.block[:, cols] += block
        if hdiag is not None:
            idx = torch.arange(cols.start, cols.stop, device=hz.device)
            hdiag[:, cols] = hz[:, idx, idx - cols.start] * n_b
    if hdiag is not None:
        acc.add_diagonal(hdiag, phi)
