"""One probe set for many layers. With independent multiplicative probes ``A_l`` for every layer,
one Hessian-vector product of the whole loss in the joint direction ``(W_1 A_1, ..., W_L A_L)``
gives ``<W_l A_l, (H v)_l>`` for every l, an unbiased estimate of each layer's kappa: the
cross-layer terms ``<W_l A_l, H_{l,k} W_k A_k>`` have zero mean because the ``A`` are independent
and centred. They add variance, which the per-layer standard errors include."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core import dist
from ..core.hooks import preserved
from ..core.hvp import differentiable_attention
from ..core.layers import LayerSpec, matrix_view, resolve_weight_layer
from ..core.losses import Loss, LossSpec
from .problem import Problem
from .stochastic import QUANTITIES, StochasticEstimate, _directions


def stochastic_estimate_layers(model: nn.Module, layers: Sequence[LayerSpec], inputs, targets=None, *,
                               loss: LossSpec = "cross_entropy", quantity: str = "kappa", rel_tol: float = 0.05,
                               max_probes: int = 1000, probes_per_round: int = 32, seed: Optional[int] = None,
                               batch_size: Optional[int] = None, distributed: Optional[bool] = None
                               ) -> Dict[str, StochasticEstimate]:
    """Unbiased estimates of kappa_Tr (or of each layer's Hessian trace) for every layer at once,
    one Hessian-vector product of the whole network per probe, in rounds until every layer's
    relative standard error reaches ``rel_tol`` or ``max_probes``. Layers as for
    :func:`stochastic_estimate` (Linear, Conv, or a 2-D parameter by name), each its own weight."""
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
    problem = Problem.build(model, layers[0], inputs, targets, loss, batch_size, distributed)
    resolved = [resolve_weight_layer(problem.model, layer) for layer in layers]
    names = [name for name, _ in resolved]
    weights = [module.weight for _, module in resolved]
    if len({id(w) for w in weights}) < len(weights):
        raise ValueError("two of the layers share one weight: name each weight once")
    views = [matrix_view(module, name) for name, module in resolved]
    mats = [view.to_matrix(w.detach()) for view, w in zip(views, weights)]
    device = mats[0].device
    if problem.distributed:
        base_seed = dist.shared_seed(seed, device)
    else:
        base_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
    samples: List[List[torch.Tensor]] = [[] for _ in names]
    done = [False] * len(names)
    n = 0
    with preserved(problem.model):
        for w in weights:
            w.requires_grad_(True)
        for rnd in range(math.ceil(max_probes / probes_per_round)):
            count = min(probes_per_round, max_probes - rnd * probes_per_round)
            dirs = [_directions(quantity, mat, view, count,
                                torch.Generator(device=device).manual_seed(((base_seed + rnd) * 1000003 + l) % 2**63),
                                None) for l, (mat, view) in enumerate(zip(mats, views))]
            total, n = torch.zeros((len(names), count), dtype=torch.float64, device=device), 0
            for x, y in problem.batches():
                total += _joint_forms(problem.model, weights, x, y, problem.loss, dirs)
                n += x.shape[0]
            if problem.distributed:
                count_t = torch.tensor(float(n), dtype=torch.float64, device=device)
                dist.all_reduce_sum([total, count_t])
                n = int(count_t.item())
            for l in range(len(names)):
                samples[l].append(total[l] / n)
                allq = torch.cat(samples[l])
                done[l] = float(allq.std() / math.sqrt(allq.numel())) <= rel_tol * abs(float(allq.mean()))
            if all(done):
                break
    seconds = time.perf_counter() - start
    out = {}
    for l, name in enumerate(names):
        allq = torch.cat(samples[l])
        out[name] = StochasticEstimate(float(allq.mean()), float(allq.std() / math.sqrt(allq.numel())), allq.numel(),
                                       allq.to(mats[l].dtype), done[l], n, seconds)
    return out


def _joint_forms(model, weights: List[torch.Tensor], x, y, loss: Loss, dirs: List[torch.Tensor]) -> torch.Tensor:
    """(L, K): n_b <V_lk, (H_b V_k)_l> for every layer l and probe k, V_k = (V_1k, ..., V_Lk)."""
    quad = torch.zeros((len(weights), dirs[0].shape[0]), dtype=torch.float64, device=dirs[0].device)
    with torch.enable_grad(), differentiable_attention():
        out = model(x)
        loss.check(out, y)
        grads = torch.autograd.grad(loss.for_derivatives(out, y), weights, create_graph=True, allow_unused=True)
    live = [l for l, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the loss is linear in every weight
        return quad
    for k in range(quad.shape[1]):
        hv = torch.autograd.grad([grads[l] for l in live], [weights[l] for l in live],
                                 grad_outputs=[dirs[l][k] for l in live], retain_graph=True, allow_unused=True)
        for l, h in zip(live, hv):
            if h is not None:
                quad[l, k] = (h * dirs[l][k]).sum().double()
    return quad * x.shape[0]
