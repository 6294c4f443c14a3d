"""Shared probes against one layer at a time, on trained networks (where flatness is measured) and at
random initialization: for each model,

* the cost of one Hessian-vector product for all layers (joint) against one layer's (the deepest
  one, whose products run through the whole network, and the median layer), same probes, after a
  warm-up (issue target: joint at most 2x one layer);
* the variance per probe, relative to kappa^2, of every layer: the per-layer estimator, plain joint
  probes, and joint probes deflated by a 32-column sketch;
* the time until every layer reaches ``--rel-tol``: shared deflated probes against the layers one
  by one (capped at ``--max-probes`` products per run).

    python -m bench.shared_probes [--models lenet5 transformer resnet18] [--width 64] [--rel-tol 0.1]

ResNet-18 is torchvision's (or the same built in: ``relflat_ext.apps.resnet``). Writes
bench/results/shared-probes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.resnet import resnet18
from relflat_ext.apps.zoo import lenet5
from relflat_ext.core.layers import weight_layers


class TokenClassifier(nn.Module):
    """Embedding, an nn.TransformerEncoder, mean pooling and a Linear head."""

    def __init__(self, layers=6, width=64, vocab=100, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0,
                                                                        batch_first=True), layers,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _train(model, x, y, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def cases(names, width):
    g = torch.Generator().manual_seed(0)
    if "lenet5" in names:
        x, y = rf.datasets.load_digits(image=True)
        x, y = x[:512], y[:512]
        torch.manual_seed(0)
        yield "LeNet-5, 512 digits, random init", lenet5().eval(), x, y
        torch.manual_seed(0)
        model, loss = _train(lenet5(), x, y, 300, 3e-3)
        yield f"LeNet-5, 512 digits, trained (loss {loss:.1e})", model, x, y
    if "transformer" in names:
        tokens, labels = torch.randint(0, 100, (8, 64), generator=g), torch.randint(0, 10, (8,), generator=g)
        torch.manual_seed(0)
        yield f"6-layer transformer, width {width}, 8 x 64 tokens, random init", TokenClassifier(width=width).eval(), \
            tokens, labels
        torch.manual_seed(0)
        model, loss = _train(TokenClassifier(width=width), tokens, labels, 100, 1e-3)
        yield f"6-layer transformer, width {width}, trained (loss {loss:.1e})", model, tokens, labels
    if "resnet18" in names:
        images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        torch.manual_seed(0)
        model, loss = _train(resnet18(num_classes=10), images, labels, 30, 1e-3)
        yield f"ResNet-18, 32 images 32x32, trained (loss {loss:.1e})", model, images, labels


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(label, model, x, y, probes, rel_tol, max_probes):
    names = weight_layers(model)
    fixed = dict(rel_tol=1e-12, max_probes=probes, probes_per_round=probes, seed=0)
    rf.stochastic_estimate_layers(model, names, x, y, sketch=0, **{**fixed, "max_probes": 2, "probes_per_round": 2})
    plain, t_joint = _timed(lambda: rf.stochastic_estimate_layers(model, names, x, y, sketch=0, **fixed))
    singles, t_single = {}, {}
    for name in names:
        singles[name], t_single[name] = _timed(lambda: rf.stochastic_estimate(model, name, x, y, **fixed))
    deflated = rf.stochastic_estimate_layers(model, names, x, y, sketch=32, **{**fixed, "max_probes": 64 + probes})
    rows = []
    for name in names:
        scale = max(abs(singles[name].value), abs(deflated[name].value), 1e-30) ** 2
        rows.append({"layer": name, "kappa_single": singles[name].value, "kappa_deflated": deflated[name].value,
                     "relvar_single": float(singles[name].samples.double().var()) / scale,
                     "relvar_joint": float(plain[name].samples.double().var()) / scale,
                     "relvar_deflated": float(deflated[name].samples.double().var()) / scale})
    # time to rel_tol for every layer, both ways
    shared, t_shared = _timed(lambda: rf.stochastic_estimate_layers(model, names, x, y, rel_tol=rel_tol,
                                                                    max_probes=max_probes, seed=1))
    one_by_one, t_one_by_one = {}, 0.0
    for name in names:
        one_by_one[name], t = _timed(lambda: rf.stochastic_estimate(model, name, x, y, rel_tol=rel_tol,
                                                                    max_probes=max_probes, seed=1))
        t_one_by_one += t
    deepest = t_single[names[0]]
    median = statistics.median(t_single.values())
    return {"model": label, "layers": len(names), "probes": probes,
            "seconds_per_probe_joint": t_joint / probes, "seconds_per_probe_deepest_layer": deepest / probes,
            "seconds_per_probe_median_layer": median / probes, "ratio_joint_to_deepest": t_joint / deepest,
            "ratio_joint_to_median": t_joint / median,
            "to_rel_tol": {"rel_tol": rel_tol, "max_probes": max_probes,
                           "shared_seconds": t_shared, "shared_products": next(iter(shared.values())).probes,
                           "shared_converged": sum(e.converged for e in shared.values()),
                           "per_layer_seconds": t_one_by_one,
                           "per_layer_products": sum(e.probes for e in one_by_one.values()),
                           "per_layer_converged": sum(e.converged for e in one_by_one.values()),
                           "worst_rel_stderr_shared": max(e.stderr / max(abs(e.value), 1e-300) for e in shared.values()),
                           "worst_rel_stderr_per_layer": max(e.stderr / max(abs(e.value), 1e-300)
                                                             for e in one_by_one.values())},
            "rows": rows}


def _geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["lenet5", "transformer"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--rel-tol", type=float, default=0.1)
    parser.add_argument("--max-probes", type=int, default=400)
    parser.add_argument("--out", default=os.path.join("bench", "results", "shared-probes.json"))
    args = parser.parse_args(argv)
    results = {"device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "cases": []}
    for label, model, x, y in cases(args.models, args.width):
        r = measure(label, model, x, y, args.probes, args.rel_tol, args.max_probes)
        results["cases"].append(r)
        t = r["to_rel_tol"]
        print(f"\n{label}: {r['layers']} layers. Per product: joint {r['seconds_per_probe_joint'] * 1e3:.1f} ms, "
              f"deepest layer {r['seconds_per_probe_deepest_layer'] * 1e3:.1f} ms (ratio "
              f"{r['ratio_joint_to_deepest']:.2f}), median layer {r['seconds_per_probe_median_layer'] * 1e3:.1f} ms "
              f"(ratio {r['ratio_joint_to_median']:.2f})")
        print(f"  variance per probe / kappa^2, geometric mean over layers: per layer "
              f"{_geomean([w['relvar_single'] for w in r['rows']]):.3g}, joint "
              f"{_geomean([w['relvar_joint'] for w in r['rows']]):.3g}, deflated "
              f"{_geomean([w['relvar_deflated'] for w in r['rows']]):.3g}")
        print(f"  to rel_tol {t['rel_tol']} (cap {t['max_probes']} products per run): shared {t['shared_seconds']:.2f} s, "
              f"{t['shared_products']} products, {t['shared_converged']}/{r['layers']} layers converged, worst "
              f"{t['worst_rel_stderr_shared']:.2g}; one by one {t['per_layer_seconds']:.2f} s, "
              f"{t['per_layer_products']} products, {t['per_layer_converged']}/{r['layers']} converged, worst "
              f"{t['worst_rel_stderr_per_layer']:.2g}")
        for w in r["rows"]:
            print(f"  {w['layer']:>42}: kappa {w['kappa_single']:10.4g} (one layer) {w['kappa_deflated']:10.4g} "
                  f"(deflated); var/kappa^2 {w['relvar_single']:9.3g} {w['relvar_joint']:9.3g} "
                  f"{w['relvar_deflated']:9.3g}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
