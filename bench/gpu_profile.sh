#!/usr/bin/env bash
# The profiling issue's GPU measurements in one call, after bench/gpu.sh (which builds in place):
#   bash bench/gpu_profile.sh [OUT_DIR]      (OUT_DIR defaults to $OUT)
# Every layer of GPT-2 small (random weights, 64 x 128 tokens) and of ResNet-18 (trained on 512
# images of 224x224) to 5% relative standard error; target: under 60 s each. Each run has its own
# time limit (a run still going at its limit has missed the target anyway): per-layer probes,
# profile's default, 100 s each; then shared probes, 75 s each (MODES="per_layer" skips them).
# At most about 6 minutes in all. summary.txt lists the times, the layers within 5% and pass/fail;
# the exit status is 0 only if every run met the target. Without a GPU it runs the 2-layer GPT-2
# on the CPU as a smoke test, unjudged.
set -uo pipefail
out=${1:-${OUT:?usage: bash bench/gpu_profile.sh OUT_DIR (or set OUT)}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODES=${MODES:-"per_layer shared"}
status=0
summary="$out/profile-summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

has_gpu=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
$PY -c "import relflat_ext, torch; print('torch', torch.__version__, relflat_ext.build_info())" 2>&1 | tee -a "$summary"
if [ "$has_gpu" = 1 ]; then
  models="gpt2 resnet18-224"; device=cuda; rel_tol=0.05
else
  models="gpt2-tiny"; device=cpu; rel_tol=0.2; MODES=per_layer
  note "no GPU: the 2-layer GPT-2 on the CPU as a smoke test, not judged"
fi
for model in $models; do
  for mode in $MODES; do
    limit=$([ "$mode" = per_layer ] && echo 100 || echo 75)
    name="profile-$model-$mode"
    begin=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" $PY -m bench.profile_models --models "$model" --device "$device" \
      --rel-tol "$rel_tol" --probes "$mode" --suffix="-$mode" --out "$out" > "$out/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name: TIMED OUT after $limit s (target missed)"; status=1
    elif [ $rc -ne 0 ]; then note "$name: FAILED (exit $rc; see $name.log)"; status=1
    else note "$name: ran ($((SECONDS - begin)) s with the model's setup)"; fi
  done
done
$PY - "$out" "$has_gpu" <<'PYEOF' | tee -a "$summary" || status=1
import glob, json, os, sys
out, judged = sys.argv[1], sys.argv[2] == "1"
missed = 0
for path in sorted(glob.glob(os.path.join(out, "profile-*.json"))):
    r = json.load(open(path))
    layers = len(r["rows"])
    ok = r["seconds"] <= 60 and r["converged"] == layers
    missed += judged and not ok
    print(f"{os.path.basename(path)}: {r['model']} on {r['device']}, {r['probes']} probes: {r['seconds']:.1f} s, "
          f"{r['converged']}/{layers} layers within {r['rel_tol']:.0%} (worst {r['worst_rel_stderr']:.2g})"
          + (f": {'pass' if ok else 'MISSED'} (target 60 s, every layer)" if judged else ""))
sys.exit(1 if missed else 0)
PYEOF
note "done (status $status)"
exit $status
