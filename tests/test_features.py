"""Random features of the NNGP and NTK (ntkjax.features).

Truths from outside the code under test: the exact kernels of :func:`ntkjax.kernel_fn` (which the
features must reproduce exactly where every rule is exact, and on average over keys where the
method is unbiased), the closed-form erf kernel (for the Hermite truncation bound), the
D^(-1/2) Monte Carlo rate (fitted slope), and kernel ridge regression solved directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

import ntkjax
from ntkjax import models, nn
from ntkjax.features import (
    Features,
    _hermite_coefficients,
    feature_map,
    feature_ridge,
    hermite_truncation_error,
)
from ntkjax.kernels import Kernel
from ntkjax.nn import pooling
from tests.helpers import assert_feature_error_falls_like_inverse_sqrt, assert_unbiased_estimate

SQRT2 = 2**0.5


def _rel_fro(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _grams(f: Features) -> tuple[np.ndarray, np.ndarray]:
    nngp, ntk = np.asarray(f.nngp, np.float64), np.asarray(f.ntk, np.float64)
    return nngp @ nngp.T, ntk @ ntk.T


class _Residual(linen.Module):
    """Residual sums, scalar multiples and a linear member of the ReLU family."""

    @linen.compact
    def __call__(self, x):
        h = nn.Dense(8, b_std=0.2)(x)
        h = h + 0.5 * nn.Dense(8, w_std=1.4)(nn.identity(nn.Dense(8)(h)))
        h = nn.leaky_relu(h, negative_slope=1.0)
        return nn.Dense(2, b_std=0.1, parameterization="standard")(h) / 2.0


def _images(n=6, shape=(5, 4, 2), seed=2):
    return jax.random.normal(jax.random.key(seed), (n, *shape))


def _twice(x):
    """A user's own function layer by the documented recipe (docs/development.md): ``2 x``,
    declared with its kernel rule (``4 K``: a Kernel times 2) and its feature rule
    (``2 phi``)."""
    if isinstance(x, nn.FeatureStandIn):
        return _TWICE.on_features(x, _twice)
    if isinstance(x, Kernel):
        return x * 2.0
    return 2.0 * jnp.asarray(x)


_TWICE = nn.declare(_twice, name="tests.twice", kernel=_twice,
                    features=lambda x, exact: (2.0 * x.phi, 2.0 * x.psi))


def _undeclared_twice(x):
    """The same layer without a declaration: its array branch meets the stand-in."""
    if isinstance(x, Kernel):
        return x * 2.0
    return 2.0 * jnp.asarray(x)


class _Joined(linen.Module):
    """Branches joined by concatenation or product; windowed average pooling that counts only
    in-input positions; a user function layer."""

    kind: str

    @linen.compact
    def __call__(self, x):
        act = nn.identity if self.kind.startswith("linear") else nn.relu
        if self.kind == "linear-images":  # Conv -> act -> avg_pool (edges) -> concat -> flatten
            h = act(nn.Conv(3, kernel_size=2, w_std=1.3, b_std=0.1)(x))
            h = nn.avg_pool(h, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)
            spatial = nn.concatenate([nn.Conv(2, kernel_size=1)(h), nn.Conv(2, kernel_size=1)(h)],
                                     axis=1)
            return nn.Dense(1, w_std=1.2)(nn.flatten(spatial))
        a = act(nn.Dense(5, w_std=1.4, b_std=0.1)(x))
        if self.kind == "user":
            return nn.Dense(1, w_std=1.2)(_twice(nn.Dense(4)(a) + nn.Dense(4)(x)))
        b = (act if self.kind == "linear" else nn.erf)(nn.Dense(5, w_std=1.1, b_std=0.2)(x))
        a, b = nn.Dense(4)(a), nn.Dense(6 if self.kind != "multiply" else 4, w_std=1.3)(b)
        if self.kind == "multiply":
            h = nn.multiply(a, b)
        else:
            h = nn.concatenate([a, b])
        return nn.Dense(1, w_std=1.2, b_std=0.1)(h)


class _Normed(linen.Module):
    """LayerNorm over channels (or channels and positions) after a Conv, in a linear network."""

    axis: tuple[int, ...]

    @linen.compact
    def __call__(self, x):
        h = nn.LayerNorm(axis=self.axis)(nn.Conv(3, kernel_size=2, w_std=1.3, b_std=0.4)(x))
        return nn.Dense(1, w_std=0.9, b_std=0.1)(nn.flatten(nn.Conv(2, kernel_size=2)(h)))


LINEAR_CASES = {
    "mlp-ntk": (models.MLP((7, 9, 3), "identity", w_std=1.3, b_std=0.4), None),
    "mlp-standard": (models.MLP((7, 9, 3), "identity", w_std=1.3, b_std=0.4,
                                parameterization="standard"), None),
    "residual": (_Residual(), None),
    "cnn-same-flatten": (models.CNN((3, 4, 2), kernel_size=(3, 2), padding="SAME",
                                    activation="identity", w_std=1.2, b_std=0.3), "images"),
    "cnn-valid-strided-gap": (models.CNN((3, 2), kernel_size=(2, 2), strides=(1, 2),
                                         padding="VALID", activation="identity",
                                         readout="global_average_pool", w_std=1.2, b_std=0.3,
                                         parameterization="standard"), "images"),
    "cnn-circular-gap": (models.CNN((3, 2), kernel_size=3, padding="CIRCULAR",
                                    activation="identity", readout="global_average_pool",
                                    w_std=0.9, b_std=0.5), "images"),
    "cnn-avg-pool-same": (models.CNN((3, 3, 2), kernel_size=2, activation="identity",
                                     pooling="avg", pool_window=2, pool_strides=1,
                                     pool_padding="SAME", w_std=1.1, b_std=0.2), "images"),
    "avg-pool-edges-concat": (_Joined("linear-images"), "images"),
    "concat-channels": (_Joined("linear"), None),
    "layer-norm-channels": (_Normed((-1,)), "images"),
    "layer-norm-all-axes": (_Normed((1, 2, 3)), "images"),
    "cnn-sum-pool-gsp": (models.CNN((3, 2), kernel_size=2, activation="identity",
                                    pooling="sum", pool_window=(2, 2), pool_strides=(2, 1),
                                    pool_padding="CIRCULAR", readout="global_sum_pool",
                                    w_std=1.1, b_std=0.2), "images"),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_networks_without_random_layers_are_exact(x64, case):
    """Dense, Conv (paddings, strides, both parameterizations), flatten, global average pooling,
    residual sums and linear activations have exact feature rules: the Gram matrices equal
    kernel_fn's NNGP and NTK to rounding."""
    module, kind = LINEAR_CASES[case]
    x = _images(n=4, shape=(4, 3, 2)) if kind else jax.random.normal(jax.random.key(1), (20, 5))
    exact = ntkjax.kernel_fn(module)(x)
    # D above the exact features' width (no compression): 8192 for the two-conv network
    f = feature_map(module, key=jax.random.key(0), num_features=8192)(x)
    nngp, ntk = _grams(f)
    np.testing.assert_allclose(nngp, exact.nngp, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ntk, exact.ntk, rtol=1e-11, atol=1e-12)


