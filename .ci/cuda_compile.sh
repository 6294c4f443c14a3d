#!/usr/bin/env bash
# Compile and link the CUDA kernels against the CUDA 13.0 build of torch 2.14.1, in a separate
# environment, without a GPU. A CUDA compile error fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
if [ ! -f "$VENV/.deps" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.14.1 numpy pybind11 ninja setuptools wheel
  touch "$VENV/.deps"
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"} MAX_JOBS=${MAX_JOBS:-2}
out=build/cuda-lib
"$VENV/bin/python" setup.py build_ext --build-lib "$out" --build-temp build/cuda-tmp
so=$(ls "$out"/relflat_ext/_C*.so)
# The library must link: every symbol it needs resolves against torch, the CUDA runtime and the C++ runtime.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib:$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}" \
  ldd -r "$so" > build/cuda-ldd.txt 2>&1 || true
# Python's own symbols resolve at import time, inside the interpreter; anything else must resolve now.
if grep -E "undefined symbol|not found" build/cuda-ldd.txt | grep -vE "undefined symbol: _?Py"; then
  echo "CUDA extension does not link"; exit 1
fi
# Device code for both architectures is embedded, and the kernels' host stubs are in the library.
grep -aq "sm_80" "$so" && grep -aq "sm_90" "$so" || { echo "missing sm_80/sm_90 device code"; exit 1; }
# PTX for compute_90 (plain text in the fatbin): GPUs newer than the list compile it at load time.
grep -aq "\.target sm_90" "$so" || { echo "no compute_90 PTX embedded: GPUs newer than sm_90 would have no kernel"; exit 1; }
nm -C "$so" > build/cuda-symbols.txt  # to a file: `nm | grep -q` would die of SIGPIPE under pipefail
for kernel in fused_small_kernel terms_kernel row_pass_kernel contract_kernel block_trace_kernel kde_fold_kernel kde_merge_kernel; do
  grep -q "$kernel" build/cuda-symbols.txt || { echo "kernel $kernel missing from $so"; exit 1; }
done
echo "CUDA kernels compiled and linked for sm_80 and sm_90, with compute_90 PTX: $so"
