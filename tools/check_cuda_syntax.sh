#!/usr/bin/env bash
# Compile-only check of every .cu file against the installed (CPU) torch wheel's headers.
# Runs nothing and links nothing; the real CUDA build needs a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
NVCC=${NVCC:-nvcc}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in csrc/cuda/*.cu; do
  "$NVCC" -std=c++20 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
    -Xcompiler=-fPIC -gencode arch=compute_90,code=sm_90 \
    -isystem "$T/include" -isystem "$T/include/torch/csrc/api/include" -I tools/cuda_shim -I csrc/include \
    -c "$f" -o "$tmp/$(basename "$f").o" || { echo "CUDA syntax check FAILED: $f"; exit 1; }
done
echo "CUDA syntax check OK"