UNBIASED_CASES = {
    "relu": (models.MLP((9, 3), "relu", w_std=1.4, b_std=0.3), {}, None),
    "abs-standard": (models.MLP((9, 3), "abs", w_std=1.4, b_std=0.3,
                                parameterization="standard"), {}, None),
    "ab_relu": (models.MLP((9, 3), functools.partial(nn.ab_relu, a=-0.3, b=0.7), w_std=1.4,
                           b_std=0.3), {}, None),
    "cnn-relu-gap": (models.CNN((3, 2), activation="relu", readout="global_average_pool",
                                w_std=1.3, b_std=0.2), {}, "images"),
    # A polynomial activation: its Hermite expansion stops at degree 3, so the truncation is
    # exact and the Hermite features are unbiased.
    "hermite-cubic": (models.MLP((9, 3), nn.elementwise(lambda u: u**3 - 0.5 * u**2 + u),
                                 w_std=0.8, b_std=0.3), {"hermite_degree": 3}, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UNBIASED_CASES))
def test_one_random_layer_is_unbiased(x64, case):
    """With exact inputs to its one random layer (arc-cosine features, TensorSRHT of the NTK
    product, the output compression; or a Hermite expansion that is exact), the estimate is
    unbiased: over 64 keys, every kernel entry's mean is within 4.5 standard errors of the exact
    kernel, and the mean is ~sqrt(64) = 8 times closer than one draw."""
    module, options, kind = UNBIASED_CASES[case]
    x = _images(n=6, shape=(4, 4, 2)) if kind else jax.random.normal(jax.random.key(1), (12, 5))
    exact = ntkjax.kernel_fn(module)(x)
    keys = 64
    draws = [_grams(feature_map(module, key=jax.random.key(s), num_features=32, **options)(x))
             for s in range(keys)]
    for which, truth in ((0, exact.nngp), (1, exact.ntk)):
        assert_unbiased_estimate(np.stack([d[which] for d in draws]), truth, closer=0.3,
                                 label=which)


