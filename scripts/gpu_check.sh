#!/usr/bin/env bash
# The one script for a GPU machine (one H100/H200, Python 3.12, torch >= 2.11 with CUDA, nvcc,
# cmake, ninja, pytest; no network). Builds adaptdiff for sm_90, runs the CUDA test cases, the
# kernel benchmarks, the CUDA op tests under compute-sanitizer, the >2^31-element cases of
# scripts/gpu_large.py and the model-level benchmarks, most important first.
#
#   usage: OUT=/some/dir [GPU_CHECK_BUDGET=540] [GPU_CHECK_STAGES="tests bench ..."] \
#          [GPU_CHECK_TESTS="tests/ops/test_x.py ..."] [GPU_CHECK_BENCH="family ..."] \
#          bash scripts/gpu_check.sh
#
# GPU_CHECK_BUDGET (seconds) bounds the whole run: each stage gets at most what is left, stages
# that no longer fit are reported as skipped. GPU_CHECK_STAGES picks stages (default: all, in
# the order below); the build is reused when the site folder already holds one of this tree.
# Logs go to $OUT/logs.tgz (re-packed after every stage, so a cut-off run keeps what it did);
# $OUT/summary.txt has one line per stage. Wheels under .whl/ (diffusers, for the accelerator
# benchmark's diffusers rows) are installed into the site folder when present.
# Every stage runs with ADAPTDIFF_UNVERIFIED_CUDA=all: the CUDA kernels not yet verified on a GPU
# (adaptdiff.ops.UNVERIFIED_CUDA, opt-in for users) are the ones tested and benchmarked here, not
# the references their wrappers run by default. Once their tests pass, remove the op's name there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=${ADAPTDIFF_GPU_SITE:-/tmp/adaptdiff-site}
BUDGET=${GPU_CHECK_BUDGET:-100000}
STAGES=${GPU_CHECK_STAGES:-"build selective_scan tests bench block_attention memcheck large moe sampling mode adapters accel pipelines racecheck"}
LOG=$(mktemp -d /tmp/gpu-logs.XXXX)
mkdir -p "$OUT"
SECONDS=0
: > "$OUT/summary.txt"
status() { printf '%-34s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
pack() { cp "$OUT/summary.txt" "$LOG/"; tar czf "$OUT/logs.tgz" -C "$LOG" . 2> /dev/null; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
# stage NAME CAP LOGFILE CMD...: runs CMD under min(CAP, budget left - 10 s), output to LOGFILE.
stage() {
  local name=$1 cap=$2 logfile=$3; shift 3
  local left=$((BUDGET - SECONDS - 10)) t0=$SECONDS rc
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then status "$name" "skipped (budget)"; return 199; fi
  timeout "$limit" "$@" > "$LOG/$logfile" 2>&1
  rc=$?
  LAST_SECS=$((SECONDS - t0))
  pack
  return $rc
}

{
  nvidia-smi || true
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvcc --version | tail -2
  "$PY" -m pip list 2> /dev/null | grep -i -E "^(torch|triton|diffusers|hypothesis|pytest|numpy) "
} > "$LOG/env.txt" 2>&1
status "device" "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)' 2> /dev/null || echo 'no GPU visible')"

# 1. Build (16 cores there): a plain install into a private folder, no deps, no network.
export MAX_JOBS=${MAX_JOBS:-16} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-16}
tree_id=$(find csrc python CMakeLists.txt pyproject.toml -type f -not -path "*/__pycache__/*" \
  -print0 | sort -z | xargs -0 md5sum | md5sum | cut -c1-16)
if wanted build && [ "$(cat "$SITE/.tree" 2> /dev/null)" != "$tree_id" ]; then
  rm -rf "$SITE"
  if stage "build (sm_90)" 400 build.log env ADAPTDIFF_CUDA=ON \
    ADAPTDIFF_CUDA_ARCHS="${ADAPTDIFF_CUDA_ARCHS:-90}" "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -v -Cbuild-dir=build/gpu --target "$SITE" .; then
    status "build (sm_90)" "ok in ${LAST_SECS}s"
    echo "$tree_id" > "$SITE/.tree"
  else
    status "build (sm_90)" "FAILED (see build.log)"
    grep -E "error|Error" "$LOG/build.log" | head -20
    tail -30 "$LOG/build.log"
    pack
    exit 1
  fi
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
      > "$LOG/wheels.log" 2>&1 || status "wheels" "install failed (see wheels.log)"
  fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export ADAPTDIFF_UNVERIFIED_CUDA=all
status "unverified CUDA kernels (opt-in)" "$("$PY" -c 'from adaptdiff.ops import UNVERIFIED_CUDA as u; print(", ".join(sorted(u)) or "none")' 2> /dev/null || echo '?')"
(cd /tmp && "$PY" -m adaptdiff.info) > "$LOG/info.txt" 2>&1
XDIST=$("$PY" -c "import xdist" 2> /dev/null && echo "-n 8")
PYTEST_TIMEOUT=$("$PY" -c "import pytest_timeout" 2> /dev/null && echo "--timeout=120")

# 2a. selective_scan first: its CUDA kernel (forward and backward) has not run on a GPU before.
# Its op tests and property cases on CUDA (an L > 2,048 case included; both opt in to the
# kernel themselves), then its benchmark (the kernel through ADAPTDIFF_UNVERIFIED_CUDA=all).
if wanted selective_scan; then
  # shellcheck disable=SC2086
  stage "selective_scan tests (cuda)" 150 selective_scan.log "$PY" -m pytest -q \
    -p no:cacheprovider tests/ops/test_selective_scan.py tests/reliability/test_properties.py \
    -k selective_scan -m cuda $PYTEST_TIMEOUT -o addopts="" -rf
  rc=$?; ((rc == 199)) || status "selective_scan tests (cuda)" "$(tail -1 "$LOG/selective_scan.log") (${LAST_SECS}s)"
  stage "selective_scan bench (cuda)" 120 bench_selective_scan_cuda.txt "$PY" -m adaptdiff.bench \
    selective_scan --device cuda --json "$LOG/bench_selective_scan_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "selective_scan bench (cuda)" "exit $rc (${LAST_SECS}s), table in bench_selective_scan_cuda.txt"
fi

# 2. The CUDA test cases (the CPU ones run in CI), every failure listed.
if wanted tests; then
  # shellcheck disable=SC2086
  stage "tests (-m cuda)" 240 tests.log "$PY" -m pytest -q -p no:cacheprovider ${GPU_CHECK_TESTS:-tests} -m cuda \
    $XDIST $PYTEST_TIMEOUT -o addopts="" -rf --maxfail=60
  rc=$?; ((rc == 199)) || status "tests (-m cuda)" "$(tail -1 "$LOG/tests.log") (${LAST_SECS}s)"
fi

# 3. Kernel benchmarks against the pure-torch references in the same process (every family,
# SaRA's included).
if wanted bench; then
  # shellcheck disable=SC2086
  stage "benchmarks (cuda)" 200 bench_cuda.txt "$PY" -m adaptdiff.bench ${GPU_CHECK_BENCH:-} --device cuda \
    --json "$LOG/bench_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "benchmarks (cuda)" "exit $rc (${LAST_SECS}s), table in bench_cuda.txt"
fi
if wanted block_attention; then
  stage "block attention (cuda)" 150 bench_block_attention_cuda.txt "$PY" \
    -m adaptdiff.bench.kernels.block_attention --device cuda \
    --json "$LOG/bench_block_attention_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "block attention (cuda)" "exit $rc (${LAST_SECS}s), vs SDPA and FlexAttention"
fi

# 4. compute-sanitizer on the CUDA op tests that compare with the reference; the verdict counts
# the errors of the tool's ERROR SUMMARY.
sanitize() {
  local tool=$1 cap=$2 rc errors verdict; shift 2
  stage "compute-sanitizer $tool" "$cap" "sanitizer_$tool.log" env \
    ADAPTDIFF_HYPOTHESIS_EXAMPLES=4 compute-sanitizer --tool "$tool" --error-exitcode 99 \
    --target-processes all "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m cuda "$@"
  rc=$?
  ((rc == 199)) && return
  errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$LOG/sanitizer_$tool.log" | awk '{s += $3} END {print s + 0}')
  case $rc in
    0) verdict="clean (0 errors)" ;;
    99) verdict="FINDINGS: $errors errors (see sanitizer_$tool.log)" ;;
    124) verdict="timed out ($errors errors so far)" ;;
    *) verdict="exit $rc, $errors errors ($(tail -1 "$LOG/sanitizer_$tool.log"))" ;;
  esac
  status "compute-sanitizer $tool" "$verdict (${LAST_SECS}s)"
}
if wanted memcheck; then
  if command -v compute-sanitizer > /dev/null; then
    sanitize memcheck 150 tests/ops -k "matches_reference or empty or noncontiguous"
  else
    status "compute-sanitizer" "not installed"
  fi
