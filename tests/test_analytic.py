"""Kernel maps of ntkjax.analytic against truths computed independently here: 1-D and 2-D
numerical integration, Price's theorem (sigma_dot = d sigma / d q12) by autodiff, limits at
angle 0 and pi, homogeneity, and the empirical NTK of a two-layer network."""

from __future__ import annotations

import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import ntkjax
from ntkjax import analytic, models

# (q12, q11, q22) triples covering positive, negative, near-parallel and unequal variances.
TRIPLES = [(0.5, 1.0, 2.0), (-0.6, 0.3, 1.7), (1.99, 2.0, 2.0), (0.0, 0.5, 0.5), (0.05, 0.1, 3.0)]

_PHI = {
    "relu": (lambda x: np.maximum(x, 0), lambda x: (x > 0) * 1.0),
    "abs": (np.abs, np.sign),
    "erf": (special.erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-x * x)),
    "gelu": (
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi),
    ),
    "sin": (np.sin, np.cos),
    "cos": (np.cos, lambda x: -np.sin(x)),
    "identity": (lambda x: x, lambda x: np.ones_like(x)),
}
SMOOTH = ["erf", "gelu", "sin", "cos"]


def _gauss_2d(phi, q12, q11, q22, n=120):
    """E[phi(u) phi(v)] by a tensor Gauss-Hermite rule in numpy (for smooth phi)."""
    z, w = np.polynomial.hermite.hermgauss(n)
    z, w = z * np.sqrt(2), w / np.sqrt(np.pi)
    chol = np.linalg.cholesky(np.array([[q11, q12], [q12, q22]]) + 1e-300 * np.eye(2))
    u = chol[0, 0] * z[:, None] + 0 * z[None, :]
    v = chol[1, 0] * z[:, None] + chol[1, 1] * z[None, :]
    return float(np.sum(w[:, None] * w[None, :] * phi(u) * phi(v)))


def _quad_2d(phi, q12, q11, q22):
    """E[phi(u) phi(v)] by adaptive quadrature, split at u = 0 for kinks."""
    chol = np.linalg.cholesky(np.array([[q11, q12], [q12, q22]]))
    dens = lambda a, b: np.exp(-(a * a + b * b) / 2) / (2 * np.pi)

    def f(b, a):
        return phi(chol[0, 0] * a) * phi(chol[1, 0] * a + chol[1, 1] * b) * dens(a, b)

    total = 0.0
    for lo, hi in ((-10, 0), (0, 10)):
        # inner integral over b, split where v changes sign
        def inner(a):
            cut = -chol[1, 0] * a / chol[1, 1]
            return sum(
                integrate.quad(lambda b: f(b, a), lo2, hi2, epsabs=1e-13, epsrel=1e-12)[0]
                for lo2, hi2 in ((-10, min(max(cut, -10), 10)), (min(max(cut, -10), 10), 10))
            )

        total += integrate.quad(inner, lo, hi, epsabs=1e-12, epsrel=1e-11)[0]
    return total


