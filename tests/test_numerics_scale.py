"""Kernels at the top of float32 (issue 22): the per-input power-of-two scale that
:class:`ntkjax.Kernel` carries (``Kernel.scaled``) keeps float32 inputs of |x| ~ 1e20, whose
input kernel ``x . x' / d`` (~1e40) overflows, finite where the true kernel is representable
and ``+inf`` (never NaN) where it is not.

Outside truths: the same network in float64 (no overflow at these sizes); the arcsine limit
of erf; positive homogeneity of bias-free ReLU networks under exact power-of-two scalings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax._meanings import declarations
from ntkjax.kernels import Kernel, input_kernel

FLOAT32_MAX = float(np.finfo(np.float32).max)
SCALE_AWARE = {"ntkjax.nn.Dense", "ntkjax.nn.relu", "ntkjax.nn.leaky_relu", "ntkjax.nn.ab_relu",
               "ntkjax.nn.abs", "ntkjax.nn.erf", "ntkjax.nn.gaussian", "ntkjax.nn.gabor"}


def _mlp(name: str) -> ntkjax.models.MLP:
    """Depth 2 with biases (Dense(8), act, Dense(8), act, Dense(1))."""
    return ntkjax.models.MLP((8, 8, 1), getattr(nn, name), w_std=1.0, b_std=0.5)


def _assert_float32_matches(got, want, what: str) -> None:
    """``got`` (float32) against the float64 truth ``want``: where the truth is representable
    in float32, finite and within 1e-5 of it (relative to the largest representable entry);
    where it overflows float32, ``+-inf`` with its sign; nowhere NaN."""
    g, w = np.asarray(got), np.asarray(want, np.float64)
    assert g.dtype == np.float32, what
    assert not np.any(np.isnan(g)), (what, g)
    fits = np.abs(w) <= FLOAT32_MAX
    assert np.all(np.isfinite(g[fits])), (what, g)
    np.testing.assert_array_equal(g[~fits], np.sign(w[~fits]) * np.inf, err_msg=what)
    if np.any(fits):
        err = np.max(np.abs(g[fits] - w[fits])) / np.max(np.abs(w[fits]))
        assert err < 1e-5, (what, err)


@pytest.mark.parametrize("name", ["erf", "gaussian", "gabor", "relu", "leaky_relu"])
def test_mlp_kernels_at_the_top_of_float32_match_float64(name):
    """|x| ~ 1e18, 1e19 and 1e20 (d = 3): bounded activations' kernels (NNGP ~1, NTK up to
    ~1e20) finite and within 1e-5 of float64; the ReLU family's (~1e40 at 1e20) ``+inf``
    where they overflow."""
    fn = ntkjax.kernel_fn(_mlp(name))
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
    for scale in (1e18, 1e19, 1e20):
        got = fn(x * scale)
        with jax.enable_x64(True):
            want = fn(x.astype(jnp.float64) * scale)
        for field in ("nngp", "ntk", "var1"):
            _assert_float32_matches(getattr(got, field), getattr(want, field),
                                    f"{name} {scale:g} {field}")
        assert got.scaled is None  # the scaled form never leaves kernel_fn
    if name == "relu":  # at 1e20 most ReLU kernel entries (~1e40) overflow: +inf, not NaN
        assert np.sum(np.isposinf(np.asarray(got.nngp))) >= 8
        assert np.sum(np.isposinf(np.asarray(got.ntk))) >= 8


@pytest.mark.parametrize(("name", "with_x2", "jit"), [("erf", False, True), ("erf", True, False),
                                                     ("relu", True, True)])
def test_mixed_magnitudes_with_and_without_x2_eager_and_jitted(name, with_x2, jit):
    """A batch mixing rows of size 1e20, 1e19, 1 and 1e-3 (each input has its own scale), with
    itself and against a second batch, eagerly and compiled, against float64 entry by entry
    (the small rows' kernels are not lost beside the large ones); x2 = None exactly
    symmetric."""
    key1, key2 = jax.random.split(jax.random.key(1))
    x1 = jax.random.normal(key1, (4, 3), jnp.float32) * jnp.array([1e20, 1.0, 1e-3, 1e19])[:, None]
    x2 = jax.random.normal(key2, (3, 3), jnp.float32) * jnp.array([1.0, 1e20, 2.0])[:, None]
    fn = ntkjax.kernel_fn(_mlp(name))
    for b in ((x2,) if with_x2 else (None,)):
        with jax.enable_x64(True):
            want = fn(x1.astype(jnp.float64), None if b is None else b.astype(jnp.float64))
        for got in ((jax.jit(fn)(x1, b),) if jit else (fn(x1, b),)):
            for field in ("nngp", "ntk"):
                g, w = np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
                fits = np.abs(w) <= FLOAT32_MAX
                _assert_float32_matches(g, w, f"{name} {field}")
                rel = np.abs(g[fits] - w[fits]) / np.abs(w[fits])
                assert np.max(rel) < 1e-5, (name, field, np.max(rel))
                if b is None:
                    np.testing.assert_array_equal(g, g.T)


def test_kernel_matrix_in_blocks_equals_kernel_fn_at_1e20():
    """kernel_matrix in blocks of 2 rows equals kernel_fn whole at |x| ~ 1e20: each input's
    scale is its own, so a block's kernel is the whole kernel's entries (erf: finite; ReLU:
    +inf). The output variances are the float64 ones."""
    x = jax.random.normal(jax.random.key(2), (5, 3), jnp.float32) * 1e20
    x2 = jax.random.normal(jax.random.key(3), (3, 3), jnp.float32) * 1e20
    for name, b in (("erf", x2), ("relu", None)):
        module = _mlp(name)
        whole = ntkjax.kernel_fn(module)(x, b)
        blocks = ntkjax.kernel_matrix(module, x, b, block_size=2)
        with jax.enable_x64(True):
            want = ntkjax.kernel_fn(module)(x.astype(jnp.float64),
                                            None if b is None else b.astype(jnp.float64))
        for field in ("nngp", "ntk", "var1", "var2"):
            got = np.asarray(getattr(blocks, field), np.float32)
            _assert_float32_matches(got, getattr(want, field), f"{name} {field}")
            ref = np.asarray(getattr(whole, field))
            # compiled blocks against the eager whole: a few ulps, amplified near c = 1
            scale = np.max(np.abs(ref[np.isfinite(ref)]), initial=1.0)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{name} {field}")
        if name == "relu":
            assert np.sum(np.isposinf(got)) >= 3  # var2: inputs' variances ~1e40


def test_float64_beyond_its_square_root_gives_the_arcsine_limit():
    """float64 inputs of |x| ~ 1e200 (x . x' ~ 1e400 overflows float64): the erf network's
    NNGP is the arcsine limit ``w^2 (2/pi) arcsin(c) + b^2`` of its first layer's input
    correlation c (the biases and Williams' 1 are below float64's resolution there),
    finite."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    module = ntkjax.models.MLP((8, 1), nn.erf, w_std=1.0, b_std=0.5)
    with jax.enable_x64(True):
        k = ntkjax.kernel_fn(module)(jnp.asarray(x * 1e200))
        got = np.asarray(k.nngp)
    norms = np.linalg.norm(x, axis=1)
    c = (x @ x.T) / np.outer(norms, norms)
    np.fill_diagonal(c, 1.0)  # exactly (arcsin is steep at 1)
    want = (2 / np.pi) * np.arcsin(np.clip(c, -1, 1)) + 0.25
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_bias_free_relu_networks_scale_exactly_by_powers_of_two():
    """Positive homogeneity: a bias-free ReLU network has K(a x) = a^2 K(x); with a = 2^40
    (stored scales 8 for rows whose largest entry is ~2^40) every entry is exactly
    ``2^80 K(x)`` -- the scaled form neither rounds nor loses bits."""
    x = jax.random.normal(jax.random.key(4), (4, 3), jnp.float32)
    fn = ntkjax.kernel_fn(ntkjax.models.MLP((8, 8, 1), nn.relu, w_std=1.3, b_std=None))
    small, big = fn(x), fn(x * 2.0**40)
    for field in ("nngp", "ntk"):
        np.testing.assert_array_equal(np.asarray(getattr(big, field)),
                                      np.asarray(getattr(small, field)) * 2.0**80)


def test_rules_that_are_not_scale_aware_never_see_the_scaled_form():
    """The input kernel of rows of 1e20 carries a scaled form; a layer whose rule is not
    declared scale-aware (LayerNorm, sin) returns a kernel without it, equal to its rule on
    the true kernels alone; structural operations (rows and columns, alpha k) keep the two
    forms consistent; the declared scale-aware rules are the expected ones."""
    x = jax.random.normal(jax.random.key(5), (4, 3), jnp.float32) * jnp.array(
        [1e20, 1.0, 3e19, 2.0])[:, None]
    k = nn.Dense(3, b_std=0.5).apply({}, input_kernel(x))
    assert isinstance(k, Kernel) and k.scaled is not None
    np.testing.assert_array_equal(np.asarray(k.scaled.log2_scale1)[[1, 3]], [0, 0])
    plain = k.replace()  # the true kernels only
    assert plain.scaled is None
    for layer in (nn.sin, lambda a: nn.LayerNorm().apply({}, a)):
        out, ref = layer(k), layer(plain)
        assert isinstance(out, Kernel) and isinstance(ref, Kernel) and out.scaled is None
        np.testing.assert_array_equal(np.asarray(out.nngp), np.asarray(ref.nngp))
    for derived in (k[jnp.array([2, 0]), jnp.array([1, 2, 3])], 3.0 * k):
        p = derived.scaled
        assert p is not None
        nngp, ntk, var1, var2 = p.true_kernels()
        np.testing.assert_array_equal(np.asarray(nngp), np.asarray(derived.nngp))
        np.testing.assert_array_equal(np.asarray(ntk), np.asarray(derived.ntk))
        np.testing.assert_array_equal(np.asarray(var1), np.asarray(derived.var1))
        np.testing.assert_array_equal(np.asarray(var2), np.asarray(derived.var2))
    got = {d.name for d in declarations() if d.scale_aware}
    assert got == SCALE_AWARE


def test_gradients_through_the_scaled_form_match_finite_differences():
    """Derivatives of an erf network's kernels, which go through the scaled determinant, with
    respect to the inputs and to w_std: finite (no NaN from the diagonal's sin t = 0) and equal
    to float64 central differences."""
    x = np.random.default_rng(1).standard_normal((4, 3))
    weights = np.arange(16.0).reshape(4, 4)
    step = np.zeros((4, 3))
    step[1, 2] = 1e-6

    def total(a, w):
        k = ntkjax.kernel_fn(ntkjax.models.MLP((8, 1), nn.erf, w_std=w, b_std=0.5))(a)
        return jnp.sum(k.ntk * weights) + jnp.sum(k.nngp * weights)

    with jax.enable_x64(True):
        value = jax.jit(total)
        dx, dw = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(x), 1.3)
        assert np.all(np.isfinite(np.asarray(dx)))
        fd_x = (value(x + step, 1.3) - value(x - step, 1.3)) / 2e-6
        fd_w = (value(x, 1.3 + 1e-6) - value(x, 1.3 - 1e-6)) / 2e-6
        np.testing.assert_allclose(float(dx[1, 2]), float(fd_x), rtol=1e-6)
        np.testing.assert_allclose(float(dw), float(fd_w), rtol=1e-6)


def test_pow2_is_the_exact_power_of_two_flushed_and_saturated_like_xla(x64):
    """``pow2`` (built from the float's bits) against numpy's ``2.0 ** e`` in float64 over
    every exponent that matters and beyond: exact inside the dtype's normal range, 0 below it
    (XLA:CPU flushes subnormals) and +inf above it; eagerly and jitted, float32 and float64."""
    from ntkjax._kernel import pow2

    for dtype, big in ((np.float32, 200), (np.float64, 1100)):
        info = np.finfo(dtype)
        e = np.arange(-big, big + 1, dtype=np.int32)
        with np.errstate(over="ignore"):
            want = np.ldexp(np.ones(e.shape, np.float64), e).astype(dtype)
        want[np.abs(want) < info.tiny] = 0  # subnormal powers flush to zero
        for fn in (pow2, jax.jit(pow2, static_argnums=1)):
            got = np.asarray(fn(jnp.asarray(e), dtype))
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, want)