def test_one_layer_relu_features_converge_to_the_arc_cosine_closed_forms(x64):
    """The exact limit of the arc-cosine features: for f(x) = v . relu(W x) / sqrt(m) the
    features (mean of 16 keys, D = 2048) reproduce the closed-form NNGP (Cho & Saul 2009) and
    NTK (Jacot et al. 2018) of ntkjax.analytic to ~1.5%; d x kernel in the NTK parameterization."""
    x = jax.random.normal(jax.random.key(1), (30, 5))
    module = models.MLP((64, 1), "relu", w_std=1.0, b_std=0.0)
    grams = [_grams(feature_map(module, key=jax.random.key(s), num_features=2048)(x))
             for s in range(16)]
    nngp = 5 * np.mean([g[0] for g in grams], axis=0)
    ntk = 5 * np.mean([g[1] for g in grams], axis=0)
    assert _rel_fro(nngp, ntkjax.two_layer_relu_nngp(x)) < 0.03
    assert _rel_fro(ntk, ntkjax.two_layer_relu_ntk(x)) < 0.03


@pytest.mark.slow
def test_ntk_error_falls_like_inverse_sqrt_of_the_features():
    """Relative Frobenius error of the approximate NTK of a depth-2 ReLU MLP on 1,000 points,
    averaged over 3 keys per D: the fitted log-log slope against D is Monte Carlo's -1/2."""
    module = models.MLP((512, 512, 1), "relu", w_std=SQRT2, b_std=0.1)
    x = jax.random.normal(jax.random.key(1), (1000, 16))
    exact = ntkjax.kernel_fn(module)(x).ntk
    error = jax.jit(lambda f: jnp.linalg.norm(jnp.matmul(f, f.T, precision="highest") - exact)
                    / jnp.linalg.norm(exact))
    sizes = [64, 128, 256, 512, 1024]
    errors = []
    for d in sizes:
        fmaps = [feature_map(module, key=jax.random.key(s), num_features=d) for s in range(3)]
        errors.append(np.mean([float(error(fmap(x).ntk)) for fmap in fmaps]))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert errors[-1] < errors[0] / 3
    assert -0.65 <= slope <= -0.35, (slope, errors)


def test_hermite_truncation_error_bounds_the_truncated_erf_kernel(x64):
    """Mehler's formula truncated at degree K differs from the closed-form erf kernel (Williams
    1997) by at most sqrt(tail(q1) tail(q2)), and at c = 1, q1 = q2 by exactly tail(q); the bound
    shrinks with K."""
    act = nn.erf
    q = jnp.asarray([0.5, 1.0, 2.0])

    @functools.partial(jax.jit, static_argnums=0)
    def check(degree):
        """(max of |error| - bound over q1, q2, c for sigma and sigma_dot, tail at c = 1)."""
        q1, q2, c = q[:, None, None], q[None, :, None], jnp.linspace(-1.0, 1.0, 21)
        exact = act.kernel_maps(c * jnp.sqrt(q1 * q2), q1, q2)
        a, b = _hermite_coefficients(act.fn, q, degree, 96)
        tails = hermite_truncation_error(act, q, degree=degree, num_quadrature=96)
        powers = c[:, None] ** jnp.arange(degree + 1)  # (C, K + 1)
        excess = []
        for coef, value, t in zip((a, b), exact, tails, strict=True):
            series = jnp.einsum("ik,jk,ck->ijc", coef, coef, powers)
            bound = jnp.sqrt(t[:, None, None] * t[None, :, None])
            excess.append(jnp.max(jnp.abs(value - series) - bound * (1 + 1e-6)))
        return excess, act.kernel_variance(q) - jnp.sum(a**2, -1), tails[0]

    for degree in (4, 8):
        excess, variance_tail, tail = check(degree)
        assert max(float(e) for e in excess) <= 1e-12
        np.testing.assert_allclose(variance_tail, tail, rtol=1e-8, atol=1e-14)
    assert float(hermite_truncation_error(act, 1.0, degree=16)[0]) < float(
        hermite_truncation_error(act, 1.0, degree=8)[0]) / 10


