"""Activations: one declaration each, with a finite and an infinite-width meaning.

Every activation is an :class:`Activation`: on arrays it is an elementwise function (the finite
network); on a :class:`~ntkjax.Kernel` it maps the kernel by its closed-form rule (the infinite-
width limit). One declaration gives all three pieces: the function ``fn``, its kernel maps
``maps(q12, q11, q22) -> (sigma, sigma_dot)`` and its second moment ``variance(q)``; without
``maps`` the kernel comes from Gauss-Hermite quadrature of ``fn`` (:func:`gauss_hermite_maps`),
and without ``variance`` the second moment is ``maps(q, q, q).sigma``.

Notation. A layer's pre-activations at two inputs are jointly Gaussian in the infinite-width
limit, ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])``, with ``q12`` the NNGP entry and ``q11``,
``q22`` the two inputs' variances. An activation ``phi`` maps them to

* ``sigma = E[phi(u) phi(v)]``                   (the new NNGP entry),
* ``sigma_dot = E[phi'(u) phi'(v)]``              (Theta <- sigma_dot Theta),

(Neal 1996; Lee et al. 2018; Jacot et al. 2018). ``q11`` and ``q22`` broadcast against ``q12``.

Numerics. Everything is written in terms of the correlation ``c = q12 / sqrt(q11 q22)`` (computed
as ``q12 * rsqrt(q11) * rsqrt(q22)``, so no product of two variances is ever formed) and of row
quantities such as ``sqrt(q11)``. ``c`` is clipped to [-1, 1] and a ``c`` within ``8 eps`` of +-1
is taken as exactly +-1: the computed ``c`` of two identical inputs is only known to a few ulps,
and the angle ``arccos c`` of a ``c`` a few ulps below 1 is ``sqrt(2 * ulps)`` -- without this
the NTK diagonal of a ReLU network would be off by ~1e-4 in float32. A zero variance gives
``c = 0`` and a zero kernel, never NaN. Arc-cosines: float64 uses ``jnp.arccos``; other dtypes a
polynomial (Hastings, Abramowitz & Stegun 4.4.46, absolute error <= 2e-8), about ten times faster
than XLA's arccos on the CPU and below float32 resolution.

Sources of the closed forms: ReLU family -- arc-cosine kernels (Cho & Saul 2009); erf (Williams
1997); GELU -- derived here by Gaussian integration by parts (Tsuchida et al. 2021 give the same
kernel); sin / cos / rbf -- from E[exp(i k u)] = exp(-k^2 q / 2); sign (Price's theorem /
Sheppard's formula).

Adding an activation: declare ``name = Activation(fn, maps, variance, name=..., doc=...)`` in this
file (``maps`` and ``variance`` may be omitted, see above) and test its maps in
``tests/test_activations.py`` against Monte Carlo or quadrature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import float_dtype
from ntkjax.kernels import Kernel

__all__ = [
    "Activation",
    "ActivationMaps",
    "ab_relu",
    "abs",
    "correlation",
    "cos",
    "elementwise",
    "erf",
    "gauss_hermite_maps",
    "gauss_hermite_variance",
    "gelu",
    "identity",
    "is_activation",
    "leaky_relu",
    "rbf",
    "relu",
    "sign",
    "sin",
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
    dtype = float_dtype(q12)
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
    """Arc-cosine kernels of degree 1 and 0 with the Gaussian normalization:

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
    dtype = float_dtype(q12)
    return q12.astype(dtype), jnp.asarray(q11, dtype), jnp.asarray(q22, dtype)


def _ab_relu_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float, b: float
) -> ActivationMaps:
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


def _ab_relu_variance(q: jax.Array, a: float, b: float) -> jax.Array:
    """``E[phi(u)^2] = (a^2 + b^2) q / 2`` for u ~ N(0, q)."""
    return (0.5 * (a * a + b * b)) * jnp.asarray(q)


def _relu_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = max(x, 0)``: ``sigma = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi)``,
    ``sigma_dot = (pi - t) / (2 pi)``, ``t = arccos(c)`` (Cho & Saul 2009)."""
    return _ab_relu_maps(q12, q11, q22, 0.0, 1.0)


def _relu_variance(q: jax.Array) -> jax.Array:
    """``E[relu(u)^2] = q / 2``."""
    return _ab_relu_variance(q, 0.0, 1.0)


def _leaky_relu_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, negative_slope: float = 0.01
) -> ActivationMaps:
    """``phi(x) = x if x > 0 else negative_slope * x`` (see :func:`_ab_relu_maps`)."""
    return _ab_relu_maps(q12, q11, q22, negative_slope, 1.0)


def _leaky_relu_variance(q: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``(1 + negative_slope^2) q / 2``."""
    return _ab_relu_variance(q, negative_slope, 1.0)


