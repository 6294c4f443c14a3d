"""The paper's experiments (Section 6, Appendix C), behind ``relflat reproduce {fig3,fig4,fig5,fam}``.

fig3: for each class separation, many data sets (paper: 100 of 500 samples); on each, psi is
trained on the features, and we measure relative flatness of psi and the generalization gap (loss
on a large fresh sample minus training loss); Pearson and Kendall correlation per separation.
fig4: the same data sets; the bound estimate ``Rep + delta^2/(2m) kappa`` against the gap.
fam: training with the differentiable penalty (:mod:`.fam`).
fig5: Kendall correlation of each comparison measure with the gap over networks trained with
random hyperparameters on scikit-learn's digits, before and after random reparameterizations.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..datasets import digits_split
from ..datasets.synthetic import make_dataset
from ..flatness import relative_flatness
from ..generalization import generalization_bound, measures
from .stats import correlations, partial_correlation
from .training import fit
from .zoo import lenet5

SEPARATIONS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
QUICK_SEPARATIONS = (0.5, 1.5, 3.0, 6.0)
DATASETS, QUICK_DATASETS = 100, 20  # per separation
TRAIN_SAMPLES = 500
TEST_SAMPLES = 20000
MINIMA, QUICK_MINIMA = 60, 6  # fig5 networks


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reproducible figure: what it shows, and the size of a full and of a --quick run."""
    description: str
    full: str
    quick: str


FIGURES = {
    "fig3": Figure("correlation of kappa_Tr with the generalization gap, per class separation (synthetic data)",
                   f"{len(SEPARATIONS)} separations x {DATASETS} data sets",
                   f"{len(QUICK_SEPARATIONS)} separations x {QUICK_DATASETS} data sets"),
    "fig4": Figure("the bound estimate Rep + delta^2/(2m) kappa against the gap (synthetic data)",
                   f"{len(SEPARATIONS)} separations x {DATASETS} data sets",
                   f"{len(QUICK_SEPARATIONS)} separations x {QUICK_DATASETS} data sets"),
    "fam": Figure("SGD with and without the relative-flatness penalty (and SAM) on LeNet-5 / MNIST: test accuracy, "
                  "loss, gap and kappa over seeds", "9-value lam grid, 4 arms + SAM x 10 seeds, 30 epochs",
                  "3-value grid, 2 seeds, 3 epochs on 600 images"),
    "fig5": Figure("correlation of each comparison measure with the gap over LeNet-5 minima on digits, "
                   "before and after random reparameterizations (Appendix C)",
                   f"{MINIMA} networks", f"{QUICK_MINIMA} networks"),
}


