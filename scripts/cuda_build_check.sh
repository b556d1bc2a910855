#!/usr/bin/env bash
# Builds adaptdiff with its CUDA kernels against pip's CUDA build of torch (2.14.1+cu130) in a
# separate environment and build folder (scripts/cuda_env.sh), then checks on this machine (no
# GPU needed) that it imports without touching CUDA, that every op with a csrc/cuda/<op>.cu
# has a CUDA kernel registered, and with cuobjdump that the library holds SASS for every
# requested architecture, the same kernels in each, and PTX for the newest only
# (scripts/cuda_arch_check.py).
#   ADAPTDIFF_CUDA_ARCHS: the architectures (default 90; `./dev wheel` builds 80;86;89;90;100)
#   ADAPTDIFF_CUDA_BUILD_DIR: the build folder (default build/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda_env.sh
ARCHS=${ADAPTDIFF_CUDA_ARCHS:-90}
SECONDS=0
ADAPTDIFF_CUDA=ON ADAPTDIFF_CUDA_ARCHS=$ARCHS \
  "$CUDA_VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir="${ADAPTDIFF_CUDA_BUILD_DIR:-build/cuda}" .
echo "CUDA build ($ARCHS) took ${SECONDS}s"
expected=$(ls csrc/cuda/*.cu | xargs -n1 basename | sed 's/\.cu$//' | tr '\n' ' ')
so=$(cd /tmp && "$CUDA_VENV/bin/python" - "$expected" <<'PY'
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
      f"CUDA kernels registered for {len(expected)} ops: {' '.join(expected)}", file=sys.stderr)
print(adaptdiff._C.__file__)
PY
)
"$CUDA_VENV/bin/python" scripts/cuda_arch_check.py --cuobjdump "$CUOBJDUMP" --expect "$ARCHS" \
  --cu-files "$(ls csrc/cuda/*.cu | wc -l)" "$so"