def _abs_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = |x|`` (see :func:`_ab_relu_maps` with a = -1, b = 1)."""
    return _ab_relu_maps(q12, q11, q22, -1.0, 1.0)


def _abs_variance(q: jax.Array) -> jax.Array:
    """``E[u^2] = q``."""
    return _ab_relu_variance(q, -1.0, 1.0)


def _identity_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = x``: ``sigma = q12``, ``sigma_dot = 1``."""
    q12, _, _ = _broadcast_stats(q12, q11, q22)
    return ActivationMaps(q12, jnp.ones_like(q12))


def _identity_variance(q: jax.Array) -> jax.Array:
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


def _erf_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
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


def _erf_variance(q: jax.Array) -> jax.Array:
    """``(2/pi) arcsin(2q / (1 + 2q)) = (2/pi) atan2(2q, sqrt(1 + 4q))``."""
    q = jnp.asarray(q)
    return (2 / _PI) * jnp.arctan2(2 * q, jnp.sqrt(1 + 4 * q))


def _gelu_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
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


def _gelu_variance(q: jax.Array) -> jax.Array:
    """``q/4 + q arcsin(q / (1 + q)) / (2 pi) + q^2 / (pi (1 + q) sqrt(1 + 2q))`` (the
    diagonal of the GELU maps)."""
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


def _sin_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = sin``: ``sigma = exp(-(q11 + q22)/2) sinh(q12)``,
    ``sigma_dot = exp(-(q11 + q22)/2) cosh(q12)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    sinh_part, cosh_part = _exp_terms(correlation(q12, q11, q22), q11, q22)
    return ActivationMaps(sinh_part, cosh_part)


def _sin_variance(q: jax.Array) -> jax.Array:
    """``(1 - exp(-2q)) / 2``."""
    return -0.5 * jnp.expm1(-2 * jnp.asarray(q))


def _cos_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = cos``: ``sigma = exp(-(q11 + q22)/2) cosh(q12)``,
    ``sigma_dot = exp(-(q11 + q22)/2) sinh(q12)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    sinh_part, cosh_part = _exp_terms(correlation(q12, q11, q22), q11, q22)
    return ActivationMaps(cosh_part, sinh_part)


def _cos_variance(q: jax.Array) -> jax.Array:
    """``(1 + exp(-2q)) / 2``."""
    return 0.5 + 0.5 * jnp.exp(-2 * jnp.asarray(q))


def _rbf_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, gamma: float = 1.0
) -> ActivationMaps:
    """``phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: ``sigma = exp(-gamma (q11 + q22 - 2 q12))``
    (the RBF kernel of the pre-activations) and ``sigma_dot = 2 gamma sigma``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    sigma = jnp.exp(-gamma * ((s1 - s2) ** 2 + 2 * (s1 * s2) * (1 - c)))
    return ActivationMaps(sigma, (2 * gamma) * sigma)


def _rbf_variance(q: jax.Array, gamma: float = 1.0) -> jax.Array:
    """``1`` (``sqrt(2) sin(. + pi/4)`` has unit second moment for any Gaussian input)."""
    return jnp.ones_like(jnp.asarray(q))


def _sign_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi = sign``: ``sigma = (2/pi) arcsin(c)``; ``sigma_dot = 0`` (phi' = 0 a.e.)."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    sigma = (2 / _PI) * jnp.arctan2(c, _sin_angle(c))
    return ActivationMaps(sigma, jnp.zeros_like(sigma))


def _sign_variance(q: jax.Array) -> jax.Array:
    """``1`` for q > 0, ``0`` for a zero input (sign(0) = 0)."""
    q = jnp.asarray(q)
    return (q > 0).astype(float_dtype(q))


def _probabilists_hermite(n: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Nodes z and weights w with sum_a w_a f(z_a) ~ E[f(z)], z ~ N(0, 1)."""
    x, w = np.polynomial.hermite.hermgauss(n)
    return jnp.asarray(x * np.sqrt(2.0), dtype), jnp.asarray(w / np.sqrt(np.pi), dtype)


def _derivative(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    return lambda x: jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]


