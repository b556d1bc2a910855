#!/usr/bin/env bash
# The one script for a GPU machine (one H100/H200, Python 3.12, torch >= 2.11 with CUDA, nvcc,
# cmake, ninja, pytest; no network), made to fit one call of at most ten minutes. Builds adaptdiff
# for sm_90, runs every CUDA test, the run-to-run determinism of every kernel, compute-sanitizer
# memcheck and racecheck on a small case of every op, times the performance targets
# (scripts/gpu_targets.py), then the kernel, model-level and large-size runs; most important first.
#
#   usage: OUT=/some/dir [GPU_CHECK_BUDGET=540] [GPU_CHECK_STAGES="build tests ..."] \
#          [GPU_CHECK_RESERVE="determinism:40 memcheck:60 racecheck:60"] [GPU_CHECK_DRY=1] \
#          [GPU_CHECK_DEVICE=cuda] [GPU_CHECK_TESTS="tests/ops/test_x.py ..."] \
#          [GPU_CHECK_BENCH="family ..."] bash scripts/gpu_check.sh
#
# Budget: GPU_CHECK_BUDGET (seconds, default 540) bounds the whole run. Each stage runs under
# `timeout` with min(its cap, the budget left - 10 s - the seconds reserved for the stages still
# to come); a stage that would get under 20 s is reported as skipped. GPU_CHECK_RESERVE holds
# fixed shares ("stage:seconds"; "" reserves nothing): until a reserved stage starts, no other
# stage may use its share, so the sanitizers and the determinism check keep their time however
# long the build or the tests take. GPU_CHECK_STAGES picks stages (default: all, in the order
# below; an unknown name is an error). GPU_CHECK_DRY=1 runs nothing: it writes the plan to
# summary.txt, every stage with the limit it would get if every stage before it used its whole
# limit (the worst case). GPU_CHECK_DEVICE=cpu runs the stages that can (determinism) on the
# CPU: a check of this script on a machine without a GPU.
# The build is reused when the site folder already holds one of this tree. Logs go to
# $OUT/logs.tgz (re-packed after every stage, so a cut-off run keeps what it did); $OUT/summary.txt
# has one line per stage and ends with the stages skipped. Result files ready to add to the
# repository (named after the card) go to $OUT/benchmarks/results/, listed in
# $OUT/benchmarks/results-ready. Wheels under .whl/ (diffusers, for the accelerator benchmark's
# diffusers rows) are installed into the site folder when present.
# Every stage runs with ADAPTDIFF_UNVERIFIED_CUDA=all: the CUDA kernels not yet verified on a GPU
# (adaptdiff.ops.UNVERIFIED_CUDA, opt-in for users) are the ones tested and benchmarked here, not
# the references their wrappers run by default. Once their tests pass, remove the op's name there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=${ADAPTDIFF_GPU_SITE:-/tmp/adaptdiff-site}
BUDGET=${GPU_CHECK_BUDGET:-540}
DRY=${GPU_CHECK_DRY:-0}
DEV=${GPU_CHECK_DEVICE:-cuda}
ALL_STAGES="build tests determinism memcheck racecheck
  attention_targets sampled_wgrad_targets sara_targets ras_targets
  selective_scan bench block_attention large moe sampling mode adapters accel pipelines
  memcheck_tests racecheck_tests"
# shellcheck disable=SC2086
ALL_STAGES=$(echo $ALL_STAGES) # one line
STAGES=${GPU_CHECK_STAGES:-$ALL_STAGES}
for s in $STAGES; do
  if [[ " $ALL_STAGES " != *" $s "* ]]; then
    echo "gpu_check.sh: unknown stage '$s' in GPU_CHECK_STAGES (stages: $ALL_STAGES)" >&2
    exit 2
  fi