def test_hermite_features_of_erf_converge_to_the_kernel():
    """Non-ReLU activations take the Hermite route (two erf layers, the default degree 8);
    their kernels converge."""
    x = jax.random.normal(jax.random.key(1), (50, 6))
    module = models.MLP((64, 64, 1), "erf", w_std=1.2, b_std=0.2)
    exact = ntkjax.kernel_fn(module)(x)
    errs = []
    for d in (64, 1024):
        nngp, ntk = _grams(feature_map(module, key=jax.random.key(0), num_features=d)(x))
        errs.append((_rel_fro(nngp, exact.nngp), _rel_fro(ntk, exact.ntk)))
    assert errs[1][0] < 0.1 and errs[1][1] < 0.15, errs
    assert errs[1][0] < errs[0][0] / 2 and errs[1][1] < errs[0][1] / 2, errs


def test_shapes_dtypes_and_float64():
    """D columns exactly (compressed when wider, zero-padded when narrower), in the input's
    dtype; float32 and float64 maps with one key agree to float32 precision."""
    module = models.MLP((16, 1), "relu", w_std=SQRT2, b_std=0.1)
    x = jax.random.normal(jax.random.key(1), (10, 3))
    for d in (4, 100):
        f = feature_map(module, key=jax.random.key(0), num_features=d)(x)
        assert f.nngp.shape == f.ntk.shape == (10, d)
        assert f.nngp.dtype == f.ntk.dtype == jnp.float32
    fmap = feature_map(module, key=jax.random.key(0), num_features=64)
    f32 = fmap(x)
    with jax.enable_x64(True):
        f64 = fmap(jnp.asarray(np.asarray(x), jnp.float64))
        assert f64.nngp.dtype == f64.ntk.dtype == jnp.float64
    for a, b in zip(f32, f64, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    ints = feature_map(module, key=jax.random.key(0), num_features=8)(jnp.ones((2, 3), int))
    assert ints.nngp.dtype == jnp.float32
    unhashable = models.MLP([16, 1], "relu", w_std=SQRT2, b_std=0.1)  # a list of widths
    listed = feature_map(unhashable, key=jax.random.key(0), num_features=64)(x)
    np.testing.assert_allclose(listed.ntk, f32.ntk, rtol=1e-6, atol=1e-7)


def test_jit_vmap_and_rows_independent_of_the_batch():
    """The map is the same for every batch: rows do not depend on their batch, and the map
    under jit and vmap agrees with the plain call."""
    module = models.MLP((4, 4, 1), "relu", w_std=SQRT2, b_std=0.1)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    fmap = feature_map(module, key=jax.random.key(3), num_features=32)
    full = fmap(x)
    one = fmap(x[2:3])
    jitted = jax.jit(fmap)(x)
    mapped = jax.vmap(fmap)(x[:, None])
    for i, part in enumerate(full):
        np.testing.assert_allclose(one[i][0], part[2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jitted[i], part, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mapped[i][:, 0], part, rtol=1e-5, atol=1e-6)
    other = feature_map(module, key=jax.random.key(4), num_features=32)(x)
    assert not np.allclose(other.ntk, full.ntk)


def _rule_free_pool(x):
    """A user's layer declared (the documented recipe) with a kernel rule but no feature rule."""
    if isinstance(x, nn.FeatureStandIn):
        return _RULE_FREE.on_features(x, _rule_free_pool)
    if isinstance(x, Kernel):
        return Kernel(nngp=x.nngp, ntk=x.ntk, var1=x.var1, var2=x.var2, width=x.width)
    return x


_RULE_FREE = nn.declare(_rule_free_pool, name="tests.rule_free_pool", kernel=_rule_free_pool)


class _Uses(linen.Module):
    kind: str

    @linen.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        if self.kind == "flax":
            h = linen.Dense(4)(h)
        elif self.kind == "raw":
            h = jnp.tanh(h)
        elif self.kind == "rule-free":
            h = _rule_free_pool(h)
        return nn.Dense(1)(nn.relu(h))


@pytest.mark.parametrize("kind, match", [
    ("flax", r"flax.linen.linear.Dense .* has no random-feature rule \(meaning 'features'\); "
             r"use ntkjax.nn.Dense instead"),
    ("raw", r"jnp\.tanh \(applied after ntkjax.nn.Dense\) has no random-feature rule"),
    ("rule-free", r"tests.rule_free_pool has no random-feature rule \(meaning 'features'\)"),
])
def test_layers_without_rules_raise_naming_them(kind, match):
    fmap = feature_map(_Uses(kind), key=jax.random.key(0), num_features=8)
    with pytest.raises(ntkjax.UnsupportedMeaning, match=match):
        fmap(jnp.ones((2, 3)))
    # nothing in ntkjax.nn is patched: the layers dispatch on the stand-in's own type
    assert nn.Activation.__call__.__qualname__ == "Activation.__call__"
    assert pooling._flatten_kernel.__name__ == "_flatten_kernel"
    assert float(ntkjax.kernel_fn(models.MLP((4, 1)))(jnp.ones((1, 3))).ntk[0, 0]) > 0




# Networks whose features are Monte Carlo estimates (the measured silent failures).
CONVERGING_CASES = {
    "avg-pool": (models.CNN((3, 1), kernel_size=2, activation="relu", pooling="avg",
                            pool_strides=1, w_std=1.3, b_std=0.1), "images"),
    "sum-pool-gsp": (models.CNN((3, 1), kernel_size=2, activation="relu", pooling="sum",
                                pool_window=(2, 2), pool_strides=(2, 1), pool_padding="CIRCULAR",
                                readout="global_sum_pool", w_std=1.3, b_std=0.1), "images"),
    "relu-erf-concatenate": (_Joined("concatenate"), None),
    "relu-erf-multiply": (_Joined("multiply"), None),
    "user-function-layer": (_Joined("user"), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CONVERGING_CASES))
def test_feature_error_falls_like_inverse_sqrt_of_the_features(x64, case):
    """Pooling, branch joins and a user's declared layer: the relative Frobenius error of the
    NNGP and NTK features against kernel_fn, root-mean-square over 8 keys, has fitted log-log
    slope in [-0.65, -0.35] over D = 64 .. 4096 (Monte Carlo's -1/2), for NNGP and NTK alike."""
    module, kind = CONVERGING_CASES[case]
    x = (_images(n=4, shape=(4, 3, 2)) if kind
         else jax.random.normal(jax.random.key(1), (8, 5)))
    exact = ntkjax.kernel_fn(module)(x)
    assert_feature_error_falls_like_inverse_sqrt(
        lambda d, key: feature_map(module, key=key, num_features=d)(x), exact,
        [64, 256, 1024, 4096], 8, final_below=0.1)


def test_undeclared_function_layers_and_rule_free_layers_raise_unsupported_meaning():
    """No silent pass-through: a user's function layer without a declaration meets the stand-in
    in its array branch (a JAX function: UnsupportedMeaning naming it); layers whose meaning
    has no random-feature rule (SelfAttention, active Dropout, ConvTranspose) raise it too."""

    class Undeclared(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.Dense(1)(_undeclared_twice(nn.relu(nn.Dense(4)(x))))

    class Attention(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.flatten(nn.SelfAttention(2, 2, 2, num_heads=1)(x)))

    class Dropping(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.Dropout(0.5, deterministic=False)(nn.Dense(4)(x)))

    class Transposed(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.flatten(nn.ConvTranspose(2, kernel_size=2)(x)))

    cases = [(Undeclared(), jnp.ones((2, 3)), r"jnp\.asarray .*random-feature rule"),
             (Attention(), jnp.ones((2, 3, 2)), "ntkjax.nn.SelfAttention has no random-feature"),
             (Dropping(), jnp.ones((2, 3)), "ntkjax.nn.Dropout has no random-feature rule"),
             (Transposed(), jnp.ones((2, 3, 2)), "ntkjax.nn.ConvTranspose has no random-feat")]
    for module, x, match in cases:
        with pytest.raises(ntkjax.UnsupportedMeaning, match=match) as info:
            feature_map(module, key=jax.random.key(0), num_features=8)(x)
        assert info.value.meaning == "features"
    # inactive dropout is the identity in every meaning
    inactive = models.MLP((4, 1))
    feature_map(inactive, key=jax.random.key(0), num_features=8)(jnp.ones((2, 3)))


def test_bad_arguments_raise():
    spatial = models.CNN((2, 1), activation="relu")

    class KeepsSpace(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(2, kernel_size=3)(x))

    with pytest.raises(ValueError, match="spatial"):
        feature_map(KeepsSpace(), key=jax.random.key(0), num_features=8)(_images())
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_features"):
            feature_map(spatial, key=jax.random.key(0), num_features=bad)
    with pytest.raises(ValueError, match="leading batch axis"):
        feature_map(spatial, key=jax.random.key(0), num_features=8)(jnp.ones(3))


def _kernel_ridge(phi_train, phi_test, y, diag_reg):
    """Kernel ridge regression with K = Phi Phi^T, solved directly."""
    k = phi_train @ phi_train.T
    lam = diag_reg * np.trace(k) / k.shape[0]
    return phi_test @ phi_train.T @ np.linalg.solve(k + lam * np.eye(k.shape[0]), y)


@pytest.mark.parametrize("n", [50, 300])  # n <= D: dual solve; n > D: streamed D x D solve
def test_feature_ridge_is_kernel_ridge_on_the_features(x64, n, capsys):
    module = models.MLP((32, 2), "relu", w_std=SQRT2, b_std=0.1)
    x = np.asarray(jax.random.normal(jax.random.key(1), (n, 4)))
    x_test = np.asarray(jax.random.normal(jax.random.key(2), (7, 4)))
    y = np.sin(x[:, :2]) + 0.1 * x[:, 2:]
    fmap = feature_map(module, key=jax.random.key(0), num_features=64)
    get = "ntk" if n > 64 else "nngp"
    fit = feature_ridge(fmap, x, y, get=get, diag_reg=1e-3, batch_size=37, show_progress=True)
    phi = np.asarray(getattr(fmap(np.concatenate([x, x_test])), get))
    np.testing.assert_allclose(fit.predict(x_test), _kernel_ridge(phi[:n], phi[n:], y, 1e-3),
                               rtol=1e-7, atol=1e-9)
    assert fit.weights.shape == (64, 2) and fit.num_train == n
    assert "feature ridge" in capsys.readouterr().err
    one = feature_ridge(fmap, x, y[:, 0], diag_reg=1e-3, batch_size=64)
    assert one.weights.shape == (64,) and one.predict(x_test, batch_size=3).shape == (7,)


def test_feature_ridge_interpolates_without_a_ridge_and_rejects_bad_input(x64):
    """With diag_reg = 0 and fewer points than features: the minimum-norm interpolant."""
    module = models.MLP((16, 1), "relu", w_std=SQRT2, b_std=0.1)
    fmap = feature_map(module, key=jax.random.key(0), num_features=64)
    x = np.asarray(jax.random.normal(jax.random.key(1), (20, 3)))
    y = x[:, :1] ** 2
    fit = feature_ridge(fmap, x, y)
    np.testing.assert_allclose(fit.predict(x), y, atol=1e-8)
    with pytest.raises(ValueError, match="y must have shape"):
        feature_ridge(fmap, x, y[:5])
    with pytest.raises(ValueError, match="diag_reg"):
        feature_ridge(fmap, x, y, diag_reg=-1.0)
    with pytest.raises(ValueError, match="unknown get"):
        feature_ridge(fmap, x, y, get="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        feature_ridge(fmap, x, y, batch_size=0)


@pytest.mark.slow
def test_digits_ntk_feature_regression_matches_exact_ntk_regression():
    """scikit-learn digits, stratified 70/30: NTK-feature ridge regression with D = 8,192 is
    within 0.5 percentage points of exact NTK kernel ridge regression with the same ridge
    (1e-4 x the mean diagonal), for a one-hidden-layer ReLU network (the depth-2 demo network's
    accuracy against D is measured by benchmarks/bench_features.py: ntk_features_digits)."""
    from ntkjax.study.datasets import load_digits

    digits = load_digits()
    module = models.MLP((512, 10), "relu", w_std=SQRT2, b_std=0.1)
    labels = np.asarray(digits.labels_test)
    accuracy = lambda scores: float(np.mean(np.argmax(np.asarray(scores), -1) == labels))
    with jax.enable_x64(True):
        as64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
        k_tt = np.asarray(ntkjax.kernel_fn(module)(as64(digits.x_train)).ntk)
        k_xt = np.asarray(ntkjax.kernel_fn(module)(as64(digits.x_test),
                                                   as64(digits.x_train)).ntk)
    exact = accuracy(_kernel_ridge_from_kernels(k_tt, k_xt, np.asarray(digits.y_train), 1e-4))
    fmap = feature_map(module, key=jax.random.key(0), num_features=8192)
    fit = feature_ridge(fmap, digits.x_train, digits.y_train, diag_reg=1e-4)
    approx = accuracy(fit.predict(digits.x_test))
    assert exact > 0.97
    assert abs(approx - exact) <= 0.005, (approx, exact)


def _kernel_ridge_from_kernels(k_tt, k_xt, y, diag_reg):
    lam = diag_reg * np.trace(k_tt) / k_tt.shape[0]
    return k_xt @ np.linalg.solve(k_tt + lam * np.eye(k_tt.shape[0]), y)


@pytest.mark.parametrize("n", [20, 80])  # n <= D (dual solve) and n > D (streamed solve)
def test_feature_ridge_names_the_argument_holding_nan_or_inf(n):
    # today these reach SciPy / LAPACK, whose errors name no argument
    fmap = feature_map(models.MLP((16, 1), "relu"), key=jax.random.key(0), num_features=32)
    x = np.asarray(jax.random.normal(jax.random.key(1), (n, 3)))
    y = np.cos(x[:, :1])
    bad_y = y.copy()
    bad_y[n - 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^y .*holds 1 non-finite"):
        feature_ridge(fmap, x, bad_y, batch_size=16)
    bad_x = x.copy()
    bad_x[n - 2, 1] = np.inf
    first = (n - 2) // 16 * 16  # the batch of rows holding the bad value
    with pytest.raises(ValueError, match=rf"^x \(rows {first} to {n - 1}\) holds 1 non-finite"):
        feature_ridge(fmap, bad_x, y, batch_size=16)
    for reg in (np.inf, np.nan):
        with pytest.raises(ValueError, match="diag_reg must be finite and >= 0"):
            feature_ridge(fmap, x, y, diag_reg=reg)
    # finite inputs whose features overflow float32 (their squares reach ~1e60)
    with pytest.raises(ValueError, match="features of x overflowed float32"):
        feature_ridge(fmap, (x * 1e30).astype(np.float32), y, batch_size=16)


class _ActNet(linen.Module):
    act: str

    @linen.compact
    def __call__(self, x):
        return nn.Dense(1)(getattr(nn, self.act)(nn.Dense(8, w_std=1.2, b_std=0.2)(x)))


def test_hermite_degree_is_raised_to_the_truncation_tolerance(x64):
    """gabor at these inputs' variances needs more than degree 8 for a relative truncation error
    of 1e-2 (hermite_truncation_error against its closed-form second moment, outside the
    features): a fixed degree 8 is refused naming it; the automatic degree gives features, the
    same map for every later batch. sign's coefficients decay too slowly: refused at 64."""
    x = np.random.default_rng(3).standard_normal((4, 3)) * 0.6
    q = jnp.asarray(1.2**2 * np.sum(x * x, 1) / 3 + 0.2**2)  # the activation's input variances
    tail = np.asarray(hermite_truncation_error(nn.gabor, q, degree=8, num_quadrature=256)[1])
    second = np.asarray(nn.gabor.kernel_maps(q, q, q)[1])
    assert np.max(tail / second) > 1e-2  # degree 8 is not enough here
    key = jax.random.key(0)
    with pytest.raises(ntkjax.UnsupportedMeaning, match="degree-8 Hermite"):
        ntkjax.feature_map(_ActNet("gabor"), key=key, num_features=16, hermite_degree=8)(x)
    fmap = ntkjax.feature_map(_ActNet("gabor"), key=key, num_features=16)
    f = fmap(x)
    assert fmap(x[:2] * 0.1).ntk.shape == (2, 16)  # smaller variances: the same degree
    np.testing.assert_allclose(fmap(x[:2]).ntk, f.ntk[:2], rtol=1e-12, atol=1e-14)  # one map
    with pytest.raises(ntkjax.UnsupportedMeaning, match="degree-64 Hermite"):
        ntkjax.feature_map(_ActNet("sign"), key=key, num_features=16)(x)
