"""Shared test helpers: devices and dtypes to sweep, float32 error judged against the fallback's."""
import contextlib

import torch

from relflat_ext.ops import HAS_CUDA_KERNELS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and HAS_CUDA_KERNELS else [])
DTYPES = [torch.float64, torch.float32]
FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_matches_reference(got, ref_same_dtype, ref_float64, what=""):
    """float64: 1e-10 relative to the result's scale. float32: the kernel's error against the
    float64 reference is at most 10x the fallback's own float32 error plus 4 ulp of the scale."""
    is64 = got.dtype == torch.float64
    got, ref_same_dtype, ref_float64 = (t.detach().double().cpu() for t in (got, ref_same_dtype, ref_float64))
    assert got.shape == ref_float64.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref_float64.shape)}"
    if got.numel() == 0:
        return
    scale = ref_float64.abs().max().item()
    err = (got - ref_float64).abs().max().item()
    ref_err = (ref_same_dtype - ref_float64).abs().max().item()
    tol = 1e-10 * scale if is64 else 10 * ref_err + 4 * FLOAT32_EPS * scale
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (scale {scale:.3e}, fallback error {ref_err:.3e})"


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A CPU process group (gloo, file rendezvous) for a spawned test worker, always torn down."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # tear down together: a rank leaving first can make gloo abort the other
    finally:
        dist.destroy_process_group()
