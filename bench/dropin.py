"""Where the drop-in call ``relative_flatness(model, layer, x, y)`` spends its time on a last layer,
against its parts and its baselines, measured side by side in one process (medians of repeats):
the model-level call, the features-given call, the eager closed form in PyTorch, the logits GEMM
alone, the authors' method (LeNet head, one run), and a profile of the model-level call.

    python -m bench.dropin [--repeats 7] [--imagenet]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf

from bench.common import timed


def _median_ms(fn, repeats: int) -> float:
    return 1e3 * timed(fn, repeats)[0]


def eager_closed_form(phi, w, b):
    """The closed form as a user would write it in PyTorch (cross entropy)."""
    p = torch.softmax(F.linear(phi, w, b), dim=1)
    g = w @ w.T
    return (phi.pow(2).sum(1) * ((p * g.diagonal()).sum(1) - ((p @ g) * p).sum(1))).mean()


def case(n: int, m: int, d: int, repeats: int, profile: bool, authors: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(m, d))
    x = torch.randn(n, m)
    y = torch.randint(0, d, (n,))
    w, b = model[0].weight.detach(), model[0].bias.detach()
    timings = {
        "relative_flatness(model, ...)": _median_ms(lambda: rf.relative_flatness(model, "0", x, y), repeats),
        "relative_flatness_from_features": _median_ms(lambda: rf.relative_flatness_from_features(x, w, y, bias=b),
                                                      repeats),
        "eager closed form (PyTorch)": _median_ms(lambda: eager_closed_form(x, w, b), repeats),
        "logits GEMM alone": _median_ms(lambda: F.linear(x, w, b), repeats),
    }
    if authors:  # one run: the authors' per-entry double backward takes seconds
        start = time.perf_counter()
        rf.relative_flatness_autograd(model, "0", x, y)
        timings["authors' method (per-entry double backward)"] = 1e3 * (time.perf_counter() - start)
    print(f"\n## n={n}, m={m}, d={d}, float32, {torch.get_num_threads()} threads\n")
    call = timings["relative_flatness(model, ...)"]
    print("| what | ms | this / model-level call |")
    print("|---|---|---|")
    for k, v in timings.items():
        print(f"| {k} | {v:.2f} | {v / call:.2f} |")
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                rf.relative_flatness(model, "0", x, y)
        print("\nprofile of the model-level call (3 calls):\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--imagenet", action="store_true", help="also the 50000 x 2048 x 1000 head")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    case(50000, 84, 10, args.repeats, args.profile, authors=True)
    if args.imagenet:
        case(50000, 2048, 1000, max(3, args.repeats // 2), args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
