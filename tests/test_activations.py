"""Activations (ntkjax.nn.activations): kernel maps against truths computed independently here --
1-D and 2-D numerical integration, Price's theorem (sigma_dot = d sigma / d q12) by autodiff, limits
at angle 0 and pi, homogeneity -- and each activation on arrays and on Kernels."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import ntkjax
from ntkjax import nn
from ntkjax.nn import activations

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
    maps = getattr(nn, name).kernel_maps(jnp.float64(q12), q11, q22)
    np.testing.assert_allclose(float(maps.sigma), _gauss_2d(phi, *triple), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        float(maps.sigma_dot), _gauss_2d(dphi, *triple), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("name", ["relu", "abs"])
@pytest.mark.parametrize("triple", TRIPLES[:2])
def test_kinked_maps_match_adaptive_quadrature(name, triple, x64):
    phi, dphi = _PHI[name]
    maps = getattr(nn, name).kernel_maps(jnp.float64(triple[0]), triple[1], triple[2])
    np.testing.assert_allclose(float(maps.sigma), _quad_2d(phi, *triple), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(
        float(maps.sigma_dot), _quad_2d(dphi, *triple), rtol=1e-7, atol=1e-10
    )


def test_ab_relu_is_linear_plus_relu(x64):
    q12, q11, q22 = jnp.float64(0.3), 0.8, 1.4
    a, b = -0.4, 1.7
    got = nn.ab_relu.kernel_maps(q12, q11, q22, a, b)
    relu = nn.relu.kernel_maps(q12, q11, q22)
    # phi = a x + (b - a) relu(x); E[u relu(v)] = q12 / 2, E[1 * relu'(v)] = 1/2
    want_sigma = a * a * q12 + 2 * a * (b - a) * q12 / 2 + (b - a) ** 2 * relu.sigma
    want_dot = a * a + 2 * a * (b - a) / 2 + (b - a) ** 2 * relu.sigma_dot
    np.testing.assert_allclose(got.sigma, want_sigma, rtol=1e-13)
    np.testing.assert_allclose(got.sigma_dot, want_dot, rtol=1e-13)
    leaky = nn.leaky_relu.kernel_maps(q12, q11, q22, 0.1)
    np.testing.assert_allclose(leaky.sigma, nn.ab_relu.kernel_maps(q12, q11, q22, 0.1, 1.0).sigma)


def test_rbf_map_is_the_rbf_kernel(x64):
    q12, q11, q22 = jnp.float64(0.4), 1.1, 0.7
    for gamma in (0.5, 2.0):
        phi = lambda x, g=gamma: np.sqrt(2) * np.sin(np.sqrt(2 * g) * x + np.pi / 4)
        maps = nn.rbf.kernel_maps(q12, q11, q22, gamma)
        np.testing.assert_allclose(maps.sigma, np.exp(-gamma * (q11 + q22 - 2 * q12)), rtol=1e-13)
        np.testing.assert_allclose(maps.sigma, _gauss_2d(phi, 0.4, q11, q22), rtol=1e-9)
        np.testing.assert_allclose(maps.sigma_dot, 2 * gamma * maps.sigma, rtol=1e-13)


def test_sign_map_is_sheppards_formula(x64):
    c = jnp.linspace(-1, 1, 11, dtype=jnp.float64)
    maps = nn.sign.kernel_maps(c * 2.0, 2.0, 2.0)
    np.testing.assert_allclose(maps.sigma, 1 - 2 * np.arccos(np.asarray(c)) / np.pi, atol=1e-14)
    assert np.all(np.asarray(maps.sigma_dot) == 0)


@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "cos", "relu", "abs"])
def test_price_theorem_sigma_dot_is_the_derivative_of_sigma(name, x64):
    fn = getattr(nn, name).kernel_maps
    for q12, q11, q22 in TRIPLES[:2] + TRIPLES[3:]:
        grad = jax.grad(lambda q, a=q11, b=q22: fn(q, a, b).sigma)(jnp.float64(q12))
        np.testing.assert_allclose(
            grad, fn(jnp.float64(q12), q11, q22).sigma_dot, rtol=1e-7, atol=1e-12
        )


_VARIANCE_PHI = {
    "relu": nn.relu.kernel_variance,
    "abs": nn.abs.kernel_variance,
    "erf": nn.erf.kernel_variance,
    "gelu": nn.gelu.kernel_variance,
    "sin": nn.sin.kernel_variance,
    "cos": nn.cos.kernel_variance,
    "identity": nn.identity.kernel_variance,
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
        diag = getattr(nn, name).kernel_maps(jnp.float64(q), q, q).sigma
        np.testing.assert_allclose(diag, want, rtol=1e-10, atol=1e-14)
    leaky = nn.leaky_relu.kernel_variance(jnp.float64(2.0), 0.2)
    np.testing.assert_allclose(leaky, (1 + 0.04) * 2.0 / 2, rtol=1e-14)
    np.testing.assert_allclose(nn.sign.kernel_variance(jnp.array([0.0, 3.0])), [0.0, 1.0])
    np.testing.assert_allclose(nn.rbf.kernel_variance(jnp.array([0.5, 3.0]), 2.0), [1.0, 1.0])


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
    got = activations.gauss_hermite_maps(q12, q11, q22, fn)
    want = getattr(nn, name).kernel_maps(q12, q11, q22)
    assert _rel(got.sigma, want.sigma) < tol_sigma
    assert _rel(got.sigma_dot, want.sigma_dot) < tol_dot
    np.testing.assert_allclose(
        activations.gauss_hermite_variance(q11, fn), getattr(nn, name).kernel_variance(q11),
        rtol=10 * tol_sigma,
    )


def test_elementwise_quadrature_converges_with_more_nodes(x64):
    qs = _qs()
    errors = [
        _rel(activations.gauss_hermite_maps(*qs, jax.lax.erf, n).sigma_dot,
             nn.erf.kernel_maps(*qs).sigma_dot)
        for n in (16, 32, 64, 128)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-11


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_angle_zero_and_pi_and_zero_vectors_are_finite_and_exact(dtype, x64):
    q = jnp.asarray([0.0, 1e-3, 1.0, 1e3], dtype)
    for name in ["relu", "abs", "erf", "gelu", "sin", "cos", "sign", "identity"]:
        fn = getattr(nn, name).kernel_maps
        for q12 in (q, -q):  # angle 0 and angle pi
            maps = fn(q12, q, q)
            assert maps.sigma.dtype == dtype
            assert np.all(np.isfinite(maps.sigma)) and np.all(np.isfinite(maps.sigma_dot)), name
    relu0, relu_pi = nn.relu.kernel_maps(q, q, q), nn.relu.kernel_maps(-q, q, q)
    np.testing.assert_allclose(relu0.sigma, q / 2, rtol=1e-6)
    np.testing.assert_allclose(relu0.sigma_dot[1:], 0.5, rtol=1e-6)
    np.testing.assert_allclose(relu_pi.sigma, 0.0, atol=1e-6)
    np.testing.assert_allclose(relu_pi.sigma_dot[1:], 0.0, atol=1e-6)
    # a zero-variance input has zero kernel with everything
    zero = nn.relu.kernel_maps(
        jnp.zeros(3, dtype), jnp.zeros(3, dtype), jnp.asarray([0.0, 1, 2], dtype)
    )
    assert np.all(np.asarray(zero.sigma) == 0)


@pytest.mark.xla_optimized
def test_correlation_is_snapped_at_identical_inputs_in_float32():
    # q12 equal to the variances up to a few ulps: angle 0 exactly
    q = jnp.asarray([0.37, 1.3, 11.0], jnp.float32)
    q12 = q * (1 + 3 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(activations.correlation(q12, q, q), 1.0)
    np.testing.assert_array_equal(activations.correlation(-q12, q, q), -1.0)
    np.testing.assert_allclose(nn.relu.kernel_maps(q12, q, q).sigma_dot, 0.5, rtol=1e-7)


def test_fast_arccos_matches_float64(x64):
    c = jnp.linspace(-1, 1, 20001)
    want = nn.relu.kernel_maps(c, 1.0, 1.0)
    got = nn.relu.kernel_maps(c.astype(jnp.float32), 1.0, 1.0)
    assert float(jnp.max(jnp.abs(got.sigma - want.sigma))) < 3e-7
    assert float(jnp.max(jnp.abs(got.sigma_dot - want.sigma_dot))) < 3e-7


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15, 1e30])
@pytest.mark.xla_optimized
def test_huge_and_tiny_scales_float32(scale):
    # relu's map is homogeneous: sigma(a q) = a sigma(q); erf saturates; rbf of scaled q
    q12 = jnp.asarray([0.3, -0.2, 0.9], jnp.float32)
    q11 = jnp.asarray([0.5, 1.0, 1.0], jnp.float32)
    q22 = jnp.asarray([1.0, 0.7, 1.0], jnp.float32)
    base = nn.relu.kernel_maps(q12, q11, q22)
    big = nn.relu.kernel_maps(q12 * scale, q11 * scale, q22 * scale)
    np.testing.assert_allclose(big.sigma / scale, base.sigma, rtol=2e-6)
    np.testing.assert_allclose(big.sigma_dot, base.sigma_dot, rtol=2e-6)
    for name in ["erf", "gelu", "sin", "cos"]:
        maps = getattr(nn, name).kernel_maps(q12 * scale, q11 * scale, q22 * scale)
        assert np.all(np.isfinite(maps.sigma)) and np.all(np.isfinite(maps.sigma_dot)), name
    with jax.enable_x64(True):
        q64 = [jnp.asarray(a, jnp.float64) * scale for a in (q12, q11, q22)]
        for name in ["erf", "gelu"]:
            want = getattr(nn, name).kernel_maps(*q64)
            got = getattr(nn, name).kernel_maps(*(a.astype(jnp.float32) for a in q64))
            np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-5, atol=1e-37)
            np.testing.assert_allclose(got.sigma_dot, want.sigma_dot, rtol=1e-5, atol=1e-37)



def _x(n=6, d=5, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)



ARRAY_CASES = [
    (nn.relu, lambda x: np.maximum(x, 0)),
    (functools.partial(nn.leaky_relu, negative_slope=0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    (functools.partial(nn.ab_relu, a=-0.5, b=2.0), lambda x: np.where(x > 0, 2 * x, -0.5 * x)),
    (nn.abs, np.abs),
    (nn.erf, special.erf),
    (nn.gelu, lambda x: 0.5 * x * (1 + special.erf(x / np.sqrt(2)))),
    (nn.sin, np.sin),
    (nn.cos, np.cos),
    (functools.partial(nn.rbf, gamma=0.7),
     lambda x: np.sqrt(2) * np.sin(np.sqrt(1.4) * x + np.pi / 4)),
    (nn.sign, np.sign),
    (nn.identity, lambda x: x),
    (nn.elementwise(jnp.tanh), np.tanh),
]


@pytest.mark.parametrize(("act", "ref"), ARRAY_CASES)
def test_activations_on_arrays(act, ref):
    x = np.linspace(-3, 3, 13).astype(np.float32)
    np.testing.assert_allclose(act(jnp.asarray(x)), ref(x), rtol=1e-6, atol=1e-6)
    assert nn.is_activation(act)


KERNEL_CASES = [
    (nn.relu, nn.relu.kernel_maps),
    (functools.partial(nn.leaky_relu, negative_slope=0.2),
     functools.partial(nn.leaky_relu.kernel_maps, negative_slope=0.2)),
    (functools.partial(nn.ab_relu, a=-0.5, b=2.0),
     functools.partial(nn.ab_relu.kernel_maps, a=-0.5, b=2.0)),
    (nn.abs, nn.abs.kernel_maps),
    (nn.erf, nn.erf.kernel_maps),
    (nn.gelu, nn.gelu.kernel_maps),
    (nn.sin, nn.sin.kernel_maps),
    (nn.cos, nn.cos.kernel_maps),
    (functools.partial(nn.rbf, gamma=0.7), functools.partial(nn.rbf.kernel_maps, gamma=0.7)),
    (nn.sign, nn.sign.kernel_maps),
    (nn.identity, nn.identity.kernel_maps),
    (nn.elementwise(jnp.sin), nn.sin.kernel_maps),
]


@pytest.mark.parametrize(("act", "maps"), KERNEL_CASES)
def test_activations_on_kernels(act, maps, x64):
    k = nn.Dense(4, b_std=0.3).apply({}, ntkjax.kernels.input_kernel(_x(dtype=jnp.float64)))
    out = act(k)
    want = maps(k.nngp, k.var1[:, None], k.var2[None, :])
    np.testing.assert_allclose(out.nngp, want.sigma, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(out.ntk, k.ntk * want.sigma_dot, rtol=1e-9, atol=1e-14)
    # variances: the map's diagonal
    np.testing.assert_allclose(out.var1, np.diagonal(want.sigma), rtol=1e-9, atol=1e-14)


def test_elementwise_validation():
    with pytest.raises(ValueError, match="callable"):
        nn.elementwise(3.0)
    with pytest.raises(ValueError, match="num_quadrature"):
        nn.elementwise(jnp.tanh, num_quadrature=1)
    assert not nn.is_activation(jnp.tanh)




# ---- activations with parameters and the closed forms of neural-tangents' activation zoo

SIGMOID_B = 1 / 2.4020563531719796


def _np_hermite(n):
    coef = np.polynomial.hermite_e.herme2poly([0.0] * n + [1.0]) / np.sqrt(special.factorial(n))
    return np.polynomial.Polynomial(coef)


# (activation, params, phi, phi') -- phi and phi' written independently in numpy/scipy
PARAM_CASES = {
    "erf_abc": (nn.erf, dict(a=1.2, b=0.8, c=0.1),
                lambda x: 1.2 * special.erf(0.8 * x) + 0.1,
                lambda x: 1.2 * 0.8 * 2 / np.sqrt(np.pi) * np.exp(-(0.8 * x) ** 2)),
    "sin_abc": (nn.sin, dict(a=1.1, b=0.9, c=0.3),
                lambda x: 1.1 * np.sin(0.9 * x + 0.3), lambda x: 1.1 * 0.9 * np.cos(0.9 * x + 0.3)),
    "cos_abc": (nn.cos, dict(a=0.9, b=1.2, c=-0.2),
                lambda x: 0.9 * np.cos(1.2 * x - 0.2),
                lambda x: -0.9 * 1.2 * np.sin(1.2 * x - 0.2)),
    "exp": (nn.exp, dict(a=0.8, b=0.5),
            lambda x: 0.8 * np.exp(0.5 * x), lambda x: 0.4 * np.exp(0.5 * x)),
    "gaussian": (nn.gaussian, dict(a=1.2, b=-0.7),
                 lambda x: 1.2 * np.exp(-0.7 * x * x),
                 lambda x: -2 * 0.7 * 1.2 * x * np.exp(-0.7 * x * x)),
    "monomial3": (nn.monomial, dict(degree=3), lambda x: x**3, lambda x: 3 * x**2),
    "monomial0": (nn.monomial, dict(degree=0), lambda x: np.ones_like(x),
                  lambda x: np.zeros_like(x)),
    "polynomial": (nn.polynomial, dict(coef=(0.1, 1.0, 0.5, -0.2)),
                   lambda x: 0.1 + x + 0.5 * x**2 - 0.2 * x**3,
                   lambda x: 1.0 + x - 0.6 * x**2),
    "hermite3": (nn.hermite, dict(degree=3), _np_hermite(3), _np_hermite(3).deriv()),
    "sigmoid_like": (nn.sigmoid_like, {}, lambda x: 0.5 * special.erf(x * SIGMOID_B) + 0.5,
                     lambda x: SIGMOID_B / np.sqrt(np.pi) * np.exp(-(x * SIGMOID_B) ** 2)),
    "gabor": (nn.gabor, {}, lambda x: np.exp(-x * x) * np.sin(x),
              lambda x: np.exp(-x * x) * (np.cos(x) - 2 * x * np.sin(x))),
}


def _triples():
    return tuple(jnp.asarray(v, jnp.float64) for v in zip(*TRIPLES, strict=True))


def test_parametrized_maps_match_two_dimensional_quadrature(x64):
    q12, q11, q22 = _triples()
    z, w = np.polynomial.hermite_e.hermegauss(200)
    for name, (act, params, phi, dphi) in PARAM_CASES.items():
        maps = act.kernel_maps(q12, q11, q22, **params)
        variance = act.kernel_variance(q11, **params)
        for i, triple in enumerate(TRIPLES):
            # 200 nodes: the Gaussian envelope of gabor / gaussian needs more than 120
            np.testing.assert_allclose(float(maps.sigma[i]), _gauss_2d(phi, *triple, n=200),
                                       rtol=1e-9, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(float(maps.sigma_dot[i]),
                                       _gauss_2d(dphi, *triple, n=200),
                                       rtol=1e-9, atol=1e-12, err_msg=name)
            # the variance is the second moment (1-D quadrature)
            want = np.sum(w * phi(np.sqrt(triple[1]) * z) ** 2) / np.sqrt(2 * np.pi)
            np.testing.assert_allclose(float(variance[i]), want, rtol=1e-10, err_msg=name)


def test_rectified_monomial_maps_match_adaptive_quadrature(x64):
    triple = TRIPLES[1]
    q = jnp.asarray([0.3, 1.0, 2.5])
    c = jnp.linspace(-1, 1, 41, dtype=jnp.float64)
    for degree in range(4):
        phi = lambda x, n=degree: np.where(x >= 0, np.abs(x) ** n, 0.0)
        dphi = lambda x, n=degree: np.where(x >= 0, n * np.abs(x) ** max(n - 1, 0), 0.0)
        maps = nn.rectified_monomial.kernel_maps(jnp.float64(triple[0]), *triple[1:], degree)
        np.testing.assert_allclose(float(maps.sigma), _quad_2d(phi, *triple), rtol=1e-7,
                                   atol=1e-10)
        if degree > 0:  # the step's derivative is 0 almost everywhere (nt's convention)
            np.testing.assert_allclose(float(maps.sigma_dot), _quad_2d(dphi, *triple),
                                       rtol=1e-7, atol=1e-10)
        # angle 0: the second moment (2n - 1)!! q^n / 2, where nt's form is 0 * inf
        same = nn.rectified_monomial.kernel_maps(q, q, q, degree)
        moment = float(np.prod(np.arange(2 * degree - 1, 0, -2))) * np.asarray(q) ** degree / 2
        np.testing.assert_allclose(same.sigma, moment, rtol=1e-13)
        np.testing.assert_allclose(nn.rectified_monomial.kernel_variance(q, degree), moment,
                                   rtol=1e-13)
        assert np.all(np.isfinite(nn.rectified_monomial.kernel_maps(c, 1.0, 1.0, degree)))
    # degree 1 is ReLU, at every angle including 0 and pi
    rm = nn.rectified_monomial.kernel_maps(1.3 * c, 1.3, 1.3, 1)
    relu = nn.relu.kernel_maps(1.3 * c, 1.3, 1.3)
    np.testing.assert_allclose(rm.sigma, relu.sigma, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(rm.sigma_dot, relu.sigma_dot, rtol=1e-14, atol=1e-15)


PRICE_CASES = [
    (nn.erf, dict(a=1.2, b=0.8, c=0.1)), (nn.sin, dict(a=1.1, b=0.9, c=0.3)),
    (nn.cos, dict(a=0.9, b=1.2, c=-0.2)), (nn.exp, dict(a=0.8, b=0.5)),
    (nn.gaussian, dict(a=1.2, b=-0.7)), (nn.polynomial, dict(coef=(0.1, 1.0, 0.5, -0.2))),
    (nn.rectified_monomial, dict(degree=2)), (nn.exp_normalized, dict(gamma=1.5, shift=-1.0)),
    (nn.gabor, {}),
]


def test_new_maps_satisfy_price_theorem(x64):
    """sigma_dot = d sigma / d q12 (Price's theorem; for exp_normalized by its definition)."""
    q12, q11, q22 = (a[np.r_[0, 1, 3, 4]] for a in _triples())
    for act, params in PRICE_CASES:
        grad = jax.vmap(jax.grad(lambda q, a, b, m=act, p=params: m.kernel_maps(q, a, b,
                                                                                **p).sigma))
        np.testing.assert_allclose(grad(q12, q11, q22),
                                   act.kernel_maps(q12, q11, q22, **params).sigma_dot,
                                   rtol=1e-7, atol=1e-12, err_msg=act.__name__)


def test_hermite_at_unit_variance_is_the_power_kernel(x64):
    c = jnp.linspace(-1, 1, 9, dtype=jnp.float64)
    for n in range(5):
        maps = nn.hermite.kernel_maps(c, 1.0, 1.0, n)
        np.testing.assert_allclose(maps.sigma, c**n, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(maps.sigma_dot, n * c ** max(n - 1, 0) if n else 0 * c,
                                   rtol=1e-13, atol=1e-13)


def test_exp_normalized_is_the_normalized_gaussian_kernel(x64):
    q12, q11, q22 = jnp.float64(0.4), 1.1, 0.7
    maps = nn.exp_normalized.kernel_maps(q12, q11, q22, 1.5, -1.0)
    c = 0.4 / np.sqrt(1.1 * 0.7)
    np.testing.assert_allclose(maps.sigma, np.sqrt(1.1 * 0.7) * np.exp(1.5 * (c - 1)), rtol=1e-14)
    np.testing.assert_allclose(maps.sigma_dot, 1.5 * np.exp(1.5 * (c - 1)), rtol=1e-14)
    with pytest.raises(ValueError, match="no finite-width function"):
        nn.exp_normalized(jnp.ones(3))


def test_parameter_validation():
    with pytest.raises(ValueError, match="b <= 0"):
        nn.gaussian(jnp.ones(3), b=0.5)
    with pytest.raises(ValueError, match="b <= 0"):
        nn.gaussian.kernel_maps(jnp.ones(3), 1.0, 1.0, 1.0, 0.5)
    for act in (nn.monomial, nn.hermite, nn.rectified_monomial):
        with pytest.raises(ValueError, match="degree"):
            act(jnp.ones(3), -1)
        with pytest.raises(ValueError, match="degree"):
            act(jnp.ones(3), 1.5)
    with pytest.raises(ValueError, match="coefficient"):
        nn.polynomial(jnp.ones(3), ())


def test_approximate_gelu_switches_only_the_finite_network():
    x = jnp.linspace(-8, 8, 20001)
    exact, approx = nn.gelu(x), nn.gelu(x, approximate=True)
    np.testing.assert_allclose(approx, jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-7)
    assert 1e-4 < float(jnp.max(jnp.abs(approx - exact))) < 4.8e-4
    q = (jnp.asarray([0.3, -0.2]), jnp.asarray([0.5, 1.0]), jnp.asarray([1.0, 0.7]))
    for got, want in zip(nn.gelu.kernel_maps(*q, approximate=True), nn.gelu.kernel_maps(*q),
                         strict=True):
        np.testing.assert_array_equal(got, want)


NEW_ARRAY_CASES = [
    (functools.partial(nn.erf, a=1.2, b=0.8, c=0.1), lambda x: 1.2 * special.erf(0.8 * x) + 0.1),
    (functools.partial(nn.sin, a=1.1, b=0.9, c=0.3), lambda x: 1.1 * np.sin(0.9 * x + 0.3)),
    (functools.partial(nn.cos, a=0.9, b=1.2, c=-0.2), lambda x: 0.9 * np.cos(1.2 * x - 0.2)),
    (functools.partial(nn.exp, a=0.8, b=0.5), lambda x: 0.8 * np.exp(0.5 * x)),
    (functools.partial(nn.gaussian, a=1.2, b=-0.7), lambda x: 1.2 * np.exp(-0.7 * x * x)),
    (functools.partial(nn.monomial, degree=3), lambda x: x**3),
    (functools.partial(nn.rectified_monomial, degree=2), lambda x: np.where(x >= 0, x * x, 0)),
    (functools.partial(nn.rectified_monomial, degree=0), lambda x: (x >= 0) * 1.0),
    (functools.partial(nn.polynomial, coef=(0.1, 1.0, 0.5)), lambda x: 0.1 + x + 0.5 * x * x),
    (functools.partial(nn.hermite, degree=2), lambda x: (x * x - 1) / np.sqrt(2)),
    (nn.sigmoid_like, lambda x: 0.5 * special.erf(x * SIGMOID_B) + 0.5),
    (nn.gabor, lambda x: np.exp(-x * x) * np.sin(x)),
]


@pytest.mark.parametrize(("act", "ref"), NEW_ARRAY_CASES)
def test_new_activations_on_arrays(act, ref):
    x = np.linspace(-3, 3, 13).astype(np.float32)
    np.testing.assert_allclose(act(jnp.asarray(x)), ref(x), rtol=1e-5, atol=1e-6)
    assert nn.is_activation(act)


def test_sigmoid_like_is_close_to_the_logistic_sigmoid():
    x = jnp.linspace(-5, 5, 1001)
    assert float(jnp.max(jnp.abs(nn.sigmoid_like(x) - jax.nn.sigmoid(x)))) < 0.02


def test_activation_after_activation_is_refused_and_identity_passes():
    k = nn.Dense(4).apply({}, ntkjax.kernels.input_kernel(_x()))
    h = nn.relu(k)
    assert h.non_gaussian == "ntkjax.nn.relu" and not k.non_gaussian
    with pytest.raises(ValueError, match=r"ntkjax\.nn\.erf.*ntkjax\.nn\.relu"):
        nn.erf(h)
    assert nn.identity(h).non_gaussian == "ntkjax.nn.relu"
    assert not nn.identity(k).non_gaussian
    assert not nn.Dense(3).apply({}, h).non_gaussian  # a dense layer makes it Gaussian again


# --------------------------------------------------------------------------- numerical range
#
# docs/numerical_behaviour.md states, per activation, the range of input variances in which the
# kernel maps are finite and accurate. These tests sweep that range: a log-spaced ladder of
# variance scales from the smallest normal number to the largest, one vectorized evaluation per
# activation and dtype, against (a) closed forms evaluated naively in numpy long double (80-bit,
# exponent range 1e+-4932: no overflow or underflow anywhere in the float64 range), and (b) for
# activations without such a naive form, the float64 maps (themselves checked against quadrature
# above) for the float32 sweep. Inside the range the values are finite and match; where the
# kernel itself overflows they are +-inf, never NaN.

# (q12, q11, q22) shapes of covariance: positive, negative, zero, near-parallel and parallel
# correlations, equal and unequal variances
_RANGE_TRIPLES = np.array([
    (0.3, 0.5, 1.0), (-0.2, 1.0, 0.7), (0.0, 1.0, 0.5), (0.9, 1.0, 1.0), (1.0, 1.0, 1.0),
    (-1.0, 1.0, 1.0), (-0.5, 1.0, 0.25),
])


def _range_sweep(dtype):
    """Triples scaled by powers of ten from 16x the smallest normal number of ``dtype`` to a
    half of its largest (every variance, ``q12`` aside, stays a normal number)."""
    info = np.finfo(dtype)
    lo, hi = np.log10(16 * float(info.tiny)), np.log10(float(info.max) / 2)
    scales = 10.0 ** np.linspace(lo, hi, 40)
    t = (_RANGE_TRIPLES[None, :, :] * scales[:, None, None]).reshape(-1, 3)
    return t[:, 0], t[:, 1], t[:, 2]


def _ld_relu_like(a, b):
    def maps(q12, q11, q22):
        s = np.sqrt(q11 * q22)
        c = np.clip(q12 / s, -1, 1)
        t = np.arccos(c)
        pi = np.arccos(np.longdouble(-1))
        sin_t = np.sqrt((1 - c) * (1 + c))  # exactly 0 at c = +-1, unlike sin(arccos c)
        k1, k0 = (sin_t + (pi - t) * c) / (2 * pi), (pi - t) / (2 * pi)
        return a * b * q12 + (b - a) ** 2 * s * k1, a * b + (b - a) ** 2 * k0
    return maps


def _ld_det(q12, q11, q22):
    """(1 + 2 q11)(1 + 2 q22) - 4 q12^2, expanded so that parallel inputs (q12^2 = q11 q22,
    bit for bit) cancel exactly."""
    return 1 + 2 * (q11 + q22) + 4 * (q11 * q22 - q12**2)


def _ld_erf(q12, q11, q22):
    # arcsin(2 q12 / sqrt(a)) = atan2(2 q12, sqrt(a - 4 q12^2)), a = (1 + 2 q11)(1 + 2 q22):
    # the arcsin of an argument within 1e-19 (long double rounding) of 1 would lose half the
    # digits
    root = np.sqrt(_ld_det(q12, q11, q22))
    return (2 / np.pi) * np.arctan2(2 * q12, root), (4 / np.pi) / root


def _ld_gaussian(q12, q11, q22):  # a = 1, b = -1
    det = _ld_det(q12, q11, q22)
    return 1 / np.sqrt(det), 4 * q12 / det**1.5


def _ld_monomial3(q12, q11, q22):  # Isserlis: E[u^3 v^3], E[3u^2 3v^2]
    return 9 * q11 * q22 * q12 + 6 * q12**3, 9 * (q11 * q22 + 2 * q12**2)


def _ld_rectified2(q12, q11, q22):  # Cho & Saul: J_2 and J_1
    s = np.sqrt(q11 * q22)
    c = np.clip(q12 / s, -1, 1)
    t = np.arccos(c)
    pi = np.arccos(np.longdouble(-1))
    sin_t = np.sqrt((1 - c) * (1 + c))
    j2 = (1 + 2 * c**2) * (pi - t) + 3 * c * sin_t
    j1 = sin_t + (pi - t) * c
    return s**2 * j2 / (2 * pi), 4 * s * j1 / (2 * pi)


def _ld_exp(q12, q11, q22):  # a = b = 1
    sigma = np.exp((q11 + q22) / 2 + q12)
    return sigma, sigma


def _ld_sign(q12, q11, q22):
    return (2 / np.pi) * np.arcsin(np.clip(q12 / np.sqrt(q11 * q22), -1, 1)), 0 * q12


_LONG_DOUBLE_MAPS = {
    "relu": _ld_relu_like(0.0, 1.0),
    "leaky_relu": _ld_relu_like(0.01, 1.0),
    "abs": _ld_relu_like(-1.0, 1.0),
    "erf": _ld_erf,
    "gaussian": _ld_gaussian,
    "monomial3": _ld_monomial3,
    "rectified_monomial2": _ld_rectified2,
    "exp": _ld_exp,
    "sign": _ld_sign,
}
_RANGE_ACTIVATIONS = {
    "relu": nn.relu.kernel_maps,
    "leaky_relu": nn.leaky_relu.kernel_maps,
    "abs": nn.abs.kernel_maps,
    "erf": nn.erf.kernel_maps,
    "gaussian": nn.gaussian.kernel_maps,
    "monomial3": functools.partial(nn.monomial.kernel_maps, degree=3),
    "rectified_monomial2": functools.partial(nn.rectified_monomial.kernel_maps, degree=2),
    "exp": nn.exp.kernel_maps,
    "sign": nn.sign.kernel_maps,
    "gelu": nn.gelu.kernel_maps,
    "sin": nn.sin.kernel_maps,
    "cos": nn.cos.kernel_maps,
    "rbf": nn.rbf.kernel_maps,
    "gabor": nn.gabor.kernel_maps,
    "sigmoid_like": nn.sigmoid_like.kernel_maps,
    "exp_normalized": nn.exp_normalized.kernel_maps,
    "hermite3": functools.partial(nn.hermite.kernel_maps, degree=3),
    "polynomial": functools.partial(nn.polynomial.kernel_maps, coef=(1.0, -2.0, 0.5, 0.25)),
}


def _assert_matches_in_range(got, want, dtype, rtol, name):
    """``got`` (computed in ``dtype``) against ``want`` (higher precision): never NaN; +-inf
    exactly where ``want`` overflows ``dtype``; elsewhere within ``rtol`` of the larger of
    ``|want|`` and the entries of its row of the sweep (a kernel entry is judged relative to the
    kernel's scale), values below the smallest normal number allowed to flush to 0; within
    ``rtol`` of the largest number either a finite value or +-inf is right."""
    got = np.asarray(got, np.float64)
    info = np.finfo(dtype)
    want = np.asarray(want, np.longdouble)
    assert not np.any(np.isnan(got)), f"{name}: NaN at {np.flatnonzero(np.isnan(got))[:5]}"
    top = np.longdouble(info.max)
    over = np.abs(want) > top * (1 + rtol)
    np.testing.assert_array_equal(got[over], np.sign(want[over]) * np.inf, err_msg=name)
    fine = np.abs(want) < top * (1 - rtol)  # at the threshold either is right
    assert np.all(np.isfinite(got[fine])), f"{name}: inf where the kernel is finite"
    scale = np.abs(want).reshape(-1, len(_RANGE_TRIPLES))
    row_scale = np.where(np.isfinite(scale), scale, 0).max(axis=1, keepdims=True)
    ref = np.broadcast_to(row_scale, scale.shape).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf where both overflow
        err = np.abs(got.astype(np.longdouble) - want)
    tol = rtol * ref + 4 * float(info.tiny)
    bad = fine & (err > tol)
    assert not np.any(bad), (
        f"{name}: {int(bad.sum())} entries off, worst {float(np.max(err[bad] / ref[bad])):.2e} "
        f"at q = {_range_sweep(dtype)[1][bad][:3]}"
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(_LONG_DOUBLE_MAPS))
def test_kernel_maps_over_the_whole_range_match_long_double_closed_forms(name, dtype):
    q12, q11, q22 = _range_sweep(dtype)
    with jax.enable_x64(dtype == np.float64):
        got = _RANGE_ACTIVATIONS[name](*(jnp.asarray(a, dtype) for a in (q12, q11, q22)))
        assert got.sigma.dtype == dtype and got.sigma_dot.dtype == dtype
    ld = [np.asarray(a, np.longdouble) for a in (q12, q11, q22)]
    with np.errstate(over="ignore", invalid="ignore"):
        want = _LONG_DOUBLE_MAPS[name](*ld)
    rtol = 5e-6 if dtype == np.float32 else 1e-13  # observed: 6e-7 and 1e-15
    _assert_matches_in_range(got.sigma, want[0], dtype, rtol, f"{name} sigma")
    _assert_matches_in_range(got.sigma_dot, want[1], dtype, rtol, f"{name} sigma_dot")


@pytest.mark.parametrize("name", sorted(set(_RANGE_ACTIVATIONS) - set(_LONG_DOUBLE_MAPS)))
@pytest.mark.xla_optimized
def test_float32_kernel_maps_over_the_whole_range_match_float64(name):
    q12, q11, q22 = _range_sweep(np.float32)
    got = _RANGE_ACTIVATIONS[name](*(jnp.asarray(a, jnp.float32) for a in (q12, q11, q22)))
    with jax.enable_x64(True):
        want = _RANGE_ACTIVATIONS[name](*(jnp.asarray(a, jnp.float64) for a in (q12, q11, q22)))
        # the float64 maps over the float64 range: never NaN
        q64 = _range_sweep(np.float64)
        wide = _RANGE_ACTIVATIONS[name](*(jnp.asarray(a, jnp.float64) for a in q64))
    assert got.sigma.dtype == jnp.float32
    for field in ("sigma", "sigma_dot"):
        ref = np.asarray(getattr(want, field), np.longdouble)
        _assert_matches_in_range(getattr(got, field), ref, np.float32, 5e-6, f"{name} {field}")
        assert not np.any(np.isnan(np.asarray(getattr(wide, field)))), f"{name} {field} float64"


@pytest.mark.slow  # six kernel compilations (~40 s on a busy 2-core machine)
@pytest.mark.xla_optimized
def test_networks_at_the_edge_of_float32():
    """Whole kernels at inputs ~1.4e19 (ReLU family; pre-activation variances ~1.8e38 and an
    NTK ~1.8e38, still representable; the NTK was q/pi everywhere) and ~1e18 (Gaussian, Gabor;
    variances ~1e36). Outside truths: a bias-free ReLU network is positively homogeneous,
    K(a x) = a^2 K(x) (NNGP and NTK); the saturating ones against the same network in
    float64."""
    x = jnp.array([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 0.9, 1.0], [0.95, 1.0, -1.0]])
    for act in ("relu", "leaky_relu"):
        fn = ntkjax.kernel_fn(ntkjax.models.MLP((8, 1), act, w_std=1.0, b_std=None))
        small, big = fn(x), fn(x * 1.4e19)
        for got, want in ((big.nngp, small.nngp), (big.ntk, small.ntk)):
            assert np.all(np.isfinite(np.asarray(got))), act
            np.testing.assert_allclose(np.asarray(got) / 1.96e38, want, rtol=2e-5, atol=1e-6,
                                       err_msg=act)
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
    for act in (nn.gaussian, nn.gabor):
        model = ntkjax.models.MLP((8, 1), act, w_std=1.0, b_std=0.5)
        got = ntkjax.kernel_fn(model)(x * 1e18)
        with jax.enable_x64(True):
            want = ntkjax.kernel_fn(model)(x.astype(jnp.float64) * 1e18)
        for g, w in ((got.nngp, want.nngp), (got.ntk, want.ntk)):
            assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g))), act
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6 * float(np.max(np.abs(w))),
                                       err_msg=act)