def gauss_hermite_maps(
    q12: jax.Array,
    q11: jax.Array,
    q22: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    num_quadrature: int = 64,
) -> ActivationMaps:
    """Any elementwise activation ``fn``, by two-dimensional Gauss-Hermite quadrature.

    ``u = sqrt(q11) z1``, ``v = sqrt(q22) (c z1 + sqrt(1 - c^2) z2)`` with independent standard
    normal ``z1, z2``, each integrated with ``num_quadrature`` probabilists' Gauss-Hermite nodes
    (``num_quadrature^2`` evaluations of ``fn`` per kernel entry); ``phi'`` is ``fn``'s derivative
    by forward-mode autodiff.

    Accuracy (default num_quadrature = 64, float64, max error relative to the largest entry, against
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
    z, w = _probabilists_hermite(num_quadrature, dtype)
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


def gauss_hermite_variance(
    q: jax.Array, fn: Callable[[jax.Array], jax.Array], num_quadrature: int = 64
) -> jax.Array:
    """``E[fn(u)^2]``, u ~ N(0, q), by Gauss-Hermite quadrature with ``num_quadrature`` nodes."""
    q = jnp.asarray(q)
    q = q.astype(float_dtype(q))
    z, w = _probabilists_hermite(num_quadrature, q.dtype)
    values = fn(_sqrt0(q)[..., None] * z)
    return jnp.tensordot(values * values, w, axes=1)




# --------------------------------------------------------------------------- the kernel rule


def _fusion_boundary(v: jax.Array) -> jax.Array:
    """``v`` unchanged, computed as the smaller of (v, v) by a sort, which XLA never fuses.

    ``jax.lax.optimization_barrier`` is expanded before fusion on the CPU, so without this XLA
    duplicates the whole O(N) variance recursion into every later layer's fusion and a depth-L
    network compiles in O(L^2) (depth 30: ~60 s instead of ~2 s).
    """
    return jnp.sort(jnp.stack([v, v], axis=-1), axis=-1)[..., 0]


def activation_kernel(
    k: Kernel,
    maps: Callable[..., ActivationMaps],
    variance: Callable[[jax.Array], jax.Array],
) -> Kernel:
    """The kernel after an elementwise activation with kernel maps
    ``maps(q12, q11, q22) -> (sigma, sigma_dot)`` and second moment ``variance(q)``:
    ``Sigma <- sigma``, ``Theta <- sigma_dot * Theta``, ``var <- variance(var)``.

    With spatial axes every entry ``[a, b, p, p']`` is mapped with the variances
    ``var1[a, p, p]`` and ``var2[b, p', p']``, and each input's covariance across positions
    ``var1[a, p, p']`` by the same map (its diagonal by ``maps`` at correlation 1). A kernel of
    same-position pairs (``diagonal_spatial``) maps ``[a, b, p]`` with ``var1[a, p]`` and
    ``var2[b, p]``, and its variances by ``variance``. The variances are read through
    :meth:`~ntkjax.Kernel.position_variances` (and not propagated when the kernel carries
    none)."""
    nd = k.spatial_ndim
    if nd == 0 or k.diagonal_spatial:
        d1, d2 = k.position_variances()
        sigma, sigma_dot = maps(k.nngp, d1[:, None], d2[None, :])
        var1, var2 = k.map_variances(variance)
    else:
        d1, d2 = k.position_variances()
        ones = (1,) * nd
        sigma, sigma_dot = maps(
            k.nngp,
            d1.reshape(d1.shape[0], 1, *d1.shape[1:], *ones),
            d2.reshape(1, d2.shape[0], *ones, *d2.shape[1:]),
        )

        def self_map(v: jax.Array, d: jax.Array) -> jax.Array:
            return maps(v, d.reshape(*d.shape, *ones), d.reshape(d.shape[0], *ones,
                                                                  *d.shape[1:]))[0]

        if k.var1 is None or k.var2 is None:
            var1 = var2 = None
        else:
            var1 = self_map(k.var1, d1)
            var2 = var1 if k.var2 is k.var1 else self_map(k.var2, d2)
    if var1 is None or var2 is None:
        pass
    elif var2 is var1:
        var1 = var2 = _fusion_boundary(var1)
    else:
        var1, var2 = _fusion_boundary(var1), _fusion_boundary(var2)
    return k.replace(nngp=sigma, ntk=k.ntk * sigma_dot, var1=var1, var2=var2)


# --------------------------------------------------------------------------- declarations


class Activation:
    """An elementwise activation with a finite and an infinite-width meaning.

    ``act(x, *params)`` is ``fn(x, *params)`` on arrays and the kernel rule
    (:func:`activation_kernel` with :meth:`kernel_maps` and :meth:`kernel_variance`) on a
    :class:`~ntkjax.Kernel`; parameters pass by position or keyword, or through
    ``functools.partial``. Usable inside any ``flax.linen`` module.

    Args:
      fn: ``fn(x, *params)``, elementwise on arrays.
      maps: ``maps(q12, q11, q22, *params) -> ActivationMaps``, the closed-form kernel maps;
        None uses Gauss-Hermite quadrature of ``fn`` (:func:`gauss_hermite_maps`) with
        ``num_quadrature`` nodes per dimension.
      variance: ``variance(q, *params) = E[fn(u)^2]`` for ``u ~ N(0, q)``; None uses
        ``maps(q, q, q).sigma`` (or quadrature without ``maps``).
      name: the activation's name (its ``__name__``).
      doc: its docstring (the function and its kernel, with sources).
      num_quadrature: quadrature nodes per dimension when ``maps`` is None.
    """

    def __init__(
        self,
        fn: Callable[..., jax.Array],
        maps: Callable[..., ActivationMaps] | None = None,
        variance: Callable[..., jax.Array] | None = None,
        *,
        name: str,
        doc: str = "",
        num_quadrature: int = 64,
    ) -> None:
        self.fn = fn
        self.maps = maps
        self.variance = variance
        self.num_quadrature = int(num_quadrature)
        self.__name__ = self.__qualname__ = name
        self.__doc__ = doc

    def __repr__(self) -> str:
        return f"ntkjax.nn.{self.__name__}"

    def __call__(self, x: Any, *params: Any, **kw_params: Any) -> Any:
        if isinstance(x, Kernel):
            return activation_kernel(
                x,
                lambda q12, q11, q22: self.kernel_maps(q12, q11, q22, *params, **kw_params),
                lambda q: self.kernel_variance(q, *params, **kw_params),
            )
        return self.fn(x, *params, **kw_params)

    def _bound_fn(self, params: tuple, kw_params: dict) -> Callable[[jax.Array], jax.Array]:
        return lambda u: self.fn(u, *params, **kw_params)

    def kernel_maps(
        self, q12: jax.Array, q11: jax.Array, q22: jax.Array, *params: Any, **kw_params: Any
    ) -> ActivationMaps:
        """``(sigma, sigma_dot)`` at pre-activation covariance ``[[q11, q12], [q12, q22]]``."""
        if self.maps is None:
            return gauss_hermite_maps(q12, q11, q22, self._bound_fn(params, kw_params),
                                      self.num_quadrature)
        return self.maps(q12, q11, q22, *params, **kw_params)

    def kernel_variance(self, q: jax.Array, *params: Any, **kw_params: Any) -> jax.Array:
        """``E[fn(u)^2]`` for ``u ~ N(0, q)``."""
        if self.variance is not None:
            return self.variance(q, *params, **kw_params)
        if self.maps is None:
            return gauss_hermite_variance(q, self._bound_fn(params, kw_params),
                                          self.num_quadrature)
        q = jnp.asarray(q)
        return self.maps(q, q, q, *params, **kw_params).sigma


def is_activation(fn: Any) -> bool:
    """True for an :class:`Activation` (or a ``functools.partial`` of one): a function with an
    infinite-width kernel rule.

    >>> is_activation(relu), is_activation(jnp.tanh)
    (True, False)
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    return isinstance(fn, Activation)


def _ab_relu_fn(x: jax.Array, a: float, b: float) -> jax.Array:
    return a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0)


def _leaky_relu_fn(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    return jnp.where(x > 0, x, negative_slope * x)


def _rbf_fn(x: jax.Array, gamma: float = 1.0) -> jax.Array:
    return math.sqrt(2) * jnp.sin(math.sqrt(2 * gamma) * x + math.pi / 4)


relu = Activation(
    jax.nn.relu, _relu_maps, _relu_variance, name="relu",
    doc="``max(x, 0)``; kernel: the arc-cosine kernel of degree 1 (Cho & Saul 2009), "
    "``sigma = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi)``, "
    "``sigma_dot = (pi - t) / (2 pi)``, ``t = arccos(c)``.",
)
leaky_relu = Activation(
    _leaky_relu_fn, _leaky_relu_maps, _leaky_relu_variance, name="leaky_relu",
    doc="``x if x > 0 else negative_slope * x`` (``leaky_relu(x, negative_slope=0.01)``); "
    "kernel as :data:`ab_relu` with ``a = negative_slope, b = 1``.",
)
ab_relu = Activation(
    _ab_relu_fn, _ab_relu_maps, _ab_relu_variance, name="ab_relu",
    doc="``a * min(x, 0) + b * max(x, 0)`` (``ab_relu(x, a, b)``); with "
    "``phi(x) = a x + (b - a) relu(x)``: ``sigma = a b q12 + (b - a)^2 sqrt(q11 q22) kappa1(c)``, "
    "``sigma_dot = a b + (b - a)^2 kappa0(c)`` (arc-cosine kernels, Cho & Saul 2009).",
)
abs = Activation(
    jnp.abs, _abs_maps, _abs_variance, name="abs",
    doc="``|x|``; kernel as :data:`ab_relu` with ``a = -1, b = 1``.",
)
erf = Activation(
    jax.lax.erf, _erf_maps, _erf_variance, name="erf",
    doc="``erf(x)``; ``sigma = (2/pi) arcsin(2 q12 / sqrt((1 + 2 q11)(1 + 2 q22)))``, "
    "``sigma_dot = (4/pi) / sqrt((1 + 2 q11)(1 + 2 q22) - 4 q12^2)`` (Williams 1997).",
)
gelu = Activation(
    functools.partial(jax.nn.gelu, approximate=False), _gelu_maps, _gelu_variance, name="gelu",
    doc="Exact GELU ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2``; closed-form kernel by Gaussian "
    "integration by parts (Tsuchida et al. 2021).",
)
sin = Activation(
    jnp.sin, _sin_maps, _sin_variance, name="sin",
    doc="``sin(x)``; ``sigma = exp(-(q11 + q22)/2) sinh(q12)``, "
    "``sigma_dot = exp(-(q11 + q22)/2) cosh(q12)``.",
)
cos = Activation(
    jnp.cos, _cos_maps, _cos_variance, name="cos",
    doc="``cos(x)``; ``sigma = exp(-(q11 + q22)/2) cosh(q12)``, "
    "``sigma_dot = exp(-(q11 + q22)/2) sinh(q12)``.",
)
rbf = Activation(
    _rbf_fn, _rbf_maps, _rbf_variance, name="rbf",
    doc="``sqrt(2) sin(sqrt(2 gamma) x + pi/4)`` (``rbf(x, gamma=1.0)``), whose NNGP map is the "
    "RBF kernel ``exp(-gamma (q11 + q22 - 2 q12))`` of the pre-activations; "
    "``sigma_dot = 2 gamma sigma``.",
)
sign = Activation(
    jnp.sign, _sign_maps, _sign_variance, name="sign",
    doc="``sign(x)``; ``sigma = (2/pi) arcsin(c)`` (Sheppard's formula); its derivative is 0 "
    "almost everywhere, so it stops the NTK (``sigma_dot = 0``).",
)
identity = Activation(
    lambda x: x, _identity_maps, _identity_variance, name="identity",
    doc="``x``; ``sigma = q12``, ``sigma_dot = 1``.",
)


def elementwise(fn: Callable[[jax.Array], jax.Array], *, num_quadrature: int = 64) -> Activation:
    """An activation from any elementwise jnp function ``fn``.

    On arrays it is ``fn``; on a Kernel its maps come from Gauss-Hermite quadrature with
    ``num_quadrature`` nodes per dimension (:func:`gauss_hermite_maps`, which states the accuracy
    at the default 64 nodes: 1e-11 for GELU, 5e-7 for erf, 1e-3 / 3e-2 (sigma / sigma_dot) for
    ReLU-like kinks). ``fn``'s derivative is taken by autodiff. Cost: ``num_quadrature^2``
    evaluations per entry.

    >>> softplus = elementwise(jax.nn.softplus)
    >>> is_activation(softplus)
    True
    """
    if not callable(fn):
        raise ValueError(f"elementwise needs a callable, got {type(fn).__name__}.")
    if int(num_quadrature) != num_quadrature or num_quadrature < 2:
        raise ValueError(f"num_quadrature must be an integer >= 2, got {num_quadrature!r}.")
    name = f"elementwise({getattr(fn, '__name__', repr(fn))})"
    return Activation(fn, name=name, num_quadrature=int(num_quadrature),
                      doc=f"Activation {name} with a Gauss-Hermite kernel rule.")
