"""Whole-model profiles with their times (issue: profiling on the architectures people use):

* ``transformer``: a 6-layer nn.TransformerEncoder classifier of width ``--width`` (384 by
  default) on 8 sequences of 64 tokens, trained to a minimum (``transformer-init``: at random
  initialization, where kappa of the inner layers is near zero and a relative tolerance is out of
  reach for any estimator);
* ``resnet18``: torchvision's ResNet-18 on 32 images of 32x32, trained to a minimum (the same
  architecture built in where torchvision does not import: ``relflat_ext.apps.resnet``);
* ``resnet18-224``: the same trained on 512 images of 224x224 in batches of 64 (a GPU's job);
* ``gpt2``: GPT-2 small with random weights on 64 sequences of 128 tokens (a GPU's job);
* ``gpt2-tiny``: the 2-layer GPT-2 of the CLI's smoke test.

Every layer to ``--rel-tol`` relative standard error (``--probes``: shared deflated probes by
default, the Hessian trace too), capped at ``--max-probes`` products per estimate; ``--compare``
times kappa alone both ways.

    python -m bench.profile_models [--models transformer resnet18] [--device cpu] [--rel-tol 0.1]

Writes bench/results/profile-<model>.json (the table and the times)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import relflat_ext as rf
from bench.shared_probes import TokenClassifier, _train
from relflat_ext.apps.resnet import resnet18
from relflat_ext.apps.zoo import gpt2_random, synthetic_tokens


def models(names, width, device, images=(512, 224)):
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 100, (8, 64), generator=g), torch.randint(0, 10, (8,), generator=g)
    if "transformer-init" in names:
        torch.manual_seed(0)
        yield "transformer-init", f"6-layer transformer, width {width}, 8 x 64 tokens, random init", \
            TokenClassifier(width=width).eval(), tokens, labels
    if "transformer" in names:
        torch.manual_seed(0)
        model, loss = _train(TokenClassifier(width=width), tokens, labels, 100, 3e-4)
        yield "transformer-trained", f"6-layer transformer, width {width}, 8 x 64 tokens, trained (loss {loss:.1e})", \
            model, tokens, labels
    if "resnet18" in names:
        images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        torch.manual_seed(0)
        model, _ = _train(resnet18(num_classes=10), images, labels, 30, 1e-3)
        loss = _settle_batchnorm(model, images, labels)
        yield "resnet18-trained", f"ResNet-18 ({_origin(model)}), 32 images 32x32, trained (eval-mode loss {loss:.1e})", \
            model, images, labels
    if "resnet18-224" in names:  # trained where it will be measured: 512 images of 224x224 are a GPU's job
        count, size = images
        x, y = torch.randn(count, 3, size, size, generator=g), torch.randint(0, 10, (count,), generator=g)
        x, y = x.to(device), y.to(device)
        torch.manual_seed(0)
        model, _ = _train(resnet18(num_classes=10).to(device), x, y, 30, 1e-3)
        loss = _settle_batchnorm(model, x, y)
        batches = [(x[s:s + 64], y[s:s + 64]) for s in range(0, count, 64)]
        yield "resnet18-224-trained", f"ResNet-18 ({_origin(model)}), {count} images {size}x{size}, trained " \
            f"(eval-mode loss {loss:.1e})", model, batches, None
    for spec, n, seq in (("gpt2", 64, 128), ("gpt2-tiny", 8, 32)):
        if spec in names:
            torch.manual_seed(0)
            model = gpt2_random("gpt2-small-random" if spec == "gpt2" else "gpt2-tiny-random")
            batches = synthetic_tokens(n, seq, model.config.vocab_size, batch_size=16 if spec == "gpt2" else 8)
            yield spec + "-random", f"{spec} random weights, {n} x {seq} tokens", model, batches, None


def _origin(model) -> str:
    return "torchvision" if type(model).__module__.startswith("torchvision") else "built in, as torchvision's"


def _settle_batchnorm(model, x, y) -> float:
    """BatchNorm's running statistics recomputed on the data (a cumulative average), so that the
    eval-mode network measured is the minimum training reached; returns its eval-mode loss."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
        loss = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["transformer"])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rel-tol", type=float, default=0.1)
    parser.add_argument("--max-probes", type=int, default=400)
    parser.add_argument("--probes", choices=["shared", "per_layer"], default="shared")
    parser.add_argument("--compare", action="store_true",
                        help="kappa only, shared probes against per_layer, both timed")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--images", type=int, nargs=2, default=[512, 224], metavar=("COUNT", "SIZE"),
                        help="resnet18-224's data (a smaller smoke test on the CPU)")
    parser.add_argument("--suffix", default="", help="appended to the JSON files' names (e.g. -per_layer)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    os.makedirs(args.out, exist_ok=True)
    for key, label, model, x, y in models(args.models, args.width, device, tuple(args.images)):
        model = model.to(device)
        if isinstance(x, list):  # batches: dicts of tensors, or (x, y) pairs
            x = [{k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else tuple(t.to(device) for t in b)
                 for b in x]
        else:
            x, y = x.to(device), y.to(device)
        if args.compare:
            times = {}
            for mode in ("shared", "per_layer"):
                start = time.perf_counter()
                table = rf.profile(model, x, y, rel_tol=args.rel_tol, max_probes=args.max_probes, probes=mode,
                                   hessian_trace=False, progress=False)
                times[mode] = {"seconds": time.perf_counter() - start,
                               "products": sum(r["probes"] or 0 for r in table.rows) if mode == "per_layer" else
                               max(r["probes"] or 0 for r in table.rows),
                               "worst_rel_stderr": max(r["kappa_stderr"] / abs(r["kappa"]) for r in table.rows
                                                       if r["kappa_stderr"])}
            print(f"{label} on {where}: kappa of every layer to rel_tol {args.rel_tol}: {times}")
            with open(os.path.join(args.out, f"profile-compare-{key}{args.suffix}.json"), "w") as fh:
                json.dump({"model": label, "device": where, "rel_tol": args.rel_tol, **times}, fh, indent=2)
            continue
        start = time.perf_counter()
        table = rf.profile(model, x, y, rel_tol=args.rel_tol, max_probes=args.max_probes, probes=args.probes)
        seconds = time.perf_counter() - start
        worst = max(r["kappa_stderr"] / abs(r["kappa"]) for r in table.rows if r["kappa_stderr"])
        converged = sum(1 for r in table.rows if not r["kappa_stderr"] or r["kappa_stderr"] <= args.rel_tol * abs(r["kappa"]))
        print(f"\n{label} on {where}, torch {torch.__version__}: {len(table.rows)} layers in {seconds:.1f} s; "
              f"{converged}/{len(table.rows)} within rel_tol {args.rel_tol} (worst {worst:.2g})\n{table}")
        with open(os.path.join(args.out, f"profile-{key}{args.suffix}.json"), "w") as fh:
            json.dump({"model": label, "device": where, "torch": torch.__version__, "rel_tol": args.rel_tol,
                       "max_probes": args.max_probes, "probes": args.probes, "seconds": seconds, "converged": converged,
                       "worst_rel_stderr": worst, "rows": table.rows}, fh, indent=2)


if __name__ == "__main__":
    main()
