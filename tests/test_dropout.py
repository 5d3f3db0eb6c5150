"""ntkjax.nn.Dropout: flax's call semantics on arrays; the train-mode kernel rule against Monte
Carlo over networks and masks (one batch with itself, and two independent batches);
kernel_matrix and the empirical NTK refuse what they cannot compute consistently."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax.kernels import input_kernel
from tests.helpers import max_relative_error
from tests.random_params import normal, ntk_param_sampler, ntk_params


def _x(n=4, shape=(5,), seed=0, dtype=jnp.float64):
    return normal((n, *shape), seed, dtype)


def test_on_arrays_like_flax_dropout():
    x = jnp.ones((64, 32))
    key = jax.random.PRNGKey(3)
    layer = nn.Dropout(0.25)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": key})
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-7)
    assert abs(float(jnp.mean(y == 0)) - 0.25) < 0.03
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(nn.Dropout(0.25, deterministic=True).apply({}, x), x)
    flax_y = linen.Dropout(0.25).apply({}, x, deterministic=False, rngs={"dropout": key})
    assert flax_y.shape == y.shape
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.Dropout(1.0, deterministic=False).apply({}, x)
    with pytest.raises(Exception, match="deterministic"):  # flax's merge_param: give it once
        nn.Dropout(0.5).apply({}, x)


class DropNet(linen.Module):
    """Dense -> relu -> Dropout -> Dense -> relu -> Dense(1) (nt's dropout reference nets)."""

    rate: float
    deterministic: bool = False
    width: int = 128

    @linen.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width, w_std=1.4, b_std=0.1)(x))
        h = nn.Dropout(self.rate, deterministic=self.deterministic)(h)
        h = nn.relu(nn.Dense(self.width, w_std=1.4, b_std=0.1)(h))
        return nn.Dense(1)(h)


@pytest.mark.slow
def test_train_kernel_matches_monte_carlo_over_networks_and_masks(x64):
    """E[f(x_a) f(x_b)] over 3000 (network, mask) draws: one batch with itself (x2 = None: an
    example shares its mask with itself) and two independently masked batches (x2 given)."""
    module = DropNet(0.5)
    x1, x2 = _x(4, seed=1), _x(3, seed=2)
    sample = ntk_param_sampler(module, x1)

    def outputs(key):
        kp, k1, k2 = jax.random.split(key, 3)
        params = sample(kp)
        f1 = module.apply(params, x1, rngs={"dropout": k1})[:, 0]
        f2 = module.apply(params, x2, rngs={"dropout": k2})[:, 0]
        return f1, f2

    f1, f2 = jax.jit(jax.vmap(outputs))(jax.random.split(jax.random.PRNGKey(5), 3000))
    same = np.asarray(f1.T @ f1) / f1.shape[0]
    cross = np.asarray(f1.T @ f2) / f1.shape[0]
    kernel = ntkjax.kernel_fn(module)
    assert max_relative_error(same, kernel(x1).nngp) < 0.08
    assert max_relative_error(cross, kernel(x1, x2).nngp) < 0.08
    # the dropout's 1/keep on the diagonal is visible: deterministic differs by far more
    det = ntkjax.kernel_fn(DropNet(0.5, deterministic=True))(x1).nngp
    assert max_relative_error(same, det) > 0.2


def test_train_rule_and_identity(x64):
    h = nn.Dense(6, b_std=0.2).apply({}, input_kernel(_x()))
    k = nn.Dropout(0.2, deterministic=False).apply({}, h)
    n = len(h.var1)
    np.testing.assert_allclose(k.var1, h.var1 / 0.8, rtol=1e-15)
    np.testing.assert_allclose(np.diagonal(k.nngp), np.diagonal(h.nngp) / 0.8, rtol=1e-15)
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_array_equal(np.asarray(k.nngp)[off], np.asarray(h.nngp)[off])
    assert k.same_inputs and k.non_gaussian
    with pytest.raises(ValueError, match="Dropout"):
        nn.relu(k)
    # two batches: only the variances change
    h12 = nn.Dense(6, b_std=0.2).apply({}, input_kernel(_x(), _x(3, seed=4)))
    k12 = nn.Dropout(0.2, deterministic=False).apply({}, h12)
    np.testing.assert_array_equal(k12.nngp, h12.nngp)
    np.testing.assert_allclose(k12.var2, h12.var2 / 0.8, rtol=1e-15)
    # images: only each example's own positions (p == p')
    img = nn.Conv(4).apply({}, input_kernel(_x(2, (3, 2, 2))))
    ki = nn.Dropout(0.5, deterministic=False).apply({}, img)
    same_pos = np.eye(6, dtype=bool).reshape(3, 2, 3, 2)
    np.testing.assert_allclose(np.asarray(ki.var1)[:, same_pos], np.asarray(img.var1)[:, same_pos]
                               * 2, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(ki.var1)[:, ~same_pos],
                                  np.asarray(img.var1)[:, ~same_pos])
    np.testing.assert_array_equal(np.asarray(ki.nngp)[0, 1], np.asarray(img.nngp)[0, 1])
    # deterministic: the identity
    assert nn.Dropout(0.2, deterministic=True).apply({}, h) is h


def test_kernel_matrix_refuses_a_batch_with_itself(x64):
    x = _x(6)
    module = DropNet(0.5, width=8)
    with pytest.raises(ValueError, match="Dropout"):
        ntkjax.kernel_matrix(module, x, block_size=4)
    blocked = ntkjax.kernel_matrix(module, x, x, block_size=4)  # two independent batches
    np.testing.assert_allclose(blocked.ntk, ntkjax.kernel_fn(module)(x, x).ntk, rtol=1e-12)


class FlaxDropNet(linen.Module):
    train: bool

    @linen.compact
    def __call__(self, x):
        h = linen.Dropout(0.3, deterministic=not self.train)(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(2)(h)


def test_empirical_ntk_refuses_active_dropout_and_agrees_without(x64):
    x = _x(4)
    for net in (DropNet(0.5, width=16), FlaxDropNet(train=True)):
        params = ntk_params(net, x)
        apply = lambda p, a, n=net: n.apply(p, a, rngs={"dropout": jax.random.PRNGKey(2)})
        for method in ("auto", "jacobian", "ntk_vp", "structured"):
            with pytest.raises(ValueError, match="train mode"):
                ntkjax.empirical_ntk_fn(apply, ntk_method=method)(params, x)
    # deterministic: the methods give one kernel
    net = DropNet(0.5, deterministic=True, width=16)
    params = ntk_params(net, x)
    got = ntkjax.empirical_ntk_fn(net.apply, ntk_method="structured")(params, x)
    want = ntkjax.empirical_ntk_fn(net.apply, ntk_method="jacobian")(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-10)
