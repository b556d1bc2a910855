#!/usr/bin/env bash
# CI step: the CPU library built with AddressSanitizer + UndefinedBehaviorSanitizer
# (ADAPTDIFF_SANITIZE=ON: -fsanitize=address,undefined -O1) into its own build folder and
# install folder (build/asan, build/asan-site), then the op tests and the op property tests
# run against it with the sanitizer runtime preloaded. Python itself is not instrumented, so
# libasan must be the first library loaded: LD_PRELOAD it (and libubsan). `python -S` keeps
# .venv's editable adaptdiff out of the way (its .pth is not read); torch and pytest come from
# .venv's site-packages on PYTHONPATH, after the sanitized build.
#   usage: bash scripts/sanitize_check.sh [pytest args]   (needs ./dev's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${ADAPTDIFF_VENV:-.venv}/bin/python
SITE=build/asan-site
SECONDS=0
rm -rf "$SITE"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir=build/asan -Ccmake.define.ADAPTDIFF_SANITIZE=ON --target "$SITE" . >&2
echo "sanitizer build took ${SECONDS}s"

PURELIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
[ -f "$ASAN_LIB" ] && [ -f "$UBSAN_LIB" ] || { echo "libasan/libubsan not found" >&2; exit 1; }
grep -q "libasan" <(ldd "$SITE"/adaptdiff/_C*.so) || { echo "not a sanitized build" >&2; exit 1; }

SECONDS=0
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
set +e
env LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  PYTHONPATH="$SITE:$PURELIB:$PWD" OMP_NUM_THREADS=2 ADAPTDIFF_HYPOTHESIS_EXAMPLES=${ADAPTDIFF_HYPOTHESIS_EXAMPLES:-10} \
  "$PY" -S -m pytest -q -x -p no:cacheprovider -m "not slow" \
  tests/ops tests/reliability/test_properties.py tests/reliability/test_concurrency.py "$@"
rc=$?
set -e
echo "sanitizer test run took ${SECONDS}s (exit $rc)"
exit $rc
