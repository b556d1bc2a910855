"""Build metadata that depends on the torch adaptdiff is compiled against.

A ``[[tool.dynamic-metadata]]`` provider for scikit-build-core (see pyproject.toml). The
native library only imports with the exact torch it was built against (``_loader.py``
refuses any other), so every built wheel, and the editable install, says so in its metadata:

* ``Requires-Dist: torch==<version>``: the version of the installed torch distribution, as
  pip sees it (``2.13.0+cpu`` for the CPU build in pip's cache, ``2.14.1`` for PyPI's CUDA
  13.0 build, whose ``torch.__version__`` is ``2.14.1+cu130``);
* with ``ADAPTDIFF_LOCAL_VERSION=1`` (``./dev wheel`` sets it), a local version label,
  ``0.1.0+cpu`` or ``0.1.0+cu130``: the CPU and CUDA wheels would otherwise have the same
  file name and version (the wheel tag does not say), so one would overwrite the other in
  ``dist/`` and pip would take one for the other. CMake checks that the label matches what it
  builds (``SKBUILD_PROJECT_VERSION_FULL``). Off by default: pip refuses a build from an
  sdist whose wheel version differs from the sdist's file name.

torch is not a build requirement (build with ``--no-build-isolation``): this reads the torch
that the build interpreter imports, the same one CMake compiles against. The sdist says
``torch>=2.11`` and marks the field dynamic.
"""

from __future__ import annotations

import os
import re
import shutil
from importlib import metadata
from pathlib import Path

_state = "wheel"


def build_state(state: str) -> None:
    global _state
    _state = state


def dynamic_wheel(settings: dict) -> dict:
    return {"dependencies": True}


def _torch() -> tuple[str, str]:
    """(distribution version, CUDA version or '') of the torch the build interpreter has."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "adaptdiff: 'import torch' failed in the build interpreter: install torch first "
            "(pip install torch==2.13.0) and build with 'pip install --no-build-isolation .'"
        ) from e
    return metadata.version("torch"), torch.version.cuda or ""


def _cuda_label(torch_cuda: str) -> str:
    """``cpu`` or ``cu130``: the same decision as CMakeLists.txt's ADAPTDIFF_CUDA."""
    mode = os.environ.get("ADAPTDIFF_CUDA", "AUTO").upper()
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if mode == "OFF" or not torch_cuda or (mode != "ON" and not nvcc):
        return "cpu"
    return "cu" + torch_cuda.replace(".", "")


def dynamic_metadata(settings: dict, project: dict) -> dict:
    text = Path(settings["version-file"]).read_text()
    match = re.search(r'^__version__ = "([^"+]+)"$', text, re.M)
    if not match:
        raise RuntimeError(f"adaptdiff: no __version__ in {settings['version-file']}")
    if _state == "sdist":
        return {"version": match.group(1), "dependencies": ["torch>=2.11"]}
    torch_version, torch_cuda = _torch()
    version = match.group(1)
    if os.environ.get("ADAPTDIFF_LOCAL_VERSION") == "1":
        version += "+" + _cuda_label(torch_cuda)
    return {"version": version, "dependencies": [f"torch=={torch_version}"]}
