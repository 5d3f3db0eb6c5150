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


# --------------------------------------------------------------------------- stores


def _outer(a, b):
    return a @ b.T


def _data(n=10, d=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_two_lambdas_never_share_a_store(tmp_path):
    """Two lambdas have the same name; the store identifies them by what they compute."""
    x, out = _data(), tmp_path / "K.zarr"
    k = evaluate_in_blocks(lambda a, b: a @ b.T, x, block_size=4, out=out)
    np.testing.assert_allclose(k[...], x @ x.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="another computation"):
        evaluate_in_blocks(lambda a, b: (a @ b.T) ** 2, x, block_size=4, out=out)
    w = jnp.ones(3)
    with pytest.raises(ValueError, match="another computation"):  # a closed-over array's bytes
        evaluate_in_blocks(lambda a, b: (a * (2 * w)) @ b.T, x, block_size=4, out=out)
    # the same computation written again is the same store
    again = evaluate_in_blocks(lambda a, b: a @ b.T, x, block_size=4, out=out)
    np.testing.assert_array_equal(again[...], k[...])


def test_two_elementwise_activations_never_share_a_store(tmp_path):
    import jax

    import ntkjax
    from ntkjax import models
    from ntkjax import nn as ntk_nn

    x = jnp.asarray(_data(8))
    sin = models.MLP((8, 1), ntk_nn.elementwise(lambda z: jnp.sin(z)))
    cos = models.MLP((8, 1), ntk_nn.elementwise(lambda z: jnp.cos(z)))
    direct = np.asarray(ntkjax.kernel_fn(cos)(x).ntk)
    assert not np.allclose(direct, np.asarray(ntkjax.kernel_fn(sin)(x).ntk), rtol=0.05)
    out = tmp_path / "K.zarr"
    ntkjax.kernel_matrix(sin, x, block_size=4, out=out)
    with pytest.raises(ValueError, match="another computation"):
        ntkjax.kernel_matrix(cos, x, block_size=4, out=out)
    fresh = ntkjax.kernel_matrix(cos, x, block_size=4, out=tmp_path / "cos.zarr")
    np.testing.assert_allclose(fresh.ntk[...], direct, rtol=1e-5, atol=1e-6)

    # two jax.jit-wrapped apply functions
    params = {"w": jnp.asarray(_data(3, 2, seed=1))}
    tanh = jax.jit(lambda p, a: jnp.tanh(a @ p["w"]))
    sine = jax.jit(lambda p, a: jnp.sin(a @ p["w"]))
    emp = tmp_path / "E.zarr"
    ntkjax.empirical_ntk_matrix(tanh, params, x, block_size=4, out=emp)
    with pytest.raises(ValueError, match="another computation"):
        ntkjax.empirical_ntk_matrix(sine, params, x, block_size=4, out=emp)


def test_what_cannot_be_fingerprinted_is_refused_and_a_key_is_taken(tmp_path):
    import jax

    x, out = _data(), tmp_path / "K.zarr"

    def host(a, b):
        spec = jax.ShapeDtypeStruct((a.shape[0], b.shape[0]), a.dtype)
        return jax.pure_callback(lambda u, v: np.asarray(u @ v.T, u.dtype), spec, a, b)

    with pytest.raises(ValueError, match=r"cannot fingerprint.*pure_callback.*store_key"):
        evaluate_in_blocks(host, x, block_size=4, out=out)
    assert not out.exists()
    k = evaluate_in_blocks(host, x, block_size=4, out=out, store_key="host outer v1")
    np.testing.assert_allclose(k[...], x @ x.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="another computation"):
        evaluate_in_blocks(host, x, block_size=4, out=out, store_key="host outer v2")
    with pytest.raises(ValueError, match="another computation"):
        evaluate_in_blocks(_outer, x, block_size=4, out=out)  # a key is not a jaxpr
    with pytest.raises(ValueError, match="store_key"):
        evaluate_in_blocks(_outer, x, block_size=4, out=tmp_path / "k2", store_key="")


@pytest.mark.parametrize("damage", ["missing", "truncated", "random bytes", "record"])
@pytest.mark.parametrize("block", [(0, 1), (1, 0), (2, 2)])
def test_a_damaged_chunk_is_named_and_computed_again(tmp_path, damage, block):
    """Blocks (0, 1) and its mirror (1, 0) of a symmetric store, and a diagonal block."""
    x, out = _data(), tmp_path / "K.zarr"
    evaluate_in_blocks(_outer, x, block_size=4, out=out)
    exact = evaluate_in_blocks(_outer, x, block_size=4)  # the in-memory evaluation
    array = "finished_blocks" if damage == "record" else "kernel"
    chunk = out / array / "c" / str(block[0]) / str(block[1])
    if damage == "record" and not chunk.exists():
        pytest.skip("a symmetric store records only blocks on and above the diagonal")
    data = chunk.read_bytes()
    if damage == "missing":
        chunk.unlink()
    elif damage == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        rng = np.random.default_rng(3)
        chunk.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
    if damage == "record":  # a damaged record entry: the block counts as not finished
        k = evaluate_in_blocks(_outer, x, block_size=4, out=out)
    else:
        with pytest.warns(RuntimeWarning, match=rf"{chunk}.*(missing|bytes|checksum)"):
            k = evaluate_in_blocks(_outer, x, block_size=4, out=out)
    got = k[...]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, exact)
    np.testing.assert_array_equal(chunk.read_bytes(), data)  # written again, bit-equal


def test_a_store_created_meanwhile_by_another_call_is_joined(tmp_path, monkeypatch):
    """Two processes creating one store at once: the loser finds the winner's store (here
    created just before this call looks, as if in the same instant) and joins it -- or, for
    another computation, gets the clear refusal, never zarr's FileExistsError."""
    from ntkjax import _store

    x, out = _data(), tmp_path / "K.zarr"
    winner = evaluate_in_blocks(_outer, x, block_size=4, out=out)[...]
    real = _store.read_meta
    looks = []

    def not_yet(path):  # the loser looked before the winner's store appeared
        looks.append(path)
        return None if len(looks) == 1 else real(path)

    monkeypatch.setattr(_store, "read_meta", not_yet)
    joined = evaluate_in_blocks(_outer, x, block_size=4, out=out)
    np.testing.assert_array_equal(joined[...], winner)
    looks.clear()
    with pytest.raises(ValueError, match="another computation"):
        evaluate_in_blocks(lambda a, b: 2 * a @ b.T, x, block_size=4, out=out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_store_of_the_old_format_is_refused_by_name(tmp_path):
    """Version 1 stores had no checksums and repr fingerprints: reusing one could be silently
    wrong, so it is refused with the version named."""
    import zarr

    x, out = _data(), tmp_path / "K.zarr"
    evaluate_in_blocks(_outer, x, block_size=4, out=out)
    group = zarr.open_group(out, mode="r+")
    meta = dict(group.attrs)["ntkjax"]
    group.attrs["ntkjax"] = {**meta, "version": 1}
    with pytest.raises(ValueError, match="format version 1"):
        evaluate_in_blocks(_outer, x, block_size=4, out=out)
