"""The paper's experiments (Section 6, Appendix C), behind ``relflat reproduce {fig3,fig4,fig5,layerwise,fam}``.

fig3: for each class separation, many data sets (paper: 100 of 500 samples); on each, psi is
trained on the features, and we measure relative flatness of psi and the generalization gap (loss
on a large fresh sample minus training loss); Pearson and Kendall correlation per separation, with
bootstrap intervals. Two protocols: ``paper`` (the construction the paper's text describes,
:mod:`..datasets.synthetic`) and ``authors`` (their public pipeline, :mod:`..datasets.authors`).
fig4: the paper protocol's data sets; the bound estimate ``Rep + delta^2/(2m) kappa`` against the gap.
fig5 (:mod:`.fig5`) and layerwise (:mod:`.layerwise`): correlation studies over LeNet-5 minima.
fam: training with the differentiable penalty (:mod:`.fam`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..datasets import authors as authors_data
from ..datasets.synthetic import make_dataset
from ..flatness import relative_flatness
from ..generalization import generalization_bound
from . import fig5, layerwise
from .minima import DATASETS as FIG5_DATASETS, REGIMES, progress
from .plots import pyplot, save
from .stats import correlations, partial_correlation

PROTOCOLS = ("paper", "authors")  # fig3: the paper's text, or the authors' public pipeline
SEPARATIONS = {"paper": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), "authors": (0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)}
QUICK_SEPARATIONS = {"paper": (0.5, 1.5, 3.0, 6.0), "authors": (0.5, 1.5, 3.0, 5.0)}
DATASETS, QUICK_DATASETS = 100, 20  # per separation
TRAIN_SAMPLES = 500
TEST_SAMPLES = 20000


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reproducible figure: what it shows, and the size of a full and of a --quick run."""
    description: str
    full: str
    quick: str


