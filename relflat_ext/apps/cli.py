"""Command line: `relflat report` (the main job, :mod:`.report`), `relflat profile` (every weight
layer of a model on a data set, :func:`relflat_ext.profile`), `relflat reproduce` (the paper's
figures, :mod:`.reproduce`)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="relflat", description="Relative flatness of PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="train an MLP on scikit-learn digits and report relative flatness per layer")
    rep.add_argument("--epochs", type=int, default=60)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--out", default=None, help="write the report as JSON to this file")
    prof = sub.add_parser("profile", help="relative flatness of every weight layer of a model")
    prof.add_argument("--model", default="lenet5",
                      help="'lenet5' (built in, trained on the data first), a torchvision model name, or module:function")
    prof.add_argument("--weights", default=None, help="a local state_dict file for the model")
    prof.add_argument("--data", default="digits",
                      help="'digits', 'digits-flat', 'synthetic-imagenet', or module:function returning a DataLoader")
    prof.add_argument("--samples", type=int, default=None, help="use the first N samples")
    prof.add_argument("--batch-size", type=int, default=256)
    prof.add_argument("--layers", nargs="*", default=None, help="layer names (default: every Linear/Conv layer)")
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--rel-tol", type=float, default=0.05)
    prof.add_argument("--max-probes", type=int, default=1000)
    prof.add_argument("--train-epochs", type=int, default=None,
                      help="train the model first (default: 30 epochs for lenet5, none otherwise)")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--out", default="reports/profile", help="folder for profile.csv/.json/.png")
    from .reproduce import FIGURES
    rep5 = sub.add_parser("reproduce", help="the paper's experiments (Figs. 3, 4 and 5 / Appendix C)")
    rep5.add_argument("figure", choices=list(FIGURES), help="; ".join(
        f"{name}: {fig.description}" for name, fig in FIGURES.items()))
    rep5.add_argument("--quick", action="store_true", help="a smaller run: " + "; ".join(
        f"{name}: {fig.quick} instead of {fig.full}" for name, fig in FIGURES.items()))
    rep5.add_argument("--out", default="reports/reproduce")
    rep5.add_argument("--seed", type=int, default=0)
    rep5.add_argument("--device", default="cpu", help="cpu or cuda: where models are trained and measured")
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        from .reproduce import reproduce
        reproduce(args.figure, quick=args.quick, out=args.out, seed=args.seed, device=args.device)
        return 0
    if args.command == "report":
        from .report import run
        run(epochs=args.epochs, seed=args.seed, out=args.out)
    elif args.command == "profile":
        return _profile(args)
    return 0


def _profile(args) -> int:
    import os
    import time

    import torch

    from ..flatness import profile
    from .training import fit
    from .zoo import load_data, load_model

    loader = load_data(args.data, batch_size=args.batch_size, samples=args.samples, seed=args.seed)
    model = load_model(args.model, args.weights, seed=args.seed)
    epochs = args.train_epochs if args.train_epochs is not None else (30 if args.model == "lenet5" else 0)
    if epochs:
        print(f"training {args.model} on {args.data} for {epochs} epochs ...")
        fit(model, loader, epochs, log=print)
    device = torch.device(args.device)
    model = model.to(device).eval()
    if device.type != "cpu":
        loader = [(x.to(device), y.to(device)) for x, y in loader]
    start = time.perf_counter()
    table = profile(model, loader, layers=args.layers or "auto", rel_tol=args.rel_tol, max_probes=args.max_probes,
                    seed=args.seed)
    print(f"\n{args.model} on {args.data} ({table.rows[0]['samples']} samples, {args.device}): "
          f"{time.perf_counter() - start:.1f} s\n")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "profile.csv"))
    table.to_json(os.path.join(args.out, "profile.json"))
    table.plot(os.path.join(args.out, "profile.png"))
    print(f"\nwrote {args.out}/profile.csv, profile.json, profile.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
