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
from ``2 rsqrt(q11)`` and ``2 rsqrt(q22)``, whose product is a normal float for any two normal
variances, so no product of two variances is ever formed and nothing underflows) and of row
quantities such as ``sqrt(q11)``; determinants by ``hypot`` and row scales, polynomial kernels with
``max(sqrt(q), 1)^n`` factored out and applied last. So every map is finite for all normal
variances wherever its value is representable, and +-inf (never NaN) where it overflows
(``docs/numerical_behaviour.md`` has the ranges; ``tests/test_activations.py`` sweeps them).
``c`` is clipped to [-1, 1] and a ``c`` within ``8 eps`` of +-1
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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import float_dtype
from ntkjax._kernel import Kernel, per_input, pow2
from ntkjax._meanings import Declaration, FeatureStandIn, UnsupportedMeaning, register

__all__ = [
    "Activation",
    "ActivationMaps",
    "ab_relu",
    "abs",
    "activation_kernel",
    "correlation",
    "cos",
    "elementwise",
    "erf",
    "exp",
    "exp_normalized",
    "gabor",
    "gauss_hermite_maps",
    "gauss_hermite_variance",
    "gaussian",
    "gelu",
    "hermite",
    "identity",
    "is_activation",
    "leaky_relu",
    "monomial",
    "polynomial",
    "rbf",
    "rectified_monomial",
    "relu",
    "sigmoid_like",
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
    """``(sqrt(q), 1/sqrt(q))`` from one rsqrt (both 0 at q = 0), each behind a fusion boundary
    (``q`` holds one variance per input: computed once per input, where XLA:CPU recomputed the
    select and the product in every entry of the fused loop that broadcasts them)."""
    r = per_input(_rsqrt0(q))
    return per_input(q * r), r


def _split_pow2(r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(m, e)`` with ``r = m 2^e`` exactly and ``m`` in [0.5, 1) (``m = 0, e = 0`` at
    ``r = 0``); ``e`` carries no gradient, ``m`` all of it."""
    _, exponent = jnp.frexp(jax.lax.stop_gradient(r))
    return _times_pow2(r, -exponent), exponent


def _times_pow2(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x 2^exponent`` for an integer ``exponent`` of either sign, in two exact halves, so it is
    +-inf only when the product overflows (never ``inf * 0``: ``x = 0`` gives 0) -- the last step
    of the scale-before-multiply pattern."""
    half = exponent // 2
    a, b = pow2(half, x.dtype), pow2(exponent - half, x.dtype)
    out = (x * a) * b
    # only where a power overflowed is 0 * inf replaced (elsewhere x = 0 keeps its derivative)
    return jnp.where((x == 0) & ~(jnp.isfinite(a) & jnp.isfinite(b)), jnp.zeros_like(x), out)


def _rsqrt1p(q: jax.Array, k: float) -> jax.Array:
    """``1 / sqrt(1 + k q)`` (``k >= 0``, ``q >= 0``) without forming ``1 + k q``, which
    overflows for ``k > 1`` and variances near the dtype's largest number."""
    big = q > 1
    qs = jnp.where(big, q, 1)
    qsmall = jnp.where(big, 0, q)
    return jnp.where(big, jax.lax.rsqrt(qs) * jax.lax.rsqrt(k + 1 / qs),
                     jax.lax.rsqrt(1 + k * qsmall))


def _rsqrt_det(k: float, c: jax.Array, q11: jax.Array, q22: jax.Array,
               p1: jax.Array | None = None, p2: jax.Array | None = None) -> jax.Array:
    """``1 / sqrt(det)``, ``det = (1 + k q11)(1 + k q22) - k^2 q12^2 = L^2 + k^2 q11 q22 (1 - c^2)``
    with ``L = sqrt(1 + k (q11 + q22))`` (the determinant of the erf, GELU, Gaussian and Gabor
    integrals), scaled before squaring: ``det = L^2 (1 + r^2 (1 - c^2))``, ``r = k sqrt(q11 q22)
    / L <= sqrt(k sqrt(q11 q22) / 2)``, and ``L`` by ``hypot`` -- so neither ``det`` (~q^2, which
    overflows float32 from q ~ 1e19) nor any square of a variance is formed.

    Scaled variances (``Kernel.scaled``: true ``q = q_stored / p^2``, ``p = 2^-s`` per input):
    with ``p1``, ``p2`` given, the ``1`` of each factor is ``p^2`` and the result is the true
    ``1 / sqrt(det)`` times ``2^(s1 + s2)``: ``L^2 = (p1 p2)^2 + k ((p2 s1)^2 + (p1 s2)^2)`` and
    ``det = hypot(L, k s1 s2 sqrt(1 - c^2))^2``."""
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    if p1 is not None and p2 is not None:
        big_l = jnp.hypot(p1 * p2, math.sqrt(k) * jnp.hypot(p2 * s1, p1 * s2))
        # r^2 ~ k sqrt(true q11 q22) / 2 may overflow here: det = hypot(L, k s1 s2 sin t)^2,
        # sin t = 0 at |c| = 1 without the infinite derivative of sqrt at 0 (a NaN gradient)
        sin2 = (1 - c) * (1 + c)
        inside = sin2 > 0
        sin_t = jnp.where(inside, jnp.sqrt(jnp.where(inside, sin2, 1)), 0)
        return 1 / jnp.hypot(big_l, k * (s1 * s2) * sin_t)
    big_l = jnp.hypot(1.0, math.sqrt(k) * jnp.hypot(s1, s2))
    r = k * ((s1 * s2) / big_l)
    return jax.lax.rsqrt(1 + (r * r) * ((1 - c) * (1 + c))) / big_l


def _doubled_rsqrt(r: jax.Array) -> jax.Array:
    """``2 r`` (``r = 1 / sqrt(q)``, one per input), capped at the largest float below
    ``2^(maxexp / 2)`` (float32: ``2^64 (1 - 2^-24)``), for :func:`_correlation_from_rsqrt`.

    For normal variances ``q`` in [tiny, max], ``r`` lies in (2^-(maxexp/2), 2^(maxexp/2 - 1)]
    (float32: (2^-64, 2^63]), so the product of two doubled ones lies in
    (2^(2 - maxexp), 2^maxexp) -- float32 (2^-126, 2^128): a normal float for every pair of
    normal variances, where ``r1 r2`` itself underflows once both pass ~2^126 (flushed to 0 on
    CPU and GPU: every ReLU kernel entry at |x| ~ 1e19 was ``q / pi``). The cap moves only
    ``r = 2^63`` (``q`` the smallest normal) by an ulp."""
    info = jnp.finfo(r.dtype)
    cap = float(2.0 ** (info.maxexp // 2)) * (1 - float(info.epsneg))
    # computed once per input (traced: behind a fusion boundary), not in every entry of the
    # fused loop
    return per_input(jnp.minimum(2 * r, cap))


def _correlation_from_rsqrt(q12: jax.Array, t1: jax.Array, t2: jax.Array) -> jax.Array:
    """``q12 r1 r2`` from the doubled ``t = 2 r`` (``r = 1 / sqrt(q)``, :func:`_doubled_rsqrt`),
    clipped and snapped (:func:`_snap`): ``(q12 (t1 t2)) / 4``.

    ``t1 t2`` is normal for any two normal variances (:func:`_doubled_rsqrt`), and since
    ``|q12| <= sqrt(q11 q22)``, ``|q12 t1 t2| <= 4``: nothing under- or overflows, and the
    division by 4 is exact. ``t1 t2 = t2 t1`` to the last bit, so the correlation is symmetric
    in (q11, q22) whatever the compiler does (a kernel of x with itself is exactly symmetric).
    Only per-input quantities are formed outside the entry loop (``t``, from the per-input
    rsqrt); per entry: three multiplications (the earlier symmetric form, the smaller of
    ``(q12 r1) r2`` and ``(q12 r2) r1``, took four and a minimum; a power-of-two split of
    ``r`` per entry made the ReLU kernels of images 2-4x slower)."""
    return _snap((q12 * (t1 * t2)) * 0.25)


def correlation(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> jax.Array:
    """``c = q12 / sqrt(q11 q22)``: clipped to [-1, 1], snapped to +-1 within 8 eps, and 0 where
    a variance is 0; computed from scaled quantities, so it is exact to a few ulps for any
    normal (non-subnormal) variances, up to the dtype's largest number."""
    q12 = jnp.asarray(q12)
    dtype = float_dtype(q12)
    q12 = q12.astype(dtype)
    return _correlation_from_rsqrt(
        q12, _doubled_rsqrt(_rsqrt0(jnp.asarray(q11, dtype))),
        _doubled_rsqrt(_rsqrt0(jnp.asarray(q22, dtype))),
    )


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
    c = _correlation_from_rsqrt(q12, _doubled_rsqrt(r1), _doubled_rsqrt(r2))
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


def _erf_like_terms(c, q11, q22, k, t1=None, t2=None):
    """Row terms for erf (k = 2) and GELU (k = 1): ``e = 1/(1 + k q)``, ``w = q e`` and
    ``g = 1 - rho^2 = e1 + e2 - e1 e2 + k^2 w1 w2 (1 - c^2)`` with ``rho = k c sqrt(w1 w2)``
    -- positive and free of cancellation at any scale. ``w = (1 - e) / k`` once ``e <= 1/2``,
    which stays right (``1/k``) where ``1 + k q`` overflows and ``e`` is 0. Scaled variances
    (true ``q = q_stored / t``, ``t = 2^-2s``; ``t1``, ``t2`` given): ``e = t / (t + k q)`` and
    ``w = q / (t + k q)``, the same (scale-free) terms."""
    if t1 is None or t2 is None:
        e1, e2 = 1 / (1 + k * q11), 1 / (1 + k * q22)
        w1 = jnp.where(e1 > 0.5, q11 * e1, (1 - e1) / k)
        w2 = jnp.where(e2 > 0.5, q22 * e2, (1 - e2) / k)
    else:
        i1, i2 = 1 / (t1 + k * q11), 1 / (t2 + k * q22)
        e1, e2 = t1 * i1, t2 * i2
        w1 = jnp.where(e1 > 0.5, q11 * i1, (1 - e1) / k)
        w2 = jnp.where(e2 > 0.5, q22 * i2, (1 - e2) / k)
    uu = _sqrt0(w1) * _sqrt0(w2)
    g = e1 + e2 - e1 * e2 + (k * k) * (w1 * w2) * ((1 - c) * (1 + c))
    return e1, e2, w1, w2, uu, g


def _erf_unit_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array,
                   scales: tuple[jax.Array, jax.Array] | None = None) -> ActivationMaps:
    """``phi = erf``: ``sigma = (2/pi) arcsin(2 q12 / sqrt((1 + 2 q11)(1 + 2 q22)))`` and
    ``sigma_dot = (4/pi) / sqrt((1 + 2 q11)(1 + 2 q22) - 4 q12^2)`` (Williams 1997).

    Computed as ``arcsin(rho) = atan2(rho, sqrt(1 - rho^2))`` with ``1 - rho^2`` from row terms,
    and ``sigma_dot`` by :func:`_rsqrt_det` (finite up to the dtype's largest variance).
    With ``scales = (p1, p2)`` (scaled variances, :func:`_scaled_erf_maps`) the true ``sigma``
    and ``sigma_dot 2^(s1 + s2)``.
    """
    c = correlation(q12, q11, q22)
    p1, p2 = (None, None) if scales is None else scales
    t1, t2 = (None, None) if p1 is None or p2 is None else (p1 * p1, p2 * p2)
    _, _, _, _, uu, g = _erf_like_terms(c, q11, q22, 2.0, t1, t2)
    sigma = (2 / _PI) * jnp.arctan2(2 * c * uu, jnp.sqrt(g))
    sigma_dot = (4 / _PI) * _rsqrt_det(2.0, c, q11, q22, p1, p2)
    return ActivationMaps(sigma, sigma_dot)


def _erf_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float = 1.0, b: float = 1.0,
    c: float = 0.0,
) -> ActivationMaps:
    """``phi(x) = a erf(b x) + c``: with ``erf(b u)`` of variance-scaled inputs ``b^2 q``
    (Williams 1997) and ``E[erf] = 0``: ``sigma = a^2 sigma_erf(b^2 q) + c^2``,
    ``sigma_dot = a^2 b^2 sigma_dot_erf(b^2 q)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    b2 = float(b) * float(b)
    unit = _erf_unit_maps(b2 * q12, b2 * q11, b2 * q22)
    a2 = float(a) * float(a)
    return ActivationMaps(a2 * unit.sigma + float(c) ** 2, (a2 * b2) * unit.sigma_dot)


def _scaled_erf_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, s1: jax.Array, s2: jax.Array,
    a: float = 1.0, b: float = 1.0, c: float = 0.0,
) -> ActivationMaps:
    """:func:`_erf_maps` of scaled variances (true ``q = q_stored 2^(s1 + s2)``): the true
    ``sigma`` (bounded: its scale is 0) and ``sigma_dot 2^(s1 + s2)``, the factor that maps the
    stored NTK to the true one. Williams' ``1 + 2 q`` becomes ``2^-2s + 2 q_stored``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    b2 = float(b) * float(b)
    scales = (pow2(-s1, q11.dtype), pow2(-s2, q22.dtype))
    unit = _erf_unit_maps(b2 * q12, b2 * q11, b2 * q22, scales)
    a2 = float(a) * float(a)
    return ActivationMaps(a2 * unit.sigma + float(c) ** 2, (a2 * b2) * unit.sigma_dot)


def _erf_variance(q: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    """``a^2 (2/pi) arcsin(2 b^2 q / (1 + 2 b^2 q)) + c^2``, with
    ``arcsin(2q / (1 + 2q)) = atan2(2q, sqrt(1 + 4q)) = atan2(2 sqrt(q) (sqrt(q) / sqrt(1 + 4q)),
    1)`` (no overflow of ``1 + 4q``)."""
    q = float(b) ** 2 * jnp.asarray(q)
    s = _sqrt0(q)
    angle = jnp.arctan2(2 * s * (s * _rsqrt1p(q, 4.0)), 1.0)
    return float(a) ** 2 * (2 / _PI) * angle + float(c) ** 2


def _gelu_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, approximate: bool = False
) -> ActivationMaps:
    """``phi(x) = x Phi(x)`` (exact GELU; ``approximate`` only changes the finite network, as in
    neural-tangents). With ``A = (1 + q11)(1 + q22)``, ``D = A - q12^2`` and
    ``rho = q12 / sqrt(A)``:

    ``sigma = q12/4 + q12 arcsin(rho) / (2 pi) + (q11 q22 D + q12^2) / (2 pi A sqrt(D))``,

    from Gaussian integration by parts on ``E[u v 1{u > z1} 1{v > z2}]`` (z independent standard
    normals); ``sigma_dot = d sigma / d q12`` (Price's theorem), differentiated by hand:

    ``sigma_dot = 1/4 + arcsin(rho)/(2 pi) + q12 / (2 pi sqrt(D))
    + q12 (2 D - q11 q22 D + q12^2) / (2 pi A D^{3/2})``.

    The code writes both with row terms ``e = 1/(1 + q)``, ``w = q e`` and
    ``g = D / A = e1 + e2 - e1 e2 + w1 w2 (1 - c^2)``, so no product of variances is formed, and
    ``sigma_dot``'s last two terms as one free of cancellation (see the code). Where ``g`` is
    divided by, it is replaced by scaled quantities: with ``re = 1 / sqrt(1 + q)`` (so ``e =
    re^2``) and ``h = 1 / sqrt(D)`` (:func:`_rsqrt_det`), ``sqrt(g) = re1 re2 / h`` -- ``g`` and
    ``e`` themselves underflow float32 from variances ~1e38, where ``e / sqrt(g)`` was 0/0.
    """
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    # the row terms from the sorted pair of variances, per entry: computed per row, XLA:CPU
    # fused them into jitted GELU networks with biases so that entries (i, j) and (j, i)
    # differed in the last bit (~2 % of them); sorted, the two are one computation on the same
    # operands (g, uu and w1 w2 are symmetric in the two variances)
    _, _, w1, w2, uu, g = _erf_like_terms(c, jnp.minimum(q11, q22), jnp.maximum(q11, q22), 1.0)
    sg = jnp.sqrt(g)
    asin = jnp.arctan2(c * uu, sg)
    re1, re2 = _rsqrt1p(q11, 1.0), _rsqrt1p(q22, 1.0)
    h = _rsqrt_det(1.0, c, q11, q22)
    rr, ww = re1 * re2, w1 * w2
    scale = _sqrt0(q11) * _sqrt0(q22)
    inv_2pi = 1 / (2 * _PI)
    # (g + c^2 e1 e2) / sqrt(g) = sqrt(g) + c^2 re1 re2 h
    sigma = scale * (c * (0.25 + asin * inv_2pi) + uu * (sg + c * c * rr * h) * inv_2pi)
    # the last two terms of sigma_dot share c uu / (2 pi sqrt(g)) and, with w = 1 - e, their
    # bracket 1 + 2 e1 e2 - w1 w2 + c^2 e1 e2 w1 w2 / g = e1 + e2 + e1 e2 + c^2 e1 e2 w1 w2 / g
    # has no cancellation (at large variances and |c| ~ 1 each term alone is huge); divided by
    # sqrt(g) = re1 re2 / h it is h (re1/re2 + re2/re1 + re1 re2) + c^2 w1 w2 h (h/re1) (h/re2)
    # (h <= re1, re2), every factor bounded
    # re1/re2 + re2/re1 from the sorted pair: XLA:CPU may contract the sum of the two quotients
    # (each a product with a reciprocal) into a fused multiply-add, which rounds the two orders
    # differently -- sorted, the (i, j) and (j, i) entries are the same computation
    lo, hi = jnp.minimum(re1, re2), jnp.maximum(re1, re2)
    sigma_dot = 0.25 + asin * inv_2pi + (c * uu * inv_2pi) * (
        h * (hi / lo + lo / hi + rr) + c * c * ww * h * ((h / re1) * (h / re2))
    )
    return ActivationMaps(sigma, sigma_dot)


def _gelu_variance(q: jax.Array, approximate: bool = False) -> jax.Array:
    """``q/4 + q arcsin(q / (1 + q)) / (2 pi) + q^2 / (pi (1 + q) sqrt(1 + 2q))`` (the
    diagonal of the GELU maps)."""
    q = jnp.asarray(q)
    s, rr = _sqrt0(q), _rsqrt1p(q, 2.0)  # rr = 1 / sqrt(1 + 2q)
    asin = jnp.arctan2(s * (s * rr), 1.0)  # atan2(q, sqrt(1 + 2q)) without overflow
    e = 1 / (1 + q)
    w = jnp.where(e > 0.5, q * e, 1 - e)  # q / (1 + q)
    return q * (0.25 + asin / (2 * _PI) + w * rr / _PI)


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


def _phase_weights(c: float) -> tuple[float, float]:
    """``(cos(c)^2, sin(c)^2)`` as Python floats (exactly ``(1, 0)`` at ``c = 0``)."""
    return math.cos(c) ** 2, math.sin(c) ** 2


def _sin_cos_parts(q12, q11, q22, b):
    """``(S, C) = (E[sin(b u) sin(b v)], E[cos(b u) cos(b v)])
    = exp(-b^2 (q11 + q22)/2) (sinh(b^2 q12), cosh(b^2 q12))`` (from ``E[exp(i k u)] =
    exp(-k^2 q / 2)``)."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    b2 = float(b) * float(b)
    return _exp_terms(correlation(q12, q11, q22), b2 * q11, b2 * q22)


def _sin_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float = 1.0, b: float = 1.0,
    c: float = 0.0,
) -> ActivationMaps:
    """``phi(x) = a sin(b x + c) = a (cos c sin(b x) + sin c cos(b x))``; the cross terms
    ``E[sin(b u) cos(b v)]`` vanish (odd in ``(u, v)``), so
    ``sigma = a^2 (cos^2 c S + sin^2 c C)``, ``sigma_dot = a^2 b^2 (cos^2 c C + sin^2 c S)``
    with ``S``, ``C`` of :func:`_sin_cos_parts`."""
    s_part, c_part = _sin_cos_parts(q12, q11, q22, b)
    wc, ws = _phase_weights(c)
    a2, b2 = float(a) ** 2, float(b) ** 2
    return ActivationMaps(a2 * (wc * s_part + ws * c_part), (a2 * b2) * (wc * c_part + ws * s_part))


def _sin_variance(q: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    """``a^2 (cos^2 c (1 - e^{-2 b^2 q}) + sin^2 c (1 + e^{-2 b^2 q})) / 2``."""
    q = float(b) ** 2 * jnp.asarray(q)
    wc, ws = _phase_weights(c)
    return float(a) ** 2 * (wc * (-0.5 * jnp.expm1(-2 * q)) + ws * (0.5 + 0.5 * jnp.exp(-2 * q)))


def _cos_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float = 1.0, b: float = 1.0,
    c: float = 0.0,
) -> ActivationMaps:
    """``phi(x) = a cos(b x + c) = a (cos c cos(b x) - sin c sin(b x))``:
    ``sigma = a^2 (cos^2 c C + sin^2 c S)``, ``sigma_dot = a^2 b^2 (cos^2 c S + sin^2 c C)``."""
    s_part, c_part = _sin_cos_parts(q12, q11, q22, b)
    wc, ws = _phase_weights(c)
    a2, b2 = float(a) ** 2, float(b) ** 2
    return ActivationMaps(a2 * (wc * c_part + ws * s_part), (a2 * b2) * (wc * s_part + ws * c_part))


def _cos_variance(q: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    """``a^2 (cos^2 c (1 + e^{-2 b^2 q}) + sin^2 c (1 - e^{-2 b^2 q})) / 2``."""
    q = float(b) ** 2 * jnp.asarray(q)
    wc, ws = _phase_weights(c)
    return float(a) ** 2 * (wc * (0.5 + 0.5 * jnp.exp(-2 * q)) + ws * (-0.5 * jnp.expm1(-2 * q)))


def _rbf_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, gamma: float = 1.0
) -> ActivationMaps:
    """``phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: ``sigma = exp(-gamma (q11 + q22 - 2 q12))``
    (the RBF kernel of the pre-activations) and ``sigma_dot = 2 gamma sigma``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    # (s1 s2) (2 (1 - c)), not (2 s1 s2)(1 - c): 2 s1 s2 overflows at the largest variances
    sigma = jnp.exp(-gamma * ((s1 - s2) ** 2 + (s1 * s2) * (2 * (1 - c))))
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


def _exp_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float = 1.0, b: float = 1.0
) -> ActivationMaps:
    """``phi(x) = a exp(b x)``: from ``E[exp(b (u + v))] = exp(b^2 (q11 + q22 + 2 q12) / 2)``,
    ``sigma = a^2 exp(b^2 ((q11 + q22)/2 + q12))`` and ``sigma_dot = b^2 sigma``. The exponent
    is ``(s1 - s2)^2 / 2 + s1 s2 (1 + c) >= 0`` (``s = sqrt(q)``): no ``inf - inf`` where
    ``q11 + q22`` overflows, so an overflowing kernel is +inf, never NaN."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    b2, a2 = float(b) ** 2, float(a) ** 2
    shape = jnp.broadcast_shapes(q12.shape, jnp.shape(q11), jnp.shape(q22))
    if a2 == 0 or b2 == 0:  # a constant a^2 (or 0), without 0 * inf at huge variances
        sigma = jnp.full(shape, a2, q12.dtype)
        return ActivationMaps(sigma, b2 * sigma)
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    sigma = a2 * jnp.exp(b2 * (0.5 * (s1 - s2) ** 2 + (s1 * s2) * (1 + c)))
    return ActivationMaps(sigma, b2 * sigma)


def _exp_variance(q: jax.Array, a: float = 1.0, b: float = 1.0) -> jax.Array:
    """``a^2 exp(2 b^2 q)``."""
    return float(a) ** 2 * jnp.exp(2 * float(b) ** 2 * jnp.asarray(q))


def _check_gaussian_b(b: float) -> None:
    if not float(b) <= 0:
        raise ValueError(
            f"gaussian(x, a, b) = a exp(b x^2) needs b <= 0, got b={b}: for b > 0 its second "
            "moment E[exp(2 b u^2)] is infinite once the variance reaches 1 / (4 b)."
        )


def _gaussian_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, a: float = 1.0, b: float = -1.0
) -> ActivationMaps:
    """``phi(x) = a exp(b x^2)``, b <= 0: a Gaussian integral gives, with ``beta = -2 b``,
    ``det = (1 + beta q11)(1 + beta q22) - beta^2 q12^2
    = 1 + beta (q11 + q22) + beta^2 q11 q22 (1 - c^2) >= 1``,
    ``sigma = a^2 / sqrt(det)`` and ``sigma_dot = d sigma / d q12 = 4 a^2 b^2 q12 / det^{3/2}``
    (Price's theorem). ``1 / sqrt(det)`` by :func:`_rsqrt_det` (``det`` ~ q^2 overflowed float32
    from q ~ 1e19) and ``q12 / det^{3/2} = c (sqrt(q11) h) (sqrt(q22) h) h``, ``h = 1 / sqrt(det)``,
    each factor bounded."""
    _check_gaussian_b(b)
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    h = _rsqrt_det(-2.0 * float(b), c, q11, q22)
    a2 = float(a) ** 2
    cross = c * ((_sqrt0(q11) * h) * (_sqrt0(q22) * h)) * h
    return ActivationMaps(a2 * h, (a2 * 4 * float(b) ** 2) * cross)


def _scaled_gaussian_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, s1: jax.Array, s2: jax.Array,
    a: float = 1.0, b: float = -1.0,
) -> ActivationMaps:
    """:func:`_gaussian_maps` of scaled variances (true ``q = q_stored 2^(s1 + s2)``): with
    ``h = 2^(s1 + s2) / sqrt(det)`` (:func:`_rsqrt_det` with the scales) the true
    ``sigma = a^2 h p1 p2`` (``p = 2^-s``) and ``sigma_dot 2^(s1 + s2) = 4 a^2 b^2 c
    (sqrt(q11) h)(sqrt(q22) h)(h p1 p2)`` (stored ``q``)."""
    _check_gaussian_b(b)
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    p1, p2 = pow2(-s1, q11.dtype), pow2(-s2, q22.dtype)
    c = correlation(q12, q11, q22)
    h = _rsqrt_det(-2.0 * float(b), c, q11, q22, p1, p2)
    a2 = float(a) ** 2
    unscaled = (h * p1) * p2  # the true 1 / sqrt(det)
    cross = c * ((_sqrt0(q11) * h) * (_sqrt0(q22) * h)) * unscaled
    return ActivationMaps(a2 * unscaled, (a2 * 4 * float(b) ** 2) * cross)


def _gaussian_variance(q: jax.Array, a: float = 1.0, b: float = -1.0) -> jax.Array:
    """``a^2 / sqrt(1 - 4 b q)``."""
    _check_gaussian_b(b)
    return float(a) ** 2 * _rsqrt1p(jnp.asarray(q), -4.0 * float(b))


def _exp_normalized_fn(x: jax.Array, gamma: float = 1.0, shift: float = -1.0) -> jax.Array:
    raise UnsupportedMeaning(
        "ntkjax.nn.exp_normalized", "finite",
        "it has no finite-width function (as in neural-tangents): it is defined only on "
        "kernels, as the normalized Gaussian kernel of Shankar et al. 2020.")


def _exp_normalized_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, gamma: float = 1.0, shift: float = -1.0
) -> ActivationMaps:
    """The "Gaussian normalized kernel" (Shankar et al. 2020, "Neural Kernels Without
    Tangents", section 3): ``sigma = sqrt(q11 q22) exp(gamma (c + shift))`` with
    ``c = q12 / sqrt(q11 q22)``, and ``sigma_dot = d sigma / d q12 = gamma exp(gamma (c +
    shift))``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    e = jnp.exp(float(gamma) * (c + float(shift)))
    return ActivationMaps(_sqrt0(q11) * _sqrt0(q22) * e, float(gamma) * e)


def _exp_normalized_variance(q: jax.Array, gamma: float = 1.0, shift: float = -1.0) -> jax.Array:
    """``q exp(gamma (1 + shift))``."""
    return jnp.asarray(q) * math.exp(float(gamma) * (1 + float(shift)))


# ---- polynomials, by their Hermite expansion (Mehler's formula)


def _check_coefficients(coef: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in np.asarray(coef, dtype=np.float64).ravel())
    except (TypeError, ValueError) as err:
        raise ValueError(f"polynomial coefficients must be numbers, got {coef!r}.") from err
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"polynomial needs at least one finite coefficient, got {coef!r}.")
    return values


@functools.lru_cache(maxsize=256)
def _hermite_weights(coef: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """``w[l][i]`` with ``H_l(s) = sum_i w[l][i] s^i``: the coefficient of ``He_l(z) / sqrt(l!)``
    in ``p(s z) = sum_i coef_i s^i z^i``, from ``z^i = sum_k i! / (2^k k! (i - 2k)!) He_{i-2k}``
    (so ``w[l][i] = coef_i i! / (2^k k! sqrt(l!))``, ``k = (i - l)/2``)."""
    n = len(coef)
    rows = []
    for level in range(n):
        row = [0.0] * n
        for i in range(level, n, 2):
            k = (i - level) // 2
            row[i] = coef[i] * math.factorial(i) / (
                2**k * math.factorial(k) * math.sqrt(math.factorial(level))
            )
        rows.append(tuple(row))
    return tuple(rows)


def _poly(ws: tuple[float, ...], s: jax.Array) -> jax.Array:
    """``sum_i ws[i] s^i`` by Horner's rule."""
    out = jnp.zeros_like(s) + ws[-1]
    for w in ws[-2::-1]:
        out = out * s + w
    return out


def _scaled_poly(ws: tuple[float, ...], s: jax.Array) -> jax.Array:
    """``sum_i ws[i] s^i / max(s, 1)^n`` (``n = len(ws) - 1``): for ``s > 1`` by Horner's rule in
    ``1/s`` on the reversed coefficients, so it is bounded by ``sum |ws|`` at any ``s``."""
    big = s > 1
    inv = 1 / jnp.where(big, s, 1)
    return jnp.where(big, _poly(ws[::-1], inv), _poly(ws, jnp.where(big, 1, s)))


def _polynomial_sigma(coef: tuple[float, ...], c, s1, s2) -> jax.Array:
    """``E[p(u) p(v)] = sum_l H_l(s1) H_l(s2) c^l`` (Mehler's formula: ``E[He_l(z1) He_m(z2)] =
    l! c^l [l = m]`` for standard normals of correlation ``c``).

    Scaled before multiplying: each ``H_l`` (of degree ``d_l``) is divided by ``t^{d_l}``
    (``t = max(s, 1)``; :func:`_scaled_poly`), so every term is a bounded number times a power
    of two ``2^{E_l}``; the terms are summed relative to the largest ``E_l`` among the nonzero
    ones, which is applied last (:func:`_times_pow2`). So an overflowing kernel is +-inf with
    the sign of the sum -- not ``inf - inf`` between terms of opposite signs, nor ``inf * 0`` at
    ``c = 0`` (NaN) -- a kernel that is exactly 0 stays 0, and no term underflows early."""
    (m1, e1), (m2, e2) = (_split_pow2(jnp.maximum(s, 1)) for s in (s1, s2))
    # t = (2m) 2^(e-1) with 2m in [1, 2): exactly 1 (no scaling at all) where t = 1
    mm, ee = (2 * m1) * (2 * m2), e1 + e2 - 2
    terms, exponents, power = [], [], None
    for ws in _hermite_weights(coef):
        nonzero = [i for i, w in enumerate(ws) if w != 0]
        ws = ws[: nonzero[-1] + 1] if nonzero else (0.0,)
        degree = len(ws) - 1
        power = jnp.ones_like(c) if power is None else power * c
        terms.append(_scaled_poly(ws, s1) * _scaled_poly(ws, s2) * power * mm**degree)
        exponents.append(degree * ee)
    floor = jnp.iinfo(ee.dtype).min // 4
    top = functools.reduce(jnp.maximum, [jnp.where(x != 0, e, floor)
                                         for x, e in zip(terms, exponents, strict=True)])
    total = sum(_times_pow2(x, e - top) for x, e in zip(terms, exponents, strict=True))
    return _times_pow2(jnp.asarray(total), top)


def _derivative_coefficients(coef: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(i * coef[i] for i in range(1, len(coef))) or (0.0,)


def _polynomial_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, coef: Any = (0.0, 1.0)
) -> ActivationMaps:
    """``phi(x) = sum_i coef[i] x^i``: expanding ``phi(sqrt(q) z)`` in normalized probabilists'
    Hermite polynomials ``He_l / sqrt(l!)`` with coefficients ``H_l(sqrt(q))``,
    ``sigma = sum_l H_l(sqrt(q11)) H_l(sqrt(q22)) c^l`` (Mehler's formula); ``sigma_dot`` is the
    same with ``phi'``. Exact for any variances (neural-tangents' Polynomial uses the same
    expansion)."""
    coef = _check_coefficients(coef)
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    s1, s2 = _sqrt0(q11), _sqrt0(q22)
    sigma = _polynomial_sigma(coef, c, s1, s2)
    sigma_dot = _polynomial_sigma(_derivative_coefficients(coef), c, s1, s2)
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    return ActivationMaps(jnp.broadcast_to(sigma, shape), jnp.broadcast_to(sigma_dot, shape))


def _polynomial_variance(q: jax.Array, coef: Any = (0.0, 1.0)) -> jax.Array:
    """``E[p(u)^2] = sum_l H_l(sqrt(q))^2``."""
    coef = _check_coefficients(coef)
    q = jnp.asarray(q)
    q = q.astype(float_dtype(q))
    s = _sqrt0(q)
    return _polynomial_sigma(coef, jnp.ones_like(s), s, s)


def _polynomial_fn(x: jax.Array, coef: Any = (0.0, 1.0)) -> jax.Array:
    coef = _check_coefficients(coef)
    x = jnp.asarray(x)
    return _poly(coef, x.astype(float_dtype(x)))


def _check_degree(degree: Any, name: str) -> int:
    if isinstance(degree, bool) or int(degree) != degree or degree < 0:
        raise ValueError(f"{name} needs an integer degree >= 0, got {degree!r}.")
    return int(degree)


def _monomial_coefficients(degree: Any) -> tuple[float, ...]:
    degree = _check_degree(degree, "monomial")
    return (0.0,) * degree + (1.0,)


def _monomial_fn(x: jax.Array, degree: int = 1) -> jax.Array:
    return _polynomial_fn(x, _monomial_coefficients(degree))


def _monomial_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, degree: int = 1
) -> ActivationMaps:
    """``phi(x) = x^n``: :func:`_polynomial_maps` of ``x^n`` -- e.g. ``n = 2``:
    ``sigma = q11 q22 + 2 q12^2``, ``sigma_dot = 4 q12`` (Isserlis' theorem)."""
    return _polynomial_maps(q12, q11, q22, _monomial_coefficients(degree))


def _monomial_variance(q: jax.Array, degree: int = 1) -> jax.Array:
    """``(2n - 1)!! q^n``."""
    degree = _check_degree(degree, "monomial")
    q = jnp.asarray(q)
    return float(math.prod(range(2 * degree - 1, 0, -2))) * q**degree


@functools.lru_cache(maxsize=64)
def _hermite_coefficients(degree: int) -> tuple[float, ...]:
    """Power-series coefficients of ``He_n(x) / sqrt(n!)`` (probabilists' Hermite)."""
    he = np.polynomial.hermite_e.herme2poly([0.0] * degree + [1.0])
    return tuple(float(v) / math.sqrt(math.factorial(degree)) for v in he)


def _hermite_fn(x: jax.Array, degree: int = 1) -> jax.Array:
    return _polynomial_fn(x, _hermite_coefficients(_check_degree(degree, "hermite")))


def _hermite_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, degree: int = 1
) -> ActivationMaps:
    """``phi = He_n / sqrt(n!)``: :func:`_polynomial_maps` of its coefficients, exact for any
    variances; at unit variances ``sigma = q12^n`` and ``sigma_dot = n q12^{n-1}``
    (``E[He_n(u) He_n(v)] = n! c^n``), neural-tangents' Hermite kernel, which assumes unit
    variances (e.g. after a LayerNorm)."""
    coef = _hermite_coefficients(_check_degree(degree, "hermite"))
    return _polynomial_maps(q12, q11, q22, coef)


def _hermite_variance(q: jax.Array, degree: int = 1) -> jax.Array:
    """``E[He_n(u)^2] / n!`` for u ~ N(0, q) (1 at q = 1)."""
    return _polynomial_variance(q, _hermite_coefficients(_check_degree(degree, "hermite")))


# ---- rectified monomials: arc-cosine kernels of any degree


@functools.lru_cache(maxsize=64)
def _arccos_polynomials(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """``(P_n, Q_n)`` (numpy power-series coefficients in ``c = cos t``) with Cho & Saul's
    ``J_n(t) = (-1)^n sin^{2n+1} t (1/sin t d/dt)^n ((pi - t)/sin t)
    = P_n(c) (pi - t) + Q_n(c) sin t``.

    Writing the n-th derivative as ``A_n(c) (pi - t) / sin^{2n+1} t + B_n(c) / sin^{2n} t``,
    one more ``(1/sin t) d/dt`` gives ``A_{n+1} = -(1 - c^2) A_n' - (2n + 1) c A_n`` and
    ``B_{n+1} = -A_n - (1 - c^2) B_n' - 2n c B_n`` (``A_0 = 1``, ``B_0 = 0``); then
    ``P_n = (-1)^n A_n``, ``Q_n = (-1)^n B_n``. E.g. ``J_1 = c (pi - t) + sin t``,
    ``J_2 = (1 + 2c^2)(pi - t) + 3 c sin t``. This form has no ``0 * inf`` at ``t = 0``."""
    poly = np.polynomial.polynomial
    one_minus_c2 = np.array([1.0, 0.0, -1.0])
    c_poly = np.array([0.0, 1.0])
    a, b = np.array([1.0]), np.array([0.0])
    for n in range(degree):
        a_next = poly.polysub(
            -poly.polymul(one_minus_c2, poly.polyder(a)), (2 * n + 1) * poly.polymul(c_poly, a)
        )
        b_next = poly.polysub(
            poly.polysub(-a, poly.polymul(one_minus_c2, poly.polyder(b))),
            2 * n * poly.polymul(c_poly, b),
        )
        a, b = a_next, b_next
    sign = (-1.0) ** degree
    return sign * np.asarray(a, dtype=np.float64), sign * np.asarray(b, dtype=np.float64)


def _arccos_j(degree: int, c: jax.Array) -> jax.Array:
    """``J_n(t)`` at ``c = cos t`` (see :func:`_arccos_polynomials`)."""
    p, q = _arccos_polynomials(degree)
    # Python floats (weakly typed): numpy float64 scalars would promote float32 to float64
    p, q = tuple(float(v) for v in p), tuple(float(v) for v in q)
    return _poly(p, c) * _acos_neg(c) + _poly(q, c) * _sin_angle(c)


def _rectified_monomial_fn(x: jax.Array, degree: int = 1) -> jax.Array:
    degree = _check_degree(degree, "rectified_monomial")
    x = jnp.asarray(x)
    x = x.astype(float_dtype(x))
    return jnp.where(x >= 0, x**degree, 0)


def _rectified_monomial_maps(
    q12: jax.Array, q11: jax.Array, q22: jax.Array, degree: int = 1
) -> ActivationMaps:
    """``phi(x) = [x >= 0] x^n``: the arc-cosine kernel of degree n (Cho & Saul 2009),
    ``sigma = (q11 q22)^{n/2} J_n(t) / (2 pi)``, and, since ``phi' = n [x >= 0] x^{n-1}``,
    ``sigma_dot = n^2 (q11 q22)^{(n-1)/2} J_{n-1}(t) / (2 pi)``; ``n = 0`` (a step) has
    ``sigma_dot = 0`` (its derivative vanishes almost everywhere; neural-tangents' convention).
    Finite at every angle, including ``t = 0`` where neural-tangents' form is ``0 * inf``; a
    zero-variance input is 0, where the step is 1."""
    degree = _check_degree(degree, "rectified_monomial")
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    c = correlation(q12, q11, q22)
    # s12^n applied last as mantissa^n and a power of two: +inf only where the kernel
    # overflows, and 0 (not inf * 0) at angle pi, where J_n = 0
    m12, e12 = _split_pow2(_sqrt0(q11) * _sqrt0(q22))
    inv_2pi = 1 / (2 * _PI)
    sigma = _times_pow2(m12**degree * _arccos_j(degree, c) * inv_2pi, degree * e12)
    if degree == 0:
        # the step at a zero-variance input is 1: E = P(v >= 0) = 1/2, or 1 if both are zero
        half1, half2 = jnp.where(q11 > 0, 0.5, 1.0), jnp.where(q22 > 0, 0.5, 1.0)
        sigma = jnp.where((q11 > 0) & (q22 > 0), sigma, half1 * half2)
        return ActivationMaps(sigma, jnp.zeros_like(sigma))
    sigma_dot = _times_pow2(
        (degree**2 * inv_2pi) * m12 ** (degree - 1) * _arccos_j(degree - 1, c),
        (degree - 1) * e12,
    )
    return ActivationMaps(sigma, sigma_dot)


def _rectified_monomial_variance(q: jax.Array, degree: int = 1) -> jax.Array:
    """``E[[u >= 0] u^{2n}] = (2n - 1)!! q^n / 2`` (1 for the step at ``q = 0``)."""
    degree = _check_degree(degree, "rectified_monomial")
    q = jnp.asarray(q)
    q = q.astype(float_dtype(q))
    moment = 0.5 * float(math.prod(range(2 * degree - 1, 0, -2))) * q**degree
    return jnp.where(q > 0, moment, 1.0) if degree == 0 else moment


# ---- Gabor


def _gabor_fn(x: jax.Array) -> jax.Array:
    return jnp.exp(-x * x) * jnp.sin(x)


@jax.custom_jvp
def _gabor_gaps(z: jax.Array, a1: jax.Array, a2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(a1 + a2 - 2 z, a1 a2 - z^2)`` for a covariance ``[[a1, z], [z, a2]]``, evaluated as
    ``((t1 - t2)^2 + 2 t1 t2 (1 - c), (t1 t2)^2 (1 - c)(1 + c))`` (``t = sqrt(a)``, ``c`` the
    correlation): no cancellation between nearly equal terms (exactly 0 for identical inputs);
    the derivatives are the polynomials' own, ``(-2, -2 z)`` in ``z`` (a snapped ``c`` has none)."""
    c = correlation(z, a1, a2)
    t1, t2 = _sqrt0(a1), _sqrt0(a2)
    t12 = t1 * t2
    return (t1 - t2) ** 2 + 2 * t12 * (1 - c), (t12 * t12) * ((1 - c) * (1 + c))


@_gabor_gaps.defjvp
def _gabor_gaps_jvp(primals, tangents):
    z, a1, a2 = primals
    dz, da1, da2 = tangents
    return _gabor_gaps(z, a1, a2), (da1 + da2 - 2 * dz, a2 * da1 + a1 * da2 - 2 * z * dz)


def _gabor_sigma(q12: jax.Array, q11: jax.Array, q22: jax.Array,
                 s1: jax.Array | None = None, s2: jax.Array | None = None) -> jax.Array:
    """``E[exp(-u^2 - v^2) sin u sin v]``: writing ``sin u sin v = (cos(u - v) - cos(u + v))/2``
    and using ``E[exp(-x^T x + i t^T x)] = det(I + 2 S)^{-1/2} exp(-t^T S (I + 2 S)^{-1} t / 2)``
    for ``x ~ N(0, S)``: with ``D = det(I + 2S) = 1 + 2 (q11 + q22) + 4 Delta``,
    ``Delta = q11 q22 - q12^2``,
    ``sigma = (exp(-(q11 + q22 + 4 Delta - 2 q12) / (2 D))
    - exp(-(q11 + q22 + 4 Delta + 2 q12) / (2 D))) / (2 sqrt(D))``, evaluated through
    ``expm1`` (no cancellation at small q12).

    Scaled before squaring (``Delta`` ~ q^2 overflowed float32 from q ~ 1e19): with ``M = p^2``,
    ``p`` the power of two with ``p <= sqrt(max(q11, q22, 1)) < 2p``, everything is written in
    ``a = q / M``, ``z = q12 / M`` (<= 4 in magnitude) and ``d / M = 1/M + 2 (a1 + a2) + 4 M
    delta`` (``delta = Delta / M^2``); the exponent as ``-(1 - 1/D)/2 + (q11 + q22 - 2 q12) /
    (2D)``, whose second term has no cancellation (:func:`_gabor_gaps`).

    Scaled variances (``s1``, ``s2`` given: true ``q = q_stored 2^(s1 + s2)``): ``p`` is found
    from the stored variances brought to the pair's larger scale, and ``a``, ``z`` are the
    stored ones times exact powers of two; the result is the true ``sigma``."""
    if s1 is None or s2 is None:
        t = jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(jnp.maximum(q11, q22), 1)))
        _, exponent = jnp.frexp(t)
        p, pinv = pow2(exponent - 1, t.dtype), pow2(1 - exponent, t.dtype)
        a1, a2, z = (q11 * pinv) * pinv, (q22 * pinv) * pinv, (q12 * pinv) * pinv
        dist, delta = _gabor_gaps(z, a1, a2)
        dm = pinv * pinv + 2 * (a1 + a2) + 4 * ((p * p) * delta)  # D / M, possibly +inf
    else:
        top = jnp.maximum(s1, s2)
        g1, g2 = pow2(s1 - top, q11.dtype), pow2(s2 - top, q22.dtype)  # <= 1
        floor = pow2(-top, q11.dtype)  # a true 1 at the larger scale
        t = jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(
            jnp.maximum((q11 * g1) * g1, (q22 * g2) * g2), floor * floor)))
        _, exponent = jnp.frexp(t)  # true sqrt(max(q11, q22, 1)) ~ 2^(exponent + top)
        f1, f2 = pow2(1 - exponent + s1 - top, q11.dtype), pow2(1 - exponent + s2 - top, q22.dtype)
        p = pow2(exponent + top - 1, q11.dtype)
        pinv = pow2(1 - exponent - top, q11.dtype)
        a1, a2, z = (q11 * f1) * f1, (q22 * f2) * f2, (q12 * f1) * f2
        dist, delta = _gabor_gaps(z, a1, a2)
        # p delta p, not (p p) delta: p^2 may overflow where delta is exactly 0
        dm = pinv * pinv + 2 * (a1 + a2) + 4 * ((p * delta) * p)
    h = jax.lax.rsqrt(dm) * pinv  # 1 / sqrt(D)
    e_plus = jnp.exp(-0.5 * (1 - h * h) + dist / (2 * dm))
    return e_plus * jnp.expm1(2 * z / dm) * (0.5 * h)