@pytest.mark.parametrize("name", [*SMOOTH, "identity"])
@pytest.mark.parametrize("triple", TRIPLES)
def test_smooth_maps_match_two_dimensional_quadrature(name, triple, x64):
    phi, dphi = _PHI[name]
    q12, q11, q22 = triple
    maps = getattr(analytic, name)(jnp.float64(q12), q11, q22)
    np.testing.assert_allclose(float(maps.sigma), _gauss_2d(phi, *triple), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        float(maps.sigma_dot), _gauss_2d(dphi, *triple), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("name", ["relu", "abs"])
@pytest.mark.parametrize("triple", TRIPLES[:2])
def test_kinked_maps_match_adaptive_quadrature(name, triple, x64):
    phi, dphi = _PHI[name]
    maps = getattr(analytic, name)(jnp.float64(triple[0]), triple[1], triple[2])
    np.testing.assert_allclose(float(maps.sigma), _quad_2d(phi, *triple), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(
        float(maps.sigma_dot), _quad_2d(dphi, *triple), rtol=1e-7, atol=1e-10
    )


def test_ab_relu_is_linear_plus_relu(x64):
    q12, q11, q22 = jnp.float64(0.3), 0.8, 1.4
    a, b = -0.4, 1.7
    got = analytic.ab_relu(q12, q11, q22, a, b)
    relu = analytic.relu(q12, q11, q22)
    # phi = a x + (b - a) relu(x); E[u relu(v)] = q12 / 2, E[1 * relu'(v)] = 1/2
    want_sigma = a * a * q12 + 2 * a * (b - a) * q12 / 2 + (b - a) ** 2 * relu.sigma
    want_dot = a * a + 2 * a * (b - a) / 2 + (b - a) ** 2 * relu.sigma_dot
    np.testing.assert_allclose(got.sigma, want_sigma, rtol=1e-13)
    np.testing.assert_allclose(got.sigma_dot, want_dot, rtol=1e-13)
    leaky = analytic.leaky_relu(q12, q11, q22, 0.1)
    np.testing.assert_allclose(leaky.sigma, analytic.ab_relu(q12, q11, q22, 0.1, 1.0).sigma)


def test_rbf_map_is_the_rbf_kernel(x64):
    q12, q11, q22 = jnp.float64(0.4), 1.1, 0.7
    for gamma in (0.5, 2.0):
        phi = lambda x, g=gamma: np.sqrt(2) * np.sin(np.sqrt(2 * g) * x + np.pi / 4)
        maps = analytic.rbf(q12, q11, q22, gamma)
        np.testing.assert_allclose(maps.sigma, np.exp(-gamma * (q11 + q22 - 2 * q12)), rtol=1e-13)
        np.testing.assert_allclose(maps.sigma, _gauss_2d(phi, 0.4, q11, q22), rtol=1e-9)
        np.testing.assert_allclose(maps.sigma_dot, 2 * gamma * maps.sigma, rtol=1e-13)


def test_sign_map_is_sheppards_formula(x64):
    c = jnp.linspace(-1, 1, 11, dtype=jnp.float64)
    maps = analytic.sign(c * 2.0, 2.0, 2.0)
    np.testing.assert_allclose(maps.sigma, 1 - 2 * np.arccos(np.asarray(c)) / np.pi, atol=1e-14)
    assert np.all(np.asarray(maps.sigma_dot) == 0)


@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "cos", "relu", "abs"])
def test_price_theorem_sigma_dot_is_the_derivative_of_sigma(name, x64):
    fn = getattr(analytic, name)
    for q12, q11, q22 in TRIPLES[:2] + TRIPLES[3:]:
        grad = jax.grad(lambda q, a=q11, b=q22: fn(q, a, b).sigma)(jnp.float64(q12))
        np.testing.assert_allclose(
            grad, fn(jnp.float64(q12), q11, q22).sigma_dot, rtol=1e-7, atol=1e-12
        )


_VARIANCE_PHI = {
    "relu": analytic.relu_variance,
    "abs": analytic.abs_variance,
    "erf": analytic.erf_variance,
    "gelu": analytic.gelu_variance,
    "sin": analytic.sin_variance,
    "cos": analytic.cos_variance,
    "identity": analytic.identity_variance,
}


@pytest.mark.parametrize("name", list(_VARIANCE_PHI))
def test_variances_are_second_moments(name, x64):
    phi = _PHI[name][0]
    for q in (0.0, 0.3, 2.0, 7.5):
        want = integrate.quad(
            lambda z, q=q: phi(np.sqrt(q) * z) ** 2 * np.exp(-z * z / 2) / np.sqrt(2 * np.pi),
            -12, 12, points=[0.0], epsabs=1e-14, epsrel=1e-12,
        )[0]
        got = _VARIANCE_PHI[name](jnp.float64(q))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        # and the map's diagonal agrees with the variance
        diag = getattr(analytic, name)(jnp.float64(q), q, q).sigma
        np.testing.assert_allclose(diag, want, rtol=1e-10, atol=1e-14)
    leaky = analytic.leaky_relu_variance(jnp.float64(2.0), 0.2)
    np.testing.assert_allclose(leaky, (1 + 0.04) * 2.0 / 2, rtol=1e-14)
    np.testing.assert_allclose(analytic.sign_variance(jnp.array([0.0, 3.0])), [0.0, 1.0])
    np.testing.assert_allclose(analytic.rbf_variance(jnp.array([0.5, 3.0]), 2.0), [1.0, 1.0])


