"""Checks the device code inside a CUDA build of adaptdiff with cuobjdump (no GPU needed).

usage: python scripts/cuda_arch_check.py --cuobjdump PATH [--expect "80;90;100"] [--cu-files N]
       WHEEL_OR_SO

For a wheel, its ``adaptdiff/_C*.so`` and ``adaptdiff/_build_info.py`` are read. Checks:

* the SASS architectures (``cuobjdump --list-elf``) are exactly those requested, and the PTX
  (``--list-ptx``) is exactly the newest's; ``--expect`` takes ADAPTDIFF_CUDA_ARCHS's syntax
  (plain numbers: SASS for each, PTX for the newest; or CMake's ``90-real`` / ``100-virtual``),
  default: the ``cuda_archs`` the build recorded, which must then agree with it too;
* every architecture has one cubin per compiled ``.cu`` file (``--cu-files``) and the same
  non-empty set of kernels (``cuobjdump --dump-resource-usage``), and every PTX entry point
  has SASS for every architecture.
Prints one line per architecture; exits non-zero with the reason on any failure.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path


def parse_archs(spec: str) -> tuple[set[str], set[str]]:
    """(SASS archs, PTX archs) for an ADAPTDIFF_CUDA_ARCHS / CMAKE_CUDA_ARCHITECTURES list."""
    entries = [e.strip() for e in spec.replace(",", ";").split(";") if e.strip()]
    if not entries:
        raise SystemExit(f"cuda_arch_check: empty architecture list {spec!r}")
    sass, ptx = set(), set()
    if any(e.endswith(("-real", "-virtual")) for e in entries):
        for e in entries:
            num, _, kind = e.partition("-")
            if kind in ("", "real"):
                sass.add(num)
            if kind in ("", "virtual"):
                ptx.add(num)
        return sass, ptx
    newest = max(entries, key=lambda e: int(re.sub(r"[af]$", "", e)))
    return set(entries), {newest}


def run(cuobjdump: str, *args: str) -> str:
    r = subprocess.run([cuobjdump, *args], capture_output=True, text=True)
    if r.returncode != 0 and "does not contain" not in r.stderr:
        raise SystemExit(f"cuda_arch_check: {cuobjdump} {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def kernels_by_arch(cuobjdump: str, so: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    arch = None
    in_elf = False
    for line in run(cuobjdump, "--dump-resource-usage", so).splitlines():
        if line.startswith("Fatbin "):  # "Fatbin elf code:" or "Fatbin ptx code:"
            in_elf, arch = line.startswith("Fatbin elf"), None
        m = re.match(r"\s*arch = sm_(\w+)", line)
        if m and in_elf:
            arch = m.group(1)
            out.setdefault(arch, set())
        m = re.match(r"\s*Function (\S+?):", line)
        if m and arch is not None:
            out[arch].add(m.group(1))
    return out


def ptx_entries(cuobjdump: str, so: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\S+?)\s*\(", run(cuobjdump, "--dump-ptx", so)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a wheel or the _C*.so")
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--expect", help="the requested architectures (default: as recorded)")
    ap.add_argument("--cu-files", type=int, help="number of .cu files compiled")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.path)
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as z:
                names = [
                    n for n in z.namelist() if re.match(r"adaptdiff/(_C\..*so|_build_info\.py)$", n)
                ]
                z.extractall(tmp, names)
            path = next(Path(tmp, "adaptdiff").glob("_C*.so"))
        recorded_file = path.parent / "_build_info.py"
        info: dict = {}
        exec(recorded_file.read_text(), info)  # plain assignments written by CMake
        if not info.get("with_cuda"):
            raise SystemExit(f"cuda_arch_check: {args.path} is not a CUDA build")
        recorded = info["cuda_archs"]
        want_sass, want_ptx = parse_archs(recorded)
        if args.expect:
            exp = parse_archs(args.expect)
            if exp != (want_sass, want_ptx):
                raise SystemExit(
                    f"cuda_arch_check: requested {args.expect!r} but the build recorded "
                    f"{recorded!r}"
                )
        so = str(path)
        elf = Counter(re.findall(r"\.sm_(\w+)\.cubin", run(args.cuobjdump, "--list-elf", so)))
        ptx = Counter(re.findall(r"\.sm_(\w+)\.ptx", run(args.cuobjdump, "--list-ptx", so)))
        kernels = kernels_by_arch(args.cuobjdump, so)
        entries = ptx_entries(args.cuobjdump, so)

    errors = []
    if set(elf) != want_sass:
        errors.append(f"SASS for {sorted(elf)}, expected {sorted(want_sass)}")
    if set(ptx) != want_ptx:
        errors.append(f"PTX for {sorted(ptx)}, expected {sorted(want_ptx)}")
    counts = set(elf.values()) | set(ptx.values())
    if len(counts) > 1 or (args.cu_files and counts != {args.cu_files}):
        errors.append(
            f"cubins per arch {dict(elf)}, PTX per arch {dict(ptx)}; expected "
            f"{args.cu_files or 'the same number'} each"
        )
    kernel_sets = {a: frozenset(k) for a, k in kernels.items()}
    if set(kernel_sets) != want_sass or not all(kernel_sets.values()):
        errors.append(f"kernels found for {sorted(k for k, v in kernel_sets.items() if v)}")
    elif len(set(kernel_sets.values())) != 1:
        union = frozenset().union(*kernel_sets.values())
        for a, k in sorted(kernel_sets.items()):
            if k != union:
                errors.append(f"sm_{a} lacks {sorted(union - k)[:5]}")
    if want_ptx and (not entries or any(not entries <= k for k in kernel_sets.values())):
        errors.append(f"{len(entries)} PTX entry points, not all with SASS everywhere")
    if errors:
        print("cuda_arch_check: FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    n = len(next(iter(kernel_sets.values())))
    for a in sorted(want_sass, key=lambda a: int(re.sub(r"[af]$", "", a))):
        print(f"cuda_arch_check: sm_{a}: SASS, {elf[a]} cubins, {n} kernels")
    for a in sorted(want_ptx):
        print(f"cuda_arch_check: compute_{a}: PTX, {ptx[a]} files, {len(entries)} entry points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
