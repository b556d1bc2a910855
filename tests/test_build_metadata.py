"""The build's metadata provider (cmake/torch_pin.py) and the architecture-list parser of the
CUDA build check (scripts/cuda_arch_check.py); both run at build time, outside the package."""

import importlib.util
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_pin(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ADAPTDIFF_LOCAL_VERSION", raising=False)
    return _load("cmake/torch_pin.py")


SETTINGS = {"version-file": "python/adaptdiff/__init__.py"}


def test_wheel_pins_the_installed_torch_distribution(torch_pin):
    import adaptdiff

    torch_pin.build_state("wheel")
    meta = torch_pin.dynamic_metadata(SETTINGS, {})
    assert meta == {
        "version": adaptdiff.__version__,
        "dependencies": [f"torch=={metadata.version('torch')}"],
    }


def test_sdist_keeps_a_range(torch_pin):
    torch_pin.build_state("sdist")
    assert torch_pin.dynamic_metadata(SETTINGS, {})["dependencies"] == ["torch>=2.11"]
    assert torch_pin.dynamic_wheel({}) == {"dependencies": True}


def test_local_version_label(torch_pin, monkeypatch):
    import torch

    torch_pin.build_state("wheel")
    monkeypatch.setenv("ADAPTDIFF_LOCAL_VERSION", "1")
    monkeypatch.setenv("ADAPTDIFF_CUDA", "OFF")
    assert torch_pin.dynamic_metadata(SETTINGS, {})["version"].endswith("+cpu")
    # ON asks for the CUDA label; with a CPU torch CMake then refuses to build at all.
    monkeypatch.setenv("ADAPTDIFF_CUDA", "ON")
    cuda = torch.version.cuda
    want = "+cu" + cuda.replace(".", "") if cuda else "+cpu"
    assert torch_pin.dynamic_metadata(SETTINGS, {})["version"].endswith(want)
    assert torch_pin._cuda_label("13.0") == "cu130"


def test_cuda_arch_list_parsing():
    parse = _load("scripts/cuda_arch_check.py").parse_archs
    assert parse("80;86;89;90;100") == ({"80", "86", "89", "90", "100"}, {"100"})
    assert parse("90") == ({"90"}, {"90"})
    assert parse("80-real;90-real;100") == ({"80", "90", "100"}, {"100"})
    assert parse("90-real;100-virtual") == ({"90"}, {"100"})
    with pytest.raises(SystemExit, match="empty"):
        parse(" ; ")
