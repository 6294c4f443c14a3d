"""How far FAM's gradient is from the gradient of kappa. LeNet-5 trained 3 epochs on 2000 MNIST
digits (SGD, lr 0.05), one batch of 256: the value and the gradient in the last layer's weight of
(a) the faithful FAMreg (bench/fam_baseline.py), (b) the same with the Hessian slice taken in the
right layout but still cut from the graph, (c) kappa_Tr / m with its exact gradient
(FlatnessRegularizer); and the gradient the exact penalty sends into the earlier layers (FAM's
sends none).

    python -m bench.fam_gradient [--out bench/results/fam-gradient.json]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import relflat_ext as rf
from relflat_ext.apps.training import fit
from relflat_ext.apps.zoo import lenet5

from bench.fam_baseline import fam_neuronwise


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fam-gradient.json")
    args = parser.parse_args(argv)
    x, y = rf.datasets.load_mnist_subset()
    torch.manual_seed(0)
    model = lenet5(activation="relu", image_size=28)
    fit(model, (x[:2000], y[:2000]), 3, optimizer="sgd", lr=0.05)
    xb, yb = x[:256], y[:256]
    weight = model[11].weight
    m = weight.shape[1]
    fam = fam_neuronwise(model, "11.weight", xb, yb)
    grad_fam = torch.autograd.grad(fam.sum(), weight)[0]
    with rf.FlatnessRegularizer(model, "11") as reg:
        model(xb)
        kappa = reg.penalty(yb)
        grads = torch.autograd.grad(kappa, list(model.parameters()))
    grad_true = grads[-2] / m  # FAM divides the trace by m
    hessian = torch.func.jacfwd(torch.func.jacrev(
        lambda w: F.cross_entropy(torch.func.functional_call(model, {"11.weight": w}, (xb,)), yb)))(weight.detach())
    block_trace = torch.diagonal(hessian, dim1=1, dim2=3).sum(-1)  # (d, d): Tr(H_{s,t})
    grad_cut = 2 * block_trace @ weight.detach() / m  # the Hessian held fixed
    names = [n for n, _ in model.named_parameters()]
    result = {
        "kappa_over_m": kappa.item() / m, "famreg_value": fam.item(),
        "cosine_famreg_vs_exact": _cosine(grad_fam, grad_true), "norm_famreg_over_exact": float(grad_fam.norm() / grad_true.norm()),
        "cosine_cut_vs_exact": _cosine(grad_cut, grad_true), "norm_cut_over_exact": float(grad_cut.norm() / grad_true.norm()),
        "exact_gradient_norms_earlier_layers": {n: float(g.norm()) for n, g in zip(names[:-2], grads[:-2])},
    }
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
