"""Tests of ntkjax.sweep: streamed, resumable JSON lines, the study preset, drift scaling."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import ntkjax.sweep as sweep_module
from ntkjax.compile_options import FAST_COMPILE
from ntkjax.study.cli import main as cli_main
from ntkjax.study.sweep_command import PRESETS
from ntkjax.sweep import SweepConfig, load_rows, summarize, sweep
from tests.helpers import free_port, xla_flags

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
    header, *lines = out.read_text().splitlines()
    assert json.loads(header) == sweep_module.SWEEP_HEADER
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
    assert len(out.read_text().splitlines()) == 5

    # a torn last line (a crash mid-write) and a lost row: only the missing seed is recomputed,
    # alone, and matches the value it had when vmapped with the other seed
    kept = [line for line in lines if json.loads(line)["width"] != 32 or
            json.loads(line)["seed"] != 1]
    out.write_text("\n".join([header, *kept]) + "\n" + '{"config_id": "tor')
    resumed = sweep(widths=(16, 32), seeds=2, out_path=out, config=TINY, show_progress=False)
    assert calls[2:] == [(32, 0.02, 1)]
    np.testing.assert_allclose(resumed[3]["loss"], rows[3]["loss"], rtol=1e-5)
    assert len(load_rows(out)) == 4
    # the unfinished row is gone: every line of the file is a whole row
    assert [json.loads(line)["seed"] for line in out.read_text().splitlines()[1:]] == [
        0, 1, 0, 1]
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
        ("[1, 2]\n", "sweep header"),
        ("HEADER[1, 2]\n", "not a row object"),
        ('HEADER{"config_id": "x"}\n', "not a row object"),
        ('HEADER{"config_id": "x"}', "not a row object"),  # a complete last line, no newline
        ("HEADER[1, 2]", "not a row"),
        ("HEADERhello world\nsecond line\n", "not JSON"),
        ("\x89PNG\r\n\x1a\n", "not"),
    ],
)
def test_an_existing_out_that_is_not_a_sweep_file_is_refused_untouched(tmp_path, content,
                                                                        message, capsys):
    out = tmp_path / "results.json"
    content = content.replace("HEADER", json.dumps(sweep_module.SWEEP_HEADER) + "\n")
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


def test_a_json_dump_without_newline_is_refused_not_truncated(tmp_path, capsys):
    """``--out cfg.json`` holding one ``json.dump`` line (starts with ``{``, no newline) looks
    like a torn row; without the sweep header it is refused, byte for byte untouched."""
    out = tmp_path / "cfg.json"
    with out.open("w") as f:
        json.dump({"learning_rate": 0.1, "widths": [8, 16]}, f)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="does not start with the sweep header"):
        sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)
    assert cli_main(["sweep", "--widths", "8", "--seeds", "1", "--steps", "10",
                     "--record-every", "10", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a sweep file" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    # nor is a file of complete rows without the header (an older sweep file), nor a header
    # of another format
    for text in ['{"config_id": "a", "width": 8}\n', '{"format": "other"}\n']:
        out.write_text(text)
        with pytest.raises(ValueError, match="sweep header"):
            sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)
        assert out.read_text() == text


def test_a_complete_last_row_without_newline_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "rows.jsonl"
    rows = sweep(widths=[8, 16], seeds=1, out_path=out, config=TINY, show_progress=False)
    header, *lines = out.read_text().splitlines()
    out.write_text("\n".join([header, *lines]))  # rewritten by a script: no final newline
    calls = _count_programs(monkeypatch)
    # a request that does not include the last row (width 16) must not lose it
    again = sweep(widths=[8, 32], seeds=1, out_path=out, config=TINY, show_progress=False)
    assert calls == [(32, 0.02, 1)] and again[0] == rows[0]
    kept = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert [(r["width"], r["seed"]) for r in kept] == [(8, 0), (16, 0), (32, 0)]
    assert kept[1] == rows[1] and out.read_text().endswith("\n")
    # a file holding only the start of the header (killed while writing it) counts as empty
    start = tmp_path / "start.jsonl"
    start.write_text(json.dumps(sweep_module.SWEEP_HEADER)[:9])
    sweep(widths=[8], seeds=1, out_path=start, config=TINY, show_progress=False)
    assert [json.loads(line)["width"] for line in start.read_text().splitlines()[1:]] == [8]


def test_an_unwritable_output_is_tried_not_assumed(tmp_path, monkeypatch, capsys):
    """Root passes ``os.access`` on read-only and virtual file systems: the write itself is
    tried and its OSError becomes the one-line error (here with os.access saying yes)."""
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    calls = _count_programs(monkeypatch)
    targets = [Path("/proc/ntkjax-sweep-test.jsonl"), Path("/proc/ntkjax-dir/sweep.jsonl")]
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc (a virtual file system)")
    if Path("/proc/version").exists():
        targets.append(Path("/proc/version"))  # exists; open for append fails or is not a sweep
    for out in targets:
        with pytest.raises(ValueError, match=str(out)):
            sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)
        assert cli_main(["sweep", "--widths", "8", "--seeds", "1", "--steps", "10",
                         "--record-every", "10", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(out) in err
    assert calls == []
    # a write that fails later (disk full, file system gone read-only) names the file too
    out = tmp_path / "late.jsonl"

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(ValueError, match=r"cannot write the sweep output .*late.jsonl.*Read-only"):
        sweep(widths=[8], seeds=1, out_path=out, config=TINY, show_progress=False)


def test_checking_a_new_output_never_creates_it(tmp_path):
    """Processes of one sweep check the same output at once (``jax.distributed``: each then
    writes its own shard file). Checking a path that does not exist must not create it, even
    for a moment: a concurrent checker would find it and fail to read it once it is removed
    (CI saw ``FileNotFoundError``), or fail to create it exclusively."""
    out = tmp_path / "new" / "rows.jsonl"
    errors: list[BaseException] = []
    seen: list[bool] = []
    stop = threading.Event()

    def check() -> None:
        try:
            for _ in range(300):
                sweep_module.check_sweep_file(out)
        except BaseException as err:  # reported below
            errors.append(err)

    def watch() -> None:
        while not stop.is_set():
            seen.append(out.exists())

    watcher = threading.Thread(target=watch)
    watcher.start()
    checkers = [threading.Thread(target=check) for _ in range(3)]
    for thread in checkers:
        thread.start()
    for thread in checkers:
        thread.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert seen and not any(seen) and not out.exists()
    assert list(out.parent.iterdir()) == []  # its folder is created, and left empty
    # a name too long for the folder's file system is refused by the check, before training
    long = tmp_path / ("x" * 300 + ".jsonl")
    with pytest.raises(ValueError, match="cannot write the sweep output"):
        sweep_module.check_sweep_file(long)
    # (Python 3.12's Path.exists says False for it, rather than raising: the probe refuses it)
    with pytest.raises(ValueError, match=r"cannot write the sweep output .* longer than \d+ bytes"):
        sweep_module._try_new_file_in(long)


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


# --------------------------------------------------------------------------- devices, shards

# The CLI's study preset at tiny size (so that `ntkjax sweep` options can name it exactly);
# compiled with FAST_COMPILE, which leaves the numbers unchanged (see the test above) and halves
# the compile time that dominates these runs.
SHARDED = dataclasses.replace(PRESETS["study"]["config"], num_train=10, num_probe=4,
                              num_steps=20, record_every=10)
SHARDED_ARGS = ["--widths", "8", "16", "--seeds", "3", "--steps", "20", "--record-every", "10",
                "--num-train", "10", "--num-probe", "4", "--no-progress"]
NUMBERS = ("loss", "test_loss", "kernel_change", "param_change", "step_loss",
           "max_learning_rate", "lambda_max")


@pytest.fixture(scope="module")
def one_device_rows(tmp_path_factory) -> dict:
    """The uninterrupted one-process, unsharded sweep: widths 8 and 16, seeds 0..2, by key."""
    out = tmp_path_factory.mktemp("reference") / "sweep.jsonl"
    rows = sweep(widths=(8, 16), seeds=3, out_path=out, config=SHARDED, show_progress=False,
                 devices=jax.local_devices()[:1], compiler_options=FAST_COMPILE)
    assert len(rows) == 6 and all(r["shard"] is None and r["devices"] == 1 for r in rows)
    return {(r["width"], r["seed"]): r for r in rows}


def _assert_same_rows(rows: list[dict], reference: dict) -> None:
    """Each (width, seed) exactly once, with the reference's numbers up to float rounding."""
    keys = [(r["width"], r["seed"]) for r in rows]
    assert sorted(keys) == sorted(reference), keys
    for row in rows:
        ref = reference[(row["width"], row["seed"])]
        assert row["config_id"] == ref["config_id"] and row["steps"] == ref["steps"]
        assert (row["stable"], row["diverged"]) == (ref["stable"], ref["diverged"])
        for key in NUMBERS:
            np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _child(code: str, *, devices: int = 1, **popen) -> subprocess.Popen:
    """A fresh Python running ``code`` with ``devices`` forced CPU devices (XLA_FLAGS must be set
    before jax is imported, hence a new process)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(devices)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child timed out after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return out


_CHILD_SWEEP = """
    import dataclasses, json
    import jax
    {setup}
    from ntkjax.compile_options import FAST_COMPILE
    from ntkjax.sweep import SweepConfig, sweep
    config = SweepConfig(**json.loads({config!r}))
    rows = sweep(widths=(8, 16), seeds=3, out_path={out!r}, config=config,
                 compiler_options=FAST_COMPILE, show_progress=False)
    print(json.dumps({{"devices": jax.local_device_count(), "rows": len(rows)}}))
"""


def _config_json() -> str:
    return json.dumps(dataclasses.asdict(SHARDED))


@pytest.mark.slow
def test_seeds_split_over_four_devices_equal_one_device(tmp_path, one_device_rows):
    out = tmp_path / "four.jsonl"
    setup = """
    from ntkjax.sweep import shard_seeds
    assert jax.local_device_count() == 4, jax.devices()
    import jax.numpy as jnp
    run = shard_seeds(jax.vmap(lambda k, x: jax.random.normal(k) * x, in_axes=(0, None)))
    spread = run(jnp.stack([jax.random.PRNGKey(s) for s in range(4)]), 1.0).sharding.device_set
    assert len(spread) == 4, spread
    """
    child = _child(_CHILD_SWEEP.format(setup=setup, config=_config_json(), out=str(out)),
                   devices=4)
    report = json.loads(_finish(child).splitlines()[-1])
    assert report == {"devices": 4, "rows": 6}
    rows = load_rows(out)
    assert all(r["devices"] == 4 for r in rows)  # 3 seeds padded to 4, one per device
    _assert_same_rows(rows, one_device_rows)


@pytest.mark.slow
def test_two_jax_distributed_processes_split_a_sweep(tmp_path, one_device_rows):
    out = tmp_path / "multi.jsonl"
    port = free_port()
    children = []
    for i in range(2):
        setup = f"""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id={i}, initialization_timeout=60)
    assert jax.process_count() == 2
    """
        children.append(_child(_CHILD_SWEEP.format(setup=setup, config=_config_json(),
                                                   out=str(out))))
    try:
        reports = [json.loads(_finish(child).splitlines()[-1]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    # by default, process K of 2 runs shard K of 2: one width each, three seeds
    assert reports == [{"devices": 1, "rows": 3}] * 2
    files = sweep_module.shard_files(out)
    assert [shard for shard, _ in files] == [(0, 2), (1, 2)] and not out.exists()
    for (index, count), path in files:
        rows = sweep_module.load_rows(path, merge_shards=False)
        assert {r["width"] for r in rows} == {(8, 16)[index]}
        assert all(r["shard"] == [index, count] for r in rows)
    _assert_same_rows(load_rows(out), one_device_rows)


@pytest.mark.slow
def test_a_killed_shard_restarts_with_every_row_exactly_once(tmp_path, one_device_rows,
                                                             monkeypatch, capsys):
    out = tmp_path / "killed.jsonl"
    first = sweep_module.shard_path(out, (0, 2))
    # the child stalls after its first row, so that SIGKILL lands mid-sweep, deterministically
    setup = """
    import time
    import ntkjax.sweep as module
    append = module._append_row
    def append_then_stall(path, row):
        append(path, row)
        time.sleep(600)
    module._append_row = append_then_stall
    """
    code = _CHILD_SWEEP.format(setup=setup, config=_config_json(), out=str(out))
    child = _child(code.replace("show_progress=False)", "show_progress=False, shard=(0, 2))"))
    try:
        deadline = time.monotonic() + 300
        while not (first.exists() and first.read_text().endswith("\n")):
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no row within 300 s"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert len(first.read_text().splitlines()) == 2  # the header, then width 8, seed 0 only
    # the other shard runs meanwhile; the killed one restarts and computes only what is missing
    calls = _count_programs(monkeypatch)
    sweep(widths=(8, 16), seeds=3, out_path=out, config=SHARDED, show_progress=False,
          shard=(1, 2), compiler_options=FAST_COMPILE)
    restarted = sweep(widths=(8, 16), seeds=3, out_path=out, config=SHARDED,
                      show_progress=False, shard="0/2", compiler_options=FAST_COMPILE)
    assert calls == [(16, 0.02, 3), (8, 0.02, 2)]
    assert [(r["width"], r["seed"]) for r in restarted] == [(8, 0), (8, 1), (8, 2)]
    raw = [json.loads(line) for path in (first, sweep_module.shard_path(out, (1, 2)))
           for line in path.read_text().splitlines()[1:]]
    _assert_same_rows(raw, one_device_rows)  # every row exactly once across the files
    # the command without --shard reads all shards: nothing to train, the whole summary
    assert SweepConfig(**raw[0]["config"]) == SHARDED
    assert cli_main(["sweep", *SHARDED_ARGS, "--out", str(out)]) == 0
    assert len(calls) == 2 and not out.exists()
    text = capsys.readouterr().out
    assert "NTK change ~ width^" in text and "present" not in text


def test_sharded_rows_merge_once_in_a_fixed_order(tmp_path):
    rows = [{"config_id": "c", "width": w, "seed": s, "learning_rate": 0.02, "config": {},
             "loss": [1.0], "diverged": False, "source": "?"} for w in (8, 16) for s in (0, 1)]
    out = tmp_path / "m.jsonl"

    def write(path, picked, source):
        path.write_text(json.dumps(sweep_module.SWEEP_HEADER) + "\n" + "".join(
            json.dumps({**r, "source": source}) + "\n" for r in picked))

    write(out, rows[:1], "plain")
    write(sweep_module.shard_path(out, (1, 2)), rows[2:], "1/2")
    write(sweep_module.shard_path(out, (0, 2)), rows[:2], "0/2")  # (8, 0) also in the plain file
    with sweep_module.shard_path(out, (1, 2)).open("a") as f:
        f.write('{"config_id": "c", "wid')  # torn by a kill
    merged = load_rows(out)
    assert [(r["width"], r["seed"], r["source"]) for r in merged] == [
        (8, 0, "plain"), (8, 1, "0/2"), (16, 0, "1/2"), (16, 1, "1/2")]
    assert len(load_rows(out, merge_shards=False)) == 1
    assert sweep_module.shard_path(out, (0, 1)) == out
    assert sweep_module.shard_path(tmp_path / "s", (3, 4)).name == "s.shard-3-of-4"


@pytest.mark.parametrize("text", ["4/4", "-1/4", "3", "a/b", "1/0", "1/2/3", "", "0 of 4"])
def test_a_malformed_shard_is_refused(text, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"K/N|0 <= K < N|N must be >= 1"):
        sweep_module.parse_shard(text)
    out = tmp_path / "s.jsonl"
    assert cli_main(["sweep", *SHARDED_ARGS, f"--shard={text}", "--out", str(out)]) == 2
    assert "shard" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_shards_of_another_count_are_refused_naming_both(tmp_path, monkeypatch, capsys):
    calls = _count_programs(monkeypatch)
    for shard in ((2, 2), (-1, 2), (True, 2), (0.0, 2), (1,), "1/-2"):
        with pytest.raises(ValueError, match="shard"):
            sweep(widths=(8,), seeds=1, out_path=tmp_path / "x.jsonl", config=TINY,
                  shard=shard)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one device"):
        sweep(widths=(8,), seeds=1, out_path=tmp_path / "x.jsonl", config=TINY, devices=[])
    assert not list(tmp_path.iterdir())  # refused before anything is written
    out = tmp_path / "runs.jsonl"
    old = sweep_module.shard_path(out, (3, 4))
    old.write_text("")
    with pytest.raises(ValueError, match=r"N = 4.*N = 2"):
        sweep(widths=(8,), seeds=1, out_path=out, config=TINY, shard=(1, 2))
    assert cli_main(["sweep", *SHARDED_ARGS, "--shard", "0/2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "N = 4" in err and "N = 2" in err and old.name in err
    # a shard file holding rows recorded for another shard is not appended to
    mine = sweep_module.shard_path(out, (0, 4))
    row = {"config_id": "c", "width": 8, "seed": 0, "learning_rate": 0.02, "config": {},
           "loss": [1.0], "diverged": False, "shard": [1, 4]}
    mine.write_text(json.dumps(sweep_module.SWEEP_HEADER) + "\n" + json.dumps(row) + "\n")
    before = mine.read_text()
    with pytest.raises(ValueError, match="shard 1/4"):
        sweep(widths=(8,), seeds=1, out_path=out, config=TINY, shard=(0, 4))
    assert mine.read_text() == before and calls == []
