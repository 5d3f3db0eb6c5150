"""Bad inputs to every kernel entry point give one kind of clear ValueError, never NaN: NaN or
Inf values, empty batches, examples without features; and huge or tiny input scales give finite
kernels equal (up to rounding) to float64 wherever the result is representable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models
from tests.helpers import max_relative_error

MLP = models.MLP((16, 1), w_std=2**0.5, b_std=0.1)
CNN = models.CNN((4, 1), kernel_size=2, readout="flatten")


def _entry_points():
    params = MLP.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    return {
        "kernel_fn": lambda x1, x2=None: ntkjax.kernel_fn(MLP)(x1, x2),
        "kernel_matrix": lambda x1, x2=None: ntkjax.kernel_matrix(MLP, x1, x2),
        "empirical_ntk_fn": lambda x1, x2=None: ntkjax.empirical_ntk_fn(MLP.apply)(
            params, x1, x2),
        "empirical_ntk_matrix": lambda x1, x2=None: ntkjax.empirical_ntk_matrix(
            MLP.apply, params, x1, x2),
        "evaluate_in_blocks": lambda x1, x2=None: ntkjax.evaluate_in_blocks(
            lambda a, b: a @ b.T, x1, x2),
    }


BAD = {
    "nan": (np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]]), "non-finite"),
    "inf": (np.array([[0.0, np.inf, 1.0], [1.0, 2.0, 3.0]]), "non-finite"),
    "empty": (np.zeros((0, 3)), "empty"),
}


@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_inputs_raise_a_clear_value_error(entry, bad):
    fn = _entry_points()[entry]
    x_bad, message = BAD[bad]
    good = np.ones((2, 3))
    with pytest.raises(ValueError, match=message):
        fn(x_bad)
    with pytest.raises(ValueError, match=message):
        fn(good, x_bad)


@pytest.mark.parametrize("entry", ["kernel_fn", "kernel_matrix", "evaluate_in_blocks"])
def test_examples_without_features_raise(entry):
    with pytest.raises(ValueError, match="no features"):
        _entry_points()[entry](np.zeros((2, 0)))


def test_image_kernels_check_values_before_compiling():
    x = np.ones((2, 3, 3, 1))
    x[0, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ntkjax.kernel_fn(CNN)(x)


@pytest.mark.parametrize(
    ("activation", "scale"),
    [("relu", 2e18), ("relu", 1e-18), ("erf", 1e3), ("erf", 1e9), ("gelu", 1e18),
     ("gelu", 1e3), ("sin", 1e3)],
)
@pytest.mark.parametrize("dim", [1, 200])
@pytest.mark.xla_optimized
def test_huge_and_tiny_inputs_give_finite_kernels_close_to_float64(activation, scale, dim):
    """Inputs x = scale * N(0, 1): the float32 kernels are finite and match float64 wherever
    their entries are representable (``x . x'`` overflows float32 from |x| ~ 1e18 at d = 200,
    ``x . x' / d`` does not)."""
    model = models.MLP((64, 64, 1), activation=activation, w_std=1.5, b_std=0.1)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(dim), (5, dim))) * scale
    k32 = ntkjax.kernel_fn(model)(x.astype(np.float32))
    with jax.enable_x64(True):
        k64 = ntkjax.kernel_fn(model)(x.astype(np.float64))
    for name in ("nngp", "ntk"):
        got, want = np.asarray(getattr(k32, name)), np.asarray(getattr(k64, name))
        assert np.all(np.isfinite(got)), name
        # sin of huge variances: exp(-q/2) terms; d = 1: all inputs collinear (c = +-1), where
        # saturating activations of huge variance amplify float32 rounding of c (erf's
        # sigma_dot ~ 1 / sqrt(1/q + 1 - c^2)): documented in the README, ~1e-3
        tol = 1e-2 if activation == "sin" or dim == 1 else 1e-4
        assert max_relative_error(got, want) < tol, name


def test_float64_at_1e153_is_finite():
    with jax.enable_x64(True):
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 200)), np.float64) * 1e153
        k = ntkjax.kernel_fn(MLP)(x)
        assert np.all(np.isfinite(np.asarray(k.ntk))) and np.max(np.asarray(k.ntk)) > 1e305
