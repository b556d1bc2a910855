#!/usr/bin/env bash
# The CPU wheel works on its own: builds it as `./dev wheel --cpu` does (against the pinned
# CPU torch of the ./dev environment, in its own build folder), checks that its metadata pins
# that torch, installs it with its `bench` extra into a clean virtual environment, and from a
# folder outside the source tree runs the op tests (tests/ops and tests/test_import.py, copied
# there, against the installed package), `adaptdiff bench --help` and one quick kernel family.
# Any failure fails the check.
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

ADAPTDIFF_CUDA=OFF ADAPTDIFF_LOCAL_VERSION=1 "$VENV/bin/pip" wheel -q --disable-pip-version-check \
  --no-build-isolation --no-deps -Cbuild-dir=build/wheel-cpu -w "$work/dist" .
wheel=$(ls "$work"/dist/adaptdiff-*.whl)
echo "wheel_check: built $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) in ${SECONDS}s"
# Its metadata pins the torch it was built against (cmake/torch_pin.py), and the version
# carries the +cpu label.
"$VENV/bin/python" - "$wheel" <<'PY'
import sys
import zipfile
from email.parser import Parser
from importlib import metadata

with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(z.read(name).decode())
    build_info = z.read("adaptdiff/_build_info.py").decode()
torch_reqs = [r for r in meta.get_all("Requires-Dist") if r.split()[0].startswith("torch")]
want = f"torch=={metadata.version('torch')}"
assert torch_reqs == [want], f"Requires-Dist {torch_reqs}, expected [{want!r}]"
assert meta["Version"].endswith("+cpu"), meta["Version"]
assert "with_cuda = False" in build_info, build_info
print(f"wheel_check: {meta['Name']} {meta['Version']} requires {want}")
PY

# A clean environment: nothing of the source tree or of the ./dev environment is importable.
unset PYTHONPATH
"$VENV/bin/python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$TORCH" "$wheel[bench]" \
  pytest==9.2.0
echo "wheel_check: installed into a clean environment at ${SECONDS}s"

# The op tests, outside the source tree: a copy of the tests they import (tests/support,
# tests/conftest.py) and pytest's settings from pyproject.toml (markers, warning filters).
mkdir -p "$work/t/tests"
cp -r tests/__init__.py tests/conftest.py tests/support tests/ops tests/test_import.py \
  "$work/t/tests/"
"$VENV/bin/python" - "$work/t/pytest.ini" <<'PY'
import sys
import tomllib

opts = tomllib.load(open("pyproject.toml", "rb"))["tool"]["pytest"]["ini_options"]
with open(sys.argv[1], "w") as f:
    f.write("[pytest]\n")
    for key, value in opts.items():
        if key != "testpaths":
            lines = value if isinstance(value, list) else [value]
            f.write(f"{key} =\n" + "".join(f"    {v}\n" for v in lines))
PY
# ... and a guard that the package those tests import is the installed one
cat > "$work/t/conftest.py" <<PY
import adaptdiff

assert adaptdiff.__file__.startswith("$work/venv/"), f"adaptdiff from {adaptdiff.__file__}"
PY

cd "$work"
export PATH="$work/venv/bin:$PATH"
python - "$work/venv" <<'PY'
import sys
from pathlib import Path

import adaptdiff

where = Path(adaptdiff.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"adaptdiff imported from {where}"
PY
(cd "$work/t" && python -m pytest -q -p no:cacheprovider -x tests/ops tests/test_import.py)
echo "wheel_check: op tests passed from the installed wheel at ${SECONDS}s"
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
