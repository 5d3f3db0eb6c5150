"""Property-based tests (hypothesis) over random small MLP and CNN configurations, dtypes and
input scales: kernels finite, exactly symmetric for x2 = None, PSD, equal for x2 = x; float32
within the documented tolerance of float64; every empirical method agrees; blocked equals
unblocked; bad inputs raise ValueError. Examples are few and derandomized (a fixed seed), so
CI runs the same cases every time."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ntkjax
from ntkjax import models
from tests.helpers import max_relative_error

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: compiles are slow
                    suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = ["relu", "erf", "gelu", "sin", "abs", "leaky_relu"]

mlps = st.builds(
    lambda depth, act, w_std, b_std, param: models.MLP(
        (16,) * depth + (1,), activation=act, w_std=w_std, b_std=b_std, parameterization=param),
    depth=st.integers(1, 3),
    act=st.sampled_from(ACTIVATIONS),
    w_std=st.floats(0.5, 2.0),
    b_std=st.floats(0.0, 0.5),
    param=st.sampled_from(["ntk", "standard"]),
)
cnns = st.builds(
    lambda depth, act, padding, readout: models.CNN(
        (8,) * depth + (1,), kernel_size=2, activation=act, padding=padding, readout=readout,
        w_std=1.4, b_std=0.1),
    depth=st.integers(1, 2),
    act=st.sampled_from(["relu", "erf"]),
    padding=st.sampled_from(["SAME", "VALID", "CIRCULAR"]),
    readout=st.sampled_from(["flatten", "global_average_pool"]),
)


def _inputs(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape), np.float64) * scale


@SETTINGS
@given(model=st.one_of(mlps, cnns), seed=st.integers(0, 2**16),
       log_scale=st.floats(-3, 3))
def test_analytic_kernels_are_finite_symmetric_psd_and_consistent(model, seed, log_scale):
    image = isinstance(model, models.CNN)
    shape = (5, 4, 4, 2) if image else (5, 3)
    x = _inputs(seed, shape, 10.0**log_scale)
    with jax.enable_x64(True):
        k64 = ntkjax.kernel_fn(model)(x)
        k_same = ntkjax.kernel_fn(model)(x, x)
    k32 = ntkjax.kernel_fn(model)(x.astype(np.float32))
    for name in ("nngp", "ntk"):
        a64, a32 = np.asarray(getattr(k64, name)), np.asarray(getattr(k32, name))
        assert np.all(np.isfinite(a64)) and np.all(np.isfinite(a32))
        np.testing.assert_array_equal(a64, a64.T)  # exactly symmetric
        np.testing.assert_array_equal(a32, a32.T)
        assert np.linalg.eigvalsh(a64)[0] >= -1e-10 * np.max(np.abs(a64))
        np.testing.assert_allclose(getattr(k_same, name), a64, rtol=1e-12,
                                   atol=1e-12 * np.max(np.abs(a64)))
        assert max_relative_error(a32, a64) < 1e-5  # the documented float32 accuracy


@SETTINGS
@given(model=mlps, seed=st.integers(0, 2**16), outputs=st.sampled_from(["trace", "full"]))
def test_every_empirical_method_agrees_and_blocked_equals_unblocked(model, seed, outputs):
    model = model.clone(features=(*model.features[:-1], 2))
    x1, x2 = _inputs(seed, (6, 3), 1.0), _inputs(seed + 1, (4, 3), 1.0)
    with jax.enable_x64(True):
        params = model.init(jax.random.PRNGKey(seed), x1)
        # MLPs: examples are independent (batch="per_sample": no probe compiled per kernel
        # function); empirical_ntk_matrix below runs its default probe
        kernels = [ntkjax.empirical_ntk_fn(model.apply, ntk_method=m, outputs=outputs,
                                           batch="per_sample")(params, x1, x2)
                   for m in ("jacobian", "ntk_vp", "structured")]
        blocked = ntkjax.empirical_ntk_matrix(model.apply, params, x1, x2, outputs=outputs,
                                              block_size=3)
        analytic_blocked = ntkjax.kernel_matrix(model, x1, x2, block_size=2)
        analytic = ntkjax.kernel_fn(model)(x1, x2)
    for k in [*kernels[1:], blocked]:
        np.testing.assert_allclose(k, kernels[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(analytic_blocked.ntk, analytic.ntk, rtol=1e-12)


@SETTINGS
@given(bad=st.sampled_from(["nan", "inf", "empty", "no_features", "ragged"]),
       entry=st.sampled_from(["kernel_fn", "kernel_matrix", "empirical_ntk_fn",
                              "evaluate_in_blocks"]))
def test_bad_inputs_raise_value_error(bad, entry):
    model = models.MLP((8, 1))
    x = np.ones((3, 4))
    x_bad = {"nan": np.where(np.eye(3, 4) > 0, np.nan, 1.0), "inf": np.full((3, 4), np.inf),
             "empty": np.ones((0, 4)), "no_features": np.ones((3, 0)),
             "ragged": np.ones((3, 5))}[bad]
    params = model.init(jax.random.PRNGKey(0), x)
    call = {
        "kernel_fn": lambda a, b: ntkjax.kernel_fn(model)(a, b),
        "kernel_matrix": lambda a, b: ntkjax.kernel_matrix(model, a, b),
        "empirical_ntk_fn": lambda a, b: ntkjax.empirical_ntk_fn(model.apply)(params, a, b),
        "evaluate_in_blocks": lambda a, b: ntkjax.evaluate_in_blocks(lambda p, q: p @ q.T, a, b),
    }[entry]
    with pytest.raises(ValueError):
        call(x, x_bad)


# ------------------------------------------------ sequences and images (issue 22)
# Attention + LayerNorm + residual networks on sequences, CNNs with pooling (and transposed
# convolutions, branches) on images: where the transformer kernels with x2 failed unseen.

def _post_ln(width, heads, mechanism, act):
    """A post-LN transformer block: LayerNorm(x + attention), LayerNorm(x + MLP)."""
    from flax import linen

    from ntkjax import nn

    class PostLN(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = nn.Dense(width, b_std=0.1)(x)
            h = nn.SelfAttention(width, width, width, num_heads=heads,
                                 attention_mechanism=mechanism)(x)
            x = nn.LayerNorm()(x + h)
            h = nn.Dense(width)(getattr(nn, act)(nn.Dense(width, w_std=1.4)(x)))
            return nn.Dense(1)(nn.global_average_pool(nn.LayerNorm()(x + h)))

    return PostLN()


sequence_nets = st.one_of(
    st.builds(
        lambda depth, heads, act, mech, readout: models.Transformer(
            8, depth=depth, num_heads=heads, activation=act, attention_mechanism=mech,
            readout=readout, b_std=0.1),
        depth=st.integers(1, 2),
        heads=st.integers(1, 2),
        act=st.sampled_from(["relu", "erf", "gelu"]),
        mech=st.sampled_from(["softmax", "identity", "abs", "relu"]),
        readout=st.sampled_from(["global_average_pool", "flatten"]),
    ),
    st.builds(_post_ln, width=st.just(8), heads=st.integers(1, 2),
              mechanism=st.sampled_from(["softmax", "relu"]),
              act=st.sampled_from(["relu", "gelu"])),
)
image_nets = st.one_of(
    st.builds(
        lambda act, pooling, readout, padding, window: models.CNN(
            (4, 4, 1), kernel_size=2, activation=act, pooling=pooling, readout=readout,
            padding=padding, pool_window=window, w_std=1.4, b_std=0.1),
        act=st.sampled_from(["relu", "erf", "gelu"]),
        pooling=st.sampled_from(["avg", "sum"]),
        readout=st.sampled_from(["flatten", "global_average_pool", "global_sum_pool"]),
        padding=st.sampled_from(["SAME", "VALID", "CIRCULAR"]),
        window=st.integers(1, 2),
    ),
    st.builds(lambda: models.Myrtle(5, num_outputs=1)),
)


def _check_psd_symmetric_permutation(model, shape, seed):
    x = _inputs(seed, (5, *shape), 1.0)
    perm = np.random.default_rng(seed).permutation(5)
    with jax.enable_x64(True):
        fn = ntkjax.kernel_fn(model)
        k, k_perm = fn(x), fn(x[perm])
    for name in ("nngp", "ntk"):
        a = np.asarray(getattr(k, name))
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, a.T)  # exactly symmetric
        assert np.linalg.eigvalsh(a)[0] >= -1e-10 * np.max(np.abs(a))
        # permuting the examples permutes the kernel (equivariance)
        np.testing.assert_allclose(getattr(k_perm, name), a[perm][:, perm], rtol=1e-12,
                                   atol=1e-12 * np.max(np.abs(a)))


def _check_x2_transpose_and_blocks(model, shape, seed):
    x1, x2 = _inputs(seed, (4, *shape), 1.0), _inputs(seed + 1, (3, *shape), 1.0)
    with jax.enable_x64(True):
        fn = ntkjax.kernel_fn(model)
        k11, k12, k21 = fn(x1), fn(x1, x2), fn(x2, x1)
        blocked = ntkjax.kernel_matrix(model, x1, block_size=2)
        blocked12 = ntkjax.kernel_matrix(model, x1, x2, block_size=2)
    for name in ("nngp", "ntk"):
        a12 = np.asarray(getattr(k12, name))
        tol = dict(rtol=1e-12, atol=1e-12 * np.max(np.abs(a12)))
        np.testing.assert_allclose(getattr(k21, name), a12.T, **tol)  # x1 <-> x2: transpose
        np.testing.assert_allclose(getattr(blocked12, name), a12, **tol)  # blocked = whole
        np.testing.assert_allclose(getattr(blocked, name), getattr(k11, name), rtol=1e-12,
                                   atol=1e-12 * np.max(np.abs(getattr(k11, name))))


SMALL = settings(SETTINGS, max_examples=3)


@pytest.mark.slow
@SMALL
@given(model=sequence_nets, seed=st.integers(0, 2**16))
def test_sequence_kernels_symmetric_psd_and_permutation_equivariant(model, seed):
    _check_psd_symmetric_permutation(model, (3, 2), seed)


@pytest.mark.slow
@SMALL
@given(model=sequence_nets, seed=st.integers(0, 2**16))
def test_sequence_kernels_x2_is_the_transpose_and_blocked_equals_whole(model, seed):
    _check_x2_transpose_and_blocks(model, (3, 2), seed)


@pytest.mark.slow
@SMALL
@given(model=image_nets, seed=st.integers(0, 2**16))
def test_image_kernels_symmetric_psd_and_permutation_equivariant(model, seed):
    _check_psd_symmetric_permutation(model, (4, 4, 2), seed)


@pytest.mark.slow
@SMALL
@given(model=image_nets, seed=st.integers(0, 2**16))
def test_image_kernels_x2_is_the_transpose_and_blocked_equals_whole(model, seed):
    _check_x2_transpose_and_blocks(model, (4, 4, 2), seed)
