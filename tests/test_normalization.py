"""ntkjax.nn.LayerNorm: the finite layer against flax.linen.LayerNorm; the kernel rule against
the input kernel of normalized zero-mean inputs (exact); errors; and (slow) the empirical NTK of
finite LayerNorm + residual networks converging to kernel_fn like width^-1/2."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax.kernels import input_kernel
from ntkjax.scaling import fit_power_law
from tests.random_params import normal, ntk_param_sampler


def _x(n=5, shape=(6,), seed=0, dtype=jnp.float64):
    return normal((n, *shape), seed, dtype)


CASES = [((7,), -1), ((4, 3, 5), -1), ((4, 3, 5), (1, 2, 3)), ((4, 3, 5), (-2, -1)),
         ((6, 5), (1, 2))]


def test_finite_layer_is_flax_layernorm_without_parameters():
    for shape, axis in CASES:
        x = 3.0 + 2.0 * _x(3, shape, dtype=jnp.float32)
        axes = (axis,) if isinstance(axis, int) else axis
        ref = linen.LayerNorm(reduction_axes=axes, use_scale=False, use_bias=False,
                              epsilon=1e-3)
        got = nn.LayerNorm(axis=axis, epsilon=1e-3).apply({}, x)
        np.testing.assert_allclose(got, ref.apply({}, x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("same", [True, False])
def test_kernel_rule_is_the_input_kernel_of_normalized_zero_mean_inputs(same, x64):
    """For inputs with zero mean over the normalized axes, LayerNorm only rescales each example
    (and position) by 1/sqrt(var + eps) with var = |x|^2 / size: then the rule applied to the
    input kernel equals the input kernel of the normalized inputs, exactly (vectors; images
    per position, over channels and positions, over one spatial axis and channels)."""

    @jax.jit
    def both(x1, x2):
        out = []
        for (_, axis), a, b in zip(CASES[1:] + CASES[:1], x1, x2, strict=True):
            layer = nn.LayerNorm(axis=axis, epsilon=0.1)
            axes = tuple(i % a.ndim for i in ((axis,) if isinstance(axis, int) else axis))
            a = a - jnp.mean(a, axis=axes, keepdims=True)
            b = None if same else b - jnp.mean(b, axis=axes, keepdims=True)
            # centered inputs stand in for a Gaussian layer's outputs: lift the inputs' mark
            gaussian = input_kernel(a, b).replace(non_gaussian="")
            out.append((layer.apply({}, gaussian),
                        input_kernel(layer.apply({}, a), None if same else layer.apply({}, b))))
        return out

    shapes = [shape for shape, _ in CASES[1:] + CASES[:1]]
    results = both([_x(4, s, i) for i, s in enumerate(shapes)],
                   [3 * _x(3, s, 10 + i) for i, s in enumerate(shapes)])
    for got, want in results:
        for name in ("nngp", "var1", "var2"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12,
                                       atol=1e-14)


def test_errors(x64):
    img = input_kernel(_x(2, (3, 4, 2)))
    with pytest.raises(ValueError, match="channel axis"):
        nn.LayerNorm(axis=(1, 2)).apply({}, img)
    with pytest.raises(ValueError, match="batch axis"):
        nn.LayerNorm(axis=(0, -1)).apply({}, img)
    with pytest.raises(ValueError, match="batch axis"):
        nn.LayerNorm(axis=0).apply({}, _x())
    with pytest.raises(ValueError, match="out of range"):
        nn.LayerNorm(axis=3).apply({}, _x())
    h = nn.relu(nn.Dense(4).apply({}, input_kernel(_x())))
    with pytest.raises(ValueError, match=r"Gaussian.*ntkjax\.nn\.relu"):
        nn.LayerNorm().apply({}, h)
    # on arrays, normalizing over positions alone is fine (only the limit needs channels)
    assert nn.LayerNorm(axis=(1, 2)).apply({}, _x(2, (3, 4, 2))).shape == (2, 3, 4, 2)


class NormResidual(linen.Module):
    """x = Dense(x); x = x + Dense(relu(Dense(LayerNorm(x)))); readout of relu(LayerNorm(x))."""

    width: int

    @linen.compact
    def __call__(self, x):
        x = nn.Dense(self.width, b_std=0.1)(x)
        h = nn.Dense(self.width, w_std=1.4, b_std=0.1)(nn.LayerNorm()(x))
        x = x + nn.Dense(self.width)(nn.relu(h))
        return nn.Dense(1)(nn.relu(nn.LayerNorm()(x)))


def ntk_errors(make, configs, x, n_networks, seed=0):
    """RMS over ``n_networks`` networks of ||Theta_emp - Theta|| / ||Theta|| for each config."""
    errors = []
    for config in configs:
        module = make(*config)
        theta = ntkjax.kernel_fn(module)(x).ntk
        # examples are independent: batch="per_sample" (under this outer jit the default
        # probe would be compiled into the program, with both kernels behind a lax.cond)
        ntk_fn = ntkjax.empirical_ntk_fn(module.apply, batch="per_sample")
        sample = ntk_param_sampler(module, x)
        keys = jax.random.split(jax.random.PRNGKey(seed + config[0]), n_networks)
        emp = jax.jit(lambda ks, f=ntk_fn, s=sample: jax.lax.map(lambda k: f(s(k), x), ks))(keys)
        sq = jnp.sum((emp - theta) ** 2, axis=(1, 2)) / jnp.sum(theta**2)
        errors.append(float(jnp.sqrt(jnp.mean(sq))))
    return errors


@pytest.mark.slow
def test_layernorm_residual_empirical_ntk_converges_like_inverse_sqrt_width(x64):
    """RMS over 24 networks of the relative NTK error of a LayerNorm + residual network at
    widths 128-1024; fitted log-log slope in [-0.7, -0.3]."""
    x = _x(5, (4,), 42)
    widths = [128, 256, 512, 1024]
    errors = ntk_errors(NormResidual, [(w,) for w in widths], x, 24)
    slope = fit_power_law(widths, errors).slope
    assert -0.7 <= slope <= -0.3, (slope, errors)
    assert errors[-1] < 0.15


def test_raw_inputs_are_refused_and_the_docstring_case_is_right_after_a_dense(x64):
    """LayerNorm subtracts each example's channel mean; the kernel of raw inputs does not hold
    it, and the rule (a rescaling) gave [[1, 0.997], ...] for the docstring's x = [[0, 1, 2],
    [3, 4, 5]], whose normalized rows [-1.22, 0, 1.22] are identical (kernel [[1, 1], ...])."""
    x = jnp.arange(6.0).reshape(2, 3)
    for fn in (ntkjax.kernel_fn(nn.LayerNorm()), jax.jit(ntkjax.kernel_fn(nn.LayerNorm()))):
        with pytest.raises(ValueError, match=r"network's inputs.*Put the LayerNorm right after a "
                                             "Dense"):  # structural: also under jit
            fn(x)
    # the rule on a Gaussian layer: Dense (no bias) then LayerNorm is the correlation matrix
    # x x^T / (|x_a| |x_b|) (the Dense kernel is w^2 x x^T / d)
    model = linen.Sequential([nn.Dense(8, w_std=1.3, b_std=None), nn.LayerNorm(epsilon=0.0)])
    k = ntkjax.kernel_fn(model)(x)
    norms = np.linalg.norm(np.asarray(x), axis=1)
    np.testing.assert_allclose(k.nngp, np.asarray(x @ x.T) / np.outer(norms, norms), rtol=1e-12)


def test_epsilon_zero_on_an_all_zero_example_gives_zeros_not_nan(x64):
    x = jnp.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])
    model = linen.Sequential([nn.Dense(8, b_std=None), nn.LayerNorm(epsilon=0.0)])
    k = ntkjax.kernel_fn(model)(x)
    for name in ("nngp", "ntk", "var1"):
        value = np.asarray(getattr(k, name))
        assert np.all(np.isfinite(value)), name
    np.testing.assert_array_equal(np.asarray(k.nngp)[0], 0.0)
    np.testing.assert_array_equal(np.asarray(k.var1)[0], 0.0)
    np.testing.assert_allclose(np.asarray(k.var1)[1:], 1.0, rtol=1e-12)  # the others: unit
    # the finite layer maps a constant example to 0 as well (flax's gives NaN at epsilon = 0)
    out = nn.LayerNorm(epsilon=0.0).apply({}, jnp.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(np.asarray(out)[0], 0.0)
    np.testing.assert_allclose(np.asarray(out)[1], [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])
