"""The GPU's headline timings against their targets, as JSON with pass/fail (bench/gpu.sh runs it):

* LeNet head (n = 50000, m = 84, d = 10, fp32): the features-given call at most 0.03 ms (the op
  alone is reported beside it);
* ImageNet head (n = 50000, m = 2048, d = 1000, fp32): at most 1.4x the fp32 logits GEMM, and at
  most 1.5x the GEMM with TF32 allowed (both sides then allowed it);
* KDE of 20000 queries against 20000 keys, m = 84, 8 bandwidths, fp32: at most 2 ms;
* the exact intermediate path (784-512-256-10, layer 2, n = 10000): at most 10 ms.

Each case is checked against a float64 reference (a fast wrong answer is not a pass: relative
error at most 1e-5, 1e-2 with TF32 logits), then timed with CUDA events: the median of 10 calls
after 3 warm-up calls. Each case runs under its own time
limit, so a slow one cannot eat the others' results. On a CPU (``--device cpu``, to exercise the
script) the times come from the wall clock and no case is judged: the targets are the GPU's.

    python -m bench.gpu_timings --out OUT/gpu-timings.json [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import signal
import statistics
import time
import traceback

import torch

import relflat_ext as rf
from relflat_ext.ops import reference as ref

from bench.common import device_name


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise CaseTimeout(f"over its {seconds} s limit")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def median_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn: CUDA events on a GPU (the device's time, launches included),
    the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _relative_error(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-30)


def lenet_head(device, quick):
    n = 5000 if quick else 50000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 84, generator=g).to(device)
    w, b = (torch.randn(10, 84, generator=g) / 9).to(device), torch.randn(10, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    want = ref.last_layer_flatness(x.cpu().double(), w.cpu().double(), b.cpu().double(), "cross_entropy", False)[0]
    got = rf.relative_flatness_from_features(x, w, y, bias=b).kappa
    err = _relative_error(got, float(want.mean()))
    call = median_ms(lambda: rf.relative_flatness_from_features(x, w, y, bias=b), device)
    op = median_ms(lambda: torch.ops.relflat.last_layer_flatness(x, w, b, "cross_entropy", False, True), device)
    return {"median_ms": call, "op_alone_ms": op, "target": "features-given call <= 0.03 ms",
            "pass": call <= 0.03 and err <= 1e-5, "relative_error": err, "error_tolerance": 1e-5}


def imagenet_head(device, quick, tf32: bool):
    n, m, d = (5000, 2048, 1000) if quick else (50000, 2048, 1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, m, generator=g).to(device)
    w, b = (torch.randn(d, m, generator=g) / math.sqrt(m)).to(device), torch.randn(d, generator=g).to(device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        sub = slice(0, 2000)
        per = torch.ops.relflat.last_layer_flatness(x[sub], w, b, "cross_entropy", False, True)[0]
        want = ref.last_layer_flatness(x[sub].cpu().double(), w.cpu().double(), b.cpu().double(), "cross_entropy",
                                       False)[0]
        err = _relative_error(float(per.double().sum().cpu()), float(want.sum()))
        kappa = median_ms(lambda: rf.relative_flatness_from_features(x, w, torch.zeros(n, dtype=torch.long,
                                                                                           device=device), bias=b),
                          device)
        gemm = median_ms(lambda: torch.addmm(b, x, w.T), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    limit = 1.5 if tf32 else 1.4
    tol = 1e-2 if tf32 else 1e-5  # TF32 logits carry 10-bit mantissas
    return {"median_ms": kappa, "gemm_ms": gemm, "ratio": kappa / gemm,
            "target": f"<= {limit}x the {'TF32' if tf32 else 'fp32'} logits GEMM",
            "pass": kappa / gemm <= limit and err <= tol,
            "relative_error_2000_rows": err, "error_tolerance": tol}


def kde(device, quick):
    n, m = (4000, 84) if quick else (20000, 84)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(n, m, generator=g).to(device), torch.randn(n, m, generator=g).to(device)
    bws = torch.logspace(0.0, 1.0, 8).to(device)
    got = torch.ops.relflat.gaussian_kernel_reduce(q[:300], k, None, bws, None, None, None)[0]
    want = ref.gaussian_kernel_reduce(q[:300].cpu().double(), k.cpu().double(), None, bws.cpu().double(), None, None,
                                      None)[0]
    err = float(((got.cpu().double() - want).abs() / want.abs()).max())
    t = median_ms(lambda: torch.ops.relflat.gaussian_kernel_reduce(q, k, None, bws, None, None, None), device)
    return {"median_ms": t, "target": "<= 2 ms", "pass": t <= 2.0 and err <= 1e-5, "relative_error_300_queries": err,
            "error_tolerance": 1e-5}


def exact_intermediate(device, quick):
    n = 1000 if quick else 10000
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    x = torch.randn(n, 784, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    got = rf.relative_flatness(model, "2", x, y, block_trace=False)
    want = rf.relative_flatness(copy.deepcopy(model).double().cpu(), "2", x[:500].double().cpu(), y[:500].cpu(),
                                block_trace=False)
    err = _relative_error(rf.relative_flatness(model, "2", x[:500], y[:500], block_trace=False).kappa, want.kappa)
    t = median_ms(lambda: rf.relative_flatness(model, "2", x, y, block_trace=False), device)
    return {"median_ms": t, "target": "<= 10 ms", "pass": t <= 10.0 and err <= 1e-5, "method": got.method,
            "relative_error_500_rows": err, "error_tolerance": 1e-5}


# name: (case, seconds it may take on a GPU, the reference checks included; ten times that on a CPU)
CASES = {
    "lenet_head": (lenet_head, 15),
    "imagenet_head_fp32": (lambda device, quick: imagenet_head(device, quick, tf32=False), 25),
    "imagenet_head_tf32": (lambda device, quick: imagenet_head(device, quick, tf32=True), 25),
    "kde_20000x20000_8_bandwidths": (kde, 20),
    "exact_intermediate_784_512_256_10": (exact_intermediate, 20),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (exercising the script, not the targets)")
    parser.add_argument("--out", default="gpu-timings.json")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    judged = device.type == "cuda" and not args.quick
    report = {"device": device_name(device), "torch": torch.__version__, "build": rf.build_info(),
              "judged": judged, "cases": {}}
    for name in args.cases.split(","):
        fn, limit = CASES[name]
        start = time.perf_counter()
        try:
            with time_limit(limit if device.type == "cuda" else 10 * limit):
                row = fn(device, args.quick)
            if not judged:
                row["pass"] = None  # the targets are the GPU's, at full size
        except Exception as exc:  # a failing case is a result, not the end of the run
            row = {"pass": False if judged else None, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=4)}
        row["seconds"] = time.perf_counter() - start
        report["cases"][name] = row
        print(f"{name:36s} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items() if k != "traceback"), flush=True)
        with open(args.out, "w") as fh:  # after every case: a later hang keeps the earlier results
            json.dump(report, fh, indent=1)
    results = [r["pass"] for r in report["cases"].values()]
    print(f"passed {sum(r is True for r in results)} of {len(results)}" + ("" if judged else " (not judged: "
                                                                            "not a GPU at full size)"))


if __name__ == "__main__":
    main()
