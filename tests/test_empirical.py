"""Empirical NTK: every method against a float64 brute-force Jacobian, symmetry, PSD, blocking,
NNGP, the matrix-free operator with CG, jit/scan usage and input validation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntkjax
from tests.helpers import max_relative_error
from tests.models_for_ntk import CASES, MLP, brute_force_ntk, case_truth, make_case, reduce_full

METHODS = ("jacobian", "ntk_vp", "structured")


# The brute-force comparisons declare the examples independent (batch="per_sample"): the
# default probe (batch="auto") would be compiled once per kernel function for the same answer
# on these per-example models; the other tests of this file run it on the same models.


@pytest.mark.parametrize("case", CASES)
def test_methods_match_brute_force_float32(case):
    apply_fn, params, x1, x2 = make_case(case)
    full = case_truth(case)
    for method in METHODS:
        for outputs in ("trace", "diagonal", "full"):
            ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs=outputs,
                                          batch="per_sample")
            got = ntk(params, x1, x2)
            assert got.dtype == jnp.float32
            expected = reduce_full(full, outputs)
            assert got.shape == expected.shape
            assert max_relative_error(got, expected) < 1e-5, (case, method, outputs)


@pytest.mark.parametrize(
    "case", [c if c in ("mlp", "embed") else pytest.param(c, marks=pytest.mark.slow)
             for c in CASES])
def test_methods_match_brute_force_float64(case, x64):
    apply_fn, params, x1, x2 = make_case(case, jnp.float64)
    full = case_truth(case)
    for method in METHODS:
        ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="full",
                                      batch="per_sample")
        got = ntk(params, x1, x2)
        assert got.dtype == jnp.float64
        assert max_relative_error(got, full) < 1e-10, (case, method)


def test_auto_picks_a_correct_method():
    apply_fn, params, x1, x2 = make_case("resnet")
    got = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="auto", outputs="diagonal")(params, x1, x2)
    assert max_relative_error(got, reduce_full(case_truth("resnet"), "diagonal")) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_x2_none_is_symmetric_psd_and_equals_x1_x1(method):
    apply_fn, params, x1, _ = make_case("cnn", n1=6)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="full")
    k = np.asarray(ntk(params, x1), np.float64)
    np.testing.assert_array_equal(k, np.transpose(k, (1, 0, 3, 2)))
    np.testing.assert_allclose(k, ntk(params, x1, x1), rtol=1e-5, atol=1e-5 * np.abs(k).max())
    n, o = k.shape[0], k.shape[2]
    mat = np.transpose(k, (0, 2, 1, 3)).reshape(n * o, n * o)
    assert np.linalg.eigvalsh(mat).min() > -1e-5 * np.abs(mat).max()


def test_output_without_feature_axis_and_extra_collections():
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(1)(nn.relu(x))[:, 0]  # output (N,)

    model = BNNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(
        lambda a: a + 0.5, variables["batch_stats"])}
    full = brute_force_ntk(lambda v, x: model.apply(v, x)[:, None], variables, x, x)
    for method in (*METHODS, "auto"):
        k = ntkjax.empirical_ntk_fn(model.apply, ntk_method=method)(variables, x)
        assert k.shape == (4, 4)
        assert max_relative_error(k, full[..., 0, 0]) < 1e-5, method


def test_usable_inside_jit_scan_and_grad():
    apply_fn, params, x1, _ = make_case("mlp")
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian")
    expected = np.asarray(ntk(params, x1))

    @jax.jit
    def loop(p):
        def step(carry, scale):
            q = jax.tree_util.tree_map(lambda a: a * scale, p)
            return carry, ntk(q, x1)
        return jax.lax.scan(step, 0.0, jnp.ones(3))[1]

    out = loop(params)
    assert out.shape == (3, *expected.shape)
    np.testing.assert_allclose(out[1], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    g = jax.grad(lambda p: jnp.trace(ntk(p, x1)))(params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(g))


def test_plain_pytree_params():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    params = {"w": w, "b": jnp.ones(2)}
    apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    # closed form: d f_i / d w_{ki} = (1 - tanh^2) x_k, d f_i / d b_i = 1
    s = 1 - jnp.tanh(x @ w) ** 2  # (N, O)
    expected = np.einsum("ai,bi->ab", s, s) * np.asarray(x @ x.T) + 2.0
    for method in ("jacobian", "ntk_vp", "auto"):
        k = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method)(params, x)
        assert max_relative_error(k, expected) < 1e-5


def test_blocked_matches_unblocked():
    apply_fn, params, x1, x2 = make_case("mlp", n1=21, n2=13)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian", outputs="full")
    for a, b in ((x1, x2), (x1, None)):
        blocked = ntkjax.empirical_ntk_matrix(
            apply_fn, params, a, b, ntk_method="structured", outputs="full", block_size=8
        )
        assert isinstance(blocked, np.ndarray)
        expected = np.asarray(ntk(params, a, b))
        assert blocked.shape == expected.shape
        assert max_relative_error(blocked, expected) < 1e-5


def test_blocked_from_memory_budget():
    apply_fn, params, x1, _ = make_case("mlp", n1=40)
    blocked = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, memory_bytes=2**19)
    expected = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian")(params, x1)
    assert max_relative_error(blocked, expected) < 1e-5


def test_nngp_outputs_and_last_hidden():
    model = MLP(widths=(16, 8), out=3)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    params = model.init(jax.random.PRNGKey(2), x1)
    f1, f2 = model.apply(params, x1), model.apply(params, x2)
    nngp = ntkjax.empirical_nngp_fn(model.apply, outputs="full")
    np.testing.assert_allclose(
        nngp(params, x1, x2), np.einsum("ai,bj->abij", f1, f2), rtol=1e-6, atol=1e-7)
    trace = ntkjax.empirical_nngp_fn(model.apply, normalize=True)(params, x1, x2)
    np.testing.assert_allclose(trace, f1 @ f2.T / 3, rtol=1e-5, atol=1e-6)

    def hidden(x):  # the last hidden layer's post-activation, written out by hand
        p = params["params"]
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jax.nn.relu(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])

    feats = ntkjax.empirical_nngp_fn(model.apply, features="last_hidden")(params, x1, x2)
    np.testing.assert_allclose(feats, hidden(x1) @ hidden(x2).T, rtol=1e-5, atol=1e-6)


def test_ntk_operator_matches_matrix_and_cg_solves():
    model = MLP(widths=(32,), out=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 4))
    params = model.init(jax.random.PRNGKey(1), x)
    theta = np.asarray(ntkjax.empirical_ntk_fn(model.apply, ntk_method="jacobian")(params, x),
                       np.float64)
    op = ntkjax.ntk_operator(model.apply, params, x, ridge=1e-2)
    v = jax.random.normal(jax.random.PRNGKey(2), (12, 1))
    np.testing.assert_allclose(op(v)[:, 0], (theta + 1e-2 * np.eye(12)) @ np.asarray(v[:, 0]),
                               rtol=1e-4, atol=1e-4 * np.abs(theta).max())
    y = jax.random.normal(jax.random.PRNGKey(3), (12, 1))
    sol, _ = jax.scipy.sparse.linalg.cg(op, y, tol=1e-7, maxiter=500)
    direct = np.linalg.solve(theta + 1e-2 * np.eye(12), np.asarray(y[:, 0], np.float64))
    assert max_relative_error(sol[:, 0], direct) < 1e-3
    with pytest.raises(ValueError, match="output shape"):
        op(jnp.ones((12,)))


def test_nnx_helper():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    apply_fn, params = ntkjax.nnx_apply_fn(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda t: apply_fn(unravel(t), x))(flat)  # (N, O, P)
    expected = np.einsum("aip,bjp->abij", jac, jac)
    for method in METHODS:
        k = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="full")(params, x)
        assert k.shape == (4, 4, 2, 2)
        assert max_relative_error(k, expected) < 1e-5


def test_errors_name_the_problem():
    apply_fn, params, x1, x2 = make_case("mlp")
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian")
    with pytest.raises(ValueError, match="allowed"):
        ntkjax.empirical_ntk_fn(apply_fn, ntk_method="exact")
    with pytest.raises(ValueError, match="'trace', 'mean', 'full', 'diagonal'"):
        ntkjax.empirical_ntk_fn(apply_fn, outputs="sum")
    with pytest.raises(ValueError, match=r"x1.shape=\(5, 6\) and x2.shape=\(4, 5\)"):
        ntk(params, x1, x2[:, :5])
    with pytest.raises(ValueError, match="batch axis"):
        ntk(params, x1[0])
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["params"]["Dense_0"]["kernel"] = jnp.ones((7, 16))
    with pytest.raises(ValueError, match=r"\(7, 16\)"):
        ntk(bad, x1)
    with pytest.raises(ValueError, match="batch axis"):
        ntkjax.empirical_ntk_matrix(apply_fn, params, x1[0])


def test_vp_batch_size_must_be_a_positive_integer():
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="vp_batch_size"):
            ntkjax.empirical_ntk_fn(lambda p, x: x @ p, ntk_method="ntk_vp", vp_batch_size=bad)


def test_nnx_helper_refuses_linen_modules_and_training_mode():
    from flax import nnx

    with pytest.raises(ValueError, match=r"needs a flax\.nnx Module"):
        ntkjax.nnx_apply_fn(MLP())
    net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)),
                         nnx.Linear(4, 1, rngs=nnx.Rngs(2)))
    with pytest.raises(ValueError, match=r"training mode \(Dropout at layers/1\).*eval\(\)"):
        ntkjax.nnx_apply_fn(net)
    net.eval()
    apply_fn, params = ntkjax.nnx_apply_fn(net)
    assert ntkjax.empirical_ntk_fn(apply_fn)(params, jnp.ones((2, 3))).shape == (2, 2)


def test_outputs_mean_is_the_brute_force_mean_over_outputs():
    # neural-tangents' trace_axes=(-1,): (1/O) sum_i Theta_ii, for every method and the NNGP
    apply_fn, params, x1, x2 = make_case("mlp")
    full = np.asarray(case_truth("mlp"))
    o = full.shape[-1]
    expected = np.trace(full, axis1=2, axis2=3) / o
    for method in METHODS:
        got = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="mean")(params, x1, x2)
        assert got.shape == expected.shape
        assert max_relative_error(got, expected) < 1e-5, method
    sym = ntkjax.empirical_ntk_fn(apply_fn, outputs="mean")(params, x1)
    np.testing.assert_array_equal(sym, sym.T)
    f1, f2 = np.asarray(apply_fn(params, x1)), np.asarray(apply_fn(params, x2))
    nngp = ntkjax.empirical_nngp_fn(apply_fn, outputs="mean")(params, x1, x2)
    np.testing.assert_allclose(nngp, f1 @ f2.T / f1.shape[1], rtol=1e-5, atol=1e-6)
    blocked = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, outputs="mean", block_size=2)
    assert max_relative_error(blocked, expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# batch-coupled functions (neural-tangents' vmap_axes=None) and batch-diagonal kernels
# ---------------------------------------------------------------------------------------------


class TrainBatchNormNet(nn.Module):
    """A train-mode BatchNorm: every output depends on the whole batch."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        h = nn.BatchNorm(use_running_average=False)(h)
        return nn.Dense(2)(nn.tanh(h))


