"""Builds relflat_ext._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA
build of torch are both present.

Switches: FORCE_CUDA=1 builds the CUDA kernels even without a visible GPU (needs nvcc and a CUDA
torch); RELFLAT_CPU_ONLY=1 never builds them; TORCH_CUDA_ARCH_LIST is honoured (default
"8.0;9.0+PTX": A100 and H100/H200 code, and PTX that newer GPUs compile at load time).
Install with `pip install --no-build-isolation -e .` so the build sees the torch you run.
"""
import glob
import os
import re
import sys
import sysconfig

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION_FILE = os.path.join(ROOT, "relflat_ext", "ops", "_extension.py")
VERSION = re.search(r'__version__ = "([^"]+)"', open(VERSION_FILE).read()).group(1)
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def choose_cuda():
    """Returns (build_cuda, reason)."""
    if _flag("RELFLAT_CPU_ONLY"):
        return False, "RELFLAT_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if _flag("FORCE_CUDA"):
        return True, f"FORCE_CUDA=1, toolkit at {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"
    if torch.cuda.is_available():
        return True, f"GPU visible, toolkit at {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"
    return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"


def nvidia_wheel_paths():
    """Header and library folders of the nvidia-* wheels that CUDA builds of torch depend on."""
    site = sysconfig.get_paths()["purelib"]
    includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    libs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    return includes, libs


def make_extension():
    build_cuda, reason = choose_cuda()
    sources = ["csrc/relflat.cpp", "csrc/autograd.cpp", "csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    macros = [("RELFLAT_VERSION", f'"{VERSION}"'), ("RELFLAT_TORCH_VERSION", f'"{torch_version}"')]
    # -fopenmp: at::parallel_for is inline OpenMP code in ATen's headers and runs serially without
    # it. The libgomp.so.1 linked here is the one torch has already loaded (same soname).
    cxx_flags = ["-O3", "-fopenmp", "-Wno-unused-function"]
    link_flags = ["-fopenmp"]
    if build_cuda:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros += [("RELFLAT_WITH_CUDA", None), ("RELFLAT_CUDA_ARCH_LIST", f'"{arch_list}"')]
        includes, libs = nvidia_wheel_paths()
        print(f"relflat_ext: building CPU + CUDA kernels ({reason}); TORCH_CUDA_ARCH_LIST={arch_list}")
        return cpp_extension.CUDAExtension(
            "relflat_ext._C", sources, define_macros=macros, include_dirs=includes, library_dirs=libs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link_flags)
    print(f"relflat_ext: building CPU kernels only ({reason})")
    return cpp_extension.CppExtension("relflat_ext._C", sources, define_macros=macros,
                                      extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    name="relflat_ext",
    version=VERSION,
    description="Fast, exact relative flatness (Petzka et al., NeurIPS 2021) for PyTorch models",
    packages=find_packages(include=["relflat_ext", "relflat_ext.*"]),
    # RELFLAT_NO_EXTENSION=1: metadata and entry points only (the Makefile builds the extension in
    # place once with `build_ext --inplace`, and an editable install would build it a second time).
    ext_modules=[] if os.environ.get("RELFLAT_NO_EXTENSION") == "1" else [make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn", "scipy"],
                    "report": ["scikit-learn", "matplotlib"]},
    entry_points={"console_scripts": ["relflat=relflat_ext.apps.cli:main"]},
)