def _gabor_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    """``phi(x) = exp(-x^2) sin x``: ``sigma`` in closed form (:func:`_gabor_sigma`) and
    ``sigma_dot = d sigma / d q12`` (Price's theorem) by forward-mode autodiff of it."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    q12 = jnp.broadcast_to(q12, shape)
    sigma, sigma_dot = jax.jvp(lambda q: _gabor_sigma(q, q11, q22), (q12,), (jnp.ones_like(q12),))
    return ActivationMaps(sigma, sigma_dot)


def _scaled_gabor_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array, s1: jax.Array,
                       s2: jax.Array) -> ActivationMaps:
    """:func:`_gabor_maps` of scaled variances: the true ``sigma`` and, differentiating by the
    stored ``q12``, ``sigma_dot 2^(s1 + s2)``."""
    q12, q11, q22 = _broadcast_stats(q12, q11, q22)
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    q12 = jnp.broadcast_to(q12, shape)
    sigma, sigma_dot = jax.jvp(lambda q: _gabor_sigma(q, q11, q22, s1, s2), (q12,),
                               (jnp.ones_like(q12),))
    return ActivationMaps(sigma, sigma_dot)


def _gabor_variance(q: jax.Array) -> jax.Array:
    """``(1 - exp(-2q / (1 + 4q))) / (2 sqrt(1 + 4q))``, with ``r = 1 / sqrt(1 + 4q)`` and
    ``2q / (1 + 4q) = 2 (sqrt(q) r)^2`` (no overflow of ``1 + 4q``)."""
    q = jnp.asarray(q)
    r = _rsqrt1p(q, 4.0)
    sr = _sqrt0(q) * r
    return -jnp.expm1(-2 * (sr * sr)) * (0.5 * r)


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

    Both orders of the two inputs are integrated and averaged, so the maps are symmetric in
    ``(q11, q22)`` to the last bit and a kernel of x with itself is exactly symmetric.

    Accuracy (default num_quadrature = 64, float64, max error relative to the largest entry, against
    the closed forms for variances in [0.1, 3]; tests/test_analytic.py): sin and cos 1e-15, GELU
    1e-11 (sigma_dot) and erf 5e-7 (sigma_dot; saturating activations converge more slowly: 8e-4
    at 32 nodes, 3e-13 at 128). Kinks converge only algebraically: ReLU's sigma 1.3e-3 and
    sigma_dot (a step function) 2.5e-2 -- use the closed forms where they exist. Oscillating
    activations of large variance need more nodes (sin at variance q needs n >> sqrt(q)).
    """
    one_order = _gauss_hermite_one_order(q12, q11, q22, fn, num_quadrature)
    other_order = _gauss_hermite_one_order(q12, q22, q11, fn, num_quadrature)
    return ActivationMaps(0.5 * (one_order.sigma + other_order.sigma),
                          0.5 * (one_order.sigma_dot + other_order.sigma_dot))