def _coupled_cases(dtype):
    """(name, apply_fn, variables, x1, x2): a train-mode BatchNorm network (applied with
    mutable batch_stats, as in training) and a Dense layer of batch-centered inputs."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    x1 = jax.random.normal(k1, (5, 3), jnp.float32).astype(dtype)
    x2 = jax.random.normal(k2, (4, 3), jnp.float32).astype(dtype)
    bn = TrainBatchNormNet()
    bn_vars = jax.tree_util.tree_map(lambda a: a.astype(dtype), bn.init(k3, x1))
    bn_apply = lambda v, x: bn.apply(v, x, mutable=["batch_stats"])[0]
    dense = nn.Dense(3)
    dense_vars = jax.tree_util.tree_map(lambda a: a.astype(dtype), dense.init(k3, x1))
    centered = lambda v, x: dense.apply(v, x - x.mean(0))
    return [("batchnorm", bn_apply, bn_vars, x1, x2), ("centered", centered, dense_vars, x1, x2)]


@pytest.mark.slow
def test_batch_coupled_functions_get_the_whole_batch_kernel(x64):
    """The kernel of a batch-coupled function is J(X1) J(X2)^T of the batched function (the
    float64 Jacobian of the whole batch), never the per-example kernel (zeros for centering)."""
    for name, apply_fn, variables, x1, x2 in _coupled_cases(jnp.float64):
        assert ntkjax.is_batch_coupled(apply_fn, variables, x1)
        truth11 = brute_force_ntk(apply_fn, variables, x1, x1)
        truth12 = brute_force_ntk(apply_fn, variables, x1, x2)
        assert np.abs(truth11).max() > 0.1
        runs = [("auto", "auto", None, truth11), ("auto", "auto", x2, truth12)]
        runs += [(method, "whole", x2, truth12) for method in METHODS]
        for method, batch, xs2, truth in runs:
            ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method=method, outputs="full",
                                          batch=batch)
            got = ntk(variables, x1, xs2)
            assert max_relative_error(got, truth) < 1e-10, (name, method, batch)


def test_batch_coupling_is_found_under_an_outer_jit_and_kept_per_shape():
    _, apply_fn, variables, x1, _ = _coupled_cases(jnp.float32)[1]
    truth = brute_force_ntk(apply_fn, variables, x1, x1)
    ntk = ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian", outputs="full")
    got = jax.jit(lambda v, x: ntk(v, x))(variables, x1)  # no concrete call before: lax.cond
    assert max_relative_error(got, truth) < 1e-5
    ntk(variables, x1)  # concrete: the decision is kept for these shapes
    got = jax.jit(lambda v, x: ntk(v, x))(variables, x1)
    assert max_relative_error(got, truth) < 1e-5
    # an independent model is not coupled, and keeps the per-example kernel
    mlp, params, a, _ = make_case("mlp")
    assert not ntkjax.is_batch_coupled(mlp, params, a)


def test_blocks_refuse_a_batch_coupled_function():
    _, apply_fn, variables, x1, _ = _coupled_cases(jnp.float32)[0]
    with pytest.raises(ValueError, match="couples the examples"):
        ntkjax.empirical_ntk_matrix(apply_fn, variables, x1, block_size=2)


def test_train_mode_dropout_refusal_is_not_called_a_params_mismatch():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(nn.Dense(4)(x)))

    x = jnp.ones((3, 2))
    variables = Drop().init(jax.random.PRNGKey(0), x)
    apply_fn = lambda v, a: Drop().apply(v, a, rngs={"dropout": jax.random.PRNGKey(1)})
    for batch in ("auto", "per_sample", "whole"):
        with pytest.raises(ValueError, match="train mode") as info:
            ntkjax.empirical_ntk_fn(apply_fn, batch=batch)(variables, x)
        assert "could not be applied" not in str(info.value)
        assert "do the params match" not in str(info.value)


@pytest.mark.parametrize(
    "case", ["mlp", "embed", pytest.param("cnn", marks=pytest.mark.slow)])
def test_diagonal_batch_is_the_diagonal_of_the_float64_kernel(case):
    apply_fn, params, x1, x2 = make_case(case, n1=4, n2=4)
    truths = {None: brute_force_ntk(apply_fn, params, x1, x1), "x2": case_truth(case)}
    runs = [(method, "full", xs2) for method in METHODS for xs2 in (None, "x2")]
    runs += [("auto", outputs, "x2") for outputs in ("trace", "mean", "diagonal")]
    for method, outputs, xs2 in runs:
        pairs = np.moveaxis(np.diagonal(truths[xs2], axis1=0, axis2=1), -1, 0)  # (N, O, O)
        ntk = ntkjax.empirical_ntk_fn(
            apply_fn, ntk_method=method, outputs=outputs, diagonal_batch=True
        )
        got = ntk(params, x1, None if xs2 is None else x2)
        want = {
            "full": pairs,
            "diagonal": np.diagonal(pairs, axis1=1, axis2=2),
            "trace": np.trace(pairs, axis1=1, axis2=2),
            "mean": np.trace(pairs, axis1=1, axis2=2) / pairs.shape[-1],
        }[outputs]
        assert got.shape == want.shape, (case, method, outputs)
        assert max_relative_error(got, want) < 1e-5, (case, method, outputs)


def test_diagonal_batch_of_a_coupled_function_and_bad_pairs(x64):
    _, apply_fn, variables, x1, _ = _coupled_cases(jnp.float64)[0]
    full = brute_force_ntk(apply_fn, variables, x1, x1)
    pairs = np.moveaxis(np.diagonal(full, axis1=0, axis2=1), -1, 0)
    for method in ("jacobian", "ntk_vp"):
        got = ntkjax.empirical_ntk_fn(
            apply_fn, ntk_method=method, outputs="full", diagonal_batch=True
        )(variables, x1)
        assert max_relative_error(got, pairs) < 1e-10
    apply_fn, params, a, _ = make_case("mlp")
    with pytest.raises(ValueError, match="same number of examples"):
        ntkjax.empirical_ntk_fn(apply_fn, diagonal_batch=True)(params, a, a[:2])
    with pytest.raises(ValueError, match="batch"):
        ntkjax.empirical_ntk_fn(apply_fn, batch="rows")
