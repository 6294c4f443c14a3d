"""Per-layer profiles: relative flatness of every weight layer of a model (or the ones named), with
the path each one took, its error bar where it is an estimate, the Hessian trace, the squared weight
norm, time and peak memory; printed as an aligned table, saved as CSV/JSON, plotted."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..core.layers import ParameterLayer, resolve_weight_layer, weight_layers
from ..core.losses import LossSpec
from .api import relative_flatness
from .stochastic import stochastic_estimate

COLUMNS = ("layer", "type", "shape", "kappa", "kappa_stderr", "kappa_normalized", "hessian_trace",
           "hessian_trace_stderr", "weight_norm_sq", "method", "samples", "probes", "seconds", "peak_memory_mib")


@dataclasses.dataclass
class ProfileTable:
    """One row (a dict with COLUMNS) per layer."""
    rows: List[Dict]

    def __str__(self) -> str:
        def cell(v):
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.4g}"
            if isinstance(v, (list, tuple)):
                return "x".join(map(str, v))
            return str(v)
        cells = [[cell(r[c]) for c in COLUMNS] for r in self.rows]
        widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(COLUMNS)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in r.items()})

    def to_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.rows, fh, indent=2)

    def plot(self, path: str) -> None:
        """kappa per layer on a log axis, with standard-error bars for estimates."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [r["layer"] for r in self.rows]
        kappa = [max(r["kappa"], 1e-300) for r in self.rows]
        err = [r["kappa_stderr"] or 0.0 for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 4))
        colors = ["tab:orange" if r["method"] == "stochastic" else "tab:blue" for r in self.rows]
        ax.bar(range(len(names)), kappa, yerr=err, color=colors, capsize=3)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("kappa_Tr (blue: exact, orange: stochastic +- s.e.)")
        ax.set_title("relative flatness per layer")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


def profile(model: nn.Module, inputs, targets=None, *, loss: LossSpec = "cross_entropy",
            layers: Union[str, Sequence[str]] = "auto", rel_tol: float = 0.05, max_probes: int = 1000,
            seed: Optional[int] = 0, batch_size: Optional[int] = None, hessian_trace: bool = True,
            progress: bool = True, distributed: Optional[bool] = None) -> ProfileTable:
    """Measures every Linear/Conv layer (``layers="auto"``) or the named ones, each through
    ``relative_flatness(method="auto")``: exact where possible, the stochastic estimator otherwise
    (to ``rel_tol``). Adds Theorem 4's normalized kappa where it is defined (Linear layers on (n, m)
    features), the Hessian trace (exact from the block traces, else estimated), and ``||W||_F^2``.
    Peak memory: CUDA's peak allocation during the layer, or on the CPU the process's resident
    high-water mark. Progress goes to stderr, one line per layer."""
    names = weight_layers(model) if layers == "auto" else list(layers)
    if not names:
        raise ValueError("the model has no Linear or Conv layers to profile; name the layers to measure")
    rows = []
    for k, name in enumerate(names, 1):
        name, module = resolve_weight_layer(model, name)
        device = module.weight.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        res = relative_flatness(model, name, inputs, targets, loss=loss, batch_size=batch_size, rel_tol=rel_tol,
                                max_probes=max_probes, seed=seed, distributed=distributed,
                                block_trace=hessian_trace)  # Tr(H) = Tr(T) where the exact path runs
        normalized = trace = trace_se = None
        if res.method != "stochastic":
            normalized = relative_flatness(model, name, inputs, targets, loss=loss, batch_size=batch_size,
                                           normalize_features=True, block_trace=False, distributed=distributed).kappa
            trace = _trace_from_block_traces(res)
        elif hessian_trace:
            est = stochastic_estimate(model, name, inputs, targets, loss=loss, quantity="hessian_trace",
                                      rel_tol=rel_tol, max_probes=max_probes, seed=seed, batch_size=batch_size,
                                      distributed=distributed)
            trace, trace_se = est.value, est.stderr
        kind = "Parameter" if isinstance(module, ParameterLayer) else type(module).__name__
        row = {"layer": name, "type": kind, "shape": list(module.weight.shape), "kappa": res.kappa,
               "kappa_stderr": res.kappa_stderr, "kappa_normalized": normalized, "hessian_trace": trace,
               "hessian_trace_stderr": trace_se,
               "weight_norm_sq": float(module.weight.detach().double().pow(2).sum()), "method": res.method,
               "samples": res.n, "probes": res.probes, "seconds": time.perf_counter() - start,
               "peak_memory_mib": _peak_mib(device)}
        rows.append(row)
        if progress:
            err = f" +- {res.kappa_stderr:.2g}" if res.kappa_stderr is not None else ""
            print(f"[{k}/{len(names)}] {name} ({row['type']} {'x'.join(map(str, row['shape']))}): kappa "
                  f"{res.kappa:.5g}{err} [{res.method}] {row['seconds']:.2f} s", file=sys.stderr, flush=True)
    return ProfileTable(rows)


def _trace_from_block_traces(res) -> Optional[float]:
    """Tr(H) = sum_s Tr(H_{s,s}) = trace of the block-trace matrix T."""
    if res.block_trace is None:
        return None
    value = float(torch.trace(res.block_trace))
    return value if math.isfinite(value) else None
