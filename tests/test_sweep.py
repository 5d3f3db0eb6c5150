"""Tests of ntkjax.sweep: streamed, resumable JSON lines, the study preset, drift scaling."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import ntkjax.sweep as sweep_module
from ntkjax.study.cli import main as cli_main
from ntkjax.study.sweep_command import PRESETS
from ntkjax.sweep import SweepConfig, load_rows, summarize, sweep

TINY = SweepConfig(num_train=10, num_probe=4, num_test=20, num_steps=20, record_every=10)


def _finite_numbers(row: dict) -> bool:
    for key in ("loss", "test_loss", "kernel_change", "param_change", "step_loss"):
        values = row[key]
        if values is None or any(v is None or not math.isfinite(v) for v in values):
            return False
    return True


def _count_programs(monkeypatch) -> list:
    """Records (width, lr, number of seeds) of every compiled seeds program the sweep runs."""
    calls = []
    original = sweep_module.seeds_program

    def counting(config, width, learning_rate, **options):
        run = original(config, width, learning_rate, **options)

        def wrapped(keys, data):
            calls.append((width, learning_rate, int(keys.shape[0])))
            return run(keys, data)

        return wrapped

    monkeypatch.setattr(sweep_module, "seeds_program", counting)
    return calls


@pytest.mark.slow
def test_rows_stream_and_rerun_resumes(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "sweep.jsonl"
    calls = _count_programs(monkeypatch)
    rows = sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    assert calls == [(16, 0.02, 2), (32, 0.02, 2)]
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert [(r["width"], r["seed"]) for r in rows] == [(16, 0), (16, 1), (32, 0), (32, 1)]
    for row in rows:
        assert row["steps"] == [0, 10, 20]
        assert _finite_numbers(row)
        assert row["kernel_change"][0] == 0.0 and row["param_change"][0] == 0.0
        assert row["stable"] and not row["diverged"] and row["diverged_at"] is None
        assert row["loss"][-1] < row["loss"][0]
    # seeds differ in their initialization
    assert rows[0]["loss"][0] != rows[1]["loss"][0]

    # a second run with the same configuration computes nothing and returns the same rows
    again = sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    assert len(calls) == 2 and again == rows
    assert len(out.read_text().splitlines()) == 4

    # a torn last line (a crash mid-write) and a lost row: only the missing seed is recomputed,
    # alone, and matches the value it had when vmapped with the other seed
    kept = [line for line in lines if json.loads(line)["width"] != 32 or
            json.loads(line)["seed"] != 1]
    out.write_text("\n".join(kept) + "\n" + '{"config_id": "tor')
    resumed = sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    assert calls[2:] == [(32, 0.02, 1)]
    np.testing.assert_allclose(resumed[3]["loss"], rows[3]["loss"], rtol=1e-5)
    assert len(load_rows(out)) == 4
    # the unfinished row is gone: every line of the file is a whole row
    assert [json.loads(line)["seed"] for line in out.read_text().splitlines()] == [0, 1, 0, 1]
    # a different configuration in the same file is computed separately
    other = dataclasses.replace(TINY, num_steps=10)
    sweep(widths=(16,), seeds=1, out_path=out, config=other, show_progress=False)
    assert calls[3:] == [(16, 0.02, 1)]
    assert len(load_rows(out)) == 5


def test_interruption_keeps_finished_rows(tmp_path, monkeypatch):
    out = tmp_path / "sweep.jsonl"
    original = sweep_module.seeds_program

    def failing_second(config, width, learning_rate, **options):
        if width == 32:
            raise KeyboardInterrupt
        return original(config, width, learning_rate, **options)

    monkeypatch.setattr(sweep_module, "seeds_program", failing_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    rows = load_rows(out)
    assert [(r["width"], r["seed"]) for r in rows] == [(16, 0), (16, 1)]
    monkeypatch.setattr(sweep_module, "seeds_program", original)
    calls = _count_programs(monkeypatch)
    sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    assert calls == [(32, 0.02, 2)]


def test_study_preset_standard_divergence_is_caught(tmp_path):
    # The study's set-up at small scale: lr 0.01 on mean((f-y)^2) = 0.02 here. In standard
    # parameterization the NTK grows ~ width, so 2n/lambda_max falls below 0.02 and the run
    # diverges: flagged before training and reported with its step, with finite numbers.
    # In NTK parameterization the same runs converge.
    base = dataclasses.replace(PRESETS["study"]["config"], num_steps=100, record_every=50)
    out = tmp_path / "study.jsonl"
    standard = sweep(widths=(1000,), seeds=2, out_path=out, show_progress=False,
                     config=dataclasses.replace(base, parameterization="standard"))
    ntk = sweep(widths=(1000,), seeds=2, out_path=out, config=base, show_progress=False)
    for row in standard:
        assert not row["stable"] and row["max_learning_rate"] < 0.02
        assert row["diverged"] and 0 < row["diverged_at"] < 100
        assert _finite_numbers(row)
        assert row["valid"][-1] is False
    for row in ntk:
        assert row["stable"] and row["max_learning_rate"] > 0.02
        assert not row["diverged"]
        assert row["loss"][-1] < row["loss"][0]
    table = summarize(standard + ntk)
    assert "2/2@" in table  # both standard seeds diverged, with the step


def test_cli_writes_summary_and_figures(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["sweep", "--widths", "16", "64", "--seeds", "2", "--steps", "20",
            "--record-every", "10", "--num-train", "10", "--num-probe", "4", "--out", str(out),
            "--plot", "--no-progress"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "NTK change ~ width^" in text and "width" in text
    assert len(load_rows(out)) == 4
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["cli_drift_vs_width_ntk_lr0.02.png", "cli_loss_curves_ntk_lr0.02.png"]
    assert cli_main(["sweep", "--widths", "16", "--steps", "15", "--record-every", "10",
                     "--out", str(out), "--no-progress"]) == 2


def test_compiler_options_change_nothing_but_compilation(tmp_path):
    from ntkjax.compile_options import FAST_COMPILE

    plain = sweep(widths=(16,), seeds=1, out_path=tmp_path / "a.jsonl", config=TINY,
                  show_progress=False)
    fast = sweep(widths=(16,), seeds=1, out_path=tmp_path / "b.jsonl", config=TINY,
                 show_progress=False, compiler_options=FAST_COMPILE)
    for key in ("loss", "test_loss", "kernel_change", "param_change"):
        np.testing.assert_allclose(fast[0][key], plain[0][key], rtol=1e-5, atol=1e-7)


def test_bad_arguments_raise(tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="widths"):
        sweep(widths=(), seeds=1, out_path=out, config=TINY)
    with pytest.raises(ValueError, match="dataset"):
        sweep(widths=(8,), seeds=1, out_path=out, config=dataclasses.replace(TINY, dataset="x"))
    with pytest.raises(ValueError, match="learning_rates"):
        sweep(widths=(8,), seeds=1, out_path=out, config=TINY, learning_rates=(-1.0,))
    with pytest.raises(ValueError, match="input_dim"):
        sweep(widths=(8,), seeds=1, out_path=out, config=dataclasses.replace(TINY, input_dim=3))


@pytest.mark.slow
def test_kernel_change_falls_like_inverse_sqrt_width(tmp_path):
    # theory check (2): lazy training (Jacot et al. 2018; Lee et al. 2019, Thm 2.1: the NTK
    # moves by O(width^-1/2)): after a fixed number of steps at a learning rate well below the
    # stability edge (0.5 vs 2n/lambda_max ~ 2.5 here), the relative NTK change of a ReLU MLP
    # in the NTK parameterization falls with a log-log slope between -0.7 and -0.3.
    config = SweepConfig(dataset="gaussian", num_train=64, input_dim=4, num_test=8, num_probe=8,
                         depth=1, num_steps=20, record_every=20)
    rows = sweep(widths=(64, 256, 1024, 4096), seeds=3, learning_rates=(0.5,),
                 out_path=tmp_path / "scaling.jsonl", config=config, show_progress=False)
    assert not any(r["diverged"] for r in rows)
    assert all(r["stable"] and r["max_learning_rate"] > 1.0 for r in rows)
    fit = sweep_module.drift_fit(rows)["ntk lr 0.5"]["fit"]
    assert -0.7 <= fit.slope <= -0.3, fit


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]\n", "not a row object"),
        ('{"config_id": "x"}\n', "not a row object"),
        ("hello world\nsecond line\n", "not JSON"),
        ("\x89PNG\r\n\x1a\n", "not"),
    ],
)
def test_an_existing_out_that_is_not_a_sweep_file_is_refused_untouched(tmp_path, content,
                                                                        message, capsys):
    out = tmp_path / "results.json"
    out.write_bytes(content.encode("latin-1"))
    before = out.read_bytes()
    with pytest.raises(ValueError, match=message):
        sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)
    assert out.read_bytes() == before
    argv = ["sweep", "--widths", "8", "--seeds", "1", "--steps", "10", "--record-every", "10",
            "--out", str(out), "--plot", "--no-progress"]
    assert cli_main(argv) == 2
    assert "not a sweep file" in capsys.readouterr().err or message in capsys.readouterr().err
    assert out.read_bytes() == before and not list(tmp_path.glob("*.png"))


def test_bad_output_paths_and_rates_are_refused_before_training(tmp_path, monkeypatch, capsys):
    calls = _count_programs(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((tmp_path, "folder"), (a_file / "rows.jsonl", "a file")):
        with pytest.raises(ValueError, match=message):
            sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)
    for lr in ("nan", "inf", "-1"):
        assert cli_main(["sweep", "--widths", "8", "--lr", lr, "--out",
                         str(tmp_path / "r.jsonl"), "--no-progress"]) == 2
        assert "finite and positive" in capsys.readouterr().err
    assert calls == []  # nothing trained
    # a torn last line (a killed run) is accepted and skipped
    good = tmp_path / "good.jsonl"
    rows = sweep(widths=[8], seeds=1, out_path=good, config=TINY, show_progress=False)
    with good.open("a") as f:
        f.write('{"config_id": "abc", "wid')
    sweep_module.check_sweep_file(good)
    assert load_rows(good) == rows
