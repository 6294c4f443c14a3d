"""Data-parallel reductions: with torch.distributed initialized, every rank's data is one shard of
the data set and the partial sums of each measurement are all-reduced, so every rank returns the
result on the union of the shards."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def active(distributed: Optional[bool]) -> bool:
    """None: reduce when a process group is initialized; True: require one; False: never."""
    import torch.distributed as dist
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialized:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    return initialized if distributed is None else bool(distributed)


def all_reduce_sum(tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """Sums each tensor over ranks, in place."""
    import torch.distributed as dist
    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def check_same_shapes(what: str, sizes: Sequence[int], device) -> None:
    """Raises on every rank if the ranks disagree on ``sizes`` (e.g. a layer's (d, m))."""
    import torch.distributed as dist
    t = torch.tensor([*sizes, *[-s for s in sizes]], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    k = len(sizes)
    if not torch.equal(t[:k], -t[k:]):
        raise ValueError(f"mismatched shards: the ranks disagree on {what} (max {t[:k].tolist()}, "
                         f"min {(-t[k:]).tolist()})")


def shared_seed(seed: Optional[int], device) -> int:
    """The caller's seed, or one drawn on rank 0 and broadcast, so every rank uses the same probes."""
    import torch.distributed as dist
    value = torch.tensor([int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)],
                         dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


def row_offset(count: Optional[int], device) -> int:
    """Where this rank's rows start in the union of the shards, ranks in order: the lower ranks'
    counts summed, so per-row random draws match one process's on the whole data. Where a rank's
    count is not known in advance (None: a DataLoader), disjoint ranges instead (rank * 2^40)."""
    import torch.distributed as dist
    rank = dist.get_rank()
    counts = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    counts[rank] = -1.0 if count is None else float(count)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if bool((counts < 0).any()):
        return rank << 40
    return int(counts[:rank].sum().item())
