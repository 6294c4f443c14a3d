"""The paper's experiments (Section 6, Appendix C), behind ``relflat reproduce {fig3,fig4,fig5}``.

fig3: for each class separation, many data sets (paper: 100 of 500 samples); on each, psi is
trained on the features, and we measure relative flatness of psi and the generalization gap (loss
on a large fresh sample minus training loss); Pearson and Kendall correlation per separation.
fig4: the same data sets; the bound estimate ``Rep + delta^2/(2m) kappa`` against the gap.
fig5: Kendall correlation of each comparison measure with the gap over networks trained with
random hyperparameters on scikit-learn's digits, before and after random reparameterizations.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .bound import generalization_bound
from .datasets.synthetic import make_dataset
from .flatness import relative_flatness

SEPARATIONS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TEST_SAMPLES = 20000


def _progress(k: int, total: int, start: float, label: str) -> None:
    width = 30
    done = int(width * k / total)
    rate = (time.perf_counter() - start) / max(k, 1)
    sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {k}/{total} "
                     f"eta {rate * (total - k):5.0f} s")
    if k == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _one_dataset(separation: float, n: int, seed: int, delta: Optional[float]) -> Dict:
    task, model, x, y = make_dataset(separation, n=n, seed=seed)
    xt, yt = task.sample(TEST_SAMPLES, torch.Generator().manual_seed(10**6 + seed))
    with torch.no_grad():
        train_loss = F.cross_entropy(model(x), y).item()
        test_loss = F.cross_entropy(model(xt), yt).item()
    row = {"seed": seed, "kappa": relative_flatness(model, "psi", x, y, block_trace=False).kappa,
           "train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss}
    if delta is not None:
        b = generalization_bound(model, "psi", x, y, delta=delta, seed=seed)
        row.update(bound=b.bound, representativeness=b.representativeness, feature_robustness=b.feature_robustness)
    return row


def run_synthetic(figure: str, separations: Sequence[float], datasets: int, n: int, seed: int,
                  delta: float = 0.1) -> Dict:
    from scipy.stats import kendalltau, pearsonr
    per_sep: List[Dict] = []
    start, total, k = time.perf_counter(), len(separations) * datasets, 0
    for sep in separations:
        rows = []
        for j in range(datasets):
            rows.append(_one_dataset(sep, n, seed * 100000 + j, delta if figure == "fig4" else None))
            k += 1
            _progress(k, total, start, figure)
        kappa = [r["kappa"] for r in rows]
        gap = [r["gap"] for r in rows]
        entry = {"separation": sep, "rows": rows, "pearson": float(pearsonr(kappa, gap)[0]),
                 "kendall": float(kendalltau(kappa, gap)[0])}
        if figure == "fig4":
            entry["mean_bound"] = sum(r["bound"] for r in rows) / datasets
            entry["mean_gap"] = sum(gap) / datasets
        per_sep.append(entry)
    return {"figure": figure, "separation": [e["separation"] for e in per_sep],
            "pearson": [e["pearson"] for e in per_sep], "kendall": [e["kendall"] for e in per_sep],
            "n_datasets": datasets, "n_samples": n, "test_samples": TEST_SAMPLES, "delta": delta,
            "per_separation": per_sep, "seconds": time.perf_counter() - start}


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if result["figure"] == "fig3":
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(result["separation"], result["pearson"], "o-", label="Pearson")
        ax.plot(result["separation"], result["kendall"], "s--", label="Kendall tau")
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: Dict) -> str:
    lines = [f"{result['figure']}: {result['n_datasets']} data sets x {result['n_samples']} samples per separation, "
             f"gap on {result['test_samples']} fresh samples ({result['seconds']:.0f} s)",
             f"{'separation':>10} {'pearson':>8} {'kendall':>8}" + (f" {'mean bound':>11} {'mean gap':>9}"
                                                                     if result["figure"] == "fig4" else "")]
    for e in result["per_separation"]:
        extra = f" {e['mean_bound']:>11.4f} {e['mean_gap']:>9.4f}" if result["figure"] == "fig4" else ""
        lines.append(f"{e['separation']:>10g} {e['pearson']:>8.3f} {e['kendall']:>8.3f}{extra}")
    return "\n".join(lines)


def reproduce(figure: str, quick: bool = False, out: str = "reports/reproduce", seed: int = 0) -> Dict:
    if figure not in ("fig3", "fig4", "fig5"):
        raise ValueError(f"figure must be fig3, fig4 or fig5, got {figure!r}")
    if figure == "fig5":
        result = run_fig5(networks=10 if quick else 40, epochs=(5, 15) if quick else (10, 30, 60), seed=seed)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fig5.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        plot_fig5(result, os.path.join(out, "fig5.png"))
        print(summary_fig5(result))
        print(f"wrote {out}/fig5.json and fig5.png")
        return result
    separations = (0.5, 1.5, 3.0, 6.0) if quick else SEPARATIONS
    datasets = 20 if quick else 100
    result = run_synthetic(figure, separations, datasets, 500, seed)
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


def _relu_mlp(width: int, seed: int):
    """Bias-free ReLU MLP 64-width-width-10: positively homogeneous, so layer-wise rescalings
    (W_l -> a W_l, W_{l+1} -> W_{l+1} / a) leave its function unchanged."""
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width, bias=False), nn.ReLU(), nn.Linear(width, width, bias=False), nn.ReLU(),
                         nn.Linear(width, 10, bias=False))


def _measure_all(model, x, y, seed: int) -> Dict[str, float]:
    from . import measures
    last = "4"
    return {"relative_flatness": relative_flatness(model, last, x, y, block_trace=False).kappa,
            "relative_flatness_normalized": relative_flatness(model, last, x, y, normalize_features=True,
                                                              block_trace=False).kappa,
            "hessian_trace": measures.hessian_trace(model, last, x, y),
            "fisher_rao": measures.fisher_rao_norm(model, x, y).norm,
            "pacbayes_flatness": measures.pacbayes_flatness(model, x, y, draws=4, iterations=10, seed=seed).flatness,
            "weight_norm": measures.weight_norm(dict(model.named_modules())[last])}


def reparameterize(model, seed: int, spread: float = 10.0):
    """A copy of a bias-free ReLU MLP with random layer-wise rescalings (log-uniform in
    [1/spread, spread]) that leave its function unchanged (Appendix C)."""
    import copy
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    linears = [m for m in out if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for a, b in zip(linears[:-1], linears[1:]):
            scale = float(torch.exp((torch.rand((), generator=g) * 2 - 1) * torch.log(torch.tensor(spread))))
            a.weight.mul_(scale)
            b.weight.div_(scale)
    return out


def run_fig5(networks: int, epochs: Sequence[int], seed: int = 0) -> Dict:
    """Trains ``networks`` bias-free ReLU MLPs on scikit-learn's digits (1797 real 8x8 images, the
    shipped real data set; CIFAR-10 cannot be downloaded here) with random hyperparameters, measures
    every comparison measure on the training set and the generalization gap (test minus train
    cross entropy), and reports Kendall's tau of each measure with the gap, before and after a
    random function-preserving reparameterization of each network."""
    from scipy.stats import kendalltau
    from .report import load_digits_split
    x, y, xt, yt = load_digits_split(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    start = time.perf_counter()
    for k in range(networks):
        pick = lambda options: options[int(torch.randint(0, len(options), (), generator=gen))]
        config = {"width": pick([16, 32, 64, 128]), "lr": pick([3e-4, 1e-3, 3e-3, 1e-2]),
                  "batch_size": pick([16, 64, 256]), "epochs": pick(list(epochs)),
                  "weight_decay": pick([0.0, 1e-4, 1e-3])}
        model = _relu_mlp(config["width"], seed * 1000 + k)
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        order = torch.Generator().manual_seed(seed * 1000 + k)
        for _ in range(config["epochs"]):
            perm = torch.randperm(len(y), generator=order)
            for s in range(0, len(y), config["batch_size"]):
                idx = perm[s:s + config["batch_size"]]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            gap = F.cross_entropy(model(xt), yt).item() - F.cross_entropy(model(x), y).item()
        row = {**config, "gap": gap, "measures": _measure_all(model, x, y, seed),
               "measures_reparameterized": _measure_all(reparameterize(model, seed * 1000 + k), x, y, seed)}
        rows.append(row)
        _progress(k + 1, networks, start, "fig5")
    gaps = [r["gap"] for r in rows]
    tau = {m: float(kendalltau([r["measures"][m] for r in rows], gaps)[0]) for m in FIG5_MEASURES}
    tau_r = {m: float(kendalltau([r["measures_reparameterized"][m] for r in rows], gaps)[0]) for m in FIG5_MEASURES}
    return {"figure": "fig5", "dataset": "scikit-learn digits (1257 train / 540 test)", "n_networks": networks,
            "measures": list(FIG5_MEASURES), "kendall": tau, "kendall_reparameterized": tau_r, "rows": rows,
            "seconds": time.perf_counter() - start}


def plot_fig5(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = result["measures"]
    pos = range(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.bar([p - 0.2 for p in pos], [result["kendall"][m] for m in names], width=0.4, label="trained networks")
    ax.bar([p + 0.2 for p in pos], [result["kendall_reparameterized"][m] for m in names], width=0.4,
           label="after random layer-wise reparameterization")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("Kendall tau with the generalization gap")
    ax.set_title(f"Fig. 5 / Appendix C on digits: {result['n_networks']} ReLU MLPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_fig5(result: Dict) -> str:
    lines = [f"fig5: {result['n_networks']} networks on {result['dataset']} ({result['seconds']:.0f} s)",
             f"{'measure':>30} {'kendall':>8} {'reparam.':>9}"]
    for m in result["measures"]:
        lines.append(f"{m:>30} {result['kendall'][m]:>8.3f} {result['kendall_reparameterized'][m]:>9.3f}")
    return "\n".join(lines)
