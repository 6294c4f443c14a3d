"""Per-layer profiles: relative flatness of every weight layer of a model (or the ones named), with
the path each one took, its error bar where it is an estimate, the Hessian trace, the squared weight
norm, time and peak memory; printed as an aligned table, saved as CSV/JSON, plotted.

Layers the exact paths can measure are measured exactly, one by one. The others are estimated
each on its own by default (``probes="per_layer"``), or together (``probes="shared"``): every
Hessian-vector product of the whole network serves all of them, deflated by a low-rank sketch
(:func:`~.joint.stochastic_estimate_layers`); the Hessian traces are estimated layer by layer
either way. A joint product costs 1.2-1.6x the deepest layer's on the CPU, and shared probes
reach kappa of every layer sooner on trained LeNet-5 and transformers (width 384: 62 s against
94 s), later on ResNet-18 (39 against 24 s); whole profiles, traces included, took about as long
either way (148 against 159 s, 55 against 48 s; bench/RESULTS.md), and shared probes hold a
sketch of 32 products (2.6 against 0.8 GB on that transformer): hence the default. Shared probes
give far smaller error bars where the Hessian is near low rank."""
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

from ..core.hvp import WeightNotInLoss
from ..core.layers import (ParameterLayer, acts_on_vectors, resolve_weight_layer, unwrap, weight_layers,
                           weight_matrix)
from ..core.losses import LossSpec
from ..core.modes import measurement
from ..core.usage import LOOKUP
from ..core.progress import ProgressLine
from .api import _dispatch, relative_flatness
from .joint import stochastic_estimate_layers
from .problem import Options, Problem
from .stochastic import stochastic_estimate

COLUMNS = ("layer", "type", "shape", "kappa", "kappa_stderr", "kappa_normalized", "hessian_trace",
           "hessian_trace_stderr", "weight_norm_sq", "method", "samples", "probes", "seconds", "peak_memory_mib")
