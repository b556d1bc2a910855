"""The validated JSON loader (adaptdiff._schema) and its use for model.json."""

from __future__ import annotations

import json

import pytest

from adaptdiff._schema import Field, SchemaError, dump_json, load_json

KIND = "adaptdiff.test_schedule"
FIELDS = {
    "model": Field(str),
    "steps": Field(int),
    "timesteps": Field(list, shape=(lambda d: d["steps"] + 1,), item=float),
    "coeffs": Field(list, shape=("rows", 2), item=float),
    "weights": Field(list, shape=("rows",), item=float, required=False),
    "method": Field(str, choices=("euler", "heun")),
    "note": Field(str, required=False),
}
GOOD = {
    "model": "DiT-XL/2",
    "steps": 2,
    "timesteps": [999, 500.5, 0],
    "coeffs": [[1, 0], [0.5, 0.5], [0, 1]],
    "method": "euler",
}


def write(tmp_path, payload, **envelope):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"kind": KIND, "version": 1, **envelope, **payload}))
    return path


def load(path, **kw):
    return load_json(path, kind=KIND, versions=(1,), fields=FIELDS, **kw)


def test_round_trip(tmp_path):
    dump_json(tmp_path / "s.json", GOOD, kind=KIND, version=1)
    assert load(tmp_path / "s.json", expect={"model": "DiT-XL/2"})["timesteps"] == [999, 500.5, 0]
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"kind": "other"}, "kind must be 'adaptdiff.test_schedule'"),
        ({"steps": "2"}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"timesteps": [1, 0]}, r"timesteps must have length 3"),
        ({"timesteps": [1, "a", 0]}, r"timesteps\[1\] must be a number"),
        ({"coeffs": [[1, 0], [0.5], [0, 1]]}, r"coeffs\[1\] must have length 2"),
        ({"weights": [1.0, 2.0]}, r"weights must have length 3 \(rows\)"),
        ({"method": "rk4"}, "method must be one of"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_bad_files_raise_naming_the_field(tmp_path, change, message):
    path = write(tmp_path, {**GOOD, **change})
    with pytest.raises(SchemaError, match=message):
        load(path)


def test_missing_field_and_model_mismatch(tmp_path):
    with pytest.raises(SchemaError, match="timesteps is missing"):
        load(write(tmp_path, {k: v for k, v in GOOD.items() if k != "timesteps"}))
    with pytest.raises(SchemaError, match="model is 'DiT-XL/2' but this is loaded for 'DiT-S/2'"):
        load(write(tmp_path, GOOD), expect={"model": "DiT-S/2"})


@pytest.mark.parametrize(
    "text, message",
    [("{", "not valid JSON"), ("[1, 2]", "must hold a JSON object"), ('{"a": NaN}', "NaN")],
)
def test_unparseable_files(tmp_path, text, message):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(SchemaError, match=message):
        load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SchemaError, match="not UTF-8"):
        load(path)


def test_no_pickle_from_a_user_path():
    """Only weights_only torch.load and safetensors in the package: no pickle, no plain
    torch.load, no numpy pickles."""
    import pathlib
    import re

    import adaptdiff

    root = pathlib.Path(adaptdiff.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.load|allow_pickle=True", text), path
        for call in re.findall(r"(?<![\w.])torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
