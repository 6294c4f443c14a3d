#!/usr/bin/env bash
# One-shot GPU check for a machine with torch (CUDA build), nvcc and no network:
# builds the extension from source, runs the test suite (CUDA cases included), the benchmark
# report and a quick scaling study on the GPU, and writes everything to the folder given.
#   bash bench/gpu.sh OUT_DIR        (about 5-8 minutes on one H100/H200)
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$out/summary.txt"; }

step "environment"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
$PY - > "$out/env.txt" 2>&1 <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())
for mod in ("pytest", "pytest_benchmark", "numpy", "sklearn", "scipy", "matplotlib", "ninja", "pybind11"):
    try:
        importlib.import_module(mod); print(mod, "ok")
    except ImportError:
        print(mod, "MISSING")
PYEOF
cat "$out/env.txt" | tee -a "$out/summary.txt"

step "build (FORCE_CUDA=1, arch of this GPU)"
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
if ! $PY setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "build failed: see build.log" | tee -a "$out/summary.txt"; tail -30 "$out/build.log"; exit 1
fi
$PY -c "import relflat_ext; print(relflat_ext.build_info())" 2>&1 | tee -a "$out/summary.txt"

step "tests (CUDA cases run where a GPU is visible)"
timeout 240 $PY -m pytest tests -q -x -p no:cacheprovider > "$out/tests.txt" 2>&1 || status=1
tail -3 "$out/tests.txt" | tee -a "$out/summary.txt"

step "benchmarks"
timeout 240 $PY -m bench.report --device cuda --size full --out "$out" > "$out/bench.txt" 2>&1 || status=1
grep -A200 "^## " "$out/bench.txt" | head -120 | tee -a "$out/summary.txt" > /dev/null

step "scaling (quick)"
timeout 150 $PY -m bench.scaling --device cuda --quick --out "$out" > "$out/scaling.txt" 2>&1 || status=1
tail -5 "$out/scaling.txt" | tee -a "$out/summary.txt"
step "done (status $status)"
exit $status
