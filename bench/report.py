"""Runs the benchmark suites and prints one table per work item: median time, the ratio of every
contender to the package (measured in the same run), achieved FLOP/s and GB/s from each case's work
model, and the fraction of this device's measured limits (a large fp32 matmul and a large copy,
timed here first). Writes the raw pytest-benchmark JSON, a summary JSON and a Markdown table.

    python -m bench.report [--device cpu|cuda] [--size small|full] [--out bench/results] [-k EXPR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Dict, List

import torch


def _timed(fn, device, repeat=5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def device_limits(device: torch.device) -> Dict[str, float]:
    """Measured peaks: fp32 matmul FLOP/s and copy bandwidth (bytes read + written per second)."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flops = 2 * n ** 3 / _timed(lambda: a @ b, device)
    src = torch.empty(64 << 20, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device)
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def summarize(raw: Dict, limits: Dict[str, float]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for bench in raw["benchmarks"]:
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        row = {"contender": bench["param"] or bench["name"], "median_s": median, "rounds": bench["stats"]["rounds"],
               "device": info.get("device", "")}
        if "flops" in info:
            row["flop_per_s"] = info["flops"] / median
            row["fraction_of_matmul_peak"] = row["flop_per_s"] / limits["matmul_flops"]
        if "bytes" in info:
            row["bytes_per_s"] = info["bytes"] / median
            row["fraction_of_copy_bandwidth"] = row["bytes_per_s"] / limits["copy_bytes_per_s"]
        groups[bench["group"] or bench["name"]].append(row)
    for rows in groups.values():
        ours = next((r for r in rows if r["contender"] == "relflat"),
                    next((r for r in rows if r["contender"].startswith("relflat")), rows[0]))
        for r in rows:
            r["ratio_to_relflat"] = r["median_s"] / ours["median_s"]
            r["is_reference"] = r is ours
    return groups


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def markdown(groups: Dict[str, List[Dict]], limits: Dict[str, float], header: str) -> str:
    lines = [header, "", f"Measured limits: fp32 matmul {limits['matmul_flops'] / 1e9:.0f} GFLOP/s, "
             f"copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s.", ""]
    for group, rows in groups.items():
        lines += [f"### {group}", "", "| contender | median | vs relflat | GFLOP/s (of peak) | GB/s (of copy) |",
                  "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["median_s"]):
            flops = (f"{r['flop_per_s'] / 1e9:.1f} ({r['fraction_of_matmul_peak']:.0%})"
                     if "flop_per_s" in r else "")
            gbs = (f"{r['bytes_per_s'] / 1e9:.1f} ({r['fraction_of_copy_bandwidth']:.0%})"
                   if "bytes_per_s" in r else "")
            ratio = r["ratio_to_relflat"]
            rel = "1" if r.get("is_reference") else (
                f"{ratio:.3g}x slower" if ratio >= 1 else f"{1 / ratio:.3g}x faster")
            lines.append(f"| {r['contender']} | {_fmt_time(r['median_s'])} | {rel} | {flops} | {gbs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=["small", "full"], default="small")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("-k", default=None, help="pytest -k expression to select cases")
    args = parser.parse_args(argv)
    import pytest

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no GPU is visible", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    limits = device_limits(device)
    tag = f"{args.device}-{args.size}"
    raw_path = os.path.join(args.out, f"bench-{tag}.raw.json")
    here = os.path.dirname(os.path.abspath(__file__))
    pytest_args = [here, "--benchmark-only", "-q", "-p", "no:cacheprovider", f"--bench-size={args.size}",
                   f"--device={args.device}", f"--benchmark-json={raw_path}"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args)
    if not os.path.exists(raw_path):
        return int(code) or 1
    with open(raw_path) as fh:
        raw = json.load(fh)
    groups = summarize(raw, limits)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} threads"
    header = (f"## {name}: torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
              f"`python -m bench.report --device {args.device} --size {args.size}`")
    text = markdown(groups, limits, header)
    print("\n" + text)
    with open(os.path.join(args.out, f"bench-{tag}.json"), "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "limits": limits, "groups": groups}, fh, indent=2)
    with open(os.path.join(args.out, f"bench-{tag}.md"), "w") as fh:
        fh.write(text + "\n")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