done
LOG=$(mktemp -d /tmp/gpu-logs.XXXX)
mkdir -p "$OUT"
SECONDS=0
PLANNED=0
SKIPPED=""
: > "$OUT/summary.txt"
# One line per stage: the name in 34 columns (every name fits), then the verdict.
status() { printf '%-34s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
pack() { cp "$OUT/summary.txt" "$LOG/"; tar czf "$OUT/logs.tgz" -C "$LOG" . 2> /dev/null; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
dry() { [ "$DRY" = 1 ]; }
# Fixed shares: RESERVED holds "stage:seconds" for the wanted reserved stages not yet started.
RESERVED=""
for r in ${GPU_CHECK_RESERVE-determinism:40 memcheck:60 racecheck:60}; do
  wanted "${r%%:*}" && RESERVED="$RESERVED $r"
done
reserved_seconds() { local r s=0; for r in $RESERVED; do s=$((s + ${r#*:})); done; echo $s; }
release() {
  local r kept=""
  for r in $RESERVED; do [ "${r%%:*}" = "$1" ] || kept="$kept $r"; done
  RESERVED=$kept
}
# stage KEY NAME CAP LOGFILE CMD...: releases KEY's reserved share, then runs CMD under
# min(CAP, budget left - 10 s - the shares still reserved), output to LOGFILE. Returns CMD's
# exit code, or 199 when the stage did not run (skipped for the budget, or a dry run).
stage() {
  local key=$1 name=$2 cap=$3 logfile=$4; shift 4
  release "$key"
  dry && SECONDS=$PLANNED # a dry run's clock: only the planned stages' time passes
  local left=$((BUDGET - SECONDS - 10 - $(reserved_seconds))) t0=$SECONDS rc
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    status "$name" "skipped (budget: ${left}s left after the reserved shares)"
    SKIPPED="$SKIPPED, $name"
    return 199
  fi
  if dry; then
    status "$name" "plan: up to ${limit}s (cap ${cap}s) from t=${SECONDS}s"
    PLANNED=$((PLANNED + limit)) # the worst case: the stage uses its whole limit
    SECONDS=$PLANNED
    return 199
  fi
  timeout -k 5 "$limit" "$@" > "$LOG/$logfile" 2>&1 # SIGKILL 5 s after a SIGTERM ignored
  rc=$?
  LAST_SECS=$((SECONDS - t0))
  pack
  return $rc
}
# done_line NAME RC TEXT: the stage's summary line unless it did not run.
done_line() { ((rc == 199)) || status "$1" "$2"; }

if dry; then
  status "device" "dry run (plan only, budget ${BUDGET}s, reserved:${RESERVED:- none})"
elif [ "$DEV" != cuda ]; then
  status "device" "$DEV (GPU_CHECK_DEVICE; only the stages that can run there are meaningful)"
else
  {
    nvidia-smi || true
    "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    nvcc --version | tail -2
    "$PY" -m pip list 2> /dev/null | grep -i -E "^(torch|triton|diffusers|hypothesis|pytest|numpy) "
  } > "$LOG/env.txt" 2>&1
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
  status "device" "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)' 2> /dev/null || echo 'no GPU visible')"
fi

# 1. Build (16 cores there): a plain install into a private folder, no deps, no network.
export MAX_JOBS=${MAX_JOBS:-16} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-16}
tree_id=""
wanted build && tree_id=$(find csrc python CMakeLists.txt pyproject.toml -type f \
  -not -path "*/__pycache__/*" -print0 | sort -z | xargs -0 md5sum | md5sum | cut -c1-16)
if wanted build && { dry || [ "$(cat "$SITE/.tree" 2> /dev/null)" != "$tree_id" ]; }; then
  dry || rm -rf "$SITE"
  stage build "build (sm_90)" 240 build.log env ADAPTDIFF_CUDA=ON \
    ADAPTDIFF_CUDA_ARCHS="${ADAPTDIFF_CUDA_ARCHS:-90}" "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -v -Cbuild-dir=build/gpu --target "$SITE" .
  rc=$?
  if ((rc == 0)); then
    status "build (sm_90)" "ok in ${LAST_SECS}s"
    echo "$tree_id" > "$SITE/.tree"
  elif ! dry; then
    status "build (sm_90)" "FAILED, exit $rc (see build.log)"
    grep -E "error|Error" "$LOG/build.log" | head -20
    tail -30 "$LOG/build.log"
    pack
    exit 1
  fi
  if ! dry && ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
      > "$LOG/wheels.log" 2>&1 || status "wheels" "install failed (see wheels.log)"
  fi
elif wanted build; then
  status "build (sm_90)" "reused (this tree is built in $SITE)"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export ADAPTDIFF_UNVERIFIED_CUDA=all
XDIST="" PYTEST_TIMEOUT=""
if ! dry; then
  status "unverified CUDA kernels (opt-in)" "$("$PY" -c 'from adaptdiff.ops import UNVERIFIED_CUDA as u; print(", ".join(sorted(u)) or "none")' 2> /dev/null || echo '?')"
  [ "$DEV" = cuda ] && (cd /tmp && "$PY" -m adaptdiff.info) > "$LOG/info.txt" 2>&1
  if wanted tests || wanted selective_scan; then
    XDIST=$("$PY" -c "import xdist" 2> /dev/null && echo "-n 8")
    PYTEST_TIMEOUT=$("$PY" -c "import pytest_timeout" 2> /dev/null && echo "--timeout=120")
  fi
fi

# 2. Every CUDA test case (the CPU ones run in CI), every failure listed.
if wanted tests; then
  # shellcheck disable=SC2086
  stage tests "tests (-m cuda)" 150 tests.log "$PY" -m pytest -q -p no:cacheprovider ${GPU_CHECK_TESTS:-tests} -m cuda \
    $XDIST $PYTEST_TIMEOUT -o addopts="" -rf --maxfail=60
  rc=$?
  done_line "tests (-m cuda)" "$(tail -1 "$LOG/tests.log" 2> /dev/null) (exit $rc, ${LAST_SECS:-0}s)"
fi

# 3. Run-to-run determinism: every kernel 10 times on the same inputs, outputs and gradients
# compared bitwise; the ops with float atomics are listed in the script and reported as such.
if wanted determinism; then
  stage determinism "determinism ($DEV, 10 repeats)" 60 determinism.log "$PY" \
    scripts/determinism_check.py --device "$DEV" --repeats 10 --dtype float32 bfloat16 \
    --json "$LOG/determinism.json"
  rc=$?
  done_line "determinism ($DEV, 10 repeats)" "$(tail -1 "$LOG/determinism.log" 2> /dev/null) (exit $rc, ${LAST_SECS:-0}s)"
fi

# 4. compute-sanitizer: memcheck and racecheck on one small call of every op, forward and
# backward (the determinism check's cases, run once); the verdict counts the errors of the
# tool's ERROR SUMMARY. The *_tests stages (later, lower priority) run the CUDA op tests.
sanitize() {
  local key=$1 tool=$2 cap=$3 logfile=$4 errors verdict name; shift 4
  name="compute-sanitizer $tool$([[ $key == *_tests ]] && echo ', tests')"
  if ! dry && ! command -v compute-sanitizer > /dev/null; then
    release "$key"
    status "$name" "not installed"
    return
  fi
  # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end (inside a cached block it would be a valid address).
  stage "$key" "$name" "$cap" "$logfile" env \
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 ADAPTDIFF_HYPOTHESIS_EXAMPLES=4 compute-sanitizer --tool "$tool" --error-exitcode 99 \
    --target-processes all "$PY" "$@"
  rc=$?
  ((rc == 199)) && return
  errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$LOG/$logfile" | awk '{s += $3} END {print s + 0}')
  case $rc in
    0) verdict="clean (0 errors)" ;;
    99) verdict="FINDINGS: $errors errors (see $logfile)" ;;
    124) verdict="timed out ($errors errors so far)" ;;
    *) verdict="exit $rc, $errors errors ($(tail -1 "$LOG/$logfile"))" ;;
  esac
  status "$name" "$verdict (${LAST_SECS}s)"
}
EVERY_OP=(scripts/determinism_check.py --device "$DEV" --repeats 1 --dtype float32 bfloat16)
wanted memcheck && sanitize memcheck memcheck 90 sanitizer_memcheck.log "${EVERY_OP[@]}"
wanted racecheck && sanitize racecheck racecheck 90 sanitizer_racecheck.log "${EVERY_OP[@]}"

# 5. The performance targets (scripts/gpu_targets.py), one process per part, ratios in the rows.
target() {
  local key=$1 part=$2 cap=$3
  stage "$key" "targets: $part" "$cap" "targets_$part.log" "$PY" scripts/gpu_targets.py \
    --part "$part" --device "$DEV" --json "$LOG/targets_$part.jsonl"
  rc=$?
  done_line "targets: $part" "exit $rc (${LAST_SECS:-0}s), $(grep -c . "$LOG/targets_$part.jsonl" 2> /dev/null || echo 0) rows"
}
wanted attention_targets && target attention_targets attention 150
wanted sampled_wgrad_targets && target sampled_wgrad_targets sampled_wgrad 45
wanted sara_targets && target sara_targets sara_step 90
wanted ras_targets && target ras_targets ras 120

# 6. selective_scan: its op tests and property cases on CUDA (an L > 2,048 case included), then
# its benchmark (the kernel through ADAPTDIFF_UNVERIFIED_CUDA=all).
if wanted selective_scan; then
  # shellcheck disable=SC2086
  stage selective_scan "selective_scan tests (cuda)" 150 selective_scan.log "$PY" -m pytest -q \
    -p no:cacheprovider tests/ops/test_selective_scan.py tests/reliability/test_properties.py \
    -k selective_scan -m cuda $PYTEST_TIMEOUT -o addopts="" -rf
  rc=$?
  done_line "selective_scan tests (cuda)" "$(tail -1 "$LOG/selective_scan.log" 2> /dev/null) (${LAST_SECS:-0}s)"
  stage selective_scan "selective_scan bench (cuda)" 120 bench_selective_scan_cuda.txt "$PY" -m adaptdiff.bench \
    selective_scan --device cuda --json "$LOG/bench_selective_scan_cuda.jsonl"
  rc=$?
  done_line "selective_scan bench (cuda)" "exit $rc (${LAST_SECS:-0}s), table in bench_selective_scan_cuda.txt"
fi

# 7. Kernel benchmarks against the pure-torch references in the same process (every family,
# SaRA's included).
if wanted bench; then
  # shellcheck disable=SC2086
  stage bench "benchmarks (cuda)" 200 bench_cuda.txt "$PY" -m adaptdiff.bench ${GPU_CHECK_BENCH:-} --device cuda \
    --json "$LOG/bench_cuda.jsonl"
  rc=$?
  done_line "benchmarks (cuda)" "exit $rc (${LAST_SECS:-0}s), table in bench_cuda.txt"
fi
if wanted block_attention; then
  stage block_attention "block attention (cuda)" 150 bench_block_attention_cuda.txt "$PY" \
    -m adaptdiff.bench.kernels.block_attention --device cuda \
    --json "$LOG/bench_block_attention_cuda.jsonl"
  rc=$?
  done_line "block attention (cuda)" "exit $rc (${LAST_SECS:-0}s), vs SDPA and FlexAttention"
fi

# 8. Large sizes: one case per kernel family past 2**31 elements (skips without the memory).
if wanted large; then
  stage large "large sizes (>2^31 elems)" 120 large_sizes.txt "$PY" scripts/gpu_large.py
  rc=$?
  done_line "large sizes (>2^31 elems)" "exit $rc (${LAST_SECS:-0}s): $(grep -c PASS "$LOG/large_sizes.txt" 2> /dev/null) pass, $(grep -c FAIL "$LOG/large_sizes.txt" 2> /dev/null) fail, $(grep -c SKIP "$LOG/large_sizes.txt" 2> /dev/null) skip"
fi

# 9. Model-level benchmarks.
if wanted moe; then
  stage moe "MoE layer (cuda)" 90 bench_moe_cuda.txt "$PY" -m adaptdiff.bench moe_layer --device cuda \
    --json "$LOG/bench_moe_cuda.jsonl"
  rc=$?
  done_line "MoE layer (cuda)" "exit $rc (${LAST_SECS:-0}s)"
fi
if wanted sampling; then
  stage sampling "sampling (cuda)" 60 bench_sampling_cuda.txt "$PY" -m adaptdiff.bench sampling \
    --device cuda --json "$LOG/bench_sampling_cuda.jsonl"
  rc=$?
  done_line "sampling (cuda)" "exit $rc (${LAST_SECS:-0}s)"
fi
if wanted mode; then
  stage mode "MoDE fusion (cuda)" 45 bench_mode_cuda.txt "$PY" -m adaptdiff.bench mode --device cuda
  rc=$?
  done_line "MoDE fusion (cuda)" "exit $rc (${LAST_SECS:-0}s)"
fi
if wanted adapters; then
  stage adapters "adapters step DiT-XL/2 (cuda)" 150 bench_adapters_cuda.txt "$PY" \
    -m adaptdiff.bench adapters --device cuda --json "$LOG/bench_adapters_cuda.jsonl"
  rc=$?
  done_line "adapters step DiT-XL/2 (cuda)" "exit $rc (${LAST_SECS:-0}s)"
fi
# Accelerators (RAS, caches, diffusers' hooks) on random DiT-XL/2 at 256 and 512 px (latent 32, 64).
if wanted accel; then
  for size in 32 64; do
    stage accel "accel XL/2 $((size * 8))px (cuda)" 150 "bench_accel_cuda_$size.txt" "$PY" \
      -m adaptdiff.bench accel --device cuda --models dit-b,diffusers --dit DiT-XL/2 \
      --size "$size" --out "$LOG/accel_$size" --json "$LOG/bench_accel_cuda.jsonl"
    rc=$?
    done_line "accel XL/2 $((size * 8))px (cuda)" "exit $rc (${LAST_SECS:-0}s)"
  done
fi
# Every accelerator inside the diffusers pipelines' own loops (DiT, PixArt, SD3, Flux, Sana),
# random weights at build_pipeline's "large" size (width 768, 8 layers, 1024 image tokens, 4096
# on Sana), --quick's 8 steps and four methods (FirstBlockCache, AG, SADA, RAS); capped at 60 s
# (building the models takes part of it; each finished row is written to the JSON at once, so a
# run cut off by the cap keeps the rows it finished). This stage has not run on a GPU yet.
if wanted pipelines; then
  stage pipelines "accel pipelines large (cuda)" 60 bench_accel_pipelines_cuda.txt "$PY" -m adaptdiff.bench \
    accel --device cuda --models pipelines --pipeline-size large --quick \
    --out "$LOG/accel_pipelines" --json "$LOG/bench_accel_pipelines_cuda.jsonl"
  rc=$?
  done_line "accel pipelines large (cuda)" "exit $rc (${LAST_SECS:-0}s)"
fi

# 10. compute-sanitizer on the CUDA op tests that compare with the reference (many more cases
# than stage 4's one call per op; what the time left allows).
wanted memcheck_tests && sanitize memcheck_tests memcheck 150 sanitizer_memcheck_tests.log \
  -m pytest -q -p no:cacheprovider -o addopts="" -m cuda tests/ops \
  -k "matches_reference or empty or noncontiguous"
wanted racecheck_tests && sanitize racecheck_tests racecheck 120 sanitizer_racecheck_tests.log \
  -m pytest -q -p no:cacheprovider -o addopts="" -m cuda tests/ops/test_block_attention.py \
  tests/ops/test_sampled_wgrad.py tests/ops/test_patch_scores.py tests/ops/test_moe_permute.py \
  tests/ops/test_selective_scan.py -k "matches_reference"

# Results ready for benchmarks/results/ (named after the card), and the summary's last line.
results_ready() {
  local slug day dir f base tag n=0
  slug=$(echo "${CARD:-}" | tr '[:upper:]' '[:lower:]' | grep -oE '[a-z][0-9]{2,4}' | head -1)
  slug=${slug:-$(dry && echo dry || echo unknown)}
  tag=$([ "$DEV" = cuda ] && echo "cuda-$slug" || echo "$DEV")
  day=$(date -u +%Y-%m-%d)
  dir="$OUT/benchmarks/results"
  mkdir -p "$dir"
  for f in "$LOG"/*.jsonl "$LOG"/*.json; do
    [ -s "$f" ] || continue
    base=$(basename "$f")
    base=${base#bench_}
    base=${base%.json*}
    base=${base%_cuda}
    base=${base//_/-}-
    [ "$base" = cuda- ] && base="" # the kernel benchmarks: cuda-<card>-<date>.jsonl, as before
    cp "$f" "$dir/$base$tag-$day.${f##*.}"
    n=$((n + 1))
  done
  {
    echo "# GPU check on ${CARD:-no GPU} ($day)"
    echo
    echo '```'
    cat "$OUT/summary.txt"
    echo '```'
    if [ -s "$LOG/env.txt" ]; then printf '\n```\n%s\n```\n' "$(cat "$LOG/env.txt")"; fi
  } > "$dir/gpu-check-$tag-$day.md"
  {
    echo "card: ${CARD:-none}"
    echo "date: $day"
    echo "budget: ${BUDGET}s, used ${SECONDS}s$(dry && echo ' (dry run: planned, not run)')"
    echo "files (copy into the repository's benchmarks/results/):"
    (cd "$dir" && ls -1)
  } > "$OUT/benchmarks/results-ready"
  echo "$n result files and gpu-check-$tag-$day.md in $dir"
}

SKIPPED=${SKIPPED#, }
status "skipped stages" "${SKIPPED:-none}"
dry && SECONDS=$PLANNED
results_ready
pack
echo
if ! dry; then
  grep -E "FAILED|Error" "$LOG/tests.log" 2> /dev/null | head -40
  cat "$LOG/determinism.log" 2> /dev/null | grep -v "^ " | tail -20
  tail -45 "$LOG/bench_cuda.txt" 2> /dev/null
fi
echo
dry && SECONDS=$PLANNED
echo "== summary (${SECONDS}s$(dry && echo ', planned')) =="
cat "$OUT/summary.txt"
