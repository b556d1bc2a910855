# Sourced by scripts/cuda_build_check.sh and `./dev wheel`: makes sure the CUDA build
# environment ($ADAPTDIFF_CUDA_VENV, default .venv-cuda) has pip's CUDA 13.0 build of torch
# (the pinned torch the CUDA wheel is built against), scikit-build-core and cuobjdump, and
# puts nvcc on PATH. Sets CUDA_VENV and CUOBJDUMP. About 5.5 GB; created once.
CUDA_VENV=${ADAPTDIFF_CUDA_VENV:-.venv-cuda}
CUDA_DEPS="torch==2.14.1 numpy==2.4.6 scikit-build-core>=1.1 tqdm nvidia-cuda-cuobjdump==13.4.92"
if [ ! -x "$CUDA_VENV/bin/python" ]; then python3 -m venv "$CUDA_VENV"; fi
CUDA_VENV=$(cd "$CUDA_VENV" && pwd)
if [ "$(cat "$CUDA_VENV/.adaptdiff-deps" 2>/dev/null)" != "$CUDA_DEPS" ]; then
  # shellcheck disable=SC2086
  "$CUDA_VENV/bin/pip" install -q --disable-pip-version-check $CUDA_DEPS
  echo "$CUDA_DEPS" > "$CUDA_VENV/.adaptdiff-deps"
fi
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
CUOBJDUMP=$("$CUDA_VENV/bin/python" -c \
  'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "cuobjdump"))')
[ -x "$CUOBJDUMP" ] || { echo "cuda_env: no cuobjdump at $CUOBJDUMP" >&2; exit 1; }