def _qs():
    """Test triples as float64 arrays (call under the x64 fixture)."""
    return (jnp.array([0.5, -0.6, 1.99, 0.0, 0.05, 0.3]),
            jnp.array([1.0, 0.3, 2.0, 0.5, 0.1, 1.0]),
            jnp.array([2.0, 1.7, 2.0, 0.5, 3.0, 1.0]))


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# documented accuracy of the 64-node quadrature (sigma, sigma_dot), with a little headroom
@pytest.mark.parametrize(
    ("name", "fn", "tol_sigma", "tol_dot"),
    [
        ("sin", jnp.sin, 1e-13, 1e-13),
        ("cos", jnp.cos, 1e-13, 1e-13),
        ("gelu", lambda x: jax.nn.gelu(x, approximate=False), 1e-10, 1e-10),
        ("erf", jax.lax.erf, 1e-7, 1e-6),
        ("relu", jax.nn.relu, 2e-3, 4e-2),
    ],
)
def test_elementwise_quadrature_accuracy_against_closed_forms(name, fn, tol_sigma, tol_dot, x64):
    q12, q11, q22 = _qs()
    got = analytic.elementwise(q12, q11, q22, fn)
    want = getattr(analytic, name)(q12, q11, q22)
    assert _rel(got.sigma, want.sigma) < tol_sigma
    assert _rel(got.sigma_dot, want.sigma_dot) < tol_dot
    np.testing.assert_allclose(
        analytic.elementwise_variance(q11, fn), getattr(analytic, f"{name}_variance")(q11),
        rtol=10 * tol_sigma,
    )


def test_elementwise_quadrature_converges_with_more_nodes(x64):
    qs = _qs()
    errors = [
        _rel(analytic.elementwise(*qs, jax.lax.erf, n).sigma_dot, analytic.erf(*qs).sigma_dot)
        for n in (16, 32, 64, 128)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-11


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_angle_zero_and_pi_and_zero_vectors_are_finite_and_exact(dtype, x64):
    q = jnp.asarray([0.0, 1e-3, 1.0, 1e3], dtype)
    for name in ["relu", "abs", "erf", "gelu", "sin", "cos", "sign", "identity"]:
        fn = getattr(analytic, name)
        for q12 in (q, -q):  # angle 0 and angle pi
            maps = fn(q12, q, q)
            assert maps.sigma.dtype == dtype
            assert np.all(np.isfinite(maps.sigma)) and np.all(np.isfinite(maps.sigma_dot)), name
    relu0, relu_pi = analytic.relu(q, q, q), analytic.relu(-q, q, q)
    np.testing.assert_allclose(relu0.sigma, q / 2, rtol=1e-6)
    np.testing.assert_allclose(relu0.sigma_dot[1:], 0.5, rtol=1e-6)
    np.testing.assert_allclose(relu_pi.sigma, 0.0, atol=1e-6)
    np.testing.assert_allclose(relu_pi.sigma_dot[1:], 0.0, atol=1e-6)
    # a zero-variance input has zero kernel with everything
    zero = analytic.relu(jnp.zeros(3, dtype), jnp.zeros(3, dtype), jnp.asarray([0.0, 1, 2], dtype))
    assert np.all(np.asarray(zero.sigma) == 0)


def test_correlation_is_snapped_at_identical_inputs_in_float32():
    # q12 equal to the variances up to a few ulps: angle 0 exactly
    q = jnp.asarray([0.37, 1.3, 11.0], jnp.float32)
    q12 = q * (1 + 3 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(analytic.correlation(q12, q, q), 1.0)
    np.testing.assert_array_equal(analytic.correlation(-q12, q, q), -1.0)
    np.testing.assert_allclose(analytic.relu(q12, q, q).sigma_dot, 0.5, rtol=1e-7)


def test_fast_arccos_matches_float64(x64):
    c = jnp.linspace(-1, 1, 20001)
    want = analytic.relu(c, 1.0, 1.0)
    got = analytic.relu(c.astype(jnp.float32), 1.0, 1.0)
    assert float(jnp.max(jnp.abs(got.sigma - want.sigma))) < 3e-7
    assert float(jnp.max(jnp.abs(got.sigma_dot - want.sigma_dot))) < 3e-7


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15, 1e30])
def test_huge_and_tiny_scales_float32(scale):
    # relu's map is homogeneous: sigma(a q) = a sigma(q); erf saturates; rbf of scaled q
    q12 = jnp.asarray([0.3, -0.2, 0.9], jnp.float32)
    q11 = jnp.asarray([0.5, 1.0, 1.0], jnp.float32)
    q22 = jnp.asarray([1.0, 0.7, 1.0], jnp.float32)
    base = analytic.relu(q12, q11, q22)
    big = analytic.relu(q12 * scale, q11 * scale, q22 * scale)
    np.testing.assert_allclose(big.sigma / scale, base.sigma, rtol=2e-6)
    np.testing.assert_allclose(big.sigma_dot, base.sigma_dot, rtol=2e-6)
    for name in ["erf", "gelu", "sin", "cos"]:
        maps = getattr(analytic, name)(q12 * scale, q11 * scale, q22 * scale)
        assert np.all(np.isfinite(maps.sigma)) and np.all(np.isfinite(maps.sigma_dot)), name
    with jax.enable_x64(True):
        q64 = [jnp.asarray(a, jnp.float64) * scale for a in (q12, q11, q22)]
        for name in ["erf", "gelu"]:
            want = getattr(analytic, name)(*q64)
            got = getattr(analytic, name)(*(a.astype(jnp.float32) for a in q64))
            np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-5, atol=1e-37)
            np.testing.assert_allclose(got.sigma_dot, want.sigma_dot, rtol=1e-5, atol=1e-37)


