"""Helpers shared by the benchmark suites: device names, synchronization, work counts, and the
wall-clock timer of the scripts that are not pytest-benchmark suites."""
import statistics
import time
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def synced(fn: Callable, device: torch.device) -> Callable:
    """fn followed by a device synchronization, so the timer sees the work finish."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def record(benchmark, device: torch.device, flops: Optional[float] = None, bytes_moved: Optional[float] = None,
           **extra) -> None:
    """What the report runner needs: the device, and the work model (FLOPs and bytes that must move)
    from which it derives achieved FLOP/s and GB/s."""
    benchmark.extra_info["device"] = device_name(device)
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = float(bytes_moved)
    benchmark.extra_info.update(extra)


def run(benchmark, fn: Callable, device: torch.device, rounds: int) -> None:
    f = synced(fn, device)
    benchmark.pedantic(f, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)


def timed(fn: Callable, repeats: int, warmup: int = 1) -> Tuple[float, List[float]]:
    """(median seconds, every call's seconds) of ``repeats`` calls of fn after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def interleaved(cases: Dict[str, Tuple[Callable[[], ContextManager[Callable]], int]], rounds: int,
                warmup: int = 1) -> Dict[str, Tuple[float, List[float]]]:
    """{name: (median seconds, every call's seconds)} for cases that take turns: in each of
    ``rounds`` rounds every case enters its context (``factory()`` yields the function to time) and
    runs ``per_round`` timed calls, after ``warmup`` untimed ones in the first round. On a shared
    machine whose speed drifts over minutes, the drift then reaches every case alike, so the
    ratios between them hold even where the absolute times do not."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(rounds):
        for name, (factory, per_round) in cases.items():
            with factory() as fn:
                for _ in range(warmup if round_index == 0 else 0):
                    fn()
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t) for name, t in times.items()}
