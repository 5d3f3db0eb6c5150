"""The progress bar: its estimate of the time left, and what it draws."""

from __future__ import annotations

import io

import pytest

from ntkjax import _progress
from ntkjax._progress import format_eta, progress, remaining_seconds


def test_remaining_seconds_is_the_rate_after_the_first_item_times_the_items_left():
    assert remaining_seconds(5.0, 0, 10) is None  # nothing done: no estimate
    assert remaining_seconds(2.0, 1, 5) == pytest.approx(8.0)  # 2 s per item, 4 left
    # the first item took 10 s (compilation), the next three 1 s each: 6 left at 1 s
    assert remaining_seconds(13.0, 4, 10, first_item=10.0) == pytest.approx(6.0)
    assert remaining_seconds(13.0, 10, 10, first_item=10.0) == 0.0


def test_format_eta_never_reads_nan():
    assert format_eta(None).split() == ["eta", "?"]
    assert format_eta(float("nan")).split() == ["eta", "?"]
    assert format_eta(12.34) == "eta  12.3s"
    assert format_eta(245.0) == "eta  4m05s"


def test_progress_draws_an_eta_from_the_items_it_timed(monkeypatch):
    # readings: start, first draw, then (item done, its draw) per item, the last one's draw
    # being the final one: the first item takes 10 s (compilation), the next ones 1 s each
    readings = [0.0, 0.0, 10.0, 10.0, 11.0, 11.0, 12.0, 12.0]

    def clock() -> float:
        return readings.pop(0) if len(readings) > 1 else readings[0]

    monkeypatch.setattr(_progress.time, "perf_counter", clock)
    stream = io.StringIO()
    assert list(progress(range(3), description="blocks", stream=stream)) == [0, 1, 2]
    draws = [d for d in stream.getvalue().split("\r") if d]
    assert "nan" not in stream.getvalue()
    assert draws[0].startswith("blocks [") and draws[0].rstrip().endswith("0/3    0.0s eta      ?")
    # after item 1 (10 s): 10 s per item, 2 left; after item 2: the second item's rate, 1 s
    assert draws[1].rstrip().endswith("1/3   10.0s eta  20.0s")
    assert draws[2].rstrip().endswith("2/3   11.0s eta   1.0s")
    assert draws[-1].endswith("3/3   12.0s eta   0.0s\n")


def test_disabled_progress_draws_nothing():
    stream = io.StringIO()
    assert list(progress([1, 2], enabled=False, stream=stream)) == [1, 2]
    assert stream.getvalue() == ""
