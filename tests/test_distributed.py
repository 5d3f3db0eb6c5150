"""Kernels across devices and processes, out-of-core resumable stores, and their bad inputs.

Truths from outside the code under test: the one-call kernels ``kernel_fn(module)(x1, x2)`` and
``empirical_ntk_fn`` of this (one-device) process in float64; an uninterrupted run against a
killed and restarted one; block counts from a callback inside the block function. Many-device
and multi-process runs are subprocesses (tests/distributed_worker.py) with forced CPU devices.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import zarr

import ntkjax
from tests.distributed_worker import CG_RIDGE, cg_targets, problem, slow_block_fn
from tests.helpers import free_port, xla_flags

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ROOT = WORKER.parent.parent


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], devices: int, timeout: float = 60) -> None:
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _finished(store: Path) -> np.ndarray | None:
    try:
        return np.asarray(zarr.open_array(store, path="finished_blocks", mode="r")[...])
    except Exception:  # not created yet
        return None


@pytest.fixture
def reference(x64):
    """One-call float64 kernels of the worker's problem, in this one-device process."""
    x, y, images, mlp, cnn, params = problem()
    mlp_fn = jax.jit(ntkjax.kernel_fn(mlp))  # one call each, no blocks
    k = mlp_fn(x)
    return {
        "sym_ntk": np.asarray(k.ntk),
        "sym_nngp": np.asarray(k.nngp),
        "cross_ntk": np.asarray(mlp_fn(x, y).ntk),
        "conv_ntk": np.asarray(jax.jit(ntkjax.kernel_fn(cnn))(images).ntk),
        "emp": np.asarray(ntkjax.empirical_ntk_fn(mlp.apply)(params, x, y)),
    }


def _assert_solves(got, reference) -> None:
    """CG on many devices or processes against a direct solve of ``(K + ridge I) a = t``."""
    x = problem()[0]
    alpha = np.linalg.solve(reference["sym_ntk"] + CG_RIDGE * np.eye(len(x)), cg_targets(x))
    assert bool(got["cg_converged"])
    for name in ("cg_alpha", "cg_stored_alpha"):
        np.testing.assert_allclose(got[name], alpha, rtol=1e-8, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(got["cg_pred"], reference["cross_ntk"].T @ alpha, rtol=1e-8,
                               atol=1e-10)


@pytest.mark.slow
def test_four_devices_give_the_one_device_kernels(tmp_path, reference):
    assert len(jax.devices()) == 1
    result = tmp_path / "four.npz"
    _run(["many_devices", str(tmp_path / "store"), str(result)], devices=4)
    got = np.load(result)
    for name in ("sym_ntk", "sym_nngp", "cross_ntk", "conv_ntk", "emp"):
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-12, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_array_equal(got["sym_ntk"], got["sym_ntk"].T)  # mirrored blocks
    _assert_solves(got, reference)


@pytest.mark.slow
def test_two_processes_fill_one_store(tmp_path, reference):
    store = tmp_path / "K.zarr"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multi_process", str(i), str(port), str(store),
             str(tmp_path / f"p{i}.npz")],
            env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stored = zarr.open_array(store, path="ntk", mode="r")[...]
    np.testing.assert_allclose(stored, reference["sym_ntk"], rtol=1e-12, atol=1e-12)
    for i in range(2):  # without out=, every process receives the full result
        got = np.load(tmp_path / f"p{i}.npz")
        np.testing.assert_array_equal(got["stored_ntk"], stored)
        np.testing.assert_allclose(got["cross_ntk"], reference["cross_ntk"], rtol=1e-12,
                                   atol=1e-12)
        assert "same list in every process" in str(got["refused"])
        _assert_solves(got, reference)  # each process holds the whole solution

    # The store records 2 writers: finished, one process may read it; unfinished, not resume.
    x, _, _, mlp, _, _ = problem()
    np.testing.assert_array_equal(ntkjax.kernel_matrix(mlp, x, block_size=8, out=store).ntk[:],
                                  stored)
    record = zarr.open_array(store, path="finished_blocks", mode="r+")
    record[0, 1] = 0
    with pytest.raises(ValueError, match=r"2 process\(es\).*this run has 1"):
        ntkjax.kernel_matrix(mlp, x, block_size=8, out=store)


@pytest.mark.slow
def test_killed_store_resumes_with_only_the_missing_blocks(tmp_path, x64):
    store, first, second = tmp_path / "K.zarr", tmp_path / "first.txt", tmp_path / "second.txt"
    total = 8 * 9 // 2  # 40 rows in blocks of 5, upper triangle
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "slow_store", str(store), "0.25", str(first)],
        env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            done = _finished(store)
            if done is not None and done.sum() >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    recorded = int(_finished(store).sum())  # type: ignore[union-attr]
    assert 1 <= recorded < total, "the run was not killed midway"

    _run(["slow_store", str(store), "0", str(second)], devices=1)
    assert len(second.read_text().splitlines()) == total - recorded
    assert _finished(store)[np.triu_indices(8)].all()  # type: ignore[index]

    x = problem()[0]
    uninterrupted = ntkjax.evaluate_in_blocks(slow_block_fn(0.0, str(tmp_path / "c.txt")), x,
                                              block_size=5)
    np.testing.assert_array_equal(zarr.open_array(store, path="kernel", mode="r")[...],
                                  uninterrupted)


