"""The shared output of the benchmarks: the table printer and the JSON-lines writer."""

from __future__ import annotations

import json

from adaptdiff.bench.output import Column, Table, append_jsonl

TABLE = Table(
    Column("name", 6, "name", left=True),
    Column("ms", 6, "ms", ".1f"),
    Column("vs", 5, "ratio", ".2f", suffix="x"),
)


def test_a_line_keeps_the_columns_widths_so_rows_print_as_they_come():
    assert TABLE.header() == "name       ms    vs"
    assert TABLE.line({"name": "a", "ms": 12.345, "ratio": 1.5}) == "a        12.3 1.50x"
    assert len(TABLE.line({"name": "abc", "ms": 1.0, "ratio": 2.0})) == len(TABLE.header())


def test_render_fits_the_widest_cell_rules_the_titles_and_separates_groups():
    rows = [
        {"name": "a-long-name", "ms": 1.0, "ratio": 1.0, "group": 1},
        {"name": "b", "ms": 1000.0, "ratio": 2.0, "group": 1},
        {"name": "c", "ms": 3.0, "ratio": 0.5, "group": 2},
    ]
    lines = TABLE.render(rows, group=lambda r: r["group"]).splitlines()
    assert lines[0] == "name            ms vs"
    assert lines[1] == "----------- ------ --"
    assert lines[2] == "a-long-name    1.0 1.00x"  # the last column is left unpadded
    assert lines[3] == "b           1000.0 2.00x"
    assert lines[4] == "" and lines[5] == "c              3.0 0.50x"


def test_jsonl_lines_start_with_the_environment_then_the_benchmark_then_the_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    env = {"device": "cpu", "torch": "2"}
    assert append_jsonl(path, [{"a": 1}, {"a": 2}], env, "sampling") == 2
    assert append_jsonl(path, iter([{"b": 3}])) == 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [list(r) for r in rows] == [["device", "torch", "benchmark", "a"]] * 2 + [["b"]]
    assert rows[1] == {"device": "cpu", "torch": "2", "benchmark": "sampling", "a": 2}
