"""Per-program XLA options: results unchanged, usable nested in other transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import compile_options
from ntkjax.compile_options import FAST_COMPILE, cpu_convolution_options, jit_with_options
from tests.helpers import max_relative_error


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_float64(x, w):
    """Direct sum over kernel offsets in numpy float64 (3x3, SAME)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, h, wd, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + wd, :] @ w[i, j]
    return out


def test_single_core_gets_no_options(monkeypatch):
    monkeypatch.setattr(compile_options, "_usable_cores", lambda: 1)
    assert cpu_convolution_options() is None


def test_rejected_options_are_not_used(monkeypatch):
    assert not compile_options._accepted((("xla_cpu_no_such_option_anywhere", True),))
    monkeypatch.setattr(compile_options, "_accepted", lambda options: False)
    monkeypatch.setattr(compile_options, "_usable_cores", lambda: 8)
    assert cpu_convolution_options() is None


@pytest.mark.parametrize("options", [cpu_convolution_options(), FAST_COMPILE, None],
                         ids=["convolutions", "fast_compile", "none"])
def test_convolution_under_options_matches_float64(options):
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 9, 8, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 6, 4))
    got = jit_with_options(_conv, options)(x, w)
    assert max_relative_error(got, _conv_float64(x, w)) < 1e-5


def test_jit_with_options_nests_in_jit_grad_vmap_and_scan():
    options = cpu_convolution_options() or FAST_COMPILE
    fn = jit_with_options(_conv, options)
    assert fn.__wrapped__ is _conv
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2))
    expected = _conv_float64(x, w)
    assert max_relative_error(jax.jit(fn)(x, w), expected) < 1e-5
    assert max_relative_error(jax.vmap(fn, in_axes=(None, 0))(x, jnp.stack([w, w]))[1],
                              expected) < 1e-5
    _, ys = jax.lax.scan(lambda c, s: (c, fn(x * s, w)), 0.0, jnp.ones(2))
    assert max_relative_error(ys[0], expected) < 1e-5
    # d/dw sum(conv(x, w)) = sum over positions of the padded input windows
    grad = jax.grad(lambda v: jnp.sum(fn(x, v)))(w)
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.stack([np.stack([padded[:, i : i + 5, j : j + 4].sum(axis=(0, 1, 2))
                                  for j in range(3)]) for i in range(3)])
    assert max_relative_error(grad, np.repeat(windows[..., None], 2, axis=-1)) < 1e-5
    assert fn.lower(x, w).compile() is not None
