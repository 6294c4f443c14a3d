"""Gaussian probes fast on the CPU: torch's CPU generator draws one number after another (about
8 ns each), which for the joint estimator's probes (one number per weight, 11M for ResNet-18) is a
sixth of a Hessian-vector product. Large draws are split into fixed chunks, each from its own
generator seeded from the caller's, filled in parallel threads: the result depends on the caller's
generator only, not on the number of threads."""
from __future__ import annotations

import concurrent.futures
import math
import threading
from typing import Optional, Sequence

import torch

CHUNK = 1 << 20  # numbers per chunk: the result is a function of the seed and of this
_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # the thread count changed (torch.set_num_threads)
            _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="relflat-randn")
            _pool_threads = threads
        return _pool


def standard_normal(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """i.i.d. N(0, 1) of ``shape``, reproducible from ``generator``'s state. On a GPU, or below two
    chunks, torch.randn itself; else chunks of ``CHUNK`` numbers from generators seeded by one draw
    of ``generator`` (advancing it) and the chunk's index, in ``torch.get_num_threads()`` threads
    (torch releases the GIL while it fills them)."""
    device = torch.device(device)
    numel = math.prod(int(s) for s in shape)
    if device.type != "cpu" or numel < 2 * CHUNK:
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    base = int(torch.randint(0, 2**62, (), generator=generator))
    out = torch.empty(numel, dtype=dtype)
    chunks = out.split(CHUNK)

    def fill(i: int) -> None:
        chunks[i].normal_(generator=torch.Generator().manual_seed((base + i * 0x9E3779B97F4A7C15) % 2**63))

    threads = min(torch.get_num_threads(), len(chunks))
    if threads > 1:
        list(_executor(threads).map(fill, range(len(chunks))))
    else:
        for i in range(len(chunks)):
            fill(i)
    return out.view(tuple(shape))
