"""The authors' additional MNIST study: relative flatness of *every* layer of the same minima against
the generalization gap (``relflat reproduce layerwise``). Their code for it is not public (only the
figures, ``AdditionalExperiments/MNIST_layerwise*``, 4 layers, r about 0.70-0.73 each); here the
minima are LeNet-5 networks on the MNIST subset trained in their Fig. 5 regime (:mod:`.minima`,
the same cache as ``fig5 --dataset mnist --regime authors``).

The three Linear layers are measured exactly in float64. The two convolutions have no per-sample
feature vectors, so their kappa is estimated by the multiplicative-probe estimator, one Hessian-vector
product of the network per probe for both (:func:`stochastic_estimate_layers`), in float32 (float64
convolutions cost 3-5x more and the estimator's standard error, reported per network, is far above
float32 rounding)."""
from __future__ import annotations

import time
from typing import Dict

import torch
import torch.nn.functional as F

from ..flatness import relative_flatness, stochastic_estimate_layers
from .minima import THRESHOLD, load_split, minima
from .plots import pyplot, save
from .stats import correlations

LAYERS = {"0": "conv1", "3": "conv2", "7": "fc1", "9": "fc2", "11": "fc3"}  # LeNet-5's weight layers
CONV_LAYERS = ("0", "3")
MINIMA, QUICK_MINIMA = 60, 6
CONV_REL_TOL, CONV_MAX_PROBES = 0.1, 32  # one round of 32 probes: each costs a Hessian-vector product


def measure_layers(model, x, y, seed: int) -> Dict[str, Dict]:
    """{layer name: {"kappa", "stderr" (None where exact), "method"}} for every weight layer."""
    out = {}
    estimates = stochastic_estimate_layers(model.float(), list(CONV_LAYERS), x.float(), y, rel_tol=CONV_REL_TOL,
                                           max_probes=CONV_MAX_PROBES, probes_per_round=CONV_MAX_PROBES, seed=seed,
                                           sketch=0)  # plain joint probes: the protocol docs/reproduction.md reports
    for key in CONV_LAYERS:
        est = estimates[key]
        out[LAYERS[key]] = {"kappa": est.value, "stderr": est.stderr, "probes": est.probes, "method": "stochastic"}
    model = model.double()
    for key in LAYERS:
        if key not in CONV_LAYERS:
            res = relative_flatness(model, key, x.double(), y, block_trace=False)
            out[LAYERS[key]] = {"kappa": res.kappa, "stderr": None, "probes": 0, "method": res.method}
    return {LAYERS[key]: out[LAYERS[key]] for key in LAYERS}


def run_layerwise(count: int, quick: bool, seed: int = 0, cache=None, device: str = "cpu") -> Dict:
    split = load_split("mnist", seed, quick)
    x, y = split.x.to(device), split.y.to(device)
    xt, yt = split.x_test.to(device), split.y_test.to(device)
    rows, start, tried = [], time.perf_counter(), 0
    for config, model in minima(split, "authors", count, quick, seed, cache, device, label="layerwise"):
        tried = config.pop("tried")
        layers = measure_layers(model, x, y, config["seed"])
        with torch.no_grad():
            model = model.double()
            train_loss = F.cross_entropy(model(x.double()), y).item()
            gap = F.cross_entropy(model(xt.double()), yt).item() - train_loss
        rows.append({**config, "train_loss": train_loss, "gap": gap, "layers": layers})
    gaps = [r["gap"] for r in rows]
    table = {name: correlations([r["layers"][name]["kappa"] for r in rows], gaps, seed=seed)
             for name in LAYERS.values()}
    table["sum of layers"] = correlations([sum(v["kappa"] for v in r["layers"].values()) for r in rows], gaps,
                                          seed=seed)
    return {"figure": "layerwise", "dataset": split.name, "regime": "authors", "model": "LeNet-5 (ReLU)",
            "n_minima": len(rows), "configurations_tried": tried, "loss_threshold": THRESHOLD["authors"],
            "conv_estimator": {"rel_tol": CONV_REL_TOL, "max_probes": CONV_MAX_PROBES, "dtype": "float32"},
            "layers": table, "rows": rows, "seconds": time.perf_counter() - start}


def plot_layerwise(result: Dict, path: str) -> None:
    plt = pyplot()
    names = list(LAYERS.values())
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.2))
    gaps = [r["gap"] for r in result["rows"]]
    for ax, name in zip(axes, names):
        kappas = [r["layers"][name]["kappa"] for r in result["rows"]]
        errors = [r["layers"][name]["stderr"] or 0.0 for r in result["rows"]]
        ax.errorbar(kappas, gaps, xerr=errors, fmt="o", ms=3, elinewidth=0.6)
        c = result["layers"][name]
        ax.set_title(f"{name}: r = {c['pearson']:.2f} [{c['pearson_ci'][0]:.2f}, {c['pearson_ci'][1]:.2f}]",
                     fontsize=8)
        ax.set_xlabel("kappa_Tr" + (" (estimated)" if result["rows"][0]["layers"][name]["stderr"] else ""),
                      fontsize=8)
    axes[0].set_ylabel("generalization gap (test - train CE)")
    fig.suptitle(f"Layer-wise relative flatness, {result['n_minima']} LeNet-5 minima on MNIST "
                 "(95% bootstrap intervals)", fontsize=9)
    save(fig, path)


def summary_layerwise(result: Dict) -> str:
    lines = [f"layerwise: {result['n_minima']} minima ({result['configurations_tried']} configurations tried) on "
             f"{result['dataset']} ({result['seconds']:.0f} s); [95% bootstrap interval]",
             f"{'layer':>14} {'pearson':>24} {'kendall':>24}"]
    for name, c in result["layers"].items():
        lines.append(f"{name:>14} {c['pearson']:>7.3f} [{c['pearson_ci'][0]:5.2f}, {c['pearson_ci'][1]:5.2f}]"
                     f"{' ' * 4}{c['kendall']:>7.3f} [{c['kendall_ci'][0]:5.2f}, {c['kendall_ci'][1]:5.2f}]")
    return "\n".join(lines)
