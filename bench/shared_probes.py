"""One probe set for every layer against one layer at a time (issue: profiling costs at most 2x
one layer). For the same number of probes: the time of estimating every weight layer jointly
(`stochastic_estimate_layers`), of one layer (`stochastic_estimate`), and of all layers one by one;
and the variance per probe of each layer both ways (the shared probes add cross-layer terms).

    python -m bench.shared_probes [--probes 64] [--out bench/results/shared-probes.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.zoo import lenet5
from relflat_ext.core.layers import weight_layers


def _transformer(layers=6, width=64, vocab=100, classes=10):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0,
                                                                            batch_first=True), layers)
            self.head = nn.Linear(width, classes)

        def forward(self, tokens):
            return self.head(self.encoder(self.embed(tokens)).mean(1))
    return Classifier()


def cases():
    torch.manual_seed(0)
    x, y = rf.datasets.load_digits(image=True)
    yield "LeNet-5 on 512 digits", lenet5().eval(), x[:512], y[:512]
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 100, (8, 64), generator=g), torch.randint(0, 10, (8,), generator=g)
    yield "6-layer transformer, width 64, 8 x 64 tokens", _transformer().eval(), tokens, labels


def measure(label, model, x, y, probes):
    names = weight_layers(model)
    kw = dict(rel_tol=1e-9, max_probes=probes, probes_per_round=probes, seed=0)
    start = time.perf_counter()
    joint = rf.stochastic_estimate_layers(model, names, x, y, **kw)
    t_joint = time.perf_counter() - start
    singles, t_singles = {}, []
    for name in names:
        start = time.perf_counter()
        singles[name] = rf.stochastic_estimate(model, name, x, y, **kw)
        t_singles.append(time.perf_counter() - start)
    rows = [{"layer": n, "kappa_joint": joint[n].value, "kappa_single": singles[n].value,
             "var_per_probe_joint": float(joint[n].samples.double().var()),
             "var_per_probe_single": float(singles[n].samples.double().var())} for n in names]
    return {"model": label, "layers": len(names), "probes": probes, "seconds_joint": t_joint,
            "seconds_one_layer_median": sorted(t_singles)[len(t_singles) // 2], "seconds_all_one_by_one": sum(t_singles),
            "ratio_joint_to_one_layer": t_joint / sorted(t_singles)[len(t_singles) // 2], "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--out", default=os.path.join("bench", "results", "shared-probes.json"))
    args = parser.parse_args(argv)
    results = {"device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "cases": []}
    for label, model, x, y in cases():
        r = measure(label, model, x, y, args.probes)
        results["cases"].append(r)
        print(f"{label}: {r['layers']} layers, {args.probes} probes: joint {r['seconds_joint']:.2f} s, one layer "
              f"(median) {r['seconds_one_layer_median']:.2f} s (ratio {r['ratio_joint_to_one_layer']:.2f}), "
              f"all one by one {r['seconds_all_one_by_one']:.2f} s")
        for row in r["rows"]:
            print(f"  {row['layer']:>32}: kappa {row['kappa_joint']:.4g} (joint) {row['kappa_single']:.4g} (single); "
                  f"variance per probe {row['var_per_probe_joint']:.3g} / {row['var_per_probe_single']:.3g}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
