"""Infinite-width kernel maps: how the NNGP and the NTK change through one layer (pure jnp).

Notation. A layer's pre-activations at two inputs are jointly Gaussian in the infinite-width limit,
``(u, v) ~ N(0, [[q11, q12], [q12, q22]])``, with ``q12`` the NNGP entry and ``q11``, ``q22`` the
two inputs' variances (the NNGP diagonal). An activation ``phi`` maps them to

* ``sigma = E[phi(u) phi(v)]``                   (the new NNGP entry),
* ``sigma_dot = E[phi'(u) phi'(v)]``              (Theta <- sigma_dot Theta),

(Neal 1996; Lee et al. 2018; Jacot et al. 2018). Every map below is an elementwise function
``(q12, q11, q22) -> ActivationMaps(sigma, sigma_dot)``; ``q11`` and ``q22`` broadcast against
``q12`` (pass ``q11[:, None]`` and ``q22[None, :]`` for a kernel matrix, or ``(q, q, q)`` for the
variances themselves). A dense layer maps the kernels by :func:`dense`; a convolution first
averages them over patches (:func:`patch_average`), then applies :func:`dense`.

Numerics. Everything is written in terms of the correlation ``c = q12 / sqrt(q11 q22)`` (computed
as ``q12 * rsqrt(q11) * rsqrt(q22)``, so no product of two variances is ever formed and nothing
overflows while the result is representable) and of row quantities such as ``sqrt(q11)``. ``c`` is
clipped to [-1, 1] and a ``c`` within ``8 eps`` of +-1 is taken as exactly +-1: the computed ``c``
of two identical inputs is only known to a few ulps, and the angle ``arccos c`` of a ``c`` a few
ulps below 1 is ``sqrt(2 * ulps)`` -- without this the NTK diagonal of a ReLU network would be off
by ~1e-4 in float32. (Angles below ``sqrt(16 eps)``, 1.4e-3 rad in float32, are resolved no
better than that anyway.) A zero variance gives ``c = 0`` and a zero kernel, never NaN.

Arc-cosines: float64 uses ``jnp.arccos``; other dtypes use a polynomial approximation (Hastings,
Abramowitz & Stegun 4.4.46, absolute error <= 2e-8), about ten times faster than XLA's arccos on
the CPU and below float32 resolution.

Sources of the closed forms: ReLU family -- arc-cosine kernels (Cho & Saul 2009); erf (Williams
1997); GELU -- derived here by Gaussian integration by parts (Tsuchida et al. 2021 give the same
kernel); sin / cos / rbf -- from E[exp(i k u)] = exp(-k^2 q / 2); sign (Price's theorem / Sheppard's
formula). Gauss-Hermite quadrature for any other activation (:func:`elementwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import check_batched, check_same_features

__all__ = [
    "ActivationMaps",
    "ab_relu",
    "ab_relu_variance",
    "abs",
    "abs_variance",
    "conv_padding",
    "correlation",
    "cos",
    "cos_variance",
    "dense",
    "dense_nngp",
    "elementwise",
    "elementwise_variance",
    "erf",
    "erf_variance",
    "gelu",
    "gelu_variance",
    "identity",
    "identity_variance",
    "leaky_relu",
    "leaky_relu_variance",
    "patch_average",
    "rbf",
    "rbf_variance",
    "relu",
    "relu_variance",
    "sign",
    "sign_variance",
    "sin",
    "sin_variance",
    "two_layer_relu_nngp",
    "two_layer_relu_ntk",
]

_PI = math.pi
_SNAP_EPS = 8.0  # |c| within this many eps of 1 is taken as exactly 1

# Hastings' arccos polynomial (Abramowitz & Stegun 4.4.46): arccos(x) = sqrt(1 - x) * P(x) on
# [0, 1], |error| <= 2e-8.
_ACOS_COEFFS = (
    1.5707963050,
    -0.2145988016,
    0.0889789874,
    -0.0501743046,
    0.0308918810,
    -0.0170881256,
    0.0066700901,
    -0.0012624911,
)


class ActivationMaps(NamedTuple):
    """Kernel maps: ``sigma = E[phi(u) phi(v)]``, ``sigma_dot = E[phi'(u) phi'(v)]``."""

    sigma: jax.Array
    sigma_dot: jax.Array


def _dtype(x) -> jnp.dtype:
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _rsqrt0(q: jax.Array) -> jax.Array:
    """1/sqrt(q) where q > 0, else 0 (a zero-variance input has correlation 0 with anything)."""
    positive = q > 0
    return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, q, 1)), 0)


def _sqrt0(q: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(q, 0))


def _row_scales(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(q), 1/sqrt(q))`` from one rsqrt (both 0 at q = 0)."""
    r = _rsqrt0(q)
    return q * r, r


