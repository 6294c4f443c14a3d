"""float32 against float64 at confident minima: the relative error of kappa_Tr (and of the block
traces and kappa_lmax) for every exact path, as the logit margin grows from 0 to 40.

Data: features ``randn(n, m)``, a head ``W = randn(d, m) / 8``. Cross entropy: bias 0 except
``bias[0] = margin`` (class 0 wins by about the margin). BCE with logits: every bias = margin.
The same numbers in float64 are the reference. Paths: the closed form through the compiled kernel
and through the fallback, on the head itself; the chain rule and Hessian-vector products on the
first layer of ``Linear(m, m) -> Tanh -> head``. Shapes cover every kernel branch (d <= 32,
32 < d <= 64, d > 64 with m >= d and with m < d).

    python -m bench.confident [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import relflat_ext as rf
from relflat_ext import fallback_only
from relflat_ext import hvp_only

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from models import behind_a_layer, confident_head  # noqa: E402  the test suite's problems

MARGINS = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
SHAPES = [(10, 64), (40, 64), (100, 256), (100, 32)]  # (d, m)
LOSSES = ["cross_entropy", "bce_with_logits"]
PATHS = ["closed_form", "fallback", "chain_rule", "hvp"]


def _run(path: str, x, w, b, y, loss: str, dtype):
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    if path in ("closed_form", "fallback"):
        if path == "fallback":
            with fallback_only():
                return rf.relative_flatness_from_features(x, w, y, loss=loss, bias=b, lmax=True, block_trace=True)
        return rf.relative_flatness_from_features(x, w, y, loss=loss, bias=b, lmax=True, block_trace=True)
    model = behind_a_layer(w.double(), b.double()).to(dtype)
    if path == "hvp":
        with hvp_only():
            return rf.relative_flatness(model, "0", x, y, loss=loss, method="exact", lmax=True, block_trace=True)
    return rf.relative_flatness(model, "0", x, y, loss=loss, method="exact", lmax=True, block_trace=True)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    scale = b.abs().max()
    if scale < 1e-30:
        return 0.0 if float(a.abs().max()) < 1e-30 else float("inf")
    return float((a - b).abs().max() / scale)


def measure(paths=PATHS, shapes=SHAPES, margins=MARGINS):
    rows = []
    for loss in LOSSES:
        for d, m in shapes:
            for margin in margins:
                x, w, b, y = confident_head(d, m, loss, margin)
                for path in paths:
                    if path in ("chain_rule", "hvp") and m > 64:
                        continue  # the tail is an m x m layer: keep the study short
                    ref = _run(path, x, w, b, y, loss, torch.float64)
                    got = _run(path, x, w, b, y, loss, torch.float32)
                    rows.append({"loss": loss, "d": d, "m": m, "margin": margin, "path": path,
                                 "kappa64": ref.kappa, "kappa": _rel(got.kappa, ref.kappa),
                                 "kappa_lmax": _rel(got.kappa_lmax, ref.kappa_lmax),
                                 "block_trace": _rel(got.block_trace, ref.block_trace)})
    return rows


def table(rows, key: str = "kappa") -> str:
    """Worst relative error over shapes, per loss x path (rows) and margin (columns)."""
    margins = sorted({r["margin"] for r in rows})
    lines = ["| loss | path | " + " | ".join(str(mg) for mg in margins) + " |",
             "|---|---|" + "---|" * len(margins)]
    for loss in LOSSES:
        for path in PATHS:
            cells = []
            for mg in margins:
                errs = [r[key] for r in rows if r["loss"] == loss and r["path"] == path and r["margin"] == mg]
                if not errs:
                    break
                cells.append(f"{max(errs):.0e}")
            if cells:
                lines.append(f"| {loss} | {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--tag", default="", help="suffix of the JSON file (e.g. before/after)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = measure()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"confident{args.tag and '-' + args.tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for key in ("kappa", "block_trace", "kappa_lmax"):
        print(f"\nfloat32 relative error of {key}, worst over shapes {SHAPES} (d, m), by margin:\n")
        print(table(rows, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
