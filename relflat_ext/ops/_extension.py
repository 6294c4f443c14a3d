"""Loads the compiled extension once; says so once, clearly, when it is missing."""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Dict, Iterator, Sequence, Tuple

import torch

__version__ = "0.1.0"

try:
    from .. import _C  # registers torch.ops.relflat.* as a side effect
    _LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = str(exc)
    warnings.warn(
        "relflat_ext: the compiled extension could not be loaded "
        f"({_LOAD_ERROR.splitlines()[0] if _LOAD_ERROR else 'unknown reason'}); every op runs on "
        "the pure-PyTorch fallback (same results, slower). Build it with `pip install -e .`.",
        RuntimeWarning, stacklevel=2)

HAS_EXTENSION = _C is not None
HAS_CUDA_KERNELS = bool(HAS_EXTENSION and _C.build_info()["cuda"])

if HAS_EXTENSION:
    _built = _C.build_info()["torch_version"]
    if _built.split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        warnings.warn(f"relflat_ext: the extension was built against torch {_built} but torch "
                      f"{torch.__version__} is running; rebuild it if ops fail.", RuntimeWarning)


def build_info() -> Dict[str, Any]:
    """What was compiled: package version, whether the C++/CUDA kernels are present, CUDA arch
    list, and the torch version the extension was built against (None without the extension)."""
    info: Dict[str, Any] = {"version": __version__, "compiled": HAS_EXTENSION, "cuda": False,
                            "cuda_arch_list": [], "torch_version": None,
                            "torch_runtime": torch.__version__, "fallback_reason": _LOAD_ERROR}
    if HAS_EXTENSION:
        built = _C.build_info()
        info.update(cuda=built["cuda"], cuda_arch_list=built["cuda_arch_list"],
                    torch_version=built["torch_version"])
        assert built["version"] == __version__, "stale extension build: rebuild relflat_ext"
    return info


_FORCE_FALLBACK = False


@contextlib.contextmanager
def fallback_only() -> Iterator[None]:
    """Runs the body on the pure-PyTorch fallback even where kernels exist (benchmarks compare the
    two through the same public API)."""
    global _FORCE_FALLBACK
    previous, _FORCE_FALLBACK = _FORCE_FALLBACK, True
    try:
        yield
    finally:
        _FORCE_FALLBACK = previous


def runs_on(capability: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether code built for ``arch_list`` (TORCH_CUDA_ARCH_LIST entries: "8.0", "9.0+PTX", ...)
    runs on a GPU of compute ``capability``: machine code for X.y runs on X.z with z >= y (same
    major version); PTX for X.y is compiled at load time for any capability >= X.y."""
    for entry in arch_list:
        name, _, suffix = entry.partition("+")
        try:
            arch = tuple(int(v) for v in name.split(".")[:2])
        except ValueError:
            continue
        if arch[0] == capability[0] and arch[1] <= capability[1]:
            return True
        if suffix.upper() == "PTX" and arch <= tuple(capability):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _cuda_kernels_run_on(index: int) -> bool:
    capability = torch.cuda.get_device_capability(index)
    arch_list = _C.build_info()["cuda_arch_list"]
    if runs_on(capability, arch_list):
        return True
    warnings.warn(f"relflat_ext: the CUDA kernels were built for {';'.join(arch_list)}, which cannot run on "
                  f"cuda:{index} (compute capability {capability[0]}.{capability[1]}); its ops use the "
                  "pure-PyTorch fallback (same results, slower). Rebuild with TORCH_CUDA_ARCH_LIST="
                  f"\"{capability[0]}.{capability[1]}\" for the kernels.", RuntimeWarning, stacklevel=3)
    return False


def kernel_available(device: torch.device) -> bool:
    """Whether a compiled kernel exists for tensors on ``device``, can run on it (the GPU's
    architecture is among those built, or PTX covers it) and is not switched off."""
    if _FORCE_FALLBACK:
        return False
    if device.type == "cpu":
        return HAS_EXTENSION
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return HAS_CUDA_KERNELS and _cuda_kernels_run_on(index)
    return False
