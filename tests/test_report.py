"""The incremental Markdown + JSON report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ntkjax.study.report import Report, flatten_numbers, format_number, to_jsonable


def test_to_jsonable_converts_numpy_and_non_finite_values():
    value = {
        "a": np.float32(1.5),
        "b": np.arange(3),
        "c": [np.nan, np.inf, -np.inf],
        "d": np.bool_(True),
        "e": {"f": (1, 2.0)},
    }
    out = to_jsonable(value)
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": ["nan", "inf", "-inf"], "d": True,
                   "e": {"f": [1, 2.0]}}
    json.dumps(out, allow_nan=False)  # strict JSON
    with pytest.raises(TypeError, match="JSON"):
        to_jsonable(object())


def test_format_and_flatten():
    assert format_number(0.123456) == "0.1235"
    assert format_number(1.5e-5) == "1.500e-05"
    assert format_number(True) == "yes"
    assert format_number([1, 0.5]) == "[1, 0.5]"
    assert flatten_numbers({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == [
        ("a", 1), ("b.c", 2), ("b.d.e", 3)]


def test_report_is_rewritten_after_every_section(tmp_path):
    report = Report(tmp_path / "out", title="Demo", intro="Intro text.", meta={"quick": True})
    figure = tmp_path / "out" / "fig1.png"
    report.add_section("one", title="First", text="Slope was fine.",
                       numbers={"slope": -0.49, "nested": {"n": 3}}, figures=[figure],
                       data={"curve": np.linspace(0, 1, 4)}, seconds=1.234)
    first = json.loads(report.json_path.read_text())
    assert list(first["sections"]) == ["one"]
    assert first["sections"]["one"]["numbers"] == {"slope": -0.49, "nested": {"n": 3}}
    assert first["sections"]["one"]["figures"] == ["fig1.png"]
    assert first["sections"]["one"]["data"]["curve"] == [0.0, 1 / 3, 2 / 3, 1.0]
    markdown = report.markdown_path.read_text()
    assert "## First" in markdown and "![fig1](fig1.png)" in markdown
    assert "| `nested.n` | 3 |" in markdown and "| `slope` | -0.49 |" in markdown
    assert "curve" not in markdown  # long series stay in the JSON

    report.add_section("two", title="Second", text="More.", numbers={"x": float("nan")})
    second = json.loads(report.json_path.read_text())
    assert list(second["sections"]) == ["one", "two"]
    assert second["sections"]["two"]["numbers"]["x"] == "nan"
    assert second["meta"] == {"quick": True}
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_numbers_from_a_thousand_on_keep_every_integer_digit():
    # a log evidence of 12950.3 -> 12980.1 once printed as 1.295e+04 -> 1.298e+04
    assert format_number(12950.3) == "12950.3"
    assert format_number(12980.14) == "12980.1"
    assert format_number(-2_500_000.0) == "-2500000.0"
    assert format_number(999.94) == "999.9"
    assert format_number(3.2e9) == "3.200000e+09"
    assert format_number(12950) == "12950"  # integers stay integers