def test_unreachable_coordinator_is_a_clear_error_in_seconds():
    port = free_port()  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        ntkjax.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=1,
                                      timeout_s=1.0)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="host:port"):
        ntkjax.initialize_distributed("localhost", num_processes=2, process_id=1)
    with pytest.raises(ValueError, match="process_id"):
        ntkjax.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout_s": float("nan")}, ValueError, r"timeout_s .*nan"),  # hung forever before
        ({"timeout_s": float("inf")}, ValueError, r"timeout_s .*inf"),  # was an OverflowError
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"timeout_s": -1.0}, ValueError, "timeout_s"),
        ({"timeout_s": "10"}, TypeError, "timeout_s"),
        ({"address": "127.0.0.1:99999"}, ValueError, r"port must be in 1 \.\. 65535; got 99999"),
        ({"address": "127.0.0.1:0"}, ValueError, "port must be in 1"),
        ({"num_processes": 0, "process_id": 0}, ValueError, "num_processes"),
        ({"num_processes": 2.0}, ValueError, "num_processes"),
        ({"process_id": -1}, ValueError, "process_id"),
        ({"process_id": True}, ValueError, "process_id"),
    ],
)
def test_start_up_arguments_are_checked_before_anything_starts(kwargs, error, message):
    args = {"address": "127.0.0.1:1", "num_processes": 2, "process_id": 1, "timeout_s": 1.0}
    args.update(kwargs)
    start = time.monotonic()
    with pytest.raises(error, match=message):
        ntkjax.initialize_distributed(args.pop("address"), args.pop("num_processes"),
                                      args.pop("process_id"), **args)
    assert time.monotonic() - start < 0.5  # refused at once, before any connection attempt


@pytest.mark.slow
def test_processes_given_different_counts_are_refused_in_every_process():
    """JAX takes the coordinator's num_processes and ignores the others': given 2 and 3, both
    processes ran with 2. The counts are exchanged at start-up and both refuse."""
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "count_mismatch", str(i), str(port),
                          str(count)], env=_env(1), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i, count in enumerate((2, 3))
    ]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "refused: num_processes differs" in out, out + err[-3000:]
        assert "process 0: 2, process 1: 3" in out


def test_store_for_other_inputs_or_model_is_refused(tmp_path):
    from ntkjax import models

    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 3)).astype(np.float32)
    mlp = models.MLP((8, 1), "relu", w_std=1.4, b_std=0.1)
    store = tmp_path / "K.zarr"
    k = ntkjax.kernel_matrix(mlp, x, block_size=4, out=store)
    np.testing.assert_allclose(k.ntk[2:7], np.asarray(ntkjax.kernel_fn(mlp)(x).ntk)[2:7],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="inputs x1"):
        ntkjax.kernel_matrix(mlp, x + 1, block_size=4, out=store)
    with pytest.raises(ValueError, match=r"inputs x1.*shape \(12, 3\)"):
        ntkjax.kernel_matrix(mlp, x[:10], out=store)
    with pytest.raises(ValueError, match="inputs x2"):
        ntkjax.kernel_matrix(mlp, x, x, out=store)
    other = models.MLP((8, 1), "relu", w_std=1.5, b_std=0.1)
    with pytest.raises(ValueError, match=r"(?s)model.*w_std = 1.5"):
        ntkjax.kernel_matrix(other, x, out=store)
    with pytest.raises(ValueError, match="block size"):
        ntkjax.kernel_matrix(mlp, x, block_size=8, out=store)

    params = mlp.init(jax.random.PRNGKey(0), x[:1])
    emp = tmp_path / "E.zarr"
    ntkjax.empirical_ntk_matrix(mlp.apply, params, x, block_size=4, out=emp)
    params2 = jax.tree_util.tree_map(lambda p: p + 1, params)
    with pytest.raises(ValueError, match="parameters"):
        ntkjax.empirical_ntk_matrix(mlp.apply, params2, x, block_size=4, out=emp)
    with pytest.raises(ValueError, match="outputs=full"):
        ntkjax.empirical_ntk_matrix(mlp.apply, params, x, block_size=4, out=emp, outputs="full")

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a store")
    with pytest.raises(ValueError, match=r"not an ntkjax block store|not a zarr"):
        ntkjax.kernel_matrix(mlp, x, out=tmp_path / "plain")
    with pytest.raises(ValueError, match="devices is empty"):
        ntkjax.kernel_matrix(mlp, x, devices=[])