def test_dense_rule_rejects_unknown_parameterization():
    with pytest.raises(ValueError, match="parameterization"):
        analytic.dense(jnp.ones(2), jnp.ones(2), w_std=1.0, b_std=0.0, parameterization="mup")


# --- the study notebook's two-layer ReLU network ------------------------------------------


def _notebook_formula(x1, x2):
    """The notebook's expression, evaluated in numpy."""
    dot = x1 @ x2.T
    norms = np.linalg.norm(x1, axis=1)[:, None] * np.linalg.norm(x2, axis=1)[None, :]
    t = np.arccos(np.clip(dot / norms, -1, 1))
    return norms * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi), dot, t


def test_two_layer_functions_formulas_and_relation_to_kernel_fn(x64):
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = np.random.default_rng(1).normal(size=(4, 3))
    nngp, dot, t = _notebook_formula(x, y)
    np.testing.assert_allclose(ntkjax.two_layer_relu_nngp(x, y), nngp, rtol=1e-12)
    np.testing.assert_allclose(
        ntkjax.two_layer_relu_ntk(x, y), nngp + dot * (np.pi - t) / (2 * np.pi), rtol=1e-12
    )
    # d * (NTK-parameterised MLP with w_std = 1, no bias): the same network
    k = ntkjax.kernel_fn(models.MLP((64, 1), "relu", w_std=1.0, b_std=0.0))(x, y)
    np.testing.assert_allclose(3 * k.ntk, ntkjax.two_layer_relu_ntk(x, y), rtol=1e-12)
    np.testing.assert_allclose(3 * k.nngp, ntkjax.two_layer_relu_nngp(x, y), rtol=1e-12)
    # x2 = None is x2 = x1, symmetric
    sym = np.asarray(ntkjax.two_layer_relu_ntk(x))
    np.testing.assert_allclose(sym, sym.T, rtol=1e-14)


@pytest.mark.slow
def test_empirical_ntk_of_two_layer_relu_converges_to_the_ntk_not_the_nngp(x64):
    """f(x) = (1/sqrt m) sum_j v_j relu(w_j . x), w_j ~ N(0, I), v_j ~ N(0, 1): the float64
    Jacobian contraction over (w, v), averaged over networks, approaches two_layer_relu_ntk."""
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 3), jnp.float64)
    m, seeds = 4096, 16

    def f(params, xs):
        w, v = params
        return jax.nn.relu(xs @ w) @ v / np.sqrt(m)

    def empirical_ntk(key):
        kw, kv = jax.random.split(key)
        params = (jax.random.normal(kw, (3, m), jnp.float64),
                  jax.random.normal(kv, (m,), jnp.float64))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        jac = jax.jacrev(lambda p: f(unravel(p), x))(flat)
        return jac @ jac.T

    mean = jnp.mean(jax.vmap(empirical_ntk)(jax.random.split(jax.random.PRNGKey(0), seeds)), 0)
    ntk, nngp = ntkjax.two_layer_relu_ntk(x), ntkjax.two_layer_relu_nngp(x)
    err = lambda a: float(jnp.linalg.norm(mean - a) / jnp.linalg.norm(a))
    assert err(ntk) < 0.02
    assert err(nngp) > 0.25  # the NNGP misses the first layer's gradient (~half the NTK)
    assert float(jnp.linalg.norm(ntk - nngp) / jnp.linalg.norm(ntk)) > 0.25