fi

# 5. Large sizes: one case per kernel family past 2**31 elements (skips without the memory).
if wanted large; then
  stage "large sizes (>2^31 elems)" 120 large_sizes.txt "$PY" scripts/gpu_large.py
  rc=$?; ((rc == 199)) || status "large sizes (>2^31 elems)" "exit $rc (${LAST_SECS}s): $(grep -c PASS "$LOG/large_sizes.txt") pass, $(grep -c FAIL "$LOG/large_sizes.txt") fail, $(grep -c SKIP "$LOG/large_sizes.txt") skip"
fi

# 6. Model-level benchmarks.
if wanted moe; then
  stage "MoE layer (cuda)" 90 bench_moe_cuda.txt "$PY" -m adaptdiff.bench moe_layer --device cuda \
    --json "$LOG/bench_moe_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "MoE layer (cuda)" "exit $rc (${LAST_SECS}s)"
fi
if wanted sampling; then
  stage "sampling (cuda)" 60 bench_sampling_cuda.txt "$PY" -m adaptdiff.bench sampling \
    --device cuda --json "$LOG/bench_sampling_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "sampling (cuda)" "exit $rc (${LAST_SECS}s)"
fi
if wanted mode; then
  stage "MoDE fusion (cuda)" 45 bench_mode_cuda.txt "$PY" -m adaptdiff.bench mode --device cuda
  rc=$?; ((rc == 199)) || status "MoDE fusion (cuda)" "exit $rc (${LAST_SECS}s)"