def _progress(k: int, total: int, start: float, label: str) -> None:
    width = 30
    done = int(width * k / total)
    rate = (time.perf_counter() - start) / max(k, 1)
    sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {k}/{total} "
                     f"eta {rate * (total - k):5.0f} s")
    if k == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _one_dataset(separation: float, n: int, seed: int, delta: Optional[float], device: str = "cpu") -> Dict:
    task, model, x, y = make_dataset(separation, n=n, seed=seed)
    xt, yt = task.sample(TEST_SAMPLES, torch.Generator().manual_seed(10**6 + seed))
    model, x, y, xt, yt = model.to(device), x.to(device), y.to(device), xt.to(device), yt.to(device)
    with torch.no_grad():
        out, out_test = model(x), model(xt)
        train_loss = F.cross_entropy(out, y).item()
        test_loss = F.cross_entropy(out_test, yt).item()
        error_gap = (out_test.argmax(1) != yt).double().mean().item() - (out.argmax(1) != y).double().mean().item()
    psi = dict(model.named_modules())["psi"]
    row = {"seed": seed, "kappa": relative_flatness(model, "psi", x, y, block_trace=False).kappa,
           "kappa_normalized": relative_flatness(model, "psi", x, y, normalize_features=True).kappa,
           "weight_norm_sq": psi.weight.detach().pow(2).sum().item(),
           "train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss, "error_gap": error_gap}
    if delta is not None:
        b = generalization_bound(model, "psi", x, y, delta=delta, seed=seed)
        row.update(bound=b.bound, representativeness=b.representativeness, feature_robustness=b.feature_robustness)
    return row


def run_synthetic(figure: str, separations: Sequence[float], datasets: int, n: int, seed: int,
                  delta: float = 0.1, device: str = "cpu") -> Dict:
    per_sep: List[Dict] = []
    start, total, k = time.perf_counter(), len(separations) * datasets, 0
    for sep in separations:
        rows = []
        for j in range(datasets):
            rows.append(_one_dataset(sep, n, seed * 100000 + j, delta if figure == "fig4" else None, device))
            k += 1
            _progress(k, total, start, figure)
        column = lambda key: [r[key] for r in rows]  # noqa: E731
        entry = {"separation": sep, "rows": rows, **correlations(column("kappa"), column("gap"), seed=seed)}
        # Robustness rows and the weight-norm confound, each with its interval.
        entry["robustness"] = {
            "error_gap": correlations(column("kappa"), column("error_gap"), seed=seed),
            "normalized_kappa": correlations(column("kappa_normalized"), column("gap"), seed=seed),
            "kappa_vs_weight_norm_sq": correlations(column("kappa"), column("weight_norm_sq"), seed=seed),
            "gap_vs_weight_norm_sq": correlations(column("gap"), column("weight_norm_sq"), seed=seed),
            "kappa_gap_given_weight_norm_sq": partial_correlation(column("kappa"), column("gap"),
                                                                  column("weight_norm_sq"), seed=seed)}
        if figure == "fig4":
            entry["bound_vs_gap"] = correlations(column("bound"), column("gap"), seed=seed)
            entry["mean_bound"] = sum(r["bound"] for r in rows) / datasets
            entry["mean_gap"] = sum(column("gap")) / datasets
        per_sep.append(entry)
    extra = {}
    if figure == "fig4":
        mean = lambda e, key: sum(r[key] for r in e["rows"]) / len(e["rows"])
        extra = {"gap": [mean(e, "gap") for e in per_sep], "bound": [mean(e, "bound") for e in per_sep],
                 "representativeness": [mean(e, "representativeness") for e in per_sep],
                 "flatness_term": [mean(e, "feature_robustness") for e in per_sep]}
    return {**extra, "figure": figure, "separation": [e["separation"] for e in per_sep],
            "pearson": [e["pearson"] for e in per_sep], "kendall": [e["kendall"] for e in per_sep],
            "pearson_ci": [e["pearson_ci"] for e in per_sep], "kendall_ci": [e["kendall_ci"] for e in per_sep],
            "n_datasets": datasets, "n_samples": n, "test_samples": TEST_SAMPLES, "delta": delta,
            "per_separation": per_sep, "seconds": time.perf_counter() - start}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot(result: Dict, path: str) -> None:
    plt = _pyplot()
    if result["figure"] == "fig3":
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, style, label in (("pearson", "o-", "Pearson"), ("kendall", "s--", "Kendall tau")):
            line, = ax.plot(result["separation"], result[key], style, label=f"{label} (95% bootstrap interval)")
            ax.fill_between(result["separation"], [c[0] for c in result[f"{key}_ci"]],
                            [c[1] for c in result[f"{key}_ci"]], color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("class separation (distance between neighbouring means)")
        ax.set_ylabel("correlation of kappa_Tr with the generalization gap")
        ax.set_title(f"Fig. 3: {result['n_datasets']} data sets of {result['n_samples']} per separation")
        ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for e in result["per_separation"]:
            ax.scatter([r["gap"] for r in e["rows"]], [r["bound"] for r in e["rows"]], s=10,
                       label=f"separation {e['separation']:g}")
        lims = ax.get_xlim()
        ax.plot(lims, lims, "k:", lw=1, label="bound = gap")
        ax.set_xlabel("generalization gap (fresh sample)")
        ax.set_ylabel(f"Rep + delta^2/(2m) kappa (delta = {result['delta']})")
        ax.set_title("Fig. 4: the bound estimate against the gap")
        ax.legend(fontsize=7)
    _save(fig, path)


def summary(result: Dict) -> str:
    fig4 = result["figure"] == "fig4"
    lines = [f"{result['figure']}: {result['n_datasets']} data sets x {result['n_samples']} samples per separation, "
             f"gap on {result['test_samples']} fresh samples ({result['seconds']:.0f} s); "
             "r = Pearson, tau = Kendall, [95% bootstrap interval]",
             f"{'separation':>10} {'r(kappa, gap)':>22} {'tau(kappa, gap)':>22} {'r(., 0/1 gap)':>13} "
             f"{'r(norm. kappa)':>14} {'r(kappa,|W|^2)':>14} {'r(gap,|W|^2)':>13} {'r(kappa,gap | |W|^2)':>22}"
             + (f" {'mean bound':>11} {'mean gap':>9} {'r(bound, gap)':>22}" if fig4 else "")]
    for e in result["per_separation"]:
        rob = e["robustness"]
        cell = lambda c, key: f"{c[key]:.3f} [{c[key + '_ci'][0]:.2f}, {c[key + '_ci'][1]:.2f}]"  # noqa: E731
        extra = (f" {e['mean_bound']:>11.4f} {e['mean_gap']:>9.4f} {cell(e['bound_vs_gap'], 'pearson'):>22}"
                 if fig4 else "")
        lines.append(f"{e['separation']:>10g} {cell(e, 'pearson'):>22} {cell(e, 'kendall'):>22} "
                     f"{rob['error_gap']['pearson']:>13.3f} {rob['normalized_kappa']['pearson']:>14.3f} "
                     f"{rob['kappa_vs_weight_norm_sq']['pearson']:>14.3f} {rob['gap_vs_weight_norm_sq']['pearson']:>13.3f} "
                     f"{cell(rob['kappa_gap_given_weight_norm_sq'], 'pearson'):>22}"
                     f"{extra}")
    return "\n".join(lines)


def reproduce(figure: str, quick: bool = False, out: str = "reports/reproduce", seed: int = 0,
              device: str = "cpu") -> Dict:
    if figure not in FIGURES:
        raise ValueError(f"figure must be one of {sorted(FIGURES)}, got {figure!r}")
    if figure == "fam":
        from .fam import reproduce_fam
        return reproduce_fam(quick=quick, out=out, seed=seed, device=device)
    if figure == "fig5":
        result = run_fig5(minima=QUICK_MINIMA if quick else MINIMA, quick=quick, seed=seed,
                          cache=os.path.join(out, "cache-fig5"), device=device)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fig5.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        plot_fig5(result, os.path.join(out, "fig5.png"))
        print(summary_fig5(result))
        print(f"wrote {out}/fig5.json and fig5.png")
        return result
    separations = QUICK_SEPARATIONS if quick else SEPARATIONS
    datasets = QUICK_DATASETS if quick else DATASETS
    result = run_synthetic(figure, separations, datasets, TRAIN_SAMPLES, seed, device=device)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{figure}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    plot(result, os.path.join(out, f"{figure}.png"))
    print(summary(result))
    print(f"wrote {out}/{figure}.json and {figure}.png")
    return result


# --- Fig. 5 and Appendix C: the correlation study on real data, with reparameterizations ---------

FIG5_MEASURES = ("relative_flatness", "relative_flatness_normalized", "hessian_trace", "fisher_rao",
                 "pacbayes_flatness", "weight_norm")
FIG5_LAYER = "11"  # the classifier of LeNet-5: relative flatness of the feature layer, as the paper
LOSS_THRESHOLD = 0.05  # a network counts as a local minimum when its training loss is below this


def reparameterize(model, seed: int, low: float = 5.0, high: float = 25.0):
    """A copy with every hidden weight layer divided by alpha ~ U[low, high] (weight and bias) and
    the next weight layer multiplied by it (Appendix C); ReLU networks compute the same function."""
    import copy
    from torch import nn
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


def _measure_all(model, x, y, seed: int) -> Dict[str, float]:
    layer = dict(model.named_modules())[FIG5_LAYER]
    return {"relative_flatness": relative_flatness(model, FIG5_LAYER, x, y, block_trace=False).kappa,
            "relative_flatness_normalized": relative_flatness(model, FIG5_LAYER, x, y, normalize_features=True,
                                                              block_trace=False).kappa,
            "hessian_trace": measures.hessian_trace(model, FIG5_LAYER, x, y),
            "fisher_rao": measures.fisher_rao_norm(model, x, y).norm,
            "pacbayes_flatness": measures.pacbayes_flatness(model, x, y, draws=4, iterations=10, seed=seed).flatness,
            "weight_norm": measures.weight_norm(layer)}


def _sample_config(gen: torch.Generator, quick: bool) -> Dict:
    pick = lambda options: options[int(torch.randint(0, len(options), (), generator=gen))]
    optimizer = pick(["sgd", "adam", "rmsprop"])
    lr = pick({"sgd": [0.03, 0.1, 0.3], "adam": [3e-4, 1e-3, 3e-3], "rmsprop": [3e-4, 1e-3, 3e-3]}[optimizer])
    return {"optimizer": optimizer, "lr": lr, "batch_size": pick([16, 32, 64, 128]),
            "weight_decay": pick([0.0, 1e-4, 5e-4]), "seed": int(torch.randint(0, 10**6, (), generator=gen)),
            "max_epochs": 40 if quick else 150}


def _train_minimum(config: Dict, x, y):
    """(model, epochs): trained until the training loss is below LOSS_THRESHOLD (a minimum), or
    (None, epochs) if it diverged or max_epochs passed first."""
    torch.manual_seed(config["seed"])
    run = fit(lenet5(activation="relu").to(x.device), (x, y), config["max_epochs"], optimizer=config["optimizer"],
              lr=config["lr"], batch_size=config["batch_size"], weight_decay=config["weight_decay"],
              seed=config["seed"], stop_below=LOSS_THRESHOLD)
    return (run.model if run.reached else None), run.epochs


def run_fig5(minima: int, quick: bool, seed: int = 0, cache: Optional[str] = None, device: str = "cpu") -> Dict:
    """Collects ``minima`` LeNet-5 networks trained to a training loss below LOSS_THRESHOLD on
    scikit-learn's digits (1797 real 8x8 images, the shipped real data set; CIFAR-10 cannot be
    downloaded here) from random optimizers, learning rates, batch sizes, weight decays and seeds
    (cached in ``cache``); measures each comparison measure on the training set (float64), the
    generalization gap (test minus train cross entropy), and Pearson and Kendall correlations of each
    measure with the gap, before and after a random reparameterization (asserted function-preserving)."""
    x, y, xt, yt = digits_split(seed, image=True)
    x, xt = x.to(device), xt.to(device)
    y, yt = y.to(device), yt.to(device)
    gen = torch.Generator().manual_seed(seed)
    rows, tried = [], 0
    start = time.perf_counter()
    if cache:
        os.makedirs(cache, exist_ok=True)
    while len(rows) < minima:
        config = _sample_config(gen, quick)
        tried += 1
        if tried > 6 * minima:
            raise RuntimeError(f"only {len(rows)} of {tried} configurations reached a training loss below "
                               f"{LOSS_THRESHOLD}; raise max_epochs or the threshold")
        key = "-".join(f"{k}={v}" for k, v in sorted(config.items()))
        path = os.path.join(cache, f"{key}.pt") if cache else None
        if path and os.path.exists(path):
            saved = torch.load(path, map_location=device)
            if saved["state"] is None:
                continue
            model = lenet5(activation="relu").to(device)
            model.load_state_dict(saved["state"])
            epochs = saved["epochs"]
        else:
            model, epochs = _train_minimum(config, x, y)
            if path:
                torch.save({"state": None if model is None else model.state_dict(), "epochs": epochs}, path)
            if model is None:
                continue
        model = model.double().eval()
        xd, xtd = x.double(), xt.double()
        with torch.no_grad():
            train_loss = F.cross_entropy(model(xd), y).item()
            gap = F.cross_entropy(model(xtd), yt).item() - train_loss
        other = reparameterize(model, seed=config["seed"])
        with torch.no_grad():
            diff = (other(xd) - model(xd)).abs().max().item()
        assert diff < 1e-8, f"reparameterization changed the function by {diff}"
        rows.append({**config, "epochs": epochs, "train_loss": train_loss, "gap": gap,
                     "measures": _measure_all(model, xd, y, seed),
                     "measures_reparam": _measure_all(other, xd, y, seed)})
        _progress(len(rows), minima, start, "fig5")
    gaps = [r["gap"] for r in rows]
    table = {}
    for m in FIG5_MEASURES:
        before = correlations([r["measures"][m] for r in rows], gaps, seed=seed)
        after = correlations([r["measures_reparam"][m] for r in rows], gaps, seed=seed)
        table[m] = {**before, **{f"{key}_reparam": value for key, value in after.items()}}
    return {"figure": "fig5", "dataset": "scikit-learn digits (1257 train / 540 test)", "model": "LeNet-5 (ReLU)",
            "n_minima": len(rows), "configurations_tried": tried, "loss_threshold": LOSS_THRESHOLD,
            "measures": table, "rows": rows, "seconds": time.perf_counter() - start}


def plot_fig5(result: Dict, path: str) -> None:
    plt = _pyplot()
    names = list(result["measures"])
    pos = range(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for shift, suffix, label in ((-0.2, "", "minima"), (0.2, "_reparam", "after reparameterization (alpha in [5, 25])")):
        values = [result["measures"][m][f"kendall{suffix}"] for m in names]
        ci = [result["measures"][m].get(f"kendall_ci{suffix}", [v, v]) for m, v in zip(names, values)]
        ax.bar([p + shift for p in pos], values, width=0.4, label=label,
               yerr=[[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]], capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("Kendall tau with the gap (95% bootstrap interval)")
    ax.set_title(f"Fig. 5 / Appendix C on digits: {result['n_minima']} LeNet-5 minima")
    ax.legend(fontsize=8)
    _save(fig, path)


def summary_fig5(result: Dict) -> str:
    lines = [f"fig5: {result['n_minima']} minima ({result['configurations_tried']} configurations tried) on "
             f"{result['dataset']} ({result['seconds']:.0f} s); [95% bootstrap interval]",
             f"{'measure':>30} {'pearson':>8} {'kendall':>22} {'pearson*':>9} {'kendall*':>22}   (* reparameterized)"]
    for m, v in result["measures"].items():
        ci, ci_r = v["kendall_ci"], v["kendall_ci_reparam"]
        lines.append(f"{m:>30} {v['pearson']:>8.3f} {v['kendall']:>8.3f} [{ci[0]:5.2f}, {ci[1]:5.2f}] "
                     f"{v['pearson_reparam']:>9.3f} {v['kendall_reparam']:>8.3f} [{ci_r[0]:5.2f}, {ci_r[1]:5.2f}]")
    return "\n".join(lines)
