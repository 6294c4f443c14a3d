"""Scaling study: time and peak memory as the work grows, for the last-layer closed form, the exact
path on an intermediate layer (streamed from a DataLoader or in one batch), and the KDE kernel, each
next to its baselines. Every point runs in a fresh process so its peak memory is its own (CPU: peak
resident set size above the process's size before the work; CUDA: peak allocated bytes). Baselines
whose memory need exceeds --memory-gib are marked "out of memory" instead of being run.

    python -m bench.scaling [--device cpu|cuda] [--quick] [--out bench/results]

Writes scaling.json and one PNG per work item (time and memory against size, log-log).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Dict, List, Optional


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _eager_closed_form(phi, w, b):
    import torch
    p = torch.softmax(phi @ w.T + b, 1)
    return (phi.pow(2).sum(1) * ((p * w.pow(2).sum(1)).sum(1) - (p @ w).pow(2).sum(1))).mean()


def _point(spec: Dict, queue) -> None:
    """Runs one measurement in this (fresh) process and puts {seconds, peak_bytes} on the queue."""
    import torch
    import relflat_ext as rf

    device = torch.device(spec["device"])
    g = torch.Generator().manual_seed(0)
    work, who, n = spec["work"], spec["contender"], spec["n"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if work == "head":
        m, d = spec["m"], spec["d"]
        phi = torch.randn(n, m, generator=g).to(device)
        w = (torch.randn(d, m, generator=g) / m ** 0.5).to(device)
        b = torch.zeros(d, device=device)
        y = torch.randint(0, d, (n,), generator=g).to(device)
        head = torch.nn.Linear(m, d).to(device)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.zero_()
        fns = {"relflat": lambda: rf.relative_flatness_from_features(phi, w, y, bias=b, block_trace=False),
               "eager": lambda: _eager_closed_form(phi, w, b),
               "autograd-loop": lambda: rf.relative_flatness_autograd(head, head, phi, y),
               "torch-func-hessian": lambda: torch.func.hessian(
                   lambda ww: torch.nn.functional.cross_entropy(phi @ ww.T + b, y))(w)}
    elif work == "exact":
        width = spec["m"]
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(100, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                    torch.nn.Tanh(), torch.nn.Linear(width, 10)).to(device)
        x = torch.randn(n, 100, generator=g).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1000)
        fns = {"relflat-streamed": lambda: rf.relative_flatness(model, "2", loader, block_trace=False),
               "relflat-one-batch": lambda: rf.relative_flatness(model, "2", x, y, block_trace=False),
               "autograd-vectorized": lambda: rf.relative_flatness_autograd(model, "2", x, y, vectorize=True)}
    else:  # kde
        m = spec["m"]
        train = torch.randn(n, m, generator=g).to(device)
        test = torch.randn(n, m, generator=g).to(device)
        h = 4.0

        def torch_full():
            d2 = torch.cdist(test, train).square_()
            return torch.logsumexp(d2.mul_(-0.5 / h ** 2), 1)

        def torch_chunked():
            return torch.cat([torch.logsumexp(torch.cdist(test[s:s + 1024], train).square_().mul_(-0.5 / h ** 2), 1)
                              for s in range(0, n, 1024)])

        def sklearn():
            from sklearn.neighbors import KernelDensity
            return KernelDensity(bandwidth=h).fit(train.cpu().numpy()).score_samples(test.cpu().numpy())

        fns = {"relflat": lambda: rf.kde_log_density(train, test, h), "torch-chunked": torch_chunked,
               "torch-full-matrix": torch_full, "sklearn": sklearn}
    fn = fns[who]
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    fn()
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    queue.put({"seconds": seconds, "peak_bytes": peak})


def _predicted_bytes(spec: Dict) -> float:
    """Memory the baselines need by construction (the pieces they must hold at once)."""
    n, who = spec["n"], spec["contender"]
    if spec["work"] == "head":
        dm = spec["d"] * spec["m"]
        # torch.func.hessian = jacfwd(jacrev): dm tangents through the (n, d) graph, several buffers
        # alive at once (measured: 17 GiB at n=10000, d=m=64, where one buffer is 2.6 GB).
        return {"autograd-loop": 4.0 * dm * dm, "torch-func-hessian": 4.0 * (dm * dm + 7 * dm * n * spec["d"])}.get(who, 0)
    if spec["work"] == "exact" and who == "autograd-vectorized":
        dm = spec["m"] * spec["m"]
        return 4.0 * dm * dm
    if spec["work"] == "kde" and who == "torch-full-matrix":
        return 8.0 * n * n
    return 0.0


def measure(spec: Dict, memory_limit: float, timeout: float) -> Dict:
    need = _predicted_bytes(spec)
    if need > memory_limit:
        return {**spec, "status": f"out of memory (needs {need / 2**30:.1f} GiB)", "seconds": None, "peak_bytes": None}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_point, args=(spec, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {**spec, "status": f"over {timeout:.0f} s", "seconds": None, "peak_bytes": None}
    if queue.empty():
        return {**spec, "status": f"failed (exit code {proc.exitcode})", "seconds": None, "peak_bytes": None}
    return {**spec, "status": "ok", **queue.get()}


def plan(quick: bool, device: str) -> List[Dict]:
    big = device == "cuda"
    specs: List[Dict] = []
    ns = [1000, 10000, 100000] if quick else [1000, 3000, 10000, 30000, 100000, 300000]
    for n in ns:
        for who in ("relflat", "eager", "autograd-loop", "torch-func-hessian"):
            if who == "autograd-loop" and n > (10000 if quick else 100000):
                continue
            specs.append({"work": "head", "sweep": "n", "contender": who, "n": n, "m": 84, "d": 10})
    for width in ([16, 64, 256] if quick else [16, 32, 64, 128, 256, 512]):
        for who in ("relflat", "eager", "torch-func-hessian"):
            specs.append({"work": "head", "sweep": "d=m", "contender": who, "n": 10000, "m": width, "d": width})
    for n in ([2000, 20000] if quick else [2000, 10000, 50000, 200000]):
        for who in ("relflat-streamed", "relflat-one-batch", "autograd-vectorized"):
            if who == "autograd-vectorized" and n > 10000:
                continue
            specs.append({"work": "exact", "sweep": "n", "contender": who, "n": n, "m": 32})
    for n in ([1000, 4000] if quick else [1000, 2000, 5000, 10000, 20000] + ([50000] if big else [])):
        for who in ("relflat", "torch-chunked", "torch-full-matrix", "sklearn"):
            if who == "sklearn" and n > 5000:
                continue
            specs.append({"work": "kde", "sweep": "n", "contender": who, "n": n, "m": 84})
    for s in specs:
        s["device"] = device
    return specs


def plot(results: List[Dict], out: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = sorted({(r["work"], r["sweep"]) for r in results})
    for work, sweep in keys:
        rows = [r for r in results if r["work"] == work and r["sweep"] == sweep]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        xkey = "n" if sweep == "n" else "m"
        for who in dict.fromkeys(r["contender"] for r in rows):
            pts = [r for r in rows if r["contender"] == who]
            ok = [r for r in pts if r["status"] == "ok"]
            line = axes[0].plot([r[xkey] for r in ok], [r["seconds"] for r in ok], "o-", label=who)[0]
            axes[1].plot([r[xkey] for r in ok], [max(r["peak_bytes"], 1 << 20) / 2**20 for r in ok], "o-",
                         color=line.get_color(), label=who)
            failed = [r for r in pts if r["status"] != "ok"]
            for r in failed:
                axes[1].annotate("OOM" if "memory" in r["status"] else "timeout", (r[xkey], 1),
                                 color=line.get_color(), fontsize=8, xycoords=("data", "axes fraction"),
                                 va="top", ha="center")
        for ax, label in zip(axes, ("seconds", "peak memory above baseline (MiB, floor 1)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("n (samples)" if sweep == "n" else "d = m (layer width)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{work} ({sweep} sweep) on {results[0]['device']}")
        fig.tight_layout()
        path = os.path.join(out, f"scaling-{results[0]['device']}-{work}-{sweep.replace('=', '')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller points (a few minutes on 2 cores)")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="mark baselines needing more as out of memory (default: a third of RAM, half of GPU memory)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per point")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.memory_gib is not None:
        limit = args.memory_gib * 2**30
    elif args.device == "cuda":
        import torch
        limit = torch.cuda.get_device_properties(0).total_memory / 2
    else:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 3
    specs = plan(args.quick, args.device)
    results = []
    for k, spec in enumerate(specs, 1):
        r = measure(spec, limit, args.timeout)
        results.append(r)
        took = f"{r['seconds']:.4g} s, {r['peak_bytes'] / 2**20:.1f} MiB" if r["status"] == "ok" else r["status"]
        size = f"n={spec['n']}" + (f" d=m={spec['m']}" if spec["sweep"] == "d=m" else "")
        print(f"[{k:2d}/{len(specs)}] {spec['work']:5s} {spec['contender']:20s} {size:18s} {took}", flush=True)
    with open(os.path.join(args.out, f"scaling-{args.device}.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    for path in plot(results, args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
