"""Error of the stochastic estimator against the number of probes, on a Linear layer (exact kappa
from the exact path) and a conv layer (exact kappa from the dense Hessian of its weight), for
plain Gaussian probes and for Rademacher (+-1) probes (same second moment, lower variance for
quadratic forms: the candidate variance reduction, measured here).

    python -m bench.stochastic_error [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.zoo import lenet5


def _exact_conv_kappa(model, name, x, y):
    module = dict(model.named_modules())[name]
    w0 = module.weight.detach().clone()
    pname = f"{name}.weight"

    def risk(w):
        return nn.functional.cross_entropy(torch.func.functional_call(model, {pname: w}, (x,)), y)
    hess = torch.autograd.functional.hessian(risk, w0)
    mat = w0.reshape(w0.shape[0], -1)
    d, m = mat.shape
    return rf.ops.dense_block_trace(hess.reshape(d * m, d * m), mat)[0].item()


def _probe_values(model, name, x, y, count, kind, seed):
    """count per-probe quadratic forms <W A, H W A> (the estimator's own samples)."""
    return rf.stochastic_estimate(model, name, x, y, rel_tol=1e-9, max_probes=count, probes_per_round=256,
                                  seed=seed, probe_distribution=kind).samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = lenet5().double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = rf.datasets.load_digits(image=True)
    x, y = x[:400].double(), y[:400]
    cases = {"Linear 120x64 (layer 7)": ("7", rf.relative_flatness(model, "7", x, y).kappa),
             "Conv2d 16x6x3x3 (layer 3)": ("3", _exact_conv_kappa(model, "3", x, y))}
    counts = [4, 8, 16, 32, 64, 128, 256]
    repeats = 20
    results = {}
    for label, (name, exact) in cases.items():
        for kind in ("gaussian", "rademacher"):
            q = _probe_values(model, name, x, y, repeats * counts[-1], kind, seed=1).reshape(repeats, counts[-1])
            rel_err = []
            for c in counts:  # root-mean-square relative error of the mean of c probes, over repeats
                est = q[:, :c].mean(1)
                rel_err.append(float(((est - exact) / exact).pow(2).mean().sqrt()))
            results[f"{label}, {kind}"] = {"probes": counts, "rms_relative_error": rel_err, "exact": exact,
                                           "per_probe_cv": float(q.std() / abs(exact))}
            print(f"{label:28s} {kind:10s} exact {exact:.5g}  per-probe CV {results[f'{label}, {kind}']['per_probe_cv']:.3f}"
                  f"  rms rel. error at 32 probes {rel_err[counts.index(32)]:.3f}", flush=True)
    with open(os.path.join(args.out, "stochastic-error.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, r in results.items():
        ax.plot(r["probes"], r["rms_relative_error"], "o-" if "gaussian" in key else "s--", label=key)
    ax.plot(counts, [results[next(iter(results))]["per_probe_cv"] / c ** 0.5 for c in counts], "k:", label="1/sqrt(probes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("probes")
    ax.set_ylabel("rms relative error of kappa (20 repeats)")
    ax.set_title("stochastic kappa estimator, LeNet-5 on digits (random weights)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, "stochastic-error.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