def _gauss_hermite_one_order(
    q12: jax.Array,
    q11: jax.Array,
    q22: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    num_quadrature: int,
) -> ActivationMaps:
    """:func:`gauss_hermite_maps` with ``u`` integrated first (not symmetric in the inputs)."""
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


def _check_gaussian_input(k: Kernel, name: str | None) -> None:
    if name is not None and k.non_gaussian:
        raise ValueError(
            f"activation {name} needs Gaussian pre-activations, but its input comes from "
            f"{k.non_gaussian}, whose outputs are not Gaussian in the infinite-width limit; put "
            "a Dense (or Conv) layer before the activation."
        )


def activation_kernel(
    k: Kernel,
    maps: Callable[..., ActivationMaps],
    variance: Callable[[jax.Array], jax.Array],
    *,
    name: str | None = None,
) -> Kernel:
    """The kernel after an elementwise activation with kernel maps
    ``maps(q12, q11, q22) -> (sigma, sigma_dot)`` and second moment ``variance(q)``:
    ``Sigma <- sigma``, ``Theta <- sigma_dot * Theta``, ``var <- variance(var)``.

    With spatial axes every entry ``[a, b, p, p']`` is mapped with the variances
    ``var1[a, p, p]`` and ``var2[b, p', p']``, and each input's covariance across positions
    ``var1[a, p, p']`` by the same map (its diagonal by ``maps`` at correlation 1). A kernel of
    same-position pairs (``diagonal_spatial``) maps ``[a, b, p]`` with ``var1[a, p]`` and
    ``var2[b, p]``, and its variances by ``variance``. The variances are read through
    :meth:`~ntkjax.Kernel.position_variances`.

    The maps hold for Gaussian pre-activations: with ``name`` given, an input kernel marked
    non-Gaussian (:attr:`ntkjax.Kernel.non_gaussian`) raises a ValueError and the output is
    marked ``name`` (without ``name``, the mark passes through unchecked)."""
    _check_gaussian_input(k, name)
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

        var1 = self_map(k.var1, d1)
        var2 = var1 if k.same_inputs else self_map(k.var2, d2)
    return k.replace(nngp=sigma, ntk=k.ntk * sigma_dot, var1=var1, var2=var2,
                     non_gaussian=k.non_gaussian if name is None else name)


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
      linear: True for a linear function (``identity``), which keeps Gaussian inputs Gaussian;
        any other activation needs Gaussian inputs and marks its output non-Gaussian
        (:attr:`ntkjax.Kernel.non_gaussian`), as neural-tangents does.
      relu_family: for ``fn(x, *params) = a min(x, 0) + b max(x, 0)``, the map
        ``(*params) -> (a, b)``: its random features are then the arc-cosine features in closed
        form (:func:`ntkjax.feature_map`); None uses the Hermite expansion of ``fn``.
      finite: False for an activation defined on kernels only (no finite network, no
        features).
      replaces: JAX functions this activation stands in for, each with a note
        (``{"relu": ""}``): the hint of :class:`ntkjax.kernels.ForeignFunctionError`.
      scaled_maps: how the rule maps a kernel's scaled form (:attr:`ntkjax.Kernel.scaled`,
        kernels of inputs far beyond the dtype's square root): ``"homogeneous"`` for maps
        positively homogeneous of degree 1 in ``(q12, q11, q22)`` with ``sigma_dot`` of degree
        0 (the ReLU family: the maps apply to the stored kernels, which keep their scales), or
        ``scaled_maps(q12, q11, q22, s1, s2, *params)`` of the stored kernels and the inputs'
        exponents returning the true ``sigma`` and ``sigma_dot 2^(s1 + s2)`` (a bounded
        activation: the output has scale 0). None: the rule reads the true kernels only.

    The activation's meanings -- finite, kernel, random features, structured NTK -- are its
    :func:`~ntkjax.nn.declaration_of` (``act.meanings``), derived from these arguments.

    Parameters are static Python numbers (or sequences), fixed when the network is built.

    >>> import jax.numpy as jnp
    >>> print(relu(jnp.array([-1.0, 2.0])))
    [0. 2.]
    >>> square = Activation(lambda x: x**2, name="square")  # kernel maps by quadrature
    >>> is_activation(square), square.__name__
    (True, 'square')
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
        linear: bool = False,
        relu_family: Callable[..., tuple[float, float]] | None = None,
        finite: bool = True,
        replaces: Mapping[str, str] | None = None,
        scaled_maps: Callable[..., ActivationMaps] | str | None = None,
    ) -> None:
        self.fn = fn
        self.scaled_maps = scaled_maps
        self.linear = bool(linear)
        self.maps = maps
        self.variance = variance
        self.num_quadrature = int(num_quadrature)
        self.relu_family = relu_family
        self.__name__ = self.__qualname__ = name
        self.__doc__ = doc
        self.meanings = Declaration(
            layer=self, name=f"ntkjax.nn.{name}", kernel=activation_kernel,
            features=_activation_features if finite else None,
            structured="parameter-free", per_input_variances=not linear, finite=finite,
            scale_aware=scaled_maps is not None,
            replaces=dict(replaces or {}),
            instead={"features": "it has no finite function to expand; use ntkjax.kernel_fn."},
        )

    def __repr__(self) -> str:
        return f"ntkjax.nn.{self.__name__}"

    def __call__(self, x: Any, *params: Any, **kw_params: Any) -> Any:
        if isinstance(x, FeatureStandIn):
            return self.meanings.on_features(
                x, lambda k: self(k, *params, **kw_params), self, params, kw_params)
        if isinstance(x, Kernel):
            if x.scaled is not None and self.scaled_maps is not None and x.spatial_ndim == 0:
                return self._scaled_kernel(x, params, kw_params)
            out = activation_kernel(
                x,
                lambda q12, q11, q22: self.kernel_maps(q12, q11, q22, *params, **kw_params),
                lambda q: self.kernel_variance(q, *params, **kw_params),
                name=None if self.linear else f"ntkjax.nn.{self.__name__}",
            )
            return out
        return self.fn(x, *params, **kw_params)

    def _scaled_kernel(self, k: Kernel, params: tuple, kw_params: dict) -> Kernel:
        """The kernel rule on a kernel with a scaled form (``scaled_maps``): homogeneous maps
        on the stored kernels, which keep their scales; else the scaled maps, whose output is
        the true kernel (scale 0, no scaled form)."""
        name = None if self.linear else f"ntkjax.nn.{self.__name__}"
        _check_gaussian_input(k, name)
        p = k.scaled
        assert p is not None
        if self.scaled_maps == "homogeneous":
            sigma, sigma_dot = self.kernel_maps(p.nngp, p.var1[:, None], p.var2[None, :],
                                                *params, **kw_params)
            var1 = self.kernel_variance(p.var1, *params, **kw_params)
            var2 = var1 if k.same_inputs else self.kernel_variance(p.var2, *params, **kw_params)
            parts = p.replace(nngp=sigma, ntk=p.ntk * sigma_dot, var1=var1, var2=var2)
            return k.with_scaled(parts, non_gaussian=k.non_gaussian if name is None else name)
        if not callable(self.scaled_maps):
            raise ValueError(f"scaled_maps must be 'homogeneous' or a function, got "
                             f"{self.scaled_maps!r}.")
        scaled_maps = self.scaled_maps
        sigma, sigma_dot = scaled_maps(p.nngp, p.var1[:, None], p.var2[None, :],
                                       p.log2_scale1[:, None], p.log2_scale2[None, :],
                                       *params, **kw_params)

        def variance(v: jax.Array, s: jax.Array) -> jax.Array:
            return scaled_maps(v, v, v, s, s, *params, **kw_params).sigma

        var1 = variance(p.var1, p.log2_scale1)
        var2 = var1 if k.same_inputs else variance(p.var2, p.log2_scale2)
        return k.replace(nngp=sigma, ntk=p.ntk * sigma_dot, var1=var1, var2=var2,
                         non_gaussian=k.non_gaussian if name is None else name)

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


