#!/usr/bin/env bash
# The one-call GPU check, for a machine with python3, a CUDA build of torch, nvcc and no network:
#   bash bench/gpu.sh [OUT_DIR]        (OUT_DIR defaults to $OUT; everything is written there)
# Steps, each under its own time limit so that a slow one cannot eat the others' results (at most
# 7.7 minutes in all on one H200 with 16 cores, the build included):
#   1. build with FORCE_CUDA=1 for this GPU's architecture, MAX_JOBS=16 (150 s; the KDE kernel
#      alone takes about 80 s for one architecture on one core of the CPU machine);
#   2. the CUDA tests: edge shapes of every op against the CPU op and the float64 reference, zero
#      sizes, side streams, 64-bit indexing, opcheck (tests/test_edges.py), and the op, gradient,
#      confident-minima, KDE and recurrent-layer suites on the GPU (120 s; 35 s for their CPU cases on 2 cores; no -x:
#      every failure is listed);
#   3. compute-sanitizer memcheck and racecheck on bench/gpu_sanitize.py, which reaches every
#      kernel branch (40 s each; skipped if the tool is missing);
#   4. the headline timings with CUDA events against their targets (bench/gpu_timings.py, JSON;
#      110 s, each case under its own limit inside).
# summary.txt says what ran and how it ended; the exit status is 0 only if every step passed.
# On a machine without a GPU it still runs: the build is CPU-only, the tests run their CPU cases,
# the sanitizer is skipped and the timings are taken at small sizes without being judged.
set -uo pipefail
out=${1:-${OUT:?usage: bash bench/gpu.sh OUT_DIR (or set OUT)}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
step() { note "== $1 ($(date +%T))"; }
# run NAME SECONDS COMMAND...: output to $out/NAME.log; a timeout or failure marks the run failed
run() {
  local name=$1 limit=$2; shift 2
  local begin=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name: TIMED OUT after ${limit} s"; status=1
  elif [ $rc -ne 0 ]; then note "$name: FAILED (exit $rc)"; status=1
  else note "$name: ok"; fi
  note "  ($((SECONDS - begin)) s; log: $name.log)"
  return $rc
}

step "environment"
has_gpu=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
$PY - > "$out/env.txt" 2>&1 <<'PYEOF'
import importlib, os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpus", os.cpu_count())
for mod in ("pytest", "numpy", "sklearn", "scipy", "matplotlib", "ninja", "pybind11", "transformers"):
    try:
        importlib.import_module(mod); print(mod, "ok")
    except ImportError:
        print(mod, "MISSING")
PYEOF
tee -a "$summary" < "$out/env.txt"

step "build"
if [ "$has_gpu" = 1 ]; then
  export FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
fi
export MAX_JOBS=${MAX_JOBS:-16}
if ! run build 150 $PY setup.py build_ext --inplace; then
  tail -30 "$out/build.log"; note "== done: the build failed, nothing else can run"; exit 1
fi
$PY -c "import relflat_ext; print(relflat_ext.build_info())" 2>&1 | tee -a "$summary"

step "tests"
run tests 120 $PY -m pytest tests/test_edges.py tests/test_ops.py tests/test_gradients.py tests/test_numerics.py \
  tests/test_kde.py tests/test_recurrent.py tests/test_modes.py -q -p no:cacheprovider -rfE --junitxml="$out/tests.xml"
grep -E "passed|failed|error" "$out/tests.log" | tail -3 | tee -a "$summary"

step "compute-sanitizer"
if [ "$has_gpu" = 1 ] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    run "sanitizer-$tool" 40 compute-sanitizer --tool "$tool" --error-exitcode 3 $PY -m bench.gpu_sanitize cuda
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|every branch" "$out/sanitizer-$tool.log" | tee -a "$summary"
  done
else
  note "skipped: $( [ "$has_gpu" = 1 ] && echo "compute-sanitizer not found" || echo "no GPU")"
  run sanitizer-branches-cpu 60 $PY -m bench.gpu_sanitize cpu
fi

step "timings"
if [ "$has_gpu" = 1 ]; then
  run timings 110 $PY -m bench.gpu_timings --device cuda --out "$out/gpu-timings.json"
else
  run timings 240 $PY -m bench.gpu_timings --device cpu --quick --out "$out/gpu-timings.json"
fi
tail -8 "$out/timings.log" | tee -a "$summary"
$PY - "$out/gpu-timings.json" <<'PYEOF' | tee -a "$summary" || status=1
import json, sys
report = json.load(open(sys.argv[1]))
failed = [name for name, row in report["cases"].items() if row.get("pass") is False]
print("targets missed:", ", ".join(failed) if failed else "none", "" if report["judged"] else "(not judged)")
sys.exit(1 if failed else 0)
PYEOF

step "done (status $status)"
exit $status