fi
if wanted adapters; then
  stage "adapters step DiT-XL/2 (cuda)" 150 bench_adapters_cuda.txt "$PY" \
    -m adaptdiff.bench adapters --device cuda --json "$LOG/bench_adapters_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "adapters step DiT-XL/2 (cuda)" "exit $rc (${LAST_SECS}s)"
fi
# Accelerators (RAS, caches, diffusers' hooks) on random DiT-XL/2 at 256 and 512 px (latent 32, 64).
if wanted accel; then
  for size in 32 64; do
    stage "accel XL/2 $((size * 8))px (cuda)" 150 "bench_accel_cuda_$size.txt" "$PY" \
      -m adaptdiff.bench accel --device cuda --models dit-b,diffusers --dit DiT-XL/2 \
      --size "$size" --out "$LOG/accel_$size" --json "$LOG/bench_accel_cuda.jsonl"
    rc=$?; ((rc == 199)) || status "accel XL/2 $((size * 8))px (cuda)" "exit $rc (${LAST_SECS}s)"
  done
fi
# Every accelerator inside the diffusers pipelines' own loops (DiT, PixArt, SD3, Flux, Sana),
# random weights at build_pipeline's "large" size (width 768, 8 layers, 1024 image tokens, 4096
# on Sana), --quick's 8 steps and four methods (FirstBlockCache, AG, SADA, RAS); capped at 60 s
# (building the models takes part of it; each finished row is written to the JSON at once, so a
# run cut off by the cap keeps the rows it finished). This stage has not run on a GPU yet.
if wanted pipelines; then
  stage "accel pipelines large (cuda)" 60 bench_accel_pipelines_cuda.txt "$PY" -m adaptdiff.bench \
    accel --device cuda --models pipelines --pipeline-size large --quick \
    --out "$LOG/accel_pipelines" --json "$LOG/bench_accel_pipelines_cuda.jsonl"
  rc=$?; ((rc == 199)) || status "accel pipelines large (cuda)" "exit $rc (${LAST_SECS}s)"
fi
if wanted racecheck && command -v compute-sanitizer > /dev/null; then
  sanitize racecheck 120 tests/ops/test_block_attention.py tests/ops/test_sampled_wgrad.py \
    tests/ops/test_patch_scores.py tests/ops/test_moe_permute.py -k "matches_reference"
fi

pack
echo
grep -E "FAILED|Error" "$LOG/tests.log" 2> /dev/null | head -40
tail -45 "$LOG/bench_cuda.txt" 2> /dev/null
tail -12 "$LOG/bench_block_attention_cuda.txt" 2> /dev/null
tail -14 "$LOG/bench_selective_scan_cuda.txt" 2> /dev/null
echo
echo "== summary (${SECONDS}s) =="
cat "$OUT/summary.txt"