def _activation_features(x: FeatureStandIn, exact: Kernel, activation: Activation,
                         params: tuple, kw_params: dict) -> tuple[Any, Any]:
    """Random features after an activation (ntkjax.features): the ReLU family
    ``a min(u, 0) + b max(u, 0)`` by arc-cosine random features in closed form (Cho & Saul
    2009; Zandieh et al. 2021), any other by its truncated Hermite expansion (Han et al. 2022)
    -- also a ReLU-family member whose slopes are traced."""
    if activation.relu_family is not None:
        try:
            a, b = (float(v) for v in activation.relu_family(*params, **kw_params))
        except (TypeError, jax.errors.ConcretizationTypeError):
            pass  # traced slopes: the general (Hermite) rule
        else:
            return x.arc_cosine(a, b)
    return x.hermite(lambda u: activation.fn(u, *params, **kw_params))


def is_activation(fn: Any) -> bool:
    """True for an :class:`Activation` (or a ``functools.partial`` of one): a function with an
    infinite-width kernel rule.

    Args:
      fn: any object.

    Returns:
      Whether ``fn`` is an activation with a kernel rule.

    >>> import jax.numpy as jnp
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


def _erf_fn(x: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    return a * jax.lax.erf(b * x) + c


def _gelu_fn(x: jax.Array, approximate: bool = False) -> jax.Array:
    return jax.nn.gelu(x, approximate=approximate)


def _sin_fn(x: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    return a * jnp.sin(b * x + c)


def _cos_fn(x: jax.Array, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> jax.Array:
    return a * jnp.cos(b * x + c)


def _exp_fn(x: jax.Array, a: float = 1.0, b: float = 1.0) -> jax.Array:
    return a * jnp.exp(b * x)


def _gaussian_fn(x: jax.Array, a: float = 1.0, b: float = -1.0) -> jax.Array:
    _check_gaussian_b(b)
    return a * jnp.exp(b * x * x)


_SIGMOID_LIKE = (0.5, 1 / 2.4020563531719796, 0.5)  # erf's (a, b, c)


def _sigmoid_like_fn(x: jax.Array) -> jax.Array:
    return _erf_fn(x, *_SIGMOID_LIKE)


def _sigmoid_like_maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
    return _erf_maps(q12, q11, q22, *_SIGMOID_LIKE)


def _sigmoid_like_variance(q: jax.Array) -> jax.Array:
    return _erf_variance(q, *_SIGMOID_LIKE)


def _rbf_fn(x: jax.Array, gamma: float = 1.0) -> jax.Array:
    return math.sqrt(2) * jnp.sin(math.sqrt(2 * gamma) * x + math.pi / 4)


relu = Activation(
    jax.nn.relu, _relu_maps, _relu_variance, name="relu", scaled_maps="homogeneous",
    relu_family=lambda: (0.0, 1.0),
    replaces={"relu": "", "maximum": "(if this is max(x, 0))"},
    doc="``max(x, 0)``; kernel: the arc-cosine kernel of degree 1 (Cho & Saul 2009), "
    "``sigma = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi)``, "
    "``sigma_dot = (pi - t) / (2 pi)``, ``t = arccos(c)``.",
)
leaky_relu = Activation(
    _leaky_relu_fn, _leaky_relu_maps, _leaky_relu_variance, name="leaky_relu",
    scaled_maps="homogeneous",
    relu_family=lambda negative_slope=0.01: (negative_slope, 1.0), replaces={"leaky_relu": ""},
    doc="``x if x > 0 else negative_slope * x`` (``leaky_relu(x, negative_slope=0.01)``); "
    "kernel as :data:`ab_relu` with ``a = negative_slope, b = 1``.",
)
ab_relu = Activation(
    _ab_relu_fn, _ab_relu_maps, _ab_relu_variance, name="ab_relu", scaled_maps="homogeneous",
    relu_family=lambda a, b: (a, b),
    doc="``a * min(x, 0) + b * max(x, 0)`` (``ab_relu(x, a, b)``); with "
    "``phi(x) = a x + (b - a) relu(x)``: ``sigma = a b q12 + (b - a)^2 sqrt(q11 q22) kappa1(c)``, "
    "``sigma_dot = a b + (b - a)^2 kappa0(c)`` (arc-cosine kernels, Cho & Saul 2009).",
)
abs = Activation(
    jnp.abs, _abs_maps, _abs_variance, name="abs", scaled_maps="homogeneous",
    relu_family=lambda: (-1.0, 1.0),
    replaces={"abs": "", "absolute": ""},
    doc="``|x|``; kernel as :data:`ab_relu` with ``a = -1, b = 1``.",
)
erf = Activation(
    _erf_fn, _erf_maps, _erf_variance, name="erf", replaces={"erf": ""},
    scaled_maps=_scaled_erf_maps,
    doc="``a * erf(b * x) + c`` (``erf(x, a=1, b=1, c=0)``, neural-tangents' ``Erf(a, b, c)``); "
    "for ``erf``: ``sigma = (2/pi) arcsin(2 q12 / sqrt((1 + 2 q11)(1 + 2 q22)))``, "
    "``sigma_dot = (4/pi) / sqrt((1 + 2 q11)(1 + 2 q22) - 4 q12^2)`` (Williams 1997); with "
    "``a, b, c``: ``sigma = a^2 sigma_erf(b^2 q) + c^2``, ``sigma_dot = a^2 b^2 "
    "sigma_dot_erf(b^2 q)`` (``E[erf] = 0``).",
)
gelu = Activation(
    _gelu_fn, _gelu_maps, _gelu_variance, name="gelu",
    replaces={"gelu": "(approximate=True matches jax.nn.gelu's default tanh form)"},
    doc="GELU ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2`` (``gelu(x, approximate=False)``); "
    "closed-form kernel by Gaussian integration by parts (Tsuchida et al. 2021). As in "
    "neural-tangents' ``Gelu(approximate)``, ``approximate=True`` switches only the finite "
    "network to the tanh form of ``jax.nn.gelu`` (within 4.8e-4 of the exact GELU everywhere); "
    "the kernel stays the exact GELU's.",
)
sin = Activation(
    _sin_fn, _sin_maps, _sin_variance, name="sin", replaces={"sin": ""},
    doc="``a * sin(b * x + c)`` (``sin(x, a=1, b=1, c=0)``, neural-tangents' "
    "``Sin(a, b, c)``); with ``S, C = exp(-b^2 (q11 + q22)/2) (sinh, cosh)(b^2 q12)``: "
    "``sigma = a^2 (cos^2 c S + sin^2 c C)``, ``sigma_dot = a^2 b^2 (cos^2 c C + sin^2 c S)`` "
    "(from ``E[exp(i k u)] = exp(-k^2 q / 2)``).",
)
cos = Activation(
    _cos_fn, _cos_maps, _cos_variance, name="cos", replaces={"cos": ""},
    doc="``a * cos(b * x + c)`` (``cos(x, a=1, b=1, c=0)``, neural-tangents' "
    "``Cos(a, b, c) = Sin(a, b, c + pi/2)``); ``sigma = a^2 (cos^2 c C + sin^2 c S)``, "
    "``sigma_dot = a^2 b^2 (cos^2 c S + sin^2 c C)`` with ``S, C`` as in :data:`sin`.",
)
rbf = Activation(
    _rbf_fn, _rbf_maps, _rbf_variance, name="rbf",
    doc="``sqrt(2) sin(sqrt(2 gamma) x + pi/4)`` (``rbf(x, gamma=1.0)``), whose NNGP map is the "
    "RBF kernel ``exp(-gamma (q11 + q22 - 2 q12))`` of the pre-activations; "
    "``sigma_dot = 2 gamma sigma``.",
)
sign = Activation(
    jnp.sign, _sign_maps, _sign_variance, name="sign", replaces={"sign": ""},
    doc="``sign(x)``; ``sigma = (2/pi) arcsin(c)`` (Sheppard's formula); its derivative is 0 "
    "almost everywhere, so it stops the NTK (``sigma_dot = 0``).",
)
identity = Activation(
    lambda x: x, _identity_maps, _identity_variance, name="identity", linear=True,
    relu_family=lambda: (1.0, 1.0),
    doc="``x``; ``sigma = q12``, ``sigma_dot = 1``.",
)
exp = Activation(
    _exp_fn, _exp_maps, _exp_variance, name="exp", replaces={"exp": ""},
    doc="``a * exp(b * x)`` (``exp(x, a=1, b=1)``, neural-tangents' ``Exp(a, b)``); "
    "``sigma = a^2 exp(b^2 ((q11 + q22)/2 + q12))``, ``sigma_dot = b^2 sigma`` (the Gaussian "
    "moment generating function).",
)
gaussian = Activation(
    _gaussian_fn, _gaussian_maps, _gaussian_variance, name="gaussian",
    scaled_maps=_scaled_gaussian_maps,
    doc="``a * exp(b * x^2)`` with ``b <= 0`` (``gaussian(x, a=1, b=-1)``, neural-tangents' "
    "``Gaussian(a, b)``); ``sigma = a^2 / sqrt((1 - 2b q11)(1 - 2b q22) - 4 b^2 q12^2)``, "
    "``sigma_dot = 4 a^2 b^2 q12 / (...)^{3/2}`` (a Gaussian integral; Price's theorem).",
)
exp_normalized = Activation(
    _exp_normalized_fn, _exp_normalized_maps, _exp_normalized_variance, name="exp_normalized",
    finite=False,
    doc="neural-tangents' ``ExpNormalized(gamma=1, shift=-1)`` (``exp_normalized(x, gamma, "
    "shift)``): the Gaussian normalized kernel of Shankar et al. 2020, defined on kernels only "
    "(on arrays it raises a ValueError): ``sigma = sqrt(q11 q22) exp(gamma (c + shift))``, "
    "``sigma_dot = gamma exp(gamma (c + shift))``, ``c = q12 / sqrt(q11 q22)`` (always clipped "
    "to [-1, 1], as nt's ``do_clip=True``; the same for a valid kernel).",
)
polynomial = Activation(
    _polynomial_fn, _polynomial_maps, _polynomial_variance, name="polynomial",
    doc="``coef[0] + coef[1] x + ... + coef[n] x^n`` (``polynomial(x, coef)``, "
    "neural-tangents' ``Polynomial(coef)``); exact kernel for any variances by the Hermite "
    "expansion ``p(sqrt(q) z) = sum_l H_l(sqrt(q)) He_l(z) / sqrt(l!)``: "
    "``sigma = sum_l H_l(sqrt(q11)) H_l(sqrt(q22)) c^l`` (Mehler's formula), ``sigma_dot`` "
    "likewise for ``p'``.",
)
monomial = Activation(
    _monomial_fn, _monomial_maps, _monomial_variance, name="monomial",
    doc="``x^degree`` (``monomial(x, degree)``, neural-tangents' ``Monomial(degree)``, which "
    "allows degrees 0-5; here any degree >= 0): the :data:`polynomial` kernel of ``x^n``, e.g. "
    "``sigma = q11 q22 + 2 q12^2`` for ``n = 2`` (Isserlis' theorem); variance "
    "``(2n - 1)!! q^n``.",
)
rectified_monomial = Activation(
    _rectified_monomial_fn, _rectified_monomial_maps, _rectified_monomial_variance,
    name="rectified_monomial",
    doc="``[x >= 0] x^degree`` (``rectified_monomial(x, degree)``, neural-tangents' "
    "``RectifiedMonomial(degree)``; degree 1 is ReLU): the arc-cosine kernel of degree n "
    "(Cho & Saul 2009) ``sigma = (q11 q22)^{n/2} J_n(t) / (2 pi)``, "
    "``sigma_dot = n^2 (q11 q22)^{(n-1)/2} J_{n-1}(t) / (2 pi)`` (0 for the step, n = 0), with "
    "``J_n = P_n(cos t)(pi - t) + Q_n(cos t) sin t`` -- finite at every angle, where "
    "neural-tangents' evaluation returns NaN at angle 0 (every x-with-itself entry).",
)
hermite = Activation(
    _hermite_fn, _hermite_maps, _hermite_variance, name="hermite",
    doc="The normalized probabilists' Hermite polynomial ``He_n(x) / sqrt(n!)`` "
    "(``hermite(x, degree)``, neural-tangents' ``Hermite(degree)``); kernel: the exact "
    ":data:`polynomial` kernel, which at unit variances (e.g. after a LayerNorm) is "
    "nt's ``sigma = q12^n``, ``sigma_dot = n q12^{n-1}`` (``E[He_n(u) He_n(v)] = n! c^n``); "
    "nt assumes unit variances, this holds for any.",
)
sigmoid_like = Activation(
    _sigmoid_like_fn, _sigmoid_like_maps, _sigmoid_like_variance, name="sigmoid_like",
    replaces={"sigmoid": "(0.5 erf(x / 2.402) + 0.5, a closed-form stand-in for the logistic "
              "sigmoid)"},
    doc="``0.5 * erf(x / 2.4020563531719796) + 0.5`` (neural-tangents' ``Sigmoid_like()``, the "
    "erf that best fits the logistic sigmoid in squared error on [-5, 5]): :data:`erf` with "
    "``a = 0.5, b = 1 / 2.4020563531719796, c = 0.5``.",
)
gabor = Activation(
    _gabor_fn, _gabor_maps, _gabor_variance, name="gabor", scaled_maps=_scaled_gabor_maps,
    doc="``exp(-x^2) sin(x)`` (neural-tangents' ``Gabor()``); with ``D = 1 + 2 (q11 + q22) + "
    "4 (q11 q22 - q12^2)``: ``sigma = (exp(-(q11 + q22 + 4 Delta - 2 q12)/(2D)) - exp(-(q11 + "
    "q22 + 4 Delta + 2 q12)/(2D))) / (2 sqrt D)`` (a Gaussian integral), ``sigma_dot = "
    "d sigma / d q12`` by autodiff (Price's theorem).",
)


# The activations above are declared layers of ntkjax.nn (elementwise ones stay undeclared).
for _activation in [v for v in list(globals().values()) if isinstance(v, Activation)]:
    register(_activation.meanings)


def elementwise(fn: Callable[[jax.Array], jax.Array], *, num_quadrature: int = 64) -> Activation:
    """An activation from any elementwise jnp function ``fn``.

    On arrays it is ``fn``; on a Kernel its maps come from Gauss-Hermite quadrature with
    ``num_quadrature`` nodes per dimension (:func:`gauss_hermite_maps`, which states the accuracy
    at the default 64 nodes: 1e-11 for GELU, 5e-7 for erf, 1e-3 / 3e-2 (sigma / sigma_dot) for
    ReLU-like kinks). ``fn``'s derivative is taken by autodiff. Cost: ``num_quadrature^2``
    evaluations per entry.

    Args:
      fn: an elementwise function of an array.
      num_quadrature: Gauss-Hermite nodes per dimension.

    Returns:
      An :class:`Activation`.

    >>> import jax
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
