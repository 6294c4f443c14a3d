"""The paper's synthetic experiments (Section 6), behind ``relflat reproduce {fig3,fig4}``.

fig3: for each class separation, many data sets (paper: 100 of 500 samples); on each, psi is
trained on the features, and we measure relative flatness of psi and the generalization gap (loss
on a large fresh sample minus training loss); Pearson and Kendall correlation per separation.
fig4: the same data sets; the bound estimate ``Rep + delta^2/(2m) kappa`` against the gap.
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
    if figure not in ("fig3", "fig4"):
        raise ValueError(f"figure must be fig3 or fig4 (fig5 is not implemented yet), got {figure!r}")
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
