#!/usr/bin/env bash
# Builds adaptdiff with its CUDA kernels (sm_90) against pip's CUDA build of torch in a
# separate environment and build folder, then checks on this machine (no GPU needed) that it
# imports without touching CUDA and that every op with a csrc/cuda/<op>.cu has a CUDA kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAPTDIFF_CUDA_VENV:-.venv-cuda}
DEPS="torch==2.14.1 numpy==2.4.6 scikit-build-core>=0.11 tqdm"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if [ "$(cat "$VENV/.adaptdiff-deps" 2>/dev/null)" != "$DEPS" ]; then
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $DEPS
  echo "$DEPS" > "$VENV/.adaptdiff-deps"
fi
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
SECONDS=0
ADAPTDIFF_CUDA=ON ADAPTDIFF_CUDA_ARCHS=${ADAPTDIFF_CUDA_ARCHS:-90} \
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir=build/cuda .
echo "CUDA build took ${SECONDS}s"
expected=$(ls csrc/cuda/*.cu | xargs -n1 basename | sed 's/\.cu$//' | tr '\n' ' ')
cd /tmp && "$OLDPWD/$VENV/bin/python" - "$expected" <<'PY'
import sys

import torch

import adaptdiff

assert not torch.cuda.is_initialized(), "importing adaptdiff initialised CUDA"
info = adaptdiff.build_info()
assert info["with_cuda"], f"not a CUDA build: {info}"
expected = sys.argv[1].split()
missing = [op for op in expected if not adaptdiff.has_kernel(op, "cuda")]
assert not missing, f"ops without a registered CUDA kernel: {missing}"
print(f"CUDA build OK: torch {torch.__version__}, archs {info['cuda_archs']}, "
      f"CUDA kernels registered for {len(expected)} ops: {' '.join(expected)}")
PY