@pytest.mark.parametrize("name", ["relu", "erf", "gaussian", "gabor"])
@pytest.mark.parametrize("scale", [1e18, 1e19])
@pytest.mark.xla_optimized
def test_mlp_kernels_at_huge_float32_inputs_match_float64(name, scale):
    """Inputs |x| ~ 1e18 and 1e19 (d = 3: input kernels and pre-activation variances up to
    ~1e38, the top of float32's range; the ReLU kernels themselves ~1e38): the float32 kernels
    are finite and within 1e-5 (relative to the largest entry) of the same network in float64
    (outside truth: float64 has no overflow there). Correlations of
    such variances are formed without the product of two inverse square roots, which
    underflows float32 at variances ~1e38."""
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32) * scale
    fn = ntkjax.kernel_fn(ntkjax.models.MLP((8, 1), getattr(nn, name), w_std=1.0, b_std=0.5))
    with jax.enable_x64(True):
        want = fn(x.astype(jnp.float64))
    # eagerly and compiled: XLA rewrites a / b / c as a / (b c) and folds halvings, which
    # overflowed the compiled input kernel at 1e19 while the eager one was finite
    for got in (fn(x), jax.jit(fn)(x)):
        for field in ("nngp", "ntk"):
            g = np.asarray(getattr(got, field))
            w = np.asarray(getattr(want, field))
            assert g.dtype == np.float32 and np.all(np.isfinite(g)), field
            err = np.max(np.abs(g.astype(np.float64) - w)) / np.max(np.abs(w))
            assert err < 1e-5, (field, err)


