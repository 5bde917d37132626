#!/usr/bin/env bash
# One short check on an air-gapped CUDA machine (H100/H200 with PyTorch, Triton, scikit-image, torchmetrics,
# pytest; no Ray, Hydra, kornia or pytorch-msssim): the gpu tests, the benchmark table, and the audit job on
# the sample data with one GPU actor. Run from the repository root, with the wheelhouse in .whl/ (see
# docs/BENCHMARKS.md, section GPU):
#
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# Every step has its own timeout and the whole stays within ~7 minutes; a failing step is reported and the
# next one still runs, so one failure cannot hide the other results. Everything is teed into
# $OUT/gpu_check.log; the table also goes to $OUT/bench_gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
declare -a RESULTS=()

# Seconds a step may take: its own cap, or what is left of the budget (at least 20).
cap() {
  local left=$((BUDGET_S - (SECONDS - START)))
  ((left < 20)) && left=20
  echo $(($1 < left ? $1 : left))
}

step() {  # step NAME CAP_S COMMAND...: run with a timeout, record the outcome, never abort the script
  local name=$1 limit
  limit=$(cap "$2")
  shift 2
  echo
  echo "=== STEP: $name (timeout ${limit}s, t=$((SECONDS - START))s) ==="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  RESULTS+=("$name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')")
  echo "=== END: $name rc=$rc after $((SECONDS - START))s ==="
  return 0
}

# A peer that can only be built here (fused-ssim) builds in the background while the tests run. Its build
# recipe is not part of this repository: it runs only if the operator put .peers/build_fused.sh there.
FUSED_PID=""
if [ -f .peers/build_fused.sh ]; then
  echo "fused-ssim: building in the background (log: $OUT/fused_build.log)"
  timeout --kill-after=10 240 bash .peers/build_fused.sh >"$OUT/fused_build.log" 2>&1 &
  FUSED_PID=$!
else
  echo "fused-ssim: no .peers/build_fused.sh, so it will be reported as not available"
fi

echo "=== STEP: environment ==="
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || echo "wheel install failed: Ray/Hydra steps will fail"
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for name in ("ray", "hydra", "kornia", "pytorch_msssim", "torchmetrics", "skimage"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", exc)
PY

step "gpu tests: Triton kernel" 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_triton_gpu.py
step "gpu tests: everything else" 75 python3 -m pytest -m gpu -q -p no:cacheprovider \
  --continue-on-collection-errors --ignore=tests/test_triton_gpu.py -k "not triton" tests
# The same ssim() GPU tests with kernel='triton' (their ids say "triton"). ssim's kernel='auto' stays on the
# torch path until this step passes on a GPU (ssim_ray/metric/kernel_choice.py, resolve_kernel).
step "gpu tests: ssim() through the kernel" 60 python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_ssim_gpu.py -k triton

if [ -n "$FUSED_PID" ]; then
  echo "fused-ssim: waiting for the build (t=$((SECONDS - START))s)"
  wait "$FUSED_PID"
  echo "fused-ssim: build exited rc=$? (t=$((SECONDS - START))s); last lines:"
  tail -n 5 "$OUT/fused_build.log"
fi
[ -d /tmp/site_fused ] && export PYTHONPATH=/tmp/site_fused:$PYTHONPATH

step "benchmark" 200 python3 scripts/bench_gpu.py --out "$OUT/bench_gpu.md"

# The audit job end to end with one GPU actor. The lead finishes the job issue; a failure here is reported
# and does not change the results above.
rm -rf /tmp/ssim_job_out
step "JOB (one GPU actor, sample data)" 100 python3 -m jobs.ssim_audit source.copies=1 runtime.num_workers=1 \
  output.url=/tmp/ssim_job_out hydra.run.dir=/tmp/ssim_job_hydra
if [ -f /tmp/ssim_job_out/summary.json ]; then
  cp /tmp/ssim_job_out/summary.json "$OUT/job_summary.json"
  python3 - <<'PY' || true
import json
s = json.load(open("/tmp/ssim_job_out/summary.json"))
keys = ("complete", "status_counts", "wall_seconds", "throughput", "batch_sizes", "shards")
print(json.dumps({k: s.get(k) for k in keys}, indent=1, default=str)[:2000])
PY
fi

# Issue 6's batch-size curve on the GPU (256² and 1024², probe's choice marked), after everything above.
step "batch-size curve" 90 python3 scripts/bench_batch_curve.py --device cuda --seconds-per-point 1 \
  --max-seconds 75 --plot "$OUT/batch_curve_cuda.png"

echo
echo "=== SUMMARY (t=$((SECONDS - START))s) ==="
printf '%s\n' "${RESULTS[@]}"
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
sleep 2  # let tee flush the log before the machine collects $OUT
exit 0
