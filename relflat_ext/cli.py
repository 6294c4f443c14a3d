"""Command line: `relflat report` runs the main job (see relflat_ext.report)."""
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
    args = parser.parse_args(argv)
    if args.command == "report":
        from .report import run
        run(epochs=args.epochs, seed=args.seed, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