def correlation(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> jax.Array:
    """``c = q12 / sqrt(q11 q22)``: clipped to [-1, 1], snapped to +-1 within 8 eps, and 0 where
    a variance is 0."""
    q12 = jnp.asarray(q12)
    dtype = _dtype(q12)
    q12 = q12.astype(dtype)
    c = (q12 * _rsqrt0(jnp.asarray(q11, dtype))) * _rsqrt0(jnp.asarray(q22, dtype))
    return _snap(c)


def _snap(c: jax.Array) -> jax.Array:
    tol = _SNAP_EPS * float(jnp.finfo(c.dtype).eps)
    c = jnp.clip(c, -1, 1)
    return jnp.where(c > 1 - tol, 1, jnp.where(c < tol - 1, -1, c)).astype(c.dtype)


def _acos_neg(c: jax.Array) -> jax.Array:
    """``pi - arccos(c) = arccos(-c)`` for c in [-1, 1] (exact near c = -1, where it is small)."""
    if c.dtype == jnp.float64:
        return jnp.arccos(-c)
    a = jnp.where(c >= 0, c, -c)  # |c|, with the one-sided derivative at 0 (not sign(0) = 0)
    p = jnp.asarray(_ACOS_COEFFS[-1], c.dtype)
    for coeff in _ACOS_COEFFS[-2::-1]:
        p = p * a + coeff
    r = jnp.sqrt(1 - a) * p  # arccos(|c|)
    return jnp.where(c >= 0, _PI - r, r)


def _sin_angle(c: jax.Array) -> jax.Array:
    """``sin(arccos c) = sqrt((1 - c)(1 + c))`` (no cancellation near c = +-1)."""
    return jnp.sqrt(jnp.maximum((1 - c) * (1 + c), 0))


def _arccos_kernels(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Arc-cosine kernels of degree 1 and 0 with the Gaussian normalisation:

    ``kappa1 = (sin t + (pi - t) c) / (2 pi) = E[relu(u) relu(v)]`` and
    ``kappa0 = (pi - t) / (2 pi) = P(u > 0, v > 0) = E[relu'(u) relu'(v)]`` for unit-variance
    ``(u, v)`` with correlation ``c = cos t`` (Cho & Saul 2009).
    """
    pmt = _acos_neg(c)
    kappa1 = (_sin_angle(c) + pmt * c) * (1 / (2 * _PI))
    kappa0 = pmt * (1 / (2 * _PI))
    return kappa1, kappa0


def _broadcast_stats(q12, q11, q22):
    q12 = jnp.asarray(q12)
    dtype = _dtype(q12)
    return q12.astype(dtype), jnp.asarray(q11, dtype), jnp.asarray(q22, dtype)


def ab_relu(q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float, b: float) -> ActivationMaps:
    """``phi(x) = a min(x, 0) + b max(x, 0)``: ReLU (0, 1), leaky ReLU (slope, 1), |x| (-1, 1).

    Writing ``phi(x) = a x + (b - a) relu(x)`` and using ``E[u relu(v)] = q12 / 2``:
    ``sigma = a b q12 + (b - a)^2 sqrt(q11 q22) kappa1(c)`` and
    ``sigma_dot = a b + (b - a)^2 kappa0(c)`` (arc-cosine kernels, Cho & Saul 2009).
    """
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    s1, r1 = _row_scales(q11)
    s2, r2 = _row_scales(q22)
    c = _snap((q12 * r1) * r2)
    kappa1, kappa0 = _arccos_kernels(c)
    scale = s1 * s2
    ab, d2 = a * b, (b - a) ** 2
    if ab == 0:
        return ActivationMaps(d2 * scale * kappa1, d2 * kappa0)
    sigma = (ab * c + d2 * kappa1) * scale
    return ActivationMaps(sigma, ab + d2 * kappa0)


def ab_relu_variance(q: jax.Array, a: float, b: float) -> jax.Array:
    """``E[phi(u)^2] = (a^2 + b^2) q / 2`` for u ~ N(0, q)."""
    return (0.5 * (a * a + b * b)) * jnp.asarray(q)


def relu(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = max(x, 0)``: ``sigma = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi)``,
    ``sigma_dot = (pi - t) / (2 pi)``, ``t = arccos(c)`` (Cho & Saul 2009)."""
    return ab_relu(q12, q11, q22, 0.0, 1.0)


def relu_variance(q: jax.Array) -> jax.Array:
    """``E[relu(u)^2] = q / 2``."""
    return ab_relu_variance(q, 0.0, 1.0)


def leaky_relu(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, negative_slope: float = 0.01
) -> ActivationMaps:
    """``phi(x) = x if x > 0 else negative_slope * x`` (see :func:`ab_relu`)."""
    return ab_relu(q12, q11, q22, negative_slope, 1.0)


def leaky_relu_variance(q: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``(1 + negative_slope^2) q / 2``."""
    return ab_relu_variance(q, negative_slope, 1.0)


def abs(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = |x|`` (see :func:`ab_relu` with a = -1, b = 1)."""
    return ab_relu(q12, q11, q22, -1.0, 1.0)


def abs_variance(q: jax.Array) -> jax.Array:
    """``E[u^2] = q``."""
    return ab_relu_variance(q, -1.0, 1.0)


def identity(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = x``: ``sigma = q12``, ``sigma_dot = 1``."""
    q12, _, _ = _broadcast_stats(q12, q11, q22)
    return ActivationMaps(q12, jnp.ones_like(q12))


def identity_variance(q: jax.Array) -> jax.Array:
    """``q``."""
    return jnp.asarray(q)


def _erf_like_terms(c, q11, q22, k):
    """Row terms for erf (k = 2) and GELU (k = 1): ``e = 1/(1 + k q)``, ``w = q e`` and
    ``g = 1 - rho^2 = e1 + e2 - e1 e2 + k^2 w1 w2 (1 - c^2)`` with ``rho = k c sqrt(w1 w2)``
    -- positive and free of cancellation at any scale."""
    e1, e2 = 1 / (1 + k * q11), 1 / (1 + k * q22)
    w1, w2 = q11 * e1, q22 * e2
    uu = _sqrt0(w1) * _sqrt0(w2)
    g = e1 + e2 - e1 * e2 + (k * k) * (w1 * w2) * ((1 - c) * (1 + c))
    return e1, e2, w1, w2, uu, g


def erf(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = erf``: ``sigma = (2/pi) arcsin(2 q12 / sqrt((1 + 2 q11)(1 + 2 q22)))`` and
    ``sigma_dot = (4/pi) / sqrt((1 + 2 q11)(1 + 2 q22) - 4 q12^2)`` (Williams 1997).

    Computed as ``arcsin(rho) = atan2(rho, sqrt(1 - rho^2))`` with ``1 - rho^2`` from row terms.
    """
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    e1, e2, _, _, uu, g = _erf_like_terms(c, q11, q22, 2.0)
    sg = jnp.sqrt(g)
    sigma = (2 / _PI) * jnp.arctan2(2 * c * uu, sg)
    sigma_dot = (4 / _PI) * (_sqrt0(e1) * _sqrt0(e2)) / sg
    return ActivationMaps(sigma, sigma_dot)


def erf_variance(q: jax.Array) -> jax.Array:
    """``(2/pi) arcsin(2q / (1 + 2q)) = (2/pi) atan2(2q, sqrt(1 + 4q))``."""
    q = jnp.asarray(q)
    return (2 / _PI) * jnp.arctan2(2 * q, jnp.sqrt(1 + 4 * q))


def gelu(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = x Phi(x)`` (exact GELU). With ``A = (1 + q11)(1 + q22)``, ``D = A - q12^2`` and
    ``rho = q12 / sqrt(A)``:

    ``sigma = q12/4 + q12 arcsin(rho) / (2 pi) + (q11 q22 D + q12^2) / (2 pi A sqrt(D))``,

    from Gaussian integration by parts on ``E[u v 1{u > z1} 1{v > z2}]`` (z independent standard
    normals); ``sigma_dot = d sigma / d q12`` (Price's theorem), differentiated by hand:

    ``sigma_dot = 1/4 + arcsin(rho)/(2 pi) + q12 / (2 pi sqrt(D))
    + q12 (2 D - q11 q22 D + q12^2) / (2 pi A D^{3/2})``.

    The code writes both with row terms ``e = 1/(1 + q)``, ``w = q e`` and
    ``g = D / A = e1 + e2 - e1 e2 + w1 w2 (1 - c^2)``, so no product of variances is formed.
    """
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    e1, e2, w1, w2, uu, g = _erf_like_terms(c, q11, q22, 1.0)
    sg = jnp.sqrt(g)
    asin = jnp.arctan2(c * uu, sg)
    ee, ww = e1 * e2, w1 * w2
    scale = _sqrt0(q11) * _sqrt0(q22)
    inv_2pi = 1 / (2 * _PI)
    sigma = scale * (c * (0.25 + asin * inv_2pi) + uu * (g + c * c * ee) * inv_2pi / sg)
    sigma_dot = (
        0.25
        + asin * inv_2pi
        + c * uu * inv_2pi / sg
        + c * uu * inv_2pi * ((2 * ee - ww) / sg + c * c * ee * ww / (g * sg))
    )
    return ActivationMaps(sigma, sigma_dot)


def gelu_variance(q: jax.Array) -> jax.Array:
    """``q/4 + q arcsin(q / (1 + q)) / (2 pi) + q^2 / (pi (1 + q) sqrt(1 + 2q))`` (the
    diagonal of :func:`gelu`)."""
    q = jnp.asarray(q)
    root = jnp.sqrt(1 + 2 * q)
    asin = jnp.arctan2(q, root)
    return q * (0.25 + asin / (2 * _PI) + q / (_PI * (1 + q) * root))


def _exp_terms(c, q11, q22):
    """``exp(-(q11 + q22)/2) * (sinh q12, cosh q12)`` without overflow:
    ``(exp(-d_minus) -+ exp(-d_plus)) / 2`` with ``d_minus, d_plus = (q11 + q22)/2 -+ q12
    = (s1 - s2)^2 / 2 + s1 s2 (1 -+ c) >= 0``; the difference through ``expm1`` of whichever
    exponent is bounded, so small ``q12`` keeps full relative precision. Smooth in ``c``."""
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    s12 = s1 * s2
    base = 0.5 * (s1 - s2) ** 2
    e_minus = jnp.exp(-(base + s12 * (1 - c)))
    e_plus = jnp.exp(-(base + s12 * (1 + c)))
    positive = c >= 0
    q_pos = jnp.where(positive, c, 0) * s12  # each branch sees a safe argument
    q_neg = jnp.where(positive, 0, c) * s12
    sinh_part = 0.5 * jnp.where(
        positive, -e_minus * jnp.expm1(-2 * q_pos), e_plus * jnp.expm1(2 * q_neg)
    )
    cosh_part = 0.5 * (e_minus + e_plus)
    return sinh_part, cosh_part


def sin(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = sin``: ``sigma = exp(-(q11 + q22)/2) sinh(q12)``,
    ``sigma_dot = exp(-(q11 + q22)/2) cosh(q12)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    sinh_part, cosh_part = _exp_terms(correlation(q12, q11, q22), q11, q22)
    return ActivationMaps(sinh_part, cosh_part)


def sin_variance(q: jax.Array) -> jax.Array:
    """``(1 - exp(-2q)) / 2``."""
    return -0.5 * jnp.expm1(-2 * jnp.asarray(q))


def cos(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = cos``: ``sigma = exp(-(q11 + q22)/2) cosh(q12)``,
    ``sigma_dot = exp(-(q11 + q22)/2) sinh(q12)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    sinh_part, cosh_part = _exp_terms(correlation(q12, q11, q22), q11, q22)
    return ActivationMaps(cosh_part, sinh_part)


def cos_variance(q: jax.Array) -> jax.Array:
    """``(1 + exp(-2q)) / 2``."""
    return 0.5 + 0.5 * jnp.exp(-2 * jnp.asarray(q))


def rbf(q12: jax.Array, q11: jax.Array, q22: jax.Array, gamma: float = 1.0) -> ActivationMaps:
    """``phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: ``sigma = exp(-gamma (q11 + q22 - 2 q12))``
    (the RBF kernel of the pre-activations) and ``sigma_dot = 2 gamma sigma``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    sigma = jnp.exp(-gamma * ((s1 - s2) ** 2 + 2 * (s1 * s2) * (1 - c)))
    return ActivationMaps(sigma, (2 * gamma) * sigma)


def rbf_variance(q: jax.Array, gamma: float = 1.0) -> jax.Array:
    """``1`` (``sqrt(2) sin(. + pi/4)`` has unit second moment for any Gaussian input)."""
    return jnp.ones_like(jnp.asarray(q))


def sign(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = sign``: ``sigma = (2/pi) arcsin(c)``; ``sigma_dot = 0`` (phi' = 0 a.e.)."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    sigma = (2 / _PI) * jnp.arctan2(c, _sin_angle(c))
    return ActivationMaps(sigma, jnp.zeros_like(sigma))


def sign_variance(q: jax.Array) -> jax.Array:
    """``1`` for q > 0, ``0`` for a zero input (sign(0) = 0)."""
    q = jnp.asarray(q)
    return (q > 0).astype(_dtype(q))


def _probabilists_hermite(n: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Nodes z and weights w with sum_a w_a f(z_a) ~ E[f(z)], z ~ N(0, 1)."""
    x, w = np.polynomial.hermite.hermgauss(n)
    return jnp.asarray(x * np.sqrt(2.0), dtype), jnp.asarray(w / np.sqrt(np.pi), dtype)


def _derivative(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    return lambda x: jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]


def elementwise(
    q12: jax.Array,
    q11: jax.Array,
    q22: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    n_quadrature: int = 64,
) -> ActivationMaps:
    """Any elementwise activation ``fn``, by two-dimensional Gauss-Hermite quadrature.

    ``u = sqrt(q11) z1``, ``v = sqrt(q22) (c z1 + sqrt(1 - c^2) z2)`` with independent standard
    normal ``z1, z2``, each integrated with ``n_quadrature`` probabilists' Gauss-Hermite nodes
    (``n_quadrature^2`` evaluations of ``fn`` per kernel entry); ``phi'`` is ``fn``'s derivative
    by forward-mode autodiff.

    Accuracy (default n_quadrature = 64, float64, max error relative to the largest entry, against
    the closed forms for variances in [0.1, 3]; tests/test_analytic.py): sin and cos 1e-15, GELU
    1e-11 (sigma_dot) and erf 5e-7 (sigma_dot; saturating activations converge more slowly: 8e-4
    at 32 nodes, 3e-13 at 128). Kinks converge only algebraically: ReLU's sigma 1.3e-3 and
    sigma_dot (a step function) 2.5e-2 -- use the closed forms where they exist. Oscillating
    activations of large variance need more nodes (sin at variance q needs n >> sqrt(q)).
    """
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    dtype = q12.dtype
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    sc = _sin_angle(c)
    z, w = _probabilists_hermite(n_quadrature, dtype)
    dfn = _derivative(fn)
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    c, sc, s1, s2 = (jnp.broadcast_to(a, shape) for a in (c, sc, s1, s2))

    def step(carry, node):
        za, wa = node
        u = s1 * za
        v = s2[..., None] * (c[..., None] * za + sc[..., None] * z)
        inner = jnp.tensordot(fn(v), w, axes=1)
        inner_dot = jnp.tensordot(dfn(v), w, axes=1)
        sigma, sigma_dot = carry
        return (sigma + wa * fn(u) * inner, sigma_dot + wa * dfn(u) * inner_dot), None

    zeros = jnp.zeros(shape, dtype)
    (sigma, sigma_dot), _ = jax.lax.scan(step, (zeros, zeros), (z, w))
    return ActivationMaps(sigma, sigma_dot)


def elementwise_variance(
    q: jax.Array, fn: Callable[[jax.Array], jax.Array], n_quadrature: int = 64
) -> jax.Array:
    """``E[fn(u)^2]``, u ~ N(0, q), by Gauss-Hermite quadrature with ``n_quadrature`` nodes."""
    q = jnp.asarray(q)
    q = q.astype(_dtype(q))
    z, w = _probabilists_hermite(n_quadrature, q.dtype)
    values = fn(_sqrt0(q)[..., None] * z)
    return jnp.tensordot(values * values, w, axes=1)


def _weak(v):
    """A Python float for a concrete scalar (numpy scalars included), so that it multiplies
    arrays without promoting their dtype (``np.sqrt(2) * float32`` would be float64 under x64);
    anything else (e.g. a traced value) unchanged."""
    return float(v) if isinstance(v, int | float | np.generic) else v


def dense_nngp(
    q: jax.Array, *, w_std: float, b_std: float, use_bias: bool = True
) -> jax.Array:
    """NNGP (or variance) after a dense layer, in either parameterization:
    ``Sigma <- w_std^2 Sigma + b_std^2`` (``b_std^2`` only with a bias)."""
    w_std, b_std = _weak(w_std), _weak(b_std)
    q = w_std**2 * q
    return q + b_std**2 if use_bias and b_std != 0 else q


def dense(
    nngp: jax.Array,
    ntk: jax.Array,
    *,
    w_std: float,
    b_std: float,
    use_bias: bool = True,
    parameterization: str = "ntk",
    fan_in: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(nngp, ntk)`` after a dense layer from the layer's input kernels (Jacot et al. 2018).

    * NTK parameterization (``y = w_std/sqrt(fan_in) x W + b_std b``, W, b ~ N(0, 1)):
      ``Sigma' = w_std^2 Sigma + b_std^2`` and ``Theta' = Sigma' + w_std^2 Theta``.
    * Standard parameterization (``y = x W + b``, W ~ N(0, w_std^2 / fan_in), b ~ N(0, b_std^2)):
      the same ``Sigma'``, and ``Theta' = fan_in Sigma + w_std^2 Theta (+ 1 with a bias)`` -- the
      expected NTK of the finite network, which grows with the actual ``fan_in`` (the gradient
      of ``x W`` w.r.t. W contributes ``x.x' = fan_in Sigma``, the bias's gradient is 1).
    """
    w_std, b_std = _weak(w_std), _weak(b_std)
    new_nngp = dense_nngp(nngp, w_std=w_std, b_std=b_std, use_bias=use_bias)
    if parameterization == "ntk":
        return new_nngp, new_nngp + w_std**2 * ntk
    if parameterization == "standard":
        if fan_in is None:
            raise ValueError("the standard parameterization needs the layer's fan_in.")
        new_ntk = fan_in * nngp + w_std**2 * ntk
        return new_nngp, (new_ntk + 1 if use_bias else new_ntk)
    raise ValueError(
        f"unknown parameterization {parameterization!r}; allowed: 'ntk', 'standard'."
    )


CONV_PADDINGS = ("SAME", "VALID", "CIRCULAR")


def conv_padding(
    spatial_shape: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    padding: str,
) -> tuple[tuple[tuple[int, int], ...], str]:
    """``(pads, mode)``: the ``(low, high)`` padding per spatial axis that ``flax.linen.Conv``
    (i.e. ``lax.conv_general_dilated``) applies, and the ``jnp.pad`` mode -- ``"constant"``
    (zeros) for ``"SAME"`` / ``"VALID"``, ``"wrap"`` for ``"CIRCULAR"``.

    ``"SAME"``: ``out = ceil(n / s)`` positions and ``(out - 1) s + k - n`` zeros in total, the
    smaller half in front (``lax.padtype_to_pads``); ``"VALID"``: none; ``"CIRCULAR"``:
    ``((k - 1) // 2, k // 2)`` periodic copies (flax's convention, independent of the stride).
    """
    if padding not in CONV_PADDINGS:
        raise ValueError(
            f"unknown padding {padding!r}; allowed: {', '.join(map(repr, CONV_PADDINGS))}."
        )
    if padding == "CIRCULAR":
        return tuple(((k - 1) // 2, k // 2) for k in window), "wrap"
    pads = jax.lax.padtype_to_pads(tuple(spatial_shape), tuple(window), tuple(strides), padding)
    return tuple((int(lo), int(hi)) for lo, hi in pads), "constant"


def patch_average(
    k: jax.Array,
    *,
    batch_ndim: int,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str = "SAME",
) -> jax.Array:
    """The covariance of a convolution's input patches, from the covariance of its inputs.

    ``k`` has shape ``(*batch, *S, *S)``: ``k[..., p, p']`` is the kernel between position ``p``
    of one input and ``p'`` of the other (``len(S) = len(window)`` spatial axes, ``batch_ndim``
    leading axes: 2 for an (N1, N2) kernel, 1 for per-input self-covariances). Returns

    ``T[o, o'] = (1 / |K|) sum_{delta in K} k[s o + delta, s o' + delta]``

    over the window's offsets ``delta`` (``|K| = prod(window)``) with strides ``s``, indices
    into the padded input: zero padding for ``"SAME"`` (positions outside contribute 0), none for
    ``"VALID"``, periodic for ``"CIRCULAR"`` (see :func:`conv_padding`); output positions as
    ``flax.linen.Conv``. A convolution is a dense layer on patches of ``|K| C`` features, so
    :func:`dense` with ``fan_in = |K| C`` applied to ``T`` (for the NNGP, the NTK and the
    variances alike) gives the kernels after the convolution, in either parameterization
    (Novak et al. 2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian
    Processes"; Arora et al. 2019, "On Exact Computation with an Infinitely Wide Neural Net").

    The window factorises over axes, so the average is taken one spatial axis at a time
    (``sum_i k_i`` shifted slices instead of ``prod_i k_i``). Keeps ``k``'s dtype.
    """
    nd = len(window)
    strides = (1,) * nd if strides is None else tuple(strides)
    spatial = tuple(k.shape[batch_ndim : batch_ndim + nd])
    if k.ndim != batch_ndim + 2 * nd or tuple(k.shape[batch_ndim + nd :]) != spatial:
        raise ValueError(
            f"patch_average needs a kernel of shape (*batch, *S, *S) with {batch_ndim} batch "
            f"axes and {nd} spatial axes (window {tuple(window)}); got shape {k.shape}."
        )
    if len(strides) != nd:
        raise ValueError(f"strides {strides} and window {tuple(window)} differ in length.")
    pads, mode = conv_padding(spatial, window, strides, padding)
    for i, (n, size, step, (lo, hi)) in enumerate(zip(spatial, window, strides, pads, strict=True)):
        a, b = batch_ndim + i, batch_ndim + nd + i
        out = (n + lo + hi - size) // step + 1
        if out < 1:
            raise ValueError(
                f"window {size} does not fit spatial axis {i} of size {n} with padding "
                f"{padding!r}."
            )
        if lo or hi:
            width = [(0, 0)] * k.ndim
            width[a] = width[b] = (lo, hi)
            k = jnp.pad(k, width, mode=mode)
        total = None
        for j in range(size):
            index = [slice(None)] * k.ndim
            index[a] = index[b] = slice(j, j + (out - 1) * step + 1, step)
            term = k[tuple(index)]
            total = term if total is None else total + term
        k = total * (1.0 / size)
    return k


def _two_layer_inputs(x1, x2):
    check_batched(x1, "x1")
    x1 = jnp.asarray(x1)
    if x2 is None:
        x2 = x1
    else:
        check_batched(x2, "x2")
        check_same_features(x1, x2)
        x2 = jnp.asarray(x2)
    dtype = jnp.result_type(_dtype(x1), _dtype(x2))
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    gram = jnp.matmul(x1, x2.T, precision=jax.lax.Precision.HIGHEST)
    return gram, jnp.sum(x1 * x1, axis=1)[:, None], jnp.sum(x2 * x2, axis=1)[None, :]


def two_layer_relu_nngp(x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
    """The study notebook's "two-layer ReLU NTK", which is only the NNGP part (first layer frozen).

    For ``f(x) = (1/sqrt(m)) sum_j v_j relu(w_j . x)`` with ``w_j ~ N(0, I_d)``, ``v_j ~ N(0, 1)``
    (no biases, no 1/sqrt(d) on the first layer) and ``m -> infinity``:

    ``K(x, x') = E[relu(w.x) relu(w.x')] = ||x|| ||x'|| (sin t + (pi - t) cos t) / (2 pi)``,

    ``t`` the angle between x and x'. It is the NTK of training only the readout ``v`` -- not the
    NTK of the network, which is :func:`two_layer_relu_ntk`. Shapes: ``(N1, d), (N2, d) ->
    (N1, N2)``; ``x2 = None`` means ``x2 = x1``.
    """
    gram, q11, q22 = _two_layer_inputs(x1, x2)
    return relu(gram, q11, q22).sigma


def two_layer_relu_ntk(x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
    """NTK of the two-layer ReLU network with both layers trained (Jacot et al. 2018).

    Same network as :func:`two_layer_relu_nngp`, ``f(x) = (1/sqrt(m)) sum_j v_j relu(w_j . x)``
    with ``w_j ~ N(0, I_d)``, ``v_j ~ N(0, 1)``, m -> infinity. The gradient w.r.t. ``v`` gives the
    NNGP, the gradient w.r.t. ``w`` adds ``x.x' E[relu'(w.x) relu'(w.x')]``:

    ``Theta(x, x') = ||x|| ||x'|| (sin t + (pi - t) cos t) / (2 pi) + x.x' (pi - t) / (2 pi)``.

    In ntkjax terms it is ``d * kernel_fn(MLP((m, 1), "relu", w_std=1, b_std=0))(x1, x2).ntk``
    (NTK parameterization divides the first layer by sqrt(d)).
    """
    gram, q11, q22 = _two_layer_inputs(x1, x2)
    maps = relu(gram, q11, q22)
    return maps.sigma + gram * maps.sigma_dot
