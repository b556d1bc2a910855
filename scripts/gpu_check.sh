#!/usr/bin/env bash
# The one script for a GPU machine (one H100/H200, Python 3.12, torch >= 2.11 with CUDA, nvcc,
# cmake, ninja, pytest; no network). Builds adaptdiff for sm_90, runs the test suite with its
# CUDA cases, the CUDA op tests under compute-sanitizer, the >2^31-element cases of
# scripts/gpu_large.py, and the kernel benchmarks.
# Everything lands in $OUT (default ./gpu-out); a short summary is printed last.
#   usage: OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=${ADAPTDIFF_GPU_SITE:-/tmp/adaptdiff-site}
mkdir -p "$OUT"
SECONDS=0
status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  nvidia-smi || true
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
status "device" "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo 'no GPU visible')"

# 1. Build (16 cores there): a plain install into a private folder, no deps, no network.
export MAX_JOBS=${MAX_JOBS:-16} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-16}
rm -rf "$SITE"
if ADAPTDIFF_CUDA=ON ADAPTDIFF_CUDA_ARCHS=${ADAPTDIFF_CUDA_ARCHS:-90} \
   "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
   -Cbuild-dir=build/gpu --target "$SITE" . > "$OUT/build.log" 2>&1; then
  status "build (sm_90)" "ok in ${SECONDS}s"
else
  status "build (sm_90)" "FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
(cd /tmp && "$PY" -m adaptdiff.info) > "$OUT/info.txt" 2>&1

# 2. Tests: the whole suite (CUDA cases run here), bounded in time.
t0=$SECONDS
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests -x --timeout=120 -o addopts="" \
  > "$OUT/tests.log" 2>&1
status "tests" "$(tail -1 "$OUT/tests.log") ($((SECONDS - t0))s)"

# 3. compute-sanitizer on the CUDA op tests and the CUDA op property tests (memcheck, racecheck)
#    when the machine allows it; the verdict counts the errors of the tool's ERROR SUMMARY.
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    t0=$SECONDS
    ADAPTDIFF_HYPOTHESIS_EXAMPLES=8 timeout 240 compute-sanitizer --tool "$tool" \
      --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/reliability/test_properties.py \
      -m cuda -k "matches_reference" > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$OUT/sanitizer_$tool.log" | awk '{s += $3} END {print s + 0}')
    case $rc in
      0) verdict="clean (0 errors)" ;;
      99) verdict="FINDINGS: $errors errors (see sanitizer_$tool.log)" ;;
      124) verdict="timed out ($errors errors so far)" ;;
      *) verdict="exit $rc, $errors errors (see sanitizer_$tool.log)" ;;
    esac
    status "compute-sanitizer $tool" "$verdict ($((SECONDS - t0))s)"
  done
else
  status "compute-sanitizer" "not installed"
fi

# 3b. Large sizes: one case per kernel family past 2**31 elements (skips without the memory).
t0=$SECONDS
timeout 300 "$PY" scripts/gpu_large.py > "$OUT/large_sizes.txt" 2>&1
status "large sizes (>2^31 elems)" "exit $? ($((SECONDS - t0))s): $(grep -c PASS "$OUT/large_sizes.txt") pass, $(grep -c FAIL "$OUT/large_sizes.txt") fail, $(grep -c SKIP "$OUT/large_sizes.txt") skip"

# 4. Kernel benchmarks on the GPU, against the pure-torch references in the same process
# (every family, SaRA's included: sampled_wgrad vs dense matmul + gather, sara_linear's
# forward+backward vs the dense masked reference, at DiT-B/2 shapes).
t0=$SECONDS
timeout 180 "$PY" -m benchmarks --device cuda --json "$OUT/bench_cuda.jsonl" > "$OUT/bench_cuda.txt" 2>&1
status "benchmarks (cuda)" "exit $? ($((SECONDS - t0))s), table in bench_cuda.txt"

t0=$SECONDS
timeout 90 "$PY" -m benchmarks.bench_sampling --device cuda --json "$OUT/bench_sampling_cuda.jsonl" \
  > "$OUT/bench_sampling_cuda.txt" 2>&1
status "sampling benchmark (cuda)" "exit $? ($((SECONDS - t0))s), table in bench_sampling_cuda.txt"

t0=$SECONDS
timeout 120 "$PY" -m benchmarks.bench_moe --device cuda --json "$OUT/bench_moe_cuda.jsonl" \
  > "$OUT/bench_moe_cuda.txt" 2>&1
status "MoE layer benchmark (cuda)" "exit $? ($((SECONDS - t0))s), table in bench_moe_cuda.txt"

t0=$SECONDS
timeout 60 "$PY" -m benchmarks.bench_mode --device cuda > "$OUT/bench_mode_cuda.txt" 2>&1
status "MoDE fusion benchmark (cuda)" "exit $? ($((SECONDS - t0))s), table in bench_mode_cuda.txt"

t0=$SECONDS
timeout 300 "$PY" -m benchmarks.bench_block_attention --device cuda \
  --json "$OUT/bench_block_attention_cuda.jsonl" > "$OUT/bench_block_attention_cuda.txt" 2>&1
status "block attention (cuda)" "exit $? ($((SECONDS - t0))s), vs SDPA and FlexAttention in bench_block_attention_cuda.txt"
t0=$SECONDS
timeout 240 "$PY" -m benchmarks.bench_adapters --device cuda --json "$OUT/bench_adapters_cuda.jsonl" \
  > "$OUT/bench_adapters_cuda.txt" 2>&1
status "adapters fine-tuning step, DiT-XL/2 (cuda)" "exit $? ($((SECONDS - t0))s), table in bench_adapters_cuda.txt"
# Accelerators (RAS, caches, diffusers' hooks) on random DiT-XL/2 at 256 and 512 px (latent 32, 64).
for size in 32 64; do
  t0=$SECONDS
  timeout 300 "$PY" -m benchmarks.bench_accel --device cuda --models dit-b,diffusers \
    --dit DiT-XL/2 --size "$size" --out "$OUT/accel_$size" --json "$OUT/bench_accel_cuda.jsonl" \
    > "$OUT/bench_accel_cuda_$size.txt" 2>&1
  status "accel benchmark XL/2 $((size * 8))px" "exit $? ($((SECONDS - t0))s), bench_accel_cuda_$size.txt"
done

echo
cat "$OUT/bench_cuda.txt" 2>/dev/null | tail -40
grep -E "sara_linear|sampled_wgrad" "$OUT/bench_cuda.txt" 2>/dev/null
cat "$OUT/bench_sampling_cuda.txt" 2>/dev/null | tail -12
cat "$OUT/bench_block_attention_cuda.txt" 2>/dev/null | tail -10
echo
echo "== summary (${SECONDS}s) =="
cat "$OUT/summary.txt"
