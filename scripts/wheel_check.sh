#!/usr/bin/env bash
# The benchmark suite ships with the package: builds a wheel of the CPU build (against the
# pinned CPU torch of the ./dev environment, in its own build folder), installs it with its
# `bench` extra into a clean virtual environment, and from a folder outside the source tree
# runs `adaptdiff bench --help` and one quick kernel family. Any failure fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAPTDIFF_VENV:-.venv}
TORCH="torch==2.13.0" # the CPU build in pip's local cache, as ./dev pins it
if [ ! -x "$VENV/bin/python" ]; then
  echo "wheel_check: no environment at $VENV (run ./dev first)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SECONDS=0

"$VENV/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir=build/wheel -w "$work/dist" .
wheel=$(ls "$work"/dist/adaptdiff-*.whl)
echo "wheel_check: built $(basename "$wheel") in ${SECONDS}s"

# A clean environment: nothing of the source tree or of the ./dev environment is importable.
unset PYTHONPATH
"$VENV/bin/python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$TORCH" "$wheel[bench]"
echo "wheel_check: installed into a clean environment at ${SECONDS}s"

cd "$work"
export PATH="$work/venv/bin:$PATH"
python - "$work/venv" <<'PY'
import sys
from pathlib import Path

import adaptdiff

where = Path(adaptdiff.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"adaptdiff imported from {where}"
PY
adaptdiff bench --help > help.txt
for name in reductions block_attention accel sampling --quick; do
  grep -q -- "$name" help.txt || { echo "wheel_check: bench --help lacks $name" >&2; exit 1; }
done
adaptdiff bench reductions --quick --threads 1 --json quick.jsonl
python - <<'PY'
import json

rows = [json.loads(line) for line in open("quick.jsonl")]
assert {r["op"] for r in rows} == {"rel_l1", "cosine", "lincomb"}, rows
assert all(r["status"] == "ok" for r in rows if r["impl"] == "reference"), rows
print(f"wheel_check: {len(rows)} JSON lines, kernels for {sorted({r['op'] for r in rows})}")
PY
echo "wheel_check: OK in ${SECONDS}s"
