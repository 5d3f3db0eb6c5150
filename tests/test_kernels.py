"""ntkjax.kernels: the Kernel object, kernel_fn on modules, the Flax-layer guard, blocking."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models, nn
from ntkjax.nn.activations import activation_kernel
from ntkjax.nn.dense import dense_kernel
from tests.helpers import max_relative_error, with_and_without_jit


def _x(n=5, d=3, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


class Residual(linen.Module):
    """A user module: h = Dense(x); h + Dense(relu(Dense(h))), then a readout."""

    width: int = 256

    @linen.compact
    def __call__(self, x):
        h = nn.Dense(self.width, w_std=1.0, b_std=0.1)(x)
        branch = nn.Dense(self.width, w_std=np.sqrt(2))(nn.relu(nn.Dense(self.width)(h)))
        return nn.Dense(1)((h + branch) / np.sqrt(2))


class FlaxDenseNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(4)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jit_and_no_jit_agree_and_keep_dtype(dtype, x64):
    mlp = models.MLP((64, 64, 2), "erf", w_std=1.5, b_std=0.2)
    x1, x2 = _x(5, 3, 0, dtype), _x(4, 3, 1, dtype)
    results = [fn(x1, x2) for fn in with_and_without_jit(ntkjax.kernel_fn(mlp))]
    for k in results:
        assert isinstance(k, ntkjax.Kernel)
        assert k.nngp.shape == k.ntk.shape == (5, 4) and k.nngp.dtype == dtype
    np.testing.assert_allclose(results[0].nngp, results[1].nngp, rtol=1e-6)
    np.testing.assert_allclose(results[0].ntk, results[1].ntk, rtol=1e-6)


def _assert_symmetric_psd_and_equal(k, k2, *, symmetry_rtol):
    """k's NNGP and NTK are symmetric and PSD, and equal k2's (the same kernels computed via
    ``x2 = x`` instead of ``x2 = None``)."""
    for name in ("nngp", "ntk"):
        a = np.asarray(getattr(k, name))
        np.testing.assert_allclose(a, a.T, rtol=symmetry_rtol)
        assert np.linalg.eigvalsh(a).min() > -1e-10 * np.abs(a).max()
        np.testing.assert_allclose(a, getattr(k2, name), rtol=1e-12)


def test_symmetric_kernels_are_symmetric_psd_with_exact_diagonal(x64):
    x = _x(12, 4, 2, jnp.float64)
    mlp = models.MLP((64, 64, 1), "relu", w_std=np.sqrt(2), b_std=0.1)
    k = jax.jit(ntkjax.kernel_fn(mlp))(x)
    k2 = ntkjax.kernel_fn(mlp)(x, x)
    _assert_symmetric_psd_and_equal(k, k2, symmetry_rtol=1e-14)
    np.testing.assert_allclose(np.diagonal(k.nngp), k.var1, rtol=1e-13)


def test_eager_calls_on_many_inputs_share_one_compiled_program_per_module_value(x64):
    """From kernels._COMPILED_ENTRIES kernel entries, an eager call on vectors runs as one
    compiled program keyed by the module's value and the shapes: a second kernel_fn of an equal
    module reuses it. The kernels are the closed-form two-layer ReLU kernels (numpy, float64;
    d * kernel_fn of this MLP, as in test_analytic), exactly symmetric for x2 = None, and
    non-finite inputs are still refused with an error naming them."""
    from ntkjax import kernels

    x, y = (np.random.default_rng(s).normal(size=(512, 8)) for s in (0, 1))
    assert x.shape[0] * y.shape[0] >= kernels._COMPILED_ENTRIES
    mlp = lambda: models.MLP((64, 1), "relu", w_std=1.0, b_std=0.0)
    programs = kernels._vector_program._cache_size()
    k = ntkjax.kernel_fn(mlp())(x, y)
    assert kernels._vector_program._cache_size() == programs + 1
    dot = x @ y.T
    norms = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(y, axis=1)[None, :]
    t = np.arccos(np.clip(dot / norms, -1, 1))
    nngp = norms * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
    ntk = nngp + dot * (np.pi - t) / (2 * np.pi)
    for got, want in ((k.nngp, nngp), (k.ntk, ntk)):  # (atol: entries that cancel to ~0)
        np.testing.assert_allclose(8 * np.asarray(got), want, rtol=1e-10,
                                   atol=1e-13 * np.abs(want).max())
    k_xx = ntkjax.kernel_fn(mlp())(x, x)  # another instance, an equal module: no new program
    assert kernels._vector_program._cache_size() == programs + 1
    k_sym = ntkjax.kernel_fn(mlp())(x)
    for name in ("nngp", "ntk"):
        a = np.asarray(getattr(k_sym, name))
        np.testing.assert_array_equal(a, a.T)
        np.testing.assert_allclose(a, getattr(k_xx, name), rtol=1e-12, atol=1e-15 * a.max())
    np.testing.assert_allclose(np.diagonal(k_sym.nngp), k_sym.var1, rtol=1e-13)
    with pytest.raises(ValueError, match="x2"):
        ntkjax.kernel_fn(mlp())(x, np.where(y > 2, np.nan, y))


@pytest.mark.xla_optimized
def test_float32_diagonal_of_relu_ntk_matches_float64(x64):
    # identical inputs: the angle must be exactly 0 (no sqrt(ulp) error from arccos)
    x = _x(64, 16, 3, jnp.float64)
    mlp = models.MLP((8,) * 10 + (1,), "relu", w_std=np.sqrt(2), b_std=0.1)
    k64 = ntkjax.kernel_fn(mlp)(x)
    k32 = jax.jit(ntkjax.kernel_fn(mlp))(x.astype(jnp.float32))
    assert max_relative_error(k32.ntk, k64.ntk) < 1e-5
    assert max_relative_error(np.diagonal(k32.ntk), np.diagonal(k64.ntk)) < 1e-5


@pytest.mark.xla_optimized
def test_depth_100_w_std_2_float32_does_not_overflow(x64):
    x = _x(4, 3, 4, jnp.float64) * jnp.array([[1.0], [10.0], [1e-3], [0.0]])
    mlp = models.MLP((8,) * 100 + (1,), "relu", w_std=2.0, b_std=0.5)
    k64 = ntkjax.kernel_fn(mlp)(x)
    k32 = ntkjax.kernel_fn(mlp)(x.astype(jnp.float32))
    # the true values are huge but representable in float32
    assert 1e30 < np.max(np.asarray(k64.ntk)) < 1e38
    for name in ("nngp", "ntk"):
        a32 = np.asarray(getattr(k32, name))
        assert np.all(np.isfinite(a32))
        assert max_relative_error(a32, getattr(k64, name)) < 1e-4


def test_residual_user_module_adds_branch_kernels(x64):
    x1, x2 = _x(5, 3, 5, jnp.float64), _x(3, 3, 6, jnp.float64)
    k = ntkjax.kernel_fn(Residual())(x1, x2)
    # the same kernel composed by hand from the Kernel rules
    h = dense_kernel(ntkjax.kernels.input_kernel(x1, x2), 256, w_std=1.0, b_std=0.1)
    branch = activation_kernel(
        dense_kernel(h, 256, w_std=1.0, b_std=0.0),
        nn.relu.kernel_maps, nn.relu.kernel_variance,
    )
    branch = dense_kernel(branch, 256, w_std=np.sqrt(2), b_std=0.0)
    want = dense_kernel((h + branch).__mul__(1 / np.sqrt(2)), 1, w_std=1.0, b_std=0.0)
    np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-13)
    np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-13)
    # and the finite network of the same module runs
    params = Residual().init(jax.random.PRNGKey(0), x1)
    assert Residual().apply(params, x1).shape == (5, 1)


@pytest.mark.slow
@pytest.mark.xla_optimized
def test_residual_nngp_matches_monte_carlo_over_networks(x64):
    x = _x(4, 3, 7, jnp.float64)
    module = Residual(width=128)
    # one compiled program (vmapped eagerly, every operation would compile a program)
    outs = jax.jit(jax.vmap(lambda key: module.apply(module.init(key, x), x)[:, 0]))(
        jax.random.split(jax.random.PRNGKey(1), 4000)
    )
    empirical = np.cov(np.asarray(outs), rowvar=False, bias=True)
    k = ntkjax.kernel_fn(module)(x)
    assert max_relative_error(empirical, k.nngp) < 0.08


def test_kernel_arithmetic_and_errors():
    k = ntkjax.kernel_fn(models.MLP((16, 1)))(_x())
    np.testing.assert_allclose((2.0 * k).ntk, 4 * k.ntk, rtol=1e-6)
    np.testing.assert_allclose((k / 2.0).nngp, k.nngp / 4, rtol=1e-6)
    np.testing.assert_allclose((k + k).nngp, 2 * k.nngp, rtol=1e-6)
    with pytest.raises(ValueError, match="scalar"):
        k * jnp.ones(3)
    other = ntkjax.kernels.input_kernel(_x())  # width 3 vs 1
    with pytest.raises(ValueError, match="width"):
        k + other


def test_flax_builtin_layer_raises_naming_the_layer():
    with pytest.raises(ValueError, match=r"flax\.linen\.linear\.Dense.*ntkjax\.nn\.Dense"):
        ntkjax.kernel_fn(FlaxDenseNet())(_x())
    # the finite network itself is fine
    params = FlaxDenseNet().init(jax.random.PRNGKey(0), _x())
    assert FlaxDenseNet().apply(params, _x()).shape == (5, 4)


def test_sequential_container_passes_kernels_through():
    seq = linen.Sequential([nn.Dense(32), nn.relu, nn.Dense(1)])
    k = ntkjax.kernel_fn(seq)(_x())
    want = ntkjax.kernel_fn(models.MLP((32, 1)))(_x())
    np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-6)


def test_input_validation():
    fn = ntkjax.kernel_fn(models.MLP((8, 1)))
    with pytest.raises(ValueError, match="batch axis"):
        fn(jnp.ones(3))
    with pytest.raises(ValueError, match="same per-example shape"):
        fn(jnp.ones((2, 3)), jnp.ones((2, 4)))
    cnn = ntkjax.kernel_fn(models.CNN((4, 1)))
    with pytest.raises(ValueError, match="same per-example shape"):
        cnn(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 5, 5, 3)))  # spatial mismatch
    with pytest.raises(ValueError, match="same per-example shape"):
        cnn(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 2)))  # channel mismatch
    with pytest.raises(ValueError, match="spatial axes"):
        cnn(jnp.ones((2, 3)))  # a conv net on feature vectors


def test_kernel_matrix_matches_kernel_fn_in_blocks(x64):
    mlp = models.MLP((32, 32, 1), "gelu", w_std=1.3, b_std=0.2)
    x1, x2 = _x(37, 5, 8, jnp.float64), _x(21, 5, 9, jnp.float64)
    full = ntkjax.kernel_fn(mlp)(x1, x2)
    blocked = ntkjax.kernel_matrix(mlp, x1, x2, block_size=8)
    assert isinstance(blocked.nngp, np.ndarray) and blocked.width == 1
    np.testing.assert_allclose(blocked.nngp, full.nngp, rtol=1e-12)
    np.testing.assert_allclose(blocked.ntk, full.ntk, rtol=1e-12)
    np.testing.assert_allclose(blocked.var1, full.var1, rtol=1e-12)
    sym = ntkjax.kernel_matrix(mlp, x1, block_size=8)
    np.testing.assert_allclose(sym.ntk, ntkjax.kernel_fn(mlp)(x1).ntk, rtol=1e-12)


@pytest.mark.slow
def test_kernel_matrix_under_a_memory_budget():
    mlp = models.MLP((512,) * 3 + (1,), "relu", w_std=np.sqrt(2), b_std=0.1)
    x = _x(3000, 64, 10)
    k = ntkjax.kernel_matrix(mlp, x, memory_bytes=64 * 2**20)
    ref = jax.jit(ntkjax.kernel_fn(mlp))(x[:300], x)
    assert k.ntk.shape == (3000, 3000)
    np.testing.assert_allclose(k.ntk[:300], ref.ntk, rtol=2e-6)
    np.testing.assert_allclose(k.ntk, k.ntk.T, rtol=2e-6)


# ---- images and convolutional networks ----


def _images(n=4, spatial=(5, 4), c=3, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *spatial, c), dtype)


CNNS = [
    models.CNN((8, 8, 2), activation="relu", readout="flatten", w_std=np.sqrt(2), b_std=0.1),
    models.CNN((8, 8, 1), kernel_size=(3, 2), strides=(2, 1), activation="erf",
               readout="global_average_pool", w_std=1.2, b_std=0.2),
    models.CNN((8, 1), padding="VALID", activation="gelu", readout="flatten",
               parameterization="standard", b_std=0.3),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("cnn", CNNS, ids=["flatten", "gap_strided", "valid_standard"])
def test_cnn_jit_and_no_jit_agree_and_keep_dtype(cnn, dtype, x64):
    x1, x2 = _images(4, dtype=dtype), _images(3, seed=1, dtype=dtype)
    results = [fn(x1, x2) for fn in with_and_without_jit(ntkjax.kernel_fn(cnn))]
    for k in results:
        assert k.nngp.shape == k.ntk.shape == (4, 3) and k.nngp.dtype == dtype
        assert k.var1.shape == (4,) and k.var2.shape == (3,) and k.width == cnn.features[-1]
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(results[0].nngp, results[1].nngp, rtol=rtol)
    np.testing.assert_allclose(results[0].ntk, results[1].ntk, rtol=rtol)


@pytest.mark.parametrize("cnn", CNNS, ids=["flatten", "gap_strided", "valid_standard"])
def test_cnn_kernels_are_symmetric_psd_with_consistent_variances(cnn, x64):
    x = _images(10, dtype=jnp.float64)
    k = jax.jit(ntkjax.kernel_fn(cnn))(x)
    k2 = ntkjax.kernel_fn(cnn)(x, x)  # separate variance path (per-image covariances)
    _assert_symmetric_psd_and_equal(k, k2, symmetry_rtol=1e-13)
    np.testing.assert_allclose(np.diagonal(k.nngp), k.var1, rtol=1e-12)
    np.testing.assert_allclose(k2.var1, k.var1, rtol=1e-12)
    np.testing.assert_allclose(k2.var2, k.var1, rtol=1e-12)


def test_dense_layers_on_images_act_per_position(x64):
    # an MLP applied to (N, *S, C) acts on every position's channel vector with shared weights:
    # its kernel between position p of x1 and p' of x2 is the MLP kernel of those two vectors
    mlp = models.MLP((16, 16, 2), "erf", w_std=1.4, b_std=0.3)
    x1, x2 = _images(3, (2, 3), 4, 0, jnp.float64), _images(2, (2, 3), 4, 1, jnp.float64)
    k = ntkjax.kernel_fn(mlp)(x1, x2)
    assert k.shape == (3, 2, 2, 3, 2, 3) and k.spatial_shape == (2, 3) and k.width == 2
    assert k.var1.shape == (3, 2, 3, 2, 3)
    fn = ntkjax.kernel_fn(mlp)
    for p in np.ndindex(2, 3):
        for q in np.ndindex(2, 3):
            want = fn(x1[:, p[0], p[1]], x2[:, q[0], q[1]])
            # rtol 1e-13 per entry, and 1e-13 of the largest entry for entries that cancel
            # (XLA contracts the two programs' multiply-adds differently)
            for got, exp in ((k.nngp[:, :, *p, *q], want.nngp), (k.ntk[:, :, *p, *q], want.ntk)):
                np.testing.assert_allclose(got, exp, rtol=1e-13,
                                           atol=1e-13 * float(np.max(np.abs(exp))))
            self_q = fn(x1[:, p[0], p[1]], x1[:, q[0], q[1]]).nngp
            np.testing.assert_allclose(k.var1[:, *p, *q], np.diagonal(self_q), rtol=1e-13)


def test_circular_cnn_with_pooling_is_invariant_to_cyclic_shifts(x64):
    cnn = models.CNN((8, 8, 1), padding="CIRCULAR", activation="relu",
                     readout="global_average_pool", w_std=np.sqrt(2), b_std=0.1)
    x1, x2 = _images(3, (5, 4), 2, 0, jnp.float64), _images(2, (5, 4), 2, 1, jnp.float64)
    k = ntkjax.kernel_fn(cnn)(x1, x2)
    shifted = ntkjax.kernel_fn(cnn)(jnp.roll(x1, (2, 1), axis=(1, 2)), x2)
    np.testing.assert_allclose(shifted.nngp, k.nngp, rtol=1e-12)
    np.testing.assert_allclose(shifted.ntk, k.ntk, rtol=1e-12)
    # and not for zero padding (the borders differ), so the check has teeth
    same = models.CNN((8, 8, 1), activation="relu", readout="global_average_pool",
                      w_std=np.sqrt(2), b_std=0.1)
    a = ntkjax.kernel_fn(same)(x1, x2).ntk
    b = ntkjax.kernel_fn(same)(jnp.roll(x1, (2, 1), axis=(1, 2)), x2).ntk
    assert max_relative_error(a, b) > 1e-3


def test_cnn_kernel_matrix_matches_kernel_fn_in_blocks(x64):
    cnn = CNNS[1]
    x1, x2 = _images(11, dtype=jnp.float64), _images(6, seed=1, dtype=jnp.float64)
    full = ntkjax.kernel_fn(cnn)(x1, x2)
    blocked = ntkjax.kernel_matrix(cnn, x1, x2, block_size=4)
    np.testing.assert_allclose(blocked.nngp, full.nngp, rtol=1e-12)
    np.testing.assert_allclose(blocked.ntk, full.ntk, rtol=1e-12)
    np.testing.assert_allclose(blocked.var1, full.var1, rtol=1e-12)
    np.testing.assert_allclose(blocked.var2, full.var2, rtol=1e-12)
    sym = ntkjax.kernel_matrix(cnn, x1, block_size=4)
    np.testing.assert_allclose(sym.ntk, ntkjax.kernel_fn(cnn)(x1).ntk, rtol=1e-12)
    with pytest.raises(ValueError, match="spatial axes"):
        ntkjax.kernel_matrix(models.MLP((8, 1)), x1)  # output still (N, *S, 1)


class ForeignActivationNet(linen.Module):
    """A user module that applies a plain function (not an ntkjax activation)."""

    fn: object

    @linen.compact
    def __call__(self, x):
        return nn.Dense(1)(self.fn(nn.Dense(8)(x)))


@pytest.mark.parametrize(
    ("fn", "pattern"),
    [
        (jax.nn.relu, r"jax\.nn\.relu.*use ntkjax\.nn\.relu"),
        (linen.relu, r"jax\.nn\.relu.*use ntkjax\.nn\.relu"),
        (jnp.tanh, r"jnp\.tanh.*ntkjax\.nn\.elementwise\(fn\)"),
        (lambda h: jnp.maximum(h, 0), r"lambda calling jnp\.maximum.*<lambda>"),
        (jax.nn.sigmoid, r"jax\.nn\.sigmoid.*ntkjax\.nn\.sigmoid_like"),
    ],
)
def test_plain_jax_function_on_a_kernel_names_it_and_the_fix(fn, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        ntkjax.kernel_fn(ForeignActivationNet(fn))(_x())
    assert isinstance(err.value, ntkjax.kernels.ForeignFunctionError)
    assert "test_kernels.py" in str(err.value)  # points at the user's line
    # the same module is a fine finite network
    params = ForeignActivationNet(fn).init(jax.random.PRNGKey(0), _x())
    assert ForeignActivationNet(fn).apply(params, _x()).shape == (5, 1)
    # and the suggested wrapper gives it a kernel
    if "elementwise" in pattern:
        k = ntkjax.kernel_fn(ForeignActivationNet(nn.elementwise(fn)))(_x())
        assert np.all(np.isfinite(k.ntk))


def test_sums_of_two_non_gaussian_branches_are_refused():
    k = nn.Dense(4).apply({}, ntkjax.kernels.input_kernel(_x()))
    assert (k + nn.relu(k)).non_gaussian == "ntkjax.nn.relu"  # one non-Gaussian branch: fine
    with pytest.raises(ValueError, match="both end in a layer with non-Gaussian outputs"):
        nn.relu(k) + nn.erf(k)


# ---- only the pairs of positions the readout needs; blocks ----


class PerPosition(linen.Module):
    """Convolutions whose output keeps its spatial axes (no readout)."""

    @linen.compact
    def __call__(self, x):
        return nn.Conv(4, kernel_size=(3, 2), strides=(2, 1), b_std=0.2)(
            nn.erf(nn.Conv(4, padding="CIRCULAR", w_std=1.3)(x)))


def test_position_pairs_are_chosen_from_the_module():
    x = _images(2, (6, 5), 2)
    kernels = ntkjax.kernels

    def use_diagonal(module, x, position_pairs):
        facts = kernels._module_facts(module, x, kernels._KnownFacts())
        return kernels._use_diagonal(position_pairs, facts)

    assert use_diagonal(CNNS[0], x, "auto")  # convolutions, activations, flatten
    assert not use_diagonal(CNNS[1], x, "auto")  # global average pooling
    assert not use_diagonal(models.CNN((4, 4, 1), pooling="avg"), x, "auto")
    assert not use_diagonal(PerPosition(), x, "auto")  # the output keeps all pairs
    assert use_diagonal(PerPosition(), x, "same")
    assert not use_diagonal(CNNS[0], x, "all")
    with pytest.raises(ValueError, match="not possible"):
        ntkjax.kernel_fn(CNNS[1], position_pairs="same")(x)
    with pytest.raises(ValueError, match="position_pairs"):
        ntkjax.kernel_fn(CNNS[0], position_pairs="diagonal")


def test_same_position_kernels_are_the_diagonal_of_all_pairs(x64):
    x1, x2 = _images(3, dtype=jnp.float64), _images(2, seed=1, dtype=jnp.float64)
    for args in ((x1, x2), (x1,)):
        full = ntkjax.kernel_fn(PerPosition())(*args)
        same = ntkjax.kernel_fn(PerPosition(), position_pairs="same")(*args)
        assert full.shape == (3, len(args[-1]), 3, 4, 3, 4) and same.shape == full.shape[:4]
        assert same.diagonal_spatial and not full.diagonal_spatial
        for name in ("nngp", "ntk"):
            a = getattr(full, name).reshape(3, len(args[-1]), 12, 12)
            want = np.diagonal(a, axis1=2, axis2=3).reshape(same.shape)
            np.testing.assert_allclose(getattr(same, name), want, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(same.var1.reshape(3, 12), np.diagonal(
            full.var1.reshape(3, 12, 12), axis1=1, axis2=2), rtol=1e-13)
        flat = ntkjax.kernel_fn(CNNS[0], position_pairs="all")(*args)
        auto = ntkjax.kernel_fn(CNNS[0])(*args)
        np.testing.assert_allclose(auto.ntk, flat.ntk, rtol=1e-13)
        np.testing.assert_allclose(auto.var1, flat.var1, rtol=1e-13)


@pytest.mark.parametrize("cnn", [CNNS[0], models.CNN((4, 4, 1), pooling="avg", b_std=0.1)],
                         ids=["same_positions", "all_pairs"])
def test_blocks_of_rows_match_one_block(cnn, monkeypatch, x64):
    # blocks of one row each: every pair is its own block; x2 = None mirrors the upper blocks
    x1, x2 = _images(5, (4, 4), dtype=jnp.float64), _images(3, (4, 4), seed=1,
                                                             dtype=jnp.float64)
    monkeypatch.setattr(ntkjax.kernels, "_BLOCK_ENTRIES", 2**30)
    fn = jax.jit(ntkjax.kernel_fn(cnn))
    whole = [fn(x1, x2), fn(x1)]
    monkeypatch.setattr(ntkjax.kernels, "_BLOCK_ENTRIES", 1)
    fn = jax.jit(ntkjax.kernel_fn(cnn))
    for got, want in zip([fn(x1, x2), fn(x1)], whole, strict=True):
        for name in ("nngp", "ntk", "var1", "var2"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12)


def test_flatten_readout_cnn_fits_in_memory_at_large_n():
    # the kernel between all pairs of positions of 256 8x8 images would take 2 x 1 GiB per
    # layer; same-position pairs in blocks take kilobytes beyond the (N, N) result
    cnn = models.CNN((64, 64, 64, 1), readout="flatten", w_std=np.sqrt(2), b_std=0.1)
    x = jax.ShapeDtypeStruct((256, 8, 8, 3), jnp.float32)
    stats = jax.jit(ntkjax.kernel_fn(cnn)).lower(x).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 32 * 2**20