PROBE_MODES = ("shared", "per_layer")


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
        """kappa_Tr per layer and, beside it, the Hessian trace (where measured): exact values as
        dots, estimates as open squares with standard-error bars. A log axis where the values are
        positive and span decades, a symmetric log axis where some are negative (a layer near a
        saddle, or at random initialization), else a linear one."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        measured = [r for r in self.rows if r["kappa"] is not None]  # not the unused layers
        panels = [("kappa", "kappa_stderr", "relative flatness kappa_Tr")]
        if any(r.get("hessian_trace") is not None for r in measured):
            panels.append(("hessian_trace", "hessian_trace_stderr", "Hessian trace Tr(H) of the layer"))
        labels = [f"{r['layer']} ({r['type']} {'x'.join(map(str, r['shape']))})" for r in measured]
        fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 0.45 * len(measured) + 2.5) * len(panels), 4.5),
                                 squeeze=False)
        for ax, (key, err_key, title) in zip(axes[0], panels):
            values = [r.get(key) for r in measured]
            for exact in (True, False):
                at = [k for k, r in enumerate(measured) if values[k] is not None
                      and (r.get(err_key) is None) == exact]
                if at:
                    ax.errorbar(at, [values[k] for k in at], yerr=None if exact else
                                [measured[k][err_key] for k in at], fmt="o" if exact else "s",
                                mfc=None if exact else "white", color="tab:blue" if exact else "tab:orange",
                                capsize=3, label="exact" if exact else "estimate +- standard error")
            _scale_axis(ax, [v for v in values if v is not None])
            ax.set_xticks(range(len(measured)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _scale_axis(ax, values: List[float]) -> None:
    """log for positive values spanning more than 30x, symlog (linear within the smallest nonzero
    magnitude) where some are negative and magnitudes span that much, else linear."""
    magnitudes = [abs(v) for v in values if v != 0]
    if not magnitudes or max(magnitudes) <= 30 * min(magnitudes):
        return
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(magnitudes))))
        ax.axhline(0.0, color="grey", lw=0.8)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


@measurement
def profile(model: nn.Module, inputs, targets=None, *, loss: Optional[LossSpec] = None,
            layers: Union[str, Sequence[str]] = "auto", probes: str = "per_layer", rel_tol: float = 0.05,
            max_probes: int = 1000, sketch: Union[str, int] = "auto", seed: Optional[int] = 0,
            batch_size: Optional[int] = None, hessian_trace: bool = True, progress: bool = True,
            distributed: Optional[bool] = None) -> ProfileTable:
    """Measures every Linear/Conv/ConvTranspose layer (``layers="auto"``: transformers' Conv1D, the
    attention and recurrent matrices of :func:`weight_layers`, and every other 2-D or stacked 3-D
    parameter the model multiplies features with on the first batch, such as mixture-of-experts
    stacks and routers), or the named ones: exactly where ``relative_flatness``
    (``method="auto"``) would, the others by the stochastic estimator to ``rel_tol``, each on its
    own (``probes="per_layer"``) or all with one shared set of Hessian-vector products
    (``"shared"``, method "stochastic-shared", ``sketch`` as in :func:`stochastic_estimate_layers`;
    ``max_probes`` bounds the products). A layer the loss does not reach (an auxiliary head
    skipped in eval mode) gets a row with method "unused" and no numbers. Adds Theorem 4's
    normalized kappa where it is defined (Linear layers on per-sample features; on the
    Hessian-vector-product path from the same products as kappa), the Hessian trace (exact from
    the block traces, else estimated layer by layer), and ``||W||_F^2``. Peak memory:
    CUDA's peak allocation, or on the CPU the process's resident high-water mark. Progress goes to
    stderr: a line per layer, and a running count of products wherever they are many (exact
    Hessian-vector products, estimates)."""
    if probes not in PROBE_MODES:
        raise ValueError(f"probes must be one of {PROBE_MODES}, got {probes!r}")
    model = unwrap(model)
    names = weight_layers(model) if layers == "auto" else list(layers)
    if layers == "auto":
        names += _multiplied_parameters(model, names, inputs, targets, loss, batch_size, distributed)
    if not names:
        raise ValueError("the model has no Linear or Conv layers to profile; name the layers to measure")
    resolved = [resolve_weight_layer(model, name) for name in names]
    rows: Dict[str, Dict] = {}
    deferred: List[str] = []
    common = dict(loss=loss, batch_size=batch_size, distributed=distributed)
    for k, (name, module) in enumerate(resolved, 1):
        device = module.weight.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        # Tr(H) = Tr(T) where exact; the normalized kappa from the exact path's own products.
        # With shared probes, the estimator's budget does not bound the exact path's products.
        options = Options(block_trace=hessian_trace, progress=progress, normalized_too=True)
        problem = Problem.build(model, name, inputs, targets, loss, batch_size, distributed)
        try:
            if probes == "shared":
                res = _dispatch(problem, "auto", options, estimate=lambda *args: None)
            else:
                res = _dispatch(problem, "auto", dataclasses.replace(options, rel_tol=rel_tol, max_probes=max_probes,
                                                                     seed=seed))
        except WeightNotInLoss as exc:
            rows[name] = _unused_row(name, module, exc, progress)
            continue
        if res is None:  # the estimator's layer: measured with the others below
            deferred.append(name)
            continue
        normalized = trace = trace_se = None
        if res.method != "stochastic":
            normalized = res.kappa_normalized
            if normalized is None:  # the closed form and the chain rule: cheap to run again
                normalized = relative_flatness(model, name, inputs, targets, normalize_features=True, **common).kappa
            trace = _trace_from_block_traces(res)
        elif hessian_trace:
            est = _estimated_trace(model, name, inputs, targets, rel_tol, max_probes, seed, progress, common)
            trace, trace_se = est.value, est.stderr
        rows[name] = _row(name, module, res.kappa, res.kappa_stderr, normalized, trace, trace_se, res.method, res.n,
                          res.probes, time.perf_counter() - start)
        if progress:
            err = f" +- {res.kappa_stderr:.2g}" if res.kappa_stderr is not None else ""
            print(f"[{k}/{len(names)}] {name} ({rows[name]['type']} {'x'.join(map(str, rows[name]['shape']))}): "
                  f"kappa {res.kappa:.5g}{err} [{res.method}] {rows[name]['seconds']:.2f} s", file=sys.stderr,
                  flush=True)
    if deferred:
        rows.update(_shared(model, resolved, deferred, inputs, targets, common, rel_tol, max_probes, sketch, seed,
                            hessian_trace, progress))
    return ProfileTable([rows[name] for name, _ in resolved])


def _multiplied_parameters(model: nn.Module, listed: List[str], inputs, targets, loss, batch_size,
                           distributed) -> List[str]:
    """The other 2-D and stacked 3-D parameters the model multiplies features with (seen on the
    first batch): a mixture-of-experts layer's expert stacks and router, a custom module's weight;
    not embedding tables it only looks up, nor weights of the layers already listed."""
    matrices = [name for name, param in model.named_parameters() if param.dim() in (2, 3)]
    if not matrices:
        return []
    # On the problem's model: a half-precision model's float32 copy, where the watch runs.
    problem = Problem.build(model, listed[0] if listed else matrices[0], inputs, targets, loss, batch_size,
                            distributed)
    covered = {id(resolve_weight_layer(problem.model, name)[1].weight) for name in listed}
    candidates = {name: param for name, param in problem.model.named_parameters()
                  if param.dim() in (2, 3) and id(param) not in covered}
    if not candidates:
        return []
    return [name for name, layout in problem.layouts(candidates).items() if layout not in (None, LOOKUP)]


def _row(name, module, kappa, stderr, normalized, trace, trace_se, method, n, probe_count, seconds) -> Dict:
    kind = f"{module.owner or 'Parameter'} param" if isinstance(module, ParameterLayer) else type(module).__name__
    shape = weight_matrix(module).shape if acts_on_vectors(module) else module.weight.shape  # Conv1D: W, (d, m)
    return {"layer": name, "type": kind, "shape": list(shape), "kappa": kappa, "kappa_stderr": stderr,
            "kappa_normalized": normalized, "hessian_trace": trace, "hessian_trace_stderr": trace_se,
            "weight_norm_sq": float(module.weight.detach().double().pow(2).sum()), "method": method, "samples": n,
            "probes": probe_count, "seconds": seconds, "peak_memory_mib": _peak_mib(module.weight.device)}


def _unused_row(name, module, exc: WeightNotInLoss, progress: bool) -> Dict:
    """A layer the loss does not reach through autograd (an auxiliary head the model skips in eval
    mode): no numbers, method "unused"."""
    if progress:
        print(f"relflat profile: {name}: not measured: {exc}", file=sys.stderr, flush=True)
    return _row(name, module, None, None, None, None, None, "unused", None, None, 0.0)


def _shared(model, resolved, deferred, inputs, targets, common, rel_tol, max_probes, sketch, seed, hessian_trace,
            progress) -> Dict[str, Dict]:
    """The estimator's layers' kappa, all from one shared set of Hessian-vector products; their
    Hessian traces each from its own probes (isotropic directions gain little from the sketch: a
    second shared set took twice kappa's products and longer than per-layer traces on the models
    measured, bench/RESULTS.md). Each row's seconds are the shared run's plus its own."""
    modules = dict(resolved)
    device = modules[deferred[0]].weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    rows = {}
    while True:  # without the layers the loss turns out not to reach (found on the first pass)
        report = ProgressLine(f"{len(deferred)} layers, kappa, shared probes") if progress else None
        try:
            results = stochastic_estimate_layers(model, deferred, inputs, targets, rel_tol=rel_tol,
                                                 max_probes=max_probes, sketch=sketch, seed=seed, progress=report,
                                                 give_up=True, **common)
            break
        except WeightNotInLoss as exc:
            rows.update({name: _unused_row(name, modules[name], exc, progress) for name in exc.names})
            deferred = [name for name in deferred if name not in exc.names]
            if not deferred:
                return rows
        finally:
            if report:
                report.close()
    seconds = time.perf_counter() - start
    for name in deferred:
        est, method = results[name], "stochastic-shared"
        products, row_seconds = est.probes, seconds
        if not est.converged:
            # Far from a minimum the Hessian is not low-rank and the cross-layer terms survive the
            # sketch: go on with this layer's own probes, pooling both unbiased estimates.
            own = stochastic_estimate(model, name, inputs, targets, rel_tol=rel_tol, max_probes=max_probes,
                                      seed=None if seed is None else seed + 1, **common)
            est, method, products = _pooled(est, own, rel_tol), "stochastic-shared+own", products + own.probes
            row_seconds += own.seconds
            if progress:
                print(f"relflat profile: {name}: not converged with shared probes; {own.probes} of its own "
                      f"({own.seconds:.1f} s)", file=sys.stderr, flush=True)
        trace = None
        if hessian_trace:
            trace = _estimated_trace(model, name, inputs, targets, rel_tol, max_probes, seed, progress, common)
            row_seconds += trace.seconds
        rows[name] = _row(name, modules[name], est.value, est.stderr, None, trace.value if trace else None,
                          trace.stderr if trace else None, method, est.n, products, row_seconds)
        if progress and not est.converged:
            print(f"relflat profile: {name}: relative standard error {est.stderr / max(abs(est.value), 1e-300):.2g} "
                  f"(rel_tol={rel_tol}); raise max_probes for more", file=sys.stderr)
    return rows


def _estimated_trace(model, name, inputs, targets, rel_tol, max_probes, seed, progress, common):
    """The layer's Hessian trace from its own probes (both probe modes: see :func:`_shared`)."""
    return stochastic_estimate(model, name, inputs, targets, quantity="hessian_trace", rel_tol=rel_tol,
                               max_probes=max_probes, seed=seed, progress=progress, **common)


def _pooled(a, b, rel_tol: float):
    """Inverse-variance pooling of two independent unbiased estimates."""
    if a.stderr == 0 or b.stderr == 0:
        return a if a.stderr == 0 else b
    wa, wb = a.stderr ** -2, b.stderr ** -2
    value, stderr = (wa * a.value + wb * b.value) / (wa + wb), (wa + wb) ** -0.5
    return dataclasses.replace(b, value=value, stderr=stderr, probes=a.probes + b.probes,
                               converged=stderr <= rel_tol * abs(value))


def _trace_from_block_traces(res) -> Optional[float]:
    """Tr(H) = sum_s Tr(H_{s,s}) = trace of the block-trace matrix T."""
    if res.block_trace is None:
        return None
    value = float(torch.trace(res.block_trace))
    return value if math.isfinite(value) else None
