"""Blocked evaluation must reproduce the direct (numpy) computation exactly, for any tiling."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax.blocking import available_memory_bytes, evaluate_in_blocks


def _rbf_and_outer(a, b):
    d2 = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    # An asymmetric-in-outputs term: K(x, x')_{pq} = x_p x'_q, so K(x', x) = K(x, x')^T in (p, q).
    full = a[:, None, :3, None] * b[None, :, None, :3]
    return {"rbf": jnp.exp(-d2), "full": full}


def _numpy_reference(a, b):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return {"rbf": np.exp(-d2), "full": a[:, None, :3, None] * b[None, :, None, :3]}


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 100])
def test_blocks_match_direct_evaluation(block_size):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(23, 5)).astype(np.float32), rng.normal(size=(17, 5)).astype(np.float32)
    out = evaluate_in_blocks(_rbf_and_outer, a, b, block_size=block_size)
    ref = _numpy_reference(a, b)
    assert out["rbf"].shape == (23, 17) and out["full"].shape == (23, 17, 3, 3)
    np.testing.assert_allclose(out["rbf"], ref["rbf"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(out["full"], ref["full"], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("block_size", [4, 5, 64])
def test_symmetric_mode_fills_lower_triangle_by_transposition(block_size):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(19, 5)).astype(np.float32)
    out = evaluate_in_blocks(_rbf_and_outer, a, None, block_size=block_size)
    ref = _numpy_reference(a, a)
    np.testing.assert_allclose(out["rbf"], ref["rbf"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(out["full"], ref["full"], rtol=2e-5, atol=1e-7)


def test_budget_choice_and_too_small_budget():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 5)).astype(np.float32)
    out = evaluate_in_blocks(_rbf_and_outer, a, memory_bytes=2**20)
    np.testing.assert_allclose(out["rbf"], _numpy_reference(a, a)["rbf"], rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match="memory budget"):
        evaluate_in_blocks(_rbf_and_outer, a, memory_bytes=10)
    assert available_memory_bytes() > 0


def test_bad_inputs_name_the_problem():
    a = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="same per-example shape"):
        evaluate_in_blocks(_rbf_and_outer, a, np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match="block_size"):
        evaluate_in_blocks(_rbf_and_outer, a, a, block_size=0)


def test_fn_args_are_passed_as_traced_arguments():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 4)).astype(np.float32)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    w = w @ w.T  # symmetric, so K(x, x') = x W x' is a symmetric kernel
    out = evaluate_in_blocks(lambda p, q, m: (p @ m) @ q.T, a, fn_args=(w,), block_size=3)
    np.testing.assert_allclose(out, (a @ w) @ a.T, rtol=1e-5, atol=1e-5)


def test_budget_message_prints_bytes_at_small_scales():
    a = np.ones((64, 5), np.float32)
    with pytest.raises(ValueError, match=r"budget of 1 B;"):
        evaluate_in_blocks(_rbf_and_outer, a, memory_bytes=1)