def test_an_activation_on_the_raw_inputs_is_refused_in_every_kernel_meaning():
    """The finite network relu(x) W has the deterministic kernel relu(x) . relu(x') / d, not the
    arc-cosine kernel of Gaussian pre-activations with covariance x . x' / d that the rule gives
    (neural-tangents refuses it too: its input kernel is not Gaussian). Refused structurally --
    eagerly, jitted, on images, in blocks and by random features (so is LayerNorm there) --
    and accepted once a Dense comes first."""
    from flax import linen

    raw = linen.Sequential([nn.relu, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(0), (5, 3))
    images = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    conv = linen.Sequential([nn.relu, nn.Conv(features=2, kernel_size=(3, 3)), nn.flatten,
                             nn.Dense(1)])
    calls = [lambda: ntkjax.kernel_fn(raw)(x), lambda: jax.jit(ntkjax.kernel_fn(raw))(x, x[:2]),
             lambda: ntkjax.kernel_fn(conv)(images),
             lambda: ntkjax.kernel_matrix(raw, x, block_size=2),
             # random features estimate kernel_fn: their arc-cosine features of the raw inputs
             # would estimate the same wrong kernel
             lambda: ntkjax.feature_map(raw, key=jax.random.key(2), num_features=8)(x),
             lambda: ntkjax.feature_map(conv, key=jax.random.key(2), num_features=8)(images)]
    for call in calls:
        with pytest.raises(ValueError, match=r"relu needs Gaussian pre-activations.*network's "
                                             "inputs.*put a Dense"):
            call()
    with pytest.raises(ValueError, match=r"LayerNorm's infinite-width rule.*network's inputs"):
        ntkjax.feature_map(linen.Sequential([nn.LayerNorm(), nn.Dense(2)]),
                           key=jax.random.key(2), num_features=8)(x)
    ok = ntkjax.kernel_fn(linen.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)]))(x)
    assert np.all(np.isfinite(np.asarray(ok.ntk)))