# ---- convolutions: patch averaging against explicit patches ----


def _numpy_patches(x, window, strides, padding):
    """(N, *out, |K| C) patch vectors of NHWC-like x, built with plain numpy loops: zero (SAME)
    or periodic (CIRCULAR) padding, SAME's padding split as in the TensorFlow/XLA convention
    (total = max((ceil(n/s) - 1) s + k - n, 0), the smaller half in front)."""
    nd = len(window)
    pads = []
    for n, k, s in zip(x.shape[1:-1], window, strides, strict=True):
        if padding == "VALID":
            pads.append((0, 0))
        elif padding == "CIRCULAR":
            pads.append(((k - 1) // 2, k // 2))
        else:
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
    mode = "wrap" if padding == "CIRCULAR" else "constant"
    xp = np.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
    outs = [(xp.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(nd)]
    patches = np.zeros((x.shape[0], *outs, int(np.prod(window)) * x.shape[-1]))
    for o in itertools.product(*map(range, outs)):
        parts = [
            xp[(slice(None), *(o[i] * strides[i] + d[i] for i in range(nd)))]
            for d in itertools.product(*map(range, window))
        ]
        patches[(slice(None), *o)] = np.concatenate(parts, axis=-1)
    return patches


CONV_CASES = [
    ((3, 3), (1, 1), "SAME", (6, 5)),
    ((3, 2), (2, 1), "SAME", (7, 5)),
    ((2, 3), (2, 2), "VALID", (6, 7)),
    ((3, 3), (1, 2), "CIRCULAR", (5, 6)),
    ((4,), (3,), "SAME", (9,)),
    ((3,), (1,), "VALID", (7,)),
]


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"), CONV_CASES)
def test_patch_average_is_the_kernel_of_explicit_patches(window, strides, padding, spatial, x64):
    rng = np.random.default_rng(0)
    c = 2
    x1, x2 = rng.normal(size=(3, *spatial, c)), rng.normal(size=(2, *spatial, c))
    nd = len(spatial)
    flat1, flat2 = x1.reshape(3, -1, c), x2.reshape(2, -1, c)
    gram = np.einsum("apc,bqc->abpq", flat1, flat2).reshape(3, 2, *spatial, *spatial) / c
    got = analytic.patch_average(
        jnp.asarray(gram), batch_ndim=2, window=window, strides=strides, padding=padding
    )
    p1, p2 = (_numpy_patches(x, window, strides, padding) for x in (x1, x2))
    outs = p1.shape[1:-1]
    want = np.einsum(
        "apc,bqc->abpq", p1.reshape(3, -1, p1.shape[-1]), p2.reshape(2, -1, p2.shape[-1])
    ).reshape(3, 2, *outs, *outs) / p1.shape[-1]
    assert got.shape == want.shape and got.ndim == 2 + 2 * nd
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_patch_average_keeps_dtype_and_rejects_bad_shapes():
    k = jnp.ones((2, 2, 4, 4, 4, 4), jnp.float32)
    assert analytic.patch_average(k, batch_ndim=2, window=(3, 3)).dtype == jnp.float32
    with pytest.raises(ValueError, match="spatial axes"):
        analytic.patch_average(k, batch_ndim=2, window=(3,))
    with pytest.raises(ValueError, match="padding"):
        analytic.patch_average(k, batch_ndim=2, window=(3, 3), padding="REFLECT")
    with pytest.raises(ValueError, match="does not fit"):
        analytic.patch_average(k, batch_ndim=2, window=(5, 5), padding="VALID")
