"""Infinite ensembles of infinitely wide networks, from a module (or kernel function) and data.

The outputs of a wide network at initialization are a centred Gaussian process with the NNGP
``K`` as covariance; gradient flow on the MSE under the NTK ``Theta`` is affine in them, so the
trained ensemble is Gaussian at every time t (Lee et al. 2019, "Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", eqs. 15-16). With
``A_t = Theta(x, X) Theta^{-1} (I - exp(-lr Theta t / n))``::

    mu_t(x)        = A_t y,
    Sigma_t(x, x') = K(x, x') + A_t K(X, X) A_t'^T - A_t K(X, x') - K(x, X) A_t'^T,

``get="ntk"``. ``get="nngp"`` puts the NNGP in place of the NTK (training only the readout
layer, Lee et al. 2019, section 2.3.1): its ``t = inf`` limit is exact Bayesian inference,
the GP posterior ``K(x, X) K^{-1} y``, ``K(x, x') - K(x, X) K^{-1} K(X, x')``. ``t = 0`` is the
prior ``(0, K(x, x'))``. The terms are :mod:`ntkjax.predict`'s (:func:`ntkjax.predict.
gradient_flow_ensemble` is the same computation on precomputed kernel triples); time and
``diag_reg`` follow its conventions (``t`` in steps at ``learning_rate``, the MSE
``1/(2n) sum ||f - y||^2``).

Cost. The training kernels and one eigendecomposition per ``get`` are computed once (on first
use) and reused for every call, block of test points and time. Kernels are evaluated
``block_size`` rows at a time, and test points are processed in blocks of ``block_size`` rows
-- their kernels against the training set, ``A_t``, mean and variances in one compiled call
per block (the last block padded to the same shape) -- so memory grows with the block, not with
the test set, except for the full covariance, which is ``(m, m)`` per time by definition
(``covariance="diagonal"`` gives the variances alone). Compiled code is shared by predictors
of equal modules (and of the same kernel function).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax._checks import (
    check_choice,
    check_diag_reg,
    check_finite,
    check_pair,
    check_positive,
    check_times,
    float_dtype,
)
from ntkjax._spectral import Eigen, eigh_psd
from ntkjax._tiling import padded_row_indices
from ntkjax.kernels import kernel_fn as module_kernel_fn
from ntkjax.predict import (
    Gaussian,
    ensemble_covariance,
    ensemble_mean,
    ensemble_transfer,
    ensemble_variance,
)

__all__ = ["COVARIANCES", "GETS", "Covariance", "Get", "ensemble_predictor"]

Get = Literal["nngp", "ntk"]
GETS: tuple[Get, ...] = ("nngp", "ntk")
Covariance = Literal["full", "diagonal", "none"]
COVARIANCES: tuple[Covariance, ...] = ("full", "diagonal", "none")

_DEFAULT_BLOCK = 512


@functools.lru_cache(maxsize=32)
def _module_kernel(module: linen.Module) -> Callable[..., Any]:
    """One kernel function per (hashable, compared by value) module, so that predictors of
    equal modules share compiled code."""
    return module_kernel_fn(module)


def _resolve_kernel(kernel: Any) -> Callable[..., Any]:
    if isinstance(kernel, linen.Module):
        return _module_kernel(kernel)
    if callable(kernel):
        return kernel
    raise ValueError(
        "kernel must be a flax module built from ntkjax.nn layers or a kernel function "
        f"(x1, x2=None) -> ntkjax.Kernel; got {type(kernel).__name__}."
    )


def _check_flat(k: Any, what: str) -> None:
    for name in ("nngp", "ntk"):
        if not hasattr(k, name):
            raise ValueError(f"the kernel function must return an ntkjax.Kernel (with .nngp, "
                             f".ntk and .var1); it returned {type(k).__name__}.")
    shape = tuple(np.shape(k.nngp))
    if len(shape) != 2:
        raise ValueError(
            f"the kernel function's output on {what} has shape {shape}: it has spatial axes "
            "(N1, N2, *S, *S), but an ensemble needs the (N1, N2) kernel of the network's "
            "outputs. End a convolutional network with ntkjax.nn.flatten or "
            "ntkjax.nn.global_average_pool and a Dense readout."
        )


def ensemble_predictor(
    kernel: linen.Module | Callable[..., Any],
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    block_size: int | None = None,
) -> Callable[..., Gaussian]:
    """Mean and covariance of the infinite ensemble trained on ``(x_train, y_train)``.

    Args:
      kernel: a ``flax.linen`` module built from :mod:`ntkjax.nn` layers (its
        :func:`ntkjax.kernel_fn` is used), or any kernel function
        ``(x1, x2=None) -> ntkjax.Kernel`` whose kernels have no spatial axes.
      x_train: ``(n, ...)`` training inputs.
      y_train: ``(n,)`` or ``(n, outputs)`` targets.
      learning_rate: ``lr``; times are in steps at this learning rate (MSE
        ``1/(2n) sum ||f - y||^2``, as :func:`ntkjax.gradient_flow_mse`).
      diag_reg: ``lambda = diag_reg * trace / n`` added to the training kernel that drives the
        dynamics (the NTK, or the NNGP for ``get="nngp"``), as in
        :func:`ntkjax.gradient_flow_mse` (weight decay towards the initialization). With
        ``get="nngp"`` and ``t = inf`` the mean is the GP posterior mean with noise variance
        ``lambda``; the covariance is the ridge-trained ensemble's (the noisy posterior
        covariance is :func:`ntkjax.gp_inference`'s); they coincide at ``diag_reg = 0``.
      block_size: test points per block (default 512).

    Returns:
      ``predict(x_test, *, t=jnp.inf, get="ntk", covariance="full") -> Gaussian``: numpy
      arrays; ``mean`` of shape ``(*T, m)`` or ``(*T, m, outputs)``, ``covariance``
      ``(*T, m, m)`` for ``"full"``, the variances ``(*T, m)`` for ``"diagonal"``, None for
      ``"none"`` (shared by all outputs); variances that round-off makes negative (at the
      training points, where they vanish) are clipped to 0. ``t``: a scalar or 1-D array of
      times ``>= 0`` (``jnp.inf`` allowed); ``get``: ``"ntk"`` (gradient descent) or
      ``"nngp"`` (Bayesian posterior at ``t = inf``).

    Raises:
      ValueError: a kernel function whose kernels have spatial axes, inputs without a batch
        axis, targets that do not match ``x_train``, unknown ``get`` / ``covariance``, or times
        that are negative.

    >>> import jax, jax.numpy as jnp
    >>> from ntkjax.models import MLP
    >>> x = jax.random.normal(jax.random.key(0), (6, 3))
    >>> predict = ensemble_predictor(MLP(features=(512, 1), activation="erf"), x, x[:, 0])
    >>> out = predict(x[:2], t=jnp.array([1.0, jnp.inf]), get="ntk", covariance="diagonal")
    >>> out.mean.shape, out.covariance.shape
    ((2, 2), (2, 2))
    """
    fn = _resolve_kernel(kernel)
    check_pair(x_train, None)
    n = int(np.shape(x_train)[0])
    y_shape = tuple(np.shape(y_train))
    if len(y_shape) not in (1, 2) or y_shape[0] != n:
        raise ValueError(f"y_train must have shape ({n},) or ({n}, outputs) to match x_train's "
                         f"{n} points; got shape {y_shape}.")
    check_finite(y_train, "y_train")
    check_positive(learning_rate, "learning_rate")
    check_diag_reg(diag_reg)
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}.")
    block = _DEFAULT_BLOCK if block_size is None else int(block_size)
    _check_flat(jax.eval_shape(fn, x_train[:1]), "x_train")

    dtype = float_dtype(x_train, jax.eval_shape(fn, x_train[:1]).nngp)
    x_train_dev = jnp.asarray(x_train, dtype)
    nngp_train, ntk_train = _rows(fn, x_train_dev, x_train_dev, block)
    k_train = {"nngp": nngp_train, "ntk": ntk_train}
    y = jnp.asarray(y_train, dtype)
    lr = jnp.asarray(learning_rate, dtype)
    eigen: dict[str, Eigen] = {}

    def decomposition(get: str) -> Eigen:
        if get not in eigen:
            eigen[get] = eigh_psd(k_train[get], diag_reg, f"the {get} of x_train")
        return eigen[get]

    def predict(
        x_test: jax.Array,
        *,
        t: Any = jnp.inf,
        get: Get = "ntk",
        covariance: Covariance = "full",
    ) -> Gaussian:
        check_choice(get, GETS, "get")
        check_choice(covariance, COVARIANCES, "covariance")
        check_pair(x_test, x_train)
        check_times(t, "t", integer=False)
        times = jnp.asarray(t, dtype)
        x_test = jnp.asarray(x_test, dtype)
        m = x_test.shape[0]
        eig = decomposition(get)
        size = min(block, m)
        starts = list(range(0, m, size))
        lead = (slice(None),) * times.ndim  # the time axes
        mean = np.empty((*times.shape, m, *y_shape[1:]), dtype)
        var = np.empty((*times.shape, m), dtype)
        blocks = []
        for i in starts:
            rows = padded_row_indices(i, min(size, m - i), size)
            xb = x_test[rows]
            a_t, k_bt, mu, v = _block_moments(fn, get == "nngp", eig, lr, times, xb, x_train_dev,
                                              k_train["nngp"], y)
            keep = min(size, m - i)
            mean[(*lead, slice(i, i + keep))] = np.asarray(mu)[(*lead, slice(0, keep))]
            # variances below 0 are round-off (cancellation in K + A K A^T - 2 A K): clip them
            var[(*lead, slice(i, i + keep))] = np.maximum(np.asarray(v)[(*lead, slice(0, keep))],
                                                          0)
            if covariance == "full":
                blocks.append((i, keep, xb, a_t, k_bt))
        if covariance == "none":
            return _host_gaussian(mean, None)
        if covariance == "diagonal":
            return _host_gaussian(mean, var)
        cov = np.empty((*times.shape, m, m), dtype)
        for bi, (i, keep_i, x_i, a_i, k_i) in enumerate(blocks):
            for j, keep_j, x_j, a_j, k_j in blocks[bi:]:
                tile = np.asarray(_cross_block(fn, a_i, a_j, k_train["nngp"], k_i, k_j, x_i, x_j))
                tile = tile[..., :keep_i, :keep_j]
                if i == j:
                    tile = 0.5 * (tile + np.swapaxes(tile, -1, -2))
                    diag = np.einsum("...ii->...i", tile)  # a view
                    np.maximum(diag, 0, out=diag)  # round-off negatives, as for "diagonal"
                cov[..., i : i + keep_i, j : j + keep_j] = tile
                cov[..., j : j + keep_j, i : i + keep_i] = np.swapaxes(tile, -1, -2)
        diagonal = np.arange(m)  # variances, >= 0 exactly: round-off clipped
        cov[..., diagonal, diagonal] = np.maximum(cov[..., diagonal, diagonal], 0)
        return _host_gaussian(mean, cov)

    return predict


@functools.partial(jax.jit, static_argnums=0)
def _kernel_rows(fn, xb, x2):
    k = fn(xb, x2)
    return k.nngp, k.ntk


def _rows(fn, x1: jax.Array, x2: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """``(nngp, ntk)`` of ``fn(x1, x2)`` computed ``block`` rows of ``x1`` at a time."""
    m = x1.shape[0]
    size = min(block, m)
    nngp, ntk = [], []
    for i in range(0, m, size):
        keep = min(size, m - i)
        a, b = _kernel_rows(fn, x1[padded_row_indices(i, keep, size)], x2)
        nngp.append(a[:keep])
        ntk.append(b[:keep])
    return jnp.concatenate(nngp), jnp.concatenate(ntk)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_moments(fn, use_nngp, eig, lr, t, xb, x_train, nngp_train, y):
    """Kernels of one block of test points against x_train, then ``A_t``, the mean and the
    variances (one compiled call per kernel function, block shape and time shape)."""
    k = fn(xb, x_train)
    a_t = ensemble_transfer(eig, lr, t, k.nngp if use_nngp else k.ntk)
    var = ensemble_variance(a_t, nngp_train, k.nngp, k.var1)
    return a_t, k.nngp, ensemble_mean(a_t, y), var


@functools.partial(jax.jit, static_argnums=0)
def _cross_block(fn, a_1, a_2, nngp_train, k_1t, k_2t, x1, x2):
    """The covariance between two blocks of test points."""
    return ensemble_covariance(a_1, a_2, nngp_train, k_1t, k_2t, fn(x1, x2).nngp)


def _host_gaussian(mean: np.ndarray, covariance: np.ndarray | None) -> Gaussian:
    """A :class:`ntkjax.predict.Gaussian` holding host (numpy) arrays."""
    return Gaussian(cast(Any, mean), cast(Any, covariance))