FIGURES = {
    "fig3": Figure("correlation of kappa_Tr with the generalization gap, per class separation (synthetic data; "
                   "--protocol paper or authors)",
                   f"{len(SEPARATIONS['paper'])} (authors: {len(SEPARATIONS['authors'])}) separations x {DATASETS} "
                   "data sets", f"4 separations x {QUICK_DATASETS} data sets"),
    "fig4": Figure("the bound estimate Rep + delta^2/(2m) kappa against the gap (synthetic data)",
                   f"{len(SEPARATIONS['paper'])} separations x {DATASETS} data sets",
                   f"4 separations x {QUICK_DATASETS} data sets"),
    "fam": Figure("SGD with and without the relative-flatness penalty (and SAM) on LeNet-5 / MNIST: test accuracy, "
                  "loss, gap and kappa over seeds", "9-value lam grid, 4 arms + SAM x 10 seeds, 30 epochs",
                  "3-value grid, 2 seeds, 3 epochs on 600 images"),
    "fig5": Figure("correlation of each comparison measure with the gap over LeNet-5 minima (--dataset digits or "
                   "mnist, --regime mixed or authors), before and after random reparameterizations (Appendix C)",
                   f"{fig5.MINIMA} networks", f"{fig5.QUICK_MINIMA} networks (MNIST: on 500 training images)"),
    "layerwise": Figure("kappa_Tr of every layer of LeNet-5 minima on MNIST against the gap (the authors' "
                        "additional MNIST study), trained as in --regime authors",
                        f"{layerwise.MINIMA} networks", f"{layerwise.QUICK_MINIMA} networks on 500 training images"),
}


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
    # Robustness: psi fitted by ridge regression to the {0, 1} labels and measured with squared error.
    with torch.no_grad():
        z, zt = model.phi(x), model.phi(xt)
    ridge = authors_data.fit_ridge(z.cpu(), y.cpu()).to(device)
    target, target_test = y.double()[:, None], yt.double()[:, None]
    with torch.no_grad():
        ridge_gap = F.mse_loss(ridge(zt), target_test).item() - F.mse_loss(ridge(z), target).item()
    row = {"seed": seed, "kappa": relative_flatness(model, "psi", x, y, block_trace=False).kappa,
           "kappa_ridge": relative_flatness(ridge, "", z, target, loss="mse").kappa, "gap_ridge": ridge_gap,
           "kappa_normalized": relative_flatness(model, "psi", x, y, normalize_features=True).kappa,
           "weight_norm_sq": psi.weight.detach().pow(2).sum().item(),
           "train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss, "error_gap": error_gap}
    if delta is not None:
        b = generalization_bound(model, "psi", x, y, delta=delta, seed=seed)
        row.update(bound=b.bound, representativeness=b.representativeness, feature_robustness=b.feature_robustness)
    return row


def _one_authors_dataset(separation: float, n: int, seed: int, device: str = "cpu") -> Dict:
    """The authors' pipeline (:mod:`..datasets.authors`): make_classification, ridge psi, exactly
    inverted tanh phi; squared error against the {0, 1} labels. kappa on psi and on fc4 (the layer
    their code measures, inside phi). The test loss is psi on the test features: f(x) = psi(z)
    holds exactly (checked on the training inputs)."""
    z, y, zt, yt = authors_data.make_authors_data(separation, n, TEST_SAMPLES, seed)
    psi = authors_data.fit_ridge(z, y)
    inverted = authors_data.invert(z, psi, seed)
    model, x = inverted.model.to(device), inverted.x.to(device)
    target = y.double()[:, None].to(device)
    with torch.no_grad():
        out = model(x)
        mismatch = (out - psi.to(device)(z.to(device))).abs().max().item()
        if not mismatch < 1e-8:
            raise RuntimeError(f"f(x) differs from psi(z) by {mismatch}: the inversion is not exact")
        out_test = psi(zt.to(device))
        train_loss = F.mse_loss(out, target).item()
        test_loss = F.mse_loss(out_test, yt.double()[:, None].to(device)).item()
        error = lambda o, t: ((o[:, 0] > 0.5).long() != t.to(device)).double().mean().item()  # noqa: E731
        error_gap = error(out_test, yt) - error(out, y)
    return {"seed": seed, "kappa": relative_flatness(model, "psi", x, target, loss="mse").kappa,
            "kappa_their_layer": relative_flatness(model, "fc4", x, target, loss="mse").kappa,
            "kappa_normalized": relative_flatness(model, "psi", x, target, loss="mse", normalize_features=True).kappa,
            "weight_norm_sq": psi.weight.detach().pow(2).sum().item(), "fc4_scaled_by": inverted.scaled[3],
            "train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss, "error_gap": error_gap}


def run_synthetic(figure: str, separations: Sequence[float], datasets: int, n: int, seed: int,
                  delta: float = 0.1, device: str = "cpu", protocol: str = "paper") -> Dict:
    per_sep: List[Dict] = []
    start, total, k = time.perf_counter(), len(separations) * datasets, 0
    for sep in separations:
        rows = []
        for j in range(datasets):
            if protocol == "authors":
                rows.append(_one_authors_dataset(sep, n, seed * 100000 + j, device))
            else:
                rows.append(_one_dataset(sep, n, seed * 100000 + j, delta if figure == "fig4" else None, device))
            k += 1
            progress(k, total, start, figure)
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
        if protocol == "paper":
            entry["robustness"]["ridge_psi"] = correlations(column("kappa_ridge"), column("gap_ridge"), seed=seed)
        else:
            entry["robustness"]["their_layer"] = correlations(column("kappa_their_layer"), column("gap"), seed=seed)
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
    return {**extra, "figure": figure, "protocol": protocol, "separation": [e["separation"] for e in per_sep],
            "pearson": [e["pearson"] for e in per_sep], "kendall": [e["kendall"] for e in per_sep],
            "pearson_ci": [e["pearson_ci"] for e in per_sep], "kendall_ci": [e["kendall_ci"] for e in per_sep],
            "n_datasets": datasets, "n_samples": n, "test_samples": TEST_SAMPLES,
            "loss": "mse" if protocol == "authors" else "cross_entropy", **({"delta": delta} if figure == "fig4" else {}),
            "per_separation": per_sep, "seconds": time.perf_counter() - start}


def plot(result: Dict, path: str) -> None:
    plt = pyplot()
    if result["figure"] == "fig3":
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, style, label in (("pearson", "o-", "Pearson"), ("kendall", "s--", "Kendall tau")):
            line, = ax.plot(result["separation"], result[key], style, label=f"{label} (95% bootstrap interval)")
            ax.fill_between(result["separation"], [c[0] for c in result[f"{key}_ci"]],
                            [c[1] for c in result[f"{key}_ci"]], color=line.get_color(), alpha=0.15)
        authors = result.get("protocol") == "authors"
        if authors:  # kappa on the layer inside phi that the authors' code measures
            theirs = [e["robustness"]["their_layer"] for e in result["per_separation"]]
            line, = ax.plot(result["separation"], [c["pearson"] for c in theirs], "^:",
                            label="Pearson, kappa on fc4 inside phi (their layer)")
            ax.fill_between(result["separation"], [c["pearson_ci"][0] for c in theirs],
                            [c["pearson_ci"][1] for c in theirs], color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("make_classification class_sep" if authors else
                      "class separation (distance between neighbouring means)")
        ax.set_ylabel("correlation of kappa_Tr with the generalization gap")
        ax.set_title(f"Fig. 3, {'authors' if authors else 'paper'} protocol: {result['n_datasets']} data sets of "
                     f"{result['n_samples']} per separation", fontsize=9)
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
    save(fig, path)


def summary(result: Dict) -> str:
    fig4, authors = result["figure"] == "fig4", result.get("protocol") == "authors"
    lines = [f"{result['figure']} ({result.get('protocol', 'paper')} protocol, {result['loss']}): {result['n_datasets']} data sets x {result['n_samples']} samples per separation, "
             f"gap on {result['test_samples']} fresh samples ({result['seconds']:.0f} s); "
             "r = Pearson, tau = Kendall, [95% bootstrap interval]",
             f"{'separation':>10} {'r(kappa, gap)':>22} {'tau(kappa, gap)':>22} {'r(., 0/1 gap)':>13} "
             f"{'r(norm. kappa)':>14} {'r(kappa,|W|^2)':>14} {'r(gap,|W|^2)':>13} {'r(kappa,gap | |W|^2)':>22}"
             + (f" {'mean bound':>11} {'mean gap':>9} {'r(bound, gap)':>22}" if fig4 else "")
             + (f" {'r(kappa fc4, gap)':>22}" if authors else f" {'r(ridge psi)':>12}")]
    for e in result["per_separation"]:
        rob = e["robustness"]
        cell = lambda c, key: f"{c[key]:.3f} [{c[key + '_ci'][0]:.2f}, {c[key + '_ci'][1]:.2f}]"  # noqa: E731
        extra = (f" {e['mean_bound']:>11.4f} {e['mean_gap']:>9.4f} {cell(e['bound_vs_gap'], 'pearson'):>22}"
                 if fig4 else "") + (f" {cell(rob['their_layer'], 'pearson'):>22}" if authors
                                     else f" {rob['ridge_psi']['pearson']:>12.3f}")
        lines.append(f"{e['separation']:>10g} {cell(e, 'pearson'):>22} {cell(e, 'kendall'):>22} "
                     f"{rob['error_gap']['pearson']:>13.3f} {rob['normalized_kappa']['pearson']:>14.3f} "
                     f"{rob['kappa_vs_weight_norm_sq']['pearson']:>14.3f} {rob['gap_vs_weight_norm_sq']['pearson']:>13.3f} "
                     f"{cell(rob['kappa_gap_given_weight_norm_sq'], 'pearson'):>22}"
                     f"{extra}")
    return "\n".join(lines)


def _write(result: Dict, out: str, name: str, plotter, summarizer) -> Dict:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    plotter(result, os.path.join(out, f"{name}.png"))
    print(summarizer(result))
    print(f"wrote {out}/{name}.json and {name}.png")
    return result


def reproduce(figure: str, quick: bool = False, out: str = "reports/reproduce", seed: int = 0, device: str = "cpu",
              protocol: str = "paper", dataset: str = "digits", regime: str = "mixed") -> Dict:
    """Runs one figure and writes ``<out>/<name>.json`` and ``.png``: fig3 (``fig3-authors`` with
    ``protocol="authors"``), fig4, fig5 (``fig5-<dataset>-<regime>`` unless digits/mixed), layerwise,
    fam. ``protocol`` is fig3's, ``dataset`` and ``regime`` fig5's."""
    if figure not in FIGURES:
        raise ValueError(f"figure must be one of {sorted(FIGURES)}, got {figure!r}")
    for name, value, allowed, owner in (("protocol", protocol, PROTOCOLS, "fig3"),
                                        ("dataset", dataset, FIG5_DATASETS, "fig5"),
                                        ("regime", regime, REGIMES, "fig5")):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if value != allowed[0] and figure != owner:
            raise ValueError(f"{name}={value!r} applies to {owner} only, not {figure}")
    if figure == "fam":
        from .fam import reproduce_fam
        return reproduce_fam(quick=quick, out=out, seed=seed, device=device)
    if figure == "fig5":
        name = "fig5" if (dataset, regime) == ("digits", "mixed") else f"fig5-{dataset}-{regime}"
        result = fig5.run_fig5(fig5.QUICK_MINIMA if quick else fig5.MINIMA, quick, seed,
                               cache=os.path.join(out, f"cache-{name}"), device=device, dataset=dataset, regime=regime)
        return _write(result, out, name, fig5.plot_fig5, fig5.summary_fig5)
    if figure == "layerwise":
        result = layerwise.run_layerwise(layerwise.QUICK_MINIMA if quick else layerwise.MINIMA, quick, seed,
                                         cache=os.path.join(out, "cache-fig5-mnist-authors"), device=device)
        return _write(result, out, "layerwise", layerwise.plot_layerwise, layerwise.summary_layerwise)
    separations = (QUICK_SEPARATIONS if quick else SEPARATIONS)[protocol]
    datasets = QUICK_DATASETS if quick else DATASETS
    result = run_synthetic(figure, separations, datasets, TRAIN_SAMPLES, seed, device=device, protocol=protocol)
    return _write(result, out, figure if protocol == "paper" else f"{figure}-{protocol}", plot, summary)
