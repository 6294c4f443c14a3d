"""Relative error of ``relative_flatness`` against the authors' autograd baseline (full Hessian of the
layer, then its block traces), float64, on random MLPs (tanh, softplus, GELU, ReLU; 2-4 layers),
every Linear layer, every built-in loss and a callable one, for each path that ran: the closed form,
the chain rule through the tail, and Hessian-vector products. Then the regime users meet: an MLP
trained on scikit-learn's digits to a train loss below 1e-5 (median logit margin about 15), each
path in float64 and in float32 against the float64 baseline. Writes a JSON and prints tables.

    python -m bench.accuracy [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import sys

import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.training import fit
from relflat_ext import hvp_only
from relflat_ext.apps.zoo import mlp as zoo_mlp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from models import data, mlp  # noqa: E402  the test suite's random networks and data

NETWORKS = [([6, 5, 4], "tanh"), ([5, 7, 6, 3], "softplus"), ([4, 6, 5, 4, 3], "gelu"), ([8, 9, 7, 4], "relu")]


def _quartic(out, target):
    return F.smooth_l1_loss(out, target) + 0.1 * out.pow(4).mean()


LOSSES = {"cross_entropy": "cross_entropy", "mse": "mse", "bce_with_logits": "bce_with_logits", "callable": _quartic}


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def measure(n: int = 64):
    rows = []
    for seed, (widths, act) in enumerate(NETWORKS):
        model = mlp(widths, act, seed=seed)
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for loss_name, loss in LOSSES.items():
            x, y = data(n, widths[0], widths[-1], "mse" if loss_name == "callable" else loss_name, seed=seed)
            for name in names:
                base = rf.relative_flatness_autograd(model, name, x, y, loss=loss, lmax=True, vectorize=True)
                runs = [rf.relative_flatness(model, name, x, y, loss=loss, lmax=True, block_trace=True)]
                if runs[0].method == "exact":
                    with hvp_only():
                        runs.append(rf.relative_flatness(model, name, x, y, loss=loss, lmax=True, block_trace=True))
                for res in runs:
                    path = res.method if res.method == "closed_form" else (
                        "chain_rule" if "chain rule" in res.reason else "hvp")
                    rows.append({"network": f"{'-'.join(map(str, widths))} {act}", "layer": name, "loss": loss_name,
                                 "path": path, "kappa": _rel(res.kappa, base.kappa),
                                 "kappa_lmax": _rel(res.kappa_lmax, base.kappa_lmax),
                                 "block_trace": _rel(res.block_trace, base.block_trace)})
    return rows


def confident_network(target_loss: float = 1e-5, max_steps: int = 20000):
    """64-32-10 tanh MLP trained (Adam, full batch, float64) on 70% of the digits to train CE < target_loss."""
    x, y, _, _ = rf.datasets.digits_split(seed=0, test_fraction=0.3)
    x = x.double()
    torch.manual_seed(0)
    run = fit(zoo_mlp([64, 32, 10]).double(), (x, y), max_steps, lr=1e-2, batch_size=len(y), stop_below=target_loss)
    run.model.zero_grad(set_to_none=True)
    return run.model, x, y, run.loss


def measure_confident():
    model, x, y, train_loss = confident_network()
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).median().item()
    rows = []
    for name in ("0", "2"):
        base = rf.relative_flatness_autograd(model, name, x, y, lmax=True, vectorize=True)
        for dtype in (torch.float64, torch.float32):
            m, xx = model.to(dtype), x.to(dtype)
            runs = [rf.relative_flatness(m, name, xx, y, lmax=True, block_trace=True)]
            if runs[0].method == "exact":
                with hvp_only():
                    runs.append(rf.relative_flatness(m, name, xx, y, lmax=True, block_trace=True))
            for res in runs:
                path = res.method if res.method == "closed_form" else (
                    "chain_rule" if "chain rule" in res.reason else "hvp")
                rows.append({"network": "digits 64-32-10 tanh, trained", "train_loss": train_loss,
                             "median_margin": margin, "layer": name, "dtype": str(dtype).replace("torch.", ""),
                             "path": path, "kappa_baseline": base.kappa, "kappa": _rel(res.kappa, base.kappa),
                             "kappa_lmax": _rel(res.kappa_lmax, base.kappa_lmax),
                             "block_trace": _rel(res.block_trace, base.block_trace)})
        model.double()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    rows = measure()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(rows, f, indent=1)
    worst = defaultdict(lambda: defaultdict(float))
    for r in rows:
        for key in ("kappa", "kappa_lmax", "block_trace"):
            worst[r["path"]][key] = max(worst[r["path"]][key], r[key])
    counts = defaultdict(int)
    for r in rows:
        counts[r["path"]] += 1
    print("| path | cases | max rel. error kappa | kappa_lmax | block_trace (max-norm) |")
    print("|---|---|---|---|---|")
    for path, w in worst.items():
        print(f"| {path} | {counts[path]} | {w['kappa']:.1e} | {w['kappa_lmax']:.1e} | {w['block_trace']:.1e} |")
    confident = measure_confident()
    with open(os.path.join(args.out, "accuracy-confident.json"), "w") as f:
        json.dump(confident, f, indent=1)
    c = confident[0]
    print(f"\n{c['network']}: train loss {c['train_loss']:.1e}, median logit margin {c['median_margin']:.1f}\n")
    print("| layer | dtype | path | kappa (baseline) | rel. error kappa | kappa_lmax | block_trace |")
    print("|---|---|---|---|---|---|---|")
    for r in confident:
        print(f"| {r['layer']} | {r['dtype']} | {r['path']} | {r['kappa_baseline']:.3e} | {r['kappa']:.1e} | "
              f"{r['kappa_lmax']:.1e} | {r['block_trace']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
