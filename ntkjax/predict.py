"""Closed-form training dynamics of wide networks, and Gaussian-process inference.

Loss convention (shared with :mod:`ntkjax.losses`): ``L(f) = 1/(2n) * sum_i ||f(x_i) - y_i||^2``
over the n training examples. Gradient flow ``d theta/dt = -lr * grad L`` on a network whose
tangent kernel stays at ``Theta`` (the infinite-width / linearized regime, Jacot et al. 2018;
Lee et al. 2019) moves the outputs by

    df(X)/dt = -(lr / n) * Theta(X, X) (f(X) - y),

so, with ``r_0 = y - f_0(X)``,

    f_t(X) = f_0(X) + (I - exp(-lr Theta t / n)) r_0,
    f_t(x) = f_0(x) + Theta(x, X) Theta^{-1} (I - exp(-lr Theta t / n)) r_0,

(Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
Descent", eqs. 10-11, with their ``eta`` equal to our ``lr / n``). Discrete gradient descent with
step ``lr`` replaces ``exp(-lr Theta t / n)`` by ``(I - lr Theta / n)^k`` after k steps.

``diag_reg`` adds ``lambda = diag_reg * trace(Theta) / n`` (relative to the mean diagonal) to the
kernel's eigenvalues: this is exactly the linearized model trained on
``L + lambda / (2n) * ||theta - theta_0||^2`` (weight decay towards the initialization), whose
``t -> inf`` limit is kernel ridge regression ``f_0(x) + Theta(x, X) (Theta + lambda I)^{-1} r_0``.

Numerics: one symmetric eigendecomposition ``Theta = V diag(s) V^T`` serves all times; tiny
negative eigenvalues from round-off are clipped to 0, and directions whose (regularized)
eigenvalue is below ``sqrt(n) * eps * s_max`` are treated as null directions of the kernel, which
gradient flow never moves (pseudo-inverse semantics; duplicated training points give finite
outputs). Linear solves (GP inference) use a Cholesky factorization and fall back to the
eigendecomposition when the matrix is not numerically positive definite. Concrete inputs
holding NaN/Inf, disagreeing shapes, or clearly indefinite kernels raise ``ValueError``; those
value checks are skipped on tracers (under ``jit``), where the clipping still applies.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.typing import ArrayLike

from ntkjax._checks import check_diag_reg as _check_diag_reg
from ntkjax._checks import check_finite, float_dtype, is_concrete
from ntkjax._checks import check_positive as _check_positive
from ntkjax._checks import check_times as _check_times
from ntkjax._spectral import Eigen as _Eigen
from ntkjax._spectral import eigh_psd as _eigh_psd
from ntkjax._spectral import null_tolerance as _null_tolerance
from ntkjax._spectral import regularizer as _regularizer

__all__ = [
    "Gaussian",
    "Predictions",
    "convergence_bound",
    "ensemble_covariance",
    "ensemble_mean",
    "ensemble_transfer",
    "ensemble_variance",
    "gp_inference",
    "gradient_descent_mse",
    "gradient_flow_ensemble",
    "gradient_flow_mse",
    "max_learning_rate",
]


class Predictions(NamedTuple):
    """Network outputs on the training and test inputs (``test`` is None without test kernels).

    With a 1-D array of times (or step counts) both carry a leading time axis.
    """

    train: jax.Array
    test: jax.Array | None


class Gaussian(NamedTuple):
    """Mean ``(m, k)`` (or ``(m,)``) and covariance ``(m, m)`` over test points.

    The covariance is shared by every output dimension (the kernels are scalar).
    With a 1-D array of times both carry a leading time axis.
    """

    mean: jax.Array
    covariance: jax.Array | None


# --------------------------------------------------------------------------- validation


def _check_square(k, name: str) -> None:
    shape = np.shape(k)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix; got shape {tuple(shape)}.")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}): pass at least one example.")
    check_finite(k, name)


def _check_rect(k, name: str, rows: int | None, cols: int) -> None:
    shape = np.shape(k)
    if len(shape) != 2 or shape[1] != cols or (rows is not None and shape[0] != rows):
        want = f"({'m' if rows is None else rows}, {cols})"
        raise ValueError(f"{name} must have shape {want}; got shape {tuple(shape)}.")
    check_finite(k, name)


def _check_targets(y, name: str, n: int) -> None:
    shape = np.shape(y)
    if len(shape) not in (1, 2) or shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) or ({n}, outputs) to match the kernel's {n} "
            f"training points; got shape {tuple(shape)}."
        )
    check_finite(y, name)


def _check_like(f, name: str, shape: tuple[int, ...]) -> None:
    if tuple(np.shape(f)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(np.shape(f))}.")
    check_finite(f, name)


# --------------------------------------------------------------------------- linear algebra


def _inverse_sqrt(k: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """Returns ``b -> H b`` with ``H^T H = k^+`` (the pseudo-inverse of a PSD matrix).

    ``H = L^{-1}`` from a Cholesky factorization ``k = L L^T`` when ``k`` is numerically
    positive definite (all pivots finite and ``min L_ii^2 > n eps max k_ii``); otherwise
    ``H = diag(s^{-1/2}) V^T`` from the eigendecomposition with eigenvalues below
    ``sqrt(n) eps s_max`` (including clipped negatives) dropped. The choice is a ``lax.cond``,
    so it also works under ``jit``.
    """
    k = 0.5 * (k + k.T)
    n = k.shape[0]
    eps = jnp.finfo(k.dtype).eps
    chol = jnp.linalg.cholesky(k)
    pivots = jnp.diagonal(chol)
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(k))), jnp.finfo(k.dtype).tiny)
    positive_definite = jnp.all(jnp.isfinite(chol)) & (jnp.min(pivots) ** 2 > n * eps * scale)

    def via_cholesky(b):
        safe = jnp.where(jnp.isfinite(chol), chol, jnp.eye(n, dtype=k.dtype))
        return solve_triangular(safe, b, lower=True)

    def via_eigh(b):
        values, vectors = jnp.linalg.eigh(k)
        top = jnp.maximum(jnp.max(jnp.abs(values)), jnp.finfo(k.dtype).tiny)
        keep = values > _null_tolerance(n, eps, top)
        inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, values, 1.0)), 0.0)
        return inv_sqrt[:, None] * (vectors.T @ b)

    return lambda b: jax.lax.cond(positive_definite, via_cholesky, via_eigh, b)


# --------------------------------------------------------------------------- dynamics


def _as_2d(y: jax.Array) -> jax.Array:
    return y[:, None] if y.ndim == 1 else y


def _restore(out: jax.Array, y_ndim: int) -> jax.Array:
    return out[..., 0] if y_ndim == 1 else out


def _linear_dynamics(
    k_train_train,
    y_train,
    k_test_train,
    fx_train_0,
    fx_test_0,
    diag_reg,
    kind: str,
    learning_rate,
    n: int,
) -> Callable[[ArrayLike], Predictions]:
    """Shared body of gradient flow (``kind="flow"``: times ``t``) / descent (``"descent"``:
    whole step counts): ``f = f_0 + K V diag(g(s, t)) V^T r_0`` with the coefficients of
    :func:`_coefficient_rules` (``n`` the example count of the rate ``lr / n``)."""
    _check_square(k_train_train, "k_train_train")
    rows = np.shape(k_train_train)[0]
    _check_targets(y_train, "y_train", rows)
    _check_diag_reg(diag_reg)
    y_shape = tuple(np.shape(y_train))
    if k_test_train is not None:
        _check_rect(k_test_train, "k_test_train", None, rows)
    if fx_train_0 is not None:
        _check_like(fx_train_0, "fx_train_0", y_shape)
    if fx_test_0 is not None:
        if k_test_train is None:
            raise ValueError("fx_test_0 needs k_test_train (the test-train kernel).")
        m = np.shape(k_test_train)[0]
        _check_like(fx_test_0, "fx_test_0", (m, *y_shape[1:]))
    dtype = float_dtype(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0)

    k = jnp.asarray(k_train_train, dtype)
    y = jnp.asarray(y_train, dtype)
    f0 = None if fx_train_0 is None else jnp.asarray(fx_train_0, dtype)
    k_xt = None if k_test_train is None else jnp.asarray(k_test_train, dtype)
    ft0 = None if fx_test_0 is None else jnp.asarray(fx_test_0, dtype)
    eig = _eigh_psd(k, diag_reg, "k_train_train")
    residual, k_test_v, ft0 = _project(eig.vectors, y, f0, k_xt, ft0)
    time_name = "t" if kind == "flow" else "steps"

    def predict(t: ArrayLike) -> Predictions:
        _check_times(t, time_name, integer=kind == "descent")
        return _predict_at(jnp.asarray(t, dtype), eig, residual, k_test_v, ft0,
                           y if f0 is None else f0, learning_rate,
                           kind=kind, n=n, y_ndim=len(y_shape), zero_f0=f0 is None)

    return predict


@jax.jit
def _project(vectors, y, f0, k_xt, ft0):
    """``V^T r_0`` (``(n, outputs)``), ``K(x, X) V`` and the test outputs at initialization
    (zeros when omitted) as ``(m, outputs)``: the time-independent part of the predictions, as
    one compiled program."""
    y = _as_2d(y)
    f0 = jnp.zeros_like(y) if f0 is None else _as_2d(f0)
    residual = vectors.T @ (y - f0)  # V^T r_0, shape (n, outputs)
    if k_xt is None:
        return residual, None, None
    k_test_v = k_xt @ vectors  # (m, n)
    ft0 = jnp.zeros((k_test_v.shape[0], y.shape[1]), y.dtype) if ft0 is None else _as_2d(ft0)
    return residual, k_test_v, ft0


def _coefficient_rules(kind: str, learning_rate, n: int):
    """``(coefficients, growth)`` of gradient flow or descent (``growth`` None for flow)."""
    if kind == "flow":
        return _flow_coefficients(learning_rate, n), None
    return _descent_coefficients(learning_rate, n)


@partial(jax.jit, static_argnames=("kind", "n", "y_ndim", "zero_f0"))
def _predict_at(t, eig, residual, k_test_v, ft0, f0_like, learning_rate, *, kind: str, n: int,
                y_ndim: int, zero_f0: bool) -> Predictions:
    """The predictions of :func:`_linear_dynamics` at times ``t``, as one compiled program for
    each shape (eagerly, each of its operations would compile one); ``f0_like`` is the
    initial train outputs (or, with ``zero_f0``, any array of their shape)."""
    coefficients, growth = _coefficient_rules(kind, learning_rate, n)
    f0 = jnp.zeros_like(_as_2d(f0_like)) if zero_f0 else _as_2d(f0_like)
    g = coefficients(eig, t)  # (..., n): g(s) ~ (1 - decay(s)) / (s + lambda)
    weights = g[..., :, None] * residual

    def apply(a: jax.Array) -> jax.Array:
        """``a @ (g * V^T r_0)``, for ``a`` = ``V diag(s)`` (train) or ``K(x, X) V``."""
        out = jnp.einsum("ij,...jk->...ik", a, weights)
        if growth is None:
            return out
        grow = growth
        return jax.lax.cond(jnp.all(jnp.isfinite(out)), lambda: out,
                            lambda: _diverging(a, eig, t, residual, out, grow))

    train = f0 + apply(eig.vectors * eig.values[None, :])
    test = None
    if k_test_v is not None and ft0 is not None:
        test = _restore(ft0 + apply(k_test_v), y_ndim)
    return Predictions(_restore(train, y_ndim), test)


def _diverging(
    a: jax.Array,
    eig: _Eigen,
    t: jax.Array,
    residual: jax.Array,
    out: jax.Array,
    growth: Callable[[_Eigen, jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
) -> jax.Array:
    """``a @ (g * R)`` where some modes' ``g`` overflowed: with ``g = limit - coef * exp(L)``,
    the growing part is scaled by ``exp(-M)`` (``M`` the largest exponent), multiplied back only
    where it is not exactly 0 -- so entries are the true values, +-inf where those overflow, and
    never ``inf * 0`` or ``inf - inf`` (NaN)."""
    log_growth, coef, limit = growth(eig, t)
    top = jnp.maximum(jnp.max(log_growth, axis=-1), 0.0)  # (...)
    scaled = coef * jnp.exp(log_growth - top[..., None])
    first = jnp.einsum("ij,...jk->...ik", a, limit[..., :, None] * residual)
    inner = jnp.einsum("ij,...jk->...ik", a, scaled[..., :, None] * residual)
    big = jnp.exp(top)[..., None, None]
    safe = first - jnp.where(inner == 0, 0.0, inner * big)
    return jnp.where(jnp.isnan(out), safe, jnp.where(jnp.isfinite(out), out, safe))


def _flow_coefficients(learning_rate, n: int):
    def coefficients(eig: _Eigen, t: jax.Array) -> jax.Array:
        s = eig.values + eig.reg
        s_safe = jnp.where(eig.null, 1.0, s)
        rate = jnp.asarray(learning_rate, t.dtype) / n
        x = rate * t[..., None] * s_safe  # t = inf gives x = inf and g = 1 / s
        return jnp.where(eig.null, 0.0, -jnp.expm1(-x) / s_safe)

    return coefficients


def _descent_coefficients(learning_rate, n: int):
    def coefficients(eig: _Eigen, steps: jax.Array) -> jax.Array:
        s = eig.values + eig.reg
        s_safe = jnp.where(eig.null, 1.0, s)
        rate = jnp.asarray(learning_rate, steps.dtype) / n
        k = steps[..., None]
        # steps = inf: modes at or above the edge have no limit; their Cesaro mean is 0
        decay = jnp.where(jnp.isinf(k), 0.0, jnp.power(1.0 - rate * s_safe, k))
        return jnp.where(eig.null, 0.0, (1.0 - decay) / s_safe)

    def growth(eig: _Eigen, steps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(L, coef, limit)`` with ``g = limit - coef * exp(L)``: ``L = k log|1 - r s|``,
        ``coef = sign((1 - r s)^k) / s``, ``limit = 1 / s`` (0 on null directions)."""
        s = eig.values + eig.reg
        s_safe = jnp.where(eig.null, 1.0, s)
        base = 1.0 - jnp.asarray(learning_rate, steps.dtype) / n * s_safe
        k = jnp.where(jnp.isinf(steps), 0.0, steps)[..., None]
        log_abs = jnp.where(k == 0, 0.0, k * jnp.log(jnp.abs(base)))
        log_abs = jnp.where(jnp.isinf(steps)[..., None], -jnp.inf, log_abs)
        odd = jnp.mod(k, 2) == 1
        sign = jnp.where((base < 0) & odd, -1.0, 1.0)
        inverse = jnp.where(eig.null, 0.0, 1.0 / s_safe)
        return log_abs, sign * inverse, jnp.broadcast_to(inverse, log_abs.shape)

    return coefficients, growth


def _full_output_kernels(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0):
    """A full ``(n, n, O, O)`` kernel problem as one over the ``n O`` (example, output) pairs:
    the kernels as ``(n O, n O)`` / ``(m O, n O)`` matrices, targets and outputs as
    ``(n O,)`` vectors. Returns those and ``restore(Predictions)`` back to ``(..., n, O)``."""
    y_shape = tuple(np.shape(y_train))
    k_shape = tuple(np.shape(k_train_train))
    if len(y_shape) != 2 or k_shape != (y_shape[0], y_shape[0], y_shape[1], y_shape[1]):
        raise ValueError(
            f"a full kernel k_train_train needs shape (n, n, O, O) and y_train shape (n, O); "
            f"got {k_shape} and {y_shape}."
        )
    n, o = y_shape
    if k_test_train is not None and (
        np.ndim(k_test_train) != 4 or tuple(np.shape(k_test_train))[1:] != (n, o, o)
    ):
        raise ValueError(f"k_test_train must have shape (m, {n}, {o}, {o}) with a full "
                         f"k_train_train; got {tuple(np.shape(k_test_train))}.")
    m = None if k_test_train is None else np.shape(k_test_train)[0]

    def matrix(k):
        k = jnp.asarray(k)
        return jnp.transpose(k, (0, 2, 1, 3)).reshape(k.shape[0] * o, k.shape[1] * o)

    def vector(f, rows):
        if f is None:
            return None
        if tuple(np.shape(f)) != (rows, o):
            raise ValueError(f"initial outputs must have shape ({rows}, {o}) with a full "
                             f"kernel; got {tuple(np.shape(f))}.")
        return jnp.reshape(jnp.asarray(f), (rows * o,))

    flat = (
        matrix(k_train_train), jnp.reshape(jnp.asarray(y_train), (n * o,)),
        None if k_test_train is None else matrix(k_test_train),
        vector(fx_train_0, n), None if fx_test_0 is None else vector(fx_test_0, m),
    )

    def restore(out: Predictions) -> Predictions:
        train = out.train.reshape(*out.train.shape[:-1], n, o)
        test = None if out.test is None else out.test.reshape(*out.test.shape[:-1], -1, o)
        return Predictions(train, test)

    return flat, restore


def gradient_flow_mse(
    k_train_train: jax.Array,
    y_train: jax.Array,
    *,
    learning_rate: float,
    k_test_train: jax.Array | None = None,
    fx_train_0: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    diag_reg: float = 0.0,
) -> Callable[[ArrayLike], Predictions]:
    r"""Predictions of continuous-time gradient flow on the MSE at any training time.

    With ``L = 1/(2n) sum ||f - y||^2``, ``df/dt = -(lr / n) Theta (f - y)`` and (Lee et al. 2019,
    eqs. 10-11), ``eta`` the learning rate:

    $$f_t(X) = f_0(X) + \left(I - e^{-\eta \Theta t / n}\right) (y - f_0(X)),$$
    $$f_t(x) = f_0(x) + \Theta(x, X)\, \Theta^{-1} \left(I - e^{-\eta \Theta t / n}\right)
      (y - f_0(X)),$$

    with ``Theta + lambda I`` (``lambda = diag_reg * trace(Theta) / n``) in the inverse and the
    exponential when ``diag_reg > 0``; ``t = jnp.inf`` gives kernel ridge regression. One
    eigendecomposition is computed here and reused for every ``t``.

    Args:
      k_train_train: ``(n, n)`` kernel (NTK for trained networks) on the training inputs, or
        a full ``(n, n, O, O)`` kernel over examples and outputs (then ``Theta`` above is the
        ``(n O, n O)`` matrix ``Theta_{(a,i),(b,j)}``).
      y_train: ``(n,)`` or ``(n, outputs)`` targets (``(n, O)`` with a full kernel).
      learning_rate: the step size ``lr`` of the loss above (time is measured in units such
        that ``t`` gradient-descent steps at a small ``lr`` reach time ``t``).
      k_test_train: optional ``(m, n)`` kernel between test and training inputs
        (``(m, n, O, O)`` with a full kernel).
      fx_train_0, fx_test_0: outputs at initialization (zeros when omitted).
      diag_reg: relative diagonal regularizer (weight decay towards init, see module doc).

    Returns:
      ``predict(t) -> Predictions(train, test)``; ``t`` a scalar or 1-D array (leading time
      axis in the outputs), ``>= 0``, ``jnp.inf`` allowed. ``predict`` is pure and can be
      wrapped in ``jax.jit`` / ``jax.vmap``.

    With ``Theta = I`` and ``n = 2`` the outputs approach y like ``1 - exp(-t / 2)``:

    >>> import jax.numpy as jnp
    >>> predict = gradient_flow_mse(jnp.eye(2), jnp.array([1.0, 2.0]), learning_rate=1.0)
    >>> print(predict(2 * jnp.log(2.0)).train, predict(jnp.inf).train)
    [0.5 1. ] [1. 2.]
    """
    _check_positive(learning_rate, "learning_rate")
    if np.ndim(k_train_train) == 4:
        flat, restore = _full_output_kernels(
            k_train_train, y_train, k_test_train, fx_train_0, fx_test_0
        )
        flow = _linear_dynamics(
            *flat, diag_reg, "flow", learning_rate, np.shape(k_train_train)[0],
        )
        return lambda t: restore(flow(t))
    n = np.shape(k_train_train)[0] if np.ndim(k_train_train) == 2 else 0
    return _linear_dynamics(
        k_train_train, y_train, k_test_train, fx_train_0, fx_test_0, diag_reg,
        "flow", learning_rate, n,
    )


def gradient_descent_mse(
    k_train_train: jax.Array,
    y_train: jax.Array,
    *,
    learning_rate: float,
    k_test_train: jax.Array | None = None,
    fx_train_0: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    diag_reg: float = 0.0,
) -> Callable[[ArrayLike], Predictions]:
    r"""Predictions after k steps of full-batch gradient descent on the MSE at a finite lr.

    Each step is ``f <- f - (lr / n) Theta (f - y)`` (the linearized network trained with
    ``optax.sgd(lr)`` on :func:`ntkjax.losses.mse_loss`), so, ``eta`` the learning rate:

    $$f_k(X) = f_0(X) + \left(I - (I - \eta \Theta / n)^k\right) (y - f_0(X)),$$
    $$f_k(x) = f_0(x) + \Theta(x, X)\, \Theta^{-1} \left(I - (I - \eta \Theta / n)^k\right)
      (y - f_0(X)).$$

    Stable for ``lr < max_learning_rate(Theta) = 2n / lambda_max``. Above the edge the modes
    with ``|1 - lr lambda / n| > 1`` grow geometrically: a ``UserWarning`` is issued once (when
    the kernel and lr are concrete) and ``predict`` returns the true values, ``+-inf`` once they
    overflow and never NaN (where ``inf * 0`` or ``inf - inf`` would appear, the growing part is
    rescaled first). At the edge the mode with ``lr lambda / n = 2`` oscillates forever.
    ``diag_reg`` as in :func:`gradient_flow_mse`. ``predict(steps)`` takes whole numbers
    ``>= 0`` (scalar or 1-D) or ``jnp.inf`` -- kernel ridge for stable learning rates; at or
    above the edge ``steps = inf`` has no limit and raises ValueError (under ``jit``, where that
    cannot be checked, those modes contribute their Cesaro mean, i.e. the kernel-ridge value).

    Args:
      k_train_train: ``(n, n)`` kernel (NTK for trained networks) on the training inputs, or
        a full ``(n, n, O, O)`` kernel over examples and outputs, as in
        :func:`gradient_flow_mse`.
      y_train: ``(n,)`` or ``(n, outputs)`` targets (``(n, O)`` with a full kernel).
      learning_rate: the step size ``lr``.
      k_test_train: optional ``(m, n)`` kernel between test and training inputs
        (``(m, n, O, O)`` with a full kernel).
      fx_train_0: outputs on the training inputs at initialization (zeros when omitted).
      fx_test_0: outputs on the test inputs at initialization (zeros when omitted).
      diag_reg: relative diagonal regularizer, as in :func:`gradient_flow_mse`.

    Returns:
      ``predict(steps) -> Predictions(train, test)``; ``steps`` a whole number or 1-D array of
      them (leading time axis in the outputs), or ``jnp.inf``.

    With ``Theta = I``, ``n = 2`` and ``lr = 1`` each step halves the residual:

    >>> import jax.numpy as jnp
    >>> predict = gradient_descent_mse(jnp.eye(2), jnp.array([1.0, 2.0]), learning_rate=1.0)
    >>> print(predict(2).train)
    [0.75 1.5 ]
    """
    _check_positive(learning_rate, "learning_rate")
    if np.ndim(k_train_train) == 4:
        flat, restore = _full_output_kernels(
            k_train_train, y_train, k_test_train, fx_train_0, fx_test_0
        )
        descent = gradient_descent_mse(
            flat[0], flat[1], learning_rate=learning_rate * flat[0].shape[0]
            / np.shape(k_train_train)[0], k_test_train=flat[2], fx_train_0=flat[3],
            fx_test_0=flat[4], diag_reg=diag_reg,
        )
        return lambda steps: restore(descent(steps))
    n = np.shape(k_train_train)[0] if np.ndim(k_train_train) == 2 else 0
    predict = _linear_dynamics(
        k_train_train, y_train, k_test_train, fx_train_0, fx_test_0, diag_reg,
        "descent", learning_rate, n,
    )
    if not (is_concrete(k_train_train) and is_concrete(learning_rate)):
        return predict
    edge = float(max_learning_rate(k_train_train, diag_reg=diag_reg))
    if learning_rate > edge:
        warnings.warn(
            f"learning_rate {learning_rate:g} is above the gradient-descent stability edge "
            f"2n/lambda_max = {edge:.4g}: the modes above it grow like |1 - lr lambda / n|^k; "
            "predictions are their true values (+-inf once they overflow).",
            UserWarning, stacklevel=2,
        )

    def checked(steps: ArrayLike) -> Predictions:
        if is_concrete(steps) and np.any(np.isinf(np.asarray(steps))) and learning_rate >= edge:
            raise ValueError(
                f"steps = inf has no limit at learning_rate {learning_rate:g} >= the stability "
                f"edge {edge:.4g}: the modes at or above it oscillate (or grow) forever."
            )
        return predict(steps)

    return checked


def max_learning_rate(
    k_train_train: jax.Array, *, diag_reg: float = 0.0, momentum: float = 0.0
) -> jax.Array:
    """The gradient-descent stability edge ``2 (1 + m) n / lambda_max(Theta + lambda I)``.

    Under ``L = 1/(2n) sum ||f - y||^2`` the residual along eigenvector i is multiplied by
    ``1 - lr lambda_i / n`` each step, which shrinks iff ``lr < 2 n / lambda_i``. With heavy-ball
    momentum ``m`` (``optax.sgd(lr, momentum=m)``) each mode follows
    ``r_{k+1} = (1 + m - a) r_k - m r_{k-1}`` with ``a = lr lambda_i / n``, whose roots lie inside
    the unit circle iff ``0 < a < 2 (1 + m)`` (Goh 2017, "Why Momentum Really Works";
    neural-tangents' ``predict.max_learning_rate``). ``momentum`` in ``[0, 1)``.

    Args:
      k_train_train: the ``(n, n)`` NTK on the training inputs.
      diag_reg: relative diagonal regularizer, as in :func:`gradient_flow_mse`.
      momentum: the heavy-ball momentum ``m``.

    Returns:
      The largest stable learning rate, a scalar array.

    >>> import jax.numpy as jnp
    >>> float(max_learning_rate(jnp.eye(2) * 4.0, momentum=0.5))
    1.5
    """
    _check_square(k_train_train, "k_train_train")
    _check_diag_reg(diag_reg)
    if is_concrete(momentum):
        m = np.asarray(momentum, dtype=np.float64)
        if m.shape != () or not np.isfinite(m) or not 0.0 <= m < 1.0:
            raise ValueError(f"momentum must be a scalar in [0, 1); got {momentum!r}.")
    k = jnp.asarray(k_train_train)
    k = k.astype(float_dtype(k))
    eig = _eigh_psd(k, diag_reg, "k_train_train")
    factor = 2.0 * (1.0 + jnp.asarray(momentum, k.dtype))
    return factor * k.shape[0] / (eig.values[-1] + eig.reg)


def convergence_bound(
    k_train_train: jax.Array,
    residual_0_norm: jax.Array,
    *,
    learning_rate: float,
    t: jax.Array,
    diag_reg: float = 0.0,
) -> jax.Array:
    r"""Upper bound ``exp(-lr lambda_min t / n) ||f_0 - y||`` on ``||f_t(X) - y||``:

    $$\|f_t(X) - y\| \le e^{-\eta \lambda_{\min}(\Theta)\, t / n}\, \|f_0(X) - y\|.$$

    The linear-convergence bound of Jacot et al. 2018 / Lee et al. 2019 (Thm 2.1), with the
    ``1/n`` of our loss convention: gradient flow
    shrinks every eigen-component of the training residual by ``exp(-lr lambda_i t / n)``, at
    least by the factor of the smallest eigenvalue (clipped at 0, plus ``lambda`` with
    ``diag_reg``; with ``diag_reg > 0`` it bounds the distance to the ridge fit instead of y).
    ``t`` a scalar or 1-D array.

    Args:
      k_train_train: the ``(n, n)`` NTK on the training inputs.
      residual_0_norm: ``||f_0(X) - y||`` at initialization.
      learning_rate: the learning rate ``lr`` (``eta``).
      t: training time(s), a scalar or 1-D array, ``>= 0``.
      diag_reg: relative diagonal regularizer, as in :func:`gradient_flow_mse`.

    Returns:
      The bound at each time, shaped like ``t``.

    >>> import jax.numpy as jnp
    >>> float(convergence_bound(2.0 * jnp.eye(2), 1.0, learning_rate=1.0, t=jnp.log(2.0)))
    0.5
    """
    _check_square(k_train_train, "k_train_train")
    _check_positive(learning_rate, "learning_rate")
    _check_diag_reg(diag_reg)
    _check_times(t, "t", integer=False)
    k = jnp.asarray(k_train_train)
    k = k.astype(float_dtype(k))
    eig = _eigh_psd(k, diag_reg, "k_train_train")
    t = jnp.asarray(t, k.dtype)
    rate = jnp.asarray(learning_rate, k.dtype) / k.shape[0]
    lam_min = eig.values[0] + eig.reg
    # t * lam_min with lam_min = 0 and t = inf: the bound stays at ||r_0|| (no decay).
    exponent = jnp.where(lam_min > 0, rate * lam_min * t, 0.0)
    return jnp.exp(-exponent) * jnp.asarray(residual_0_norm, k.dtype)


# --------------------------------------------------------------------------- Gaussian processes


def _symmetric_psd_diagonal(cov: jax.Array) -> jax.Array:
    """A posterior covariance (``(..., m, m)``) made exactly symmetric, its diagonal -- the
    variances, exactly >= 0 -- clipped at 0: the difference of two nearly equal matrices leaves
    rounding errors of either sign (in float32, ~1e-6 of the prior variance), and a negative
    variance would give NaN standard deviations."""
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    diagonal = jnp.diagonal(cov, axis1=-2, axis2=-1)
    clipped = jnp.maximum(diagonal, 0)
    m = cov.shape[-1]
    return cov + (clipped - diagonal)[..., :, None] * jnp.eye(m, dtype=cov.dtype)


def gp_inference(
    k_train_train: jax.Array,
    k_test_train: jax.Array,
    k_test_test: jax.Array | None,
    y_train: jax.Array,
    *,
    diag_reg: float = 0.0,
) -> Gaussian:
    r"""Exact GP posterior (Bayesian inference with the NNGP as prior covariance).

    $$\mu(x) = K(x, X) (K + \lambda I)^{-1} y, \qquad
      \Sigma(x, x') = K(x, x') - K(x, X) (K + \lambda I)^{-1} K(X, x')$$

    (Rasmussen & Williams 2006, eqs. 2.23-2.24), ``lambda = diag_reg * trace(K) / n`` playing the
    observation-noise variance. Solved through a Cholesky factor, with an eigendecomposition
    fallback when ``K + lambda I`` is not numerically positive definite (pseudo-inverse).
    ``k_test_test`` may be None (no covariance returned).

    Args:
      k_train_train: ``K(X, X)``, ``(n, n)``, the NNGP on the training inputs.
      k_test_train: ``K(x, X)``, ``(m, n)``.
      k_test_test: ``K(x, x')``, ``(m, m)``, or None.
      y_train: ``(n,)`` or ``(n, outputs)`` targets.
      diag_reg: relative diagonal regularizer (the observation noise, relative to the mean
        diagonal of ``K``).

    Returns:
      A :class:`Gaussian`: the posterior ``mean`` ``(m,)`` or ``(m, outputs)`` and
      ``covariance`` ``(m, m)`` (None without ``k_test_test``).

    >>> import jax.numpy as jnp
    >>> post = gp_inference(jnp.eye(2), jnp.array([[0.5, 0.0]]), jnp.array([[1.0]]),
    ...                     jnp.array([2.0, 4.0]))
    >>> print(post.mean, post.covariance)  # 0.5 * 2 and 1 - 0.5^2
    [1.] [[0.75]]
    """
    _check_square(k_train_train, "k_train_train")
    n = np.shape(k_train_train)[0]
    _check_rect(k_test_train, "k_test_train", None, n)
    m = np.shape(k_test_train)[0]
    if k_test_test is not None:
        _check_rect(k_test_test, "k_test_test", m, m)
    _check_targets(y_train, "y_train", n)
    _check_diag_reg(diag_reg)
    dtype = float_dtype(k_train_train, k_test_train, k_test_test, y_train)
    k = jnp.asarray(k_train_train, dtype)
    if is_concrete(k):
        _eigh_psd(k, 0.0, "k_train_train")  # raises on clearly indefinite kernels
    return _gp_posterior(k, jnp.asarray(k_test_train, dtype), jnp.asarray(y_train, dtype),
                         None if k_test_test is None else jnp.asarray(k_test_test, dtype),
                         diag_reg)


@jax.jit
def _gp_posterior(k, kxt, y, k_xx, diag_reg) -> Gaussian:
    """The computation of :func:`gp_inference` on checked inputs, as one compiled program for
    each shape (eagerly, each of its operations would compile one)."""
    k_reg = k + _regularizer(k, diag_reg) * jnp.eye(k.shape[0], dtype=k.dtype)
    whiten = _inverse_sqrt(k_reg)
    w_y = whiten(_as_2d(y))
    w_t = whiten(kxt.T)  # (n, m)
    mean = _restore(w_t.T @ w_y, y.ndim)
    cov = None
    if k_xx is not None:
        cov = _symmetric_psd_diagonal(k_xx - w_t.T @ w_t)
    return Gaussian(mean, cov)


def gradient_flow_ensemble(
    nngp: tuple[jax.Array, jax.Array, jax.Array | None],
    ntk: tuple[jax.Array, jax.Array, jax.Array | None],
    y_train: jax.Array,
    *,
    learning_rate: float,
    t: jax.Array,
    diag_reg: float = 0.0,
) -> Gaussian:
    """Mean and covariance over an infinite ensemble of infinitely wide nets trained to time t.

    Outputs at initialization are a centred GP with covariance ``K`` (the NNGP); training by
    gradient flow under the NTK ``Theta`` is affine in them. With
    ``A_t = Theta(x, X) Theta^{-1} (I - exp(-lr Theta t / n))`` (Lee et al. 2019, eqs. 15-16,
    their ``eta`` = our ``lr / n``)::

        mu_t(x)       = A_t y
        Sigma_t(x, x') = K(x, x') + A_t K(X, X) A_t^T - (A_t K(X, x') + K(x, X) A_t^T)

    ``t = 0`` gives the prior ``(0, K(x, x'))``, ``t = inf`` NTK regression with its
    covariance. ``diag_reg`` regularizes ``Theta`` as in :func:`gradient_flow_mse`.

    Args:
      nngp: ``(K(X, X), K(x, X), K(x, x'))``; the last may be None (no covariance returned).
      ntk: ``(Theta(X, X), Theta(x, X), Theta(x, x'))``; the last is not needed and may be None.
      y_train: ``(n,)`` or ``(n, outputs)`` targets.
      learning_rate, t: as in :func:`gradient_flow_mse`; ``t`` a scalar or 1-D array.
      diag_reg: relative diagonal regularizer of ``Theta``.

    Returns:
      A :class:`Gaussian` (with a leading time axis for a 1-D ``t``).

    At ``t = 0`` the prior; at ``t = inf`` the NTK regression mean:

    >>> import jax.numpy as jnp
    >>> k = (jnp.eye(2), jnp.array([[0.5, 0.0]]), jnp.array([[1.0]]))
    >>> y = jnp.array([2.0, 4.0])
    >>> post = gradient_flow_ensemble(k, k, y, learning_rate=1.0, t=jnp.array([0.0, jnp.inf]))
    >>> print(post.mean.ravel(), post.covariance.ravel())  # means; variances 1 and 1 - 0.5^2
    [0. 1.] [1.   0.75]
    """
    if len(nngp) != 3 or len(ntk) != 3:
        raise ValueError("nngp and ntk must be (train_train, test_train, test_test) triples.")
    _check_positive(learning_rate, "learning_rate")
    _check_times(t, "t", integer=False)
    nngp_tt, nngp_xt, nngp_xx = nngp
    ntk_tt, ntk_xt, _ = ntk
    _check_square(ntk_tt, "ntk[0] (train-train)")
    n = np.shape(ntk_tt)[0]
    _check_rect(ntk_xt, "ntk[1] (test-train)", None, n)
    m = np.shape(ntk_xt)[0]
    _check_rect(nngp_tt, "nngp[0] (train-train)", n, n)
    _check_rect(nngp_xt, "nngp[1] (test-train)", m, n)
    if nngp_xx is not None:
        _check_rect(nngp_xx, "nngp[2] (test-test)", m, m)
    _check_targets(y_train, "y_train", n)
    _check_diag_reg(diag_reg)
    dtype = float_dtype(ntk_tt, ntk_xt, nngp_tt, nngp_xt, nngp_xx, y_train)

    eig = _eigh_psd(jnp.asarray(ntk_tt, dtype), diag_reg, "ntk[0] (train-train)")
    return _ensemble_posterior(
        eig, learning_rate, jnp.asarray(t, dtype), jnp.asarray(ntk_xt, dtype),
        jnp.asarray(y_train, dtype), jnp.asarray(nngp_tt, dtype), jnp.asarray(nngp_xt, dtype),
        None if nngp_xx is None else jnp.asarray(nngp_xx, dtype),
    )


@jax.jit
def _ensemble_posterior(eig, learning_rate, t, ntk_xt, y, nngp_tt, nngp_xt, nngp_xx) -> Gaussian:
    """The computation of :func:`gradient_flow_ensemble` on checked inputs and the NTK's
    decomposition, as one compiled program for each shape (eagerly, each of its operations
    would compile one)."""
    a_t = ensemble_transfer(eig, learning_rate, t, ntk_xt)
    mean = ensemble_mean(a_t, y)
    cov = None
    if nngp_xx is not None:
        cov = _symmetric_psd_diagonal(ensemble_covariance(
            a_t, a_t, nngp_tt, nngp_xt, nngp_xt, nngp_xx
        ))
    return Gaussian(mean, cov)


# --------------------------------------------------------------------------- ensemble pieces
# The terms of Lee et al. 2019, eqs. 15-16, given one eigendecomposition of the training kernel;
# shared by :func:`gradient_flow_ensemble` and :mod:`ntkjax.ensemble` (which reuses one
# decomposition across blocks of test points and times).


def ensemble_transfer(
    eig: _Eigen, learning_rate: float | jax.Array, t: jax.Array, k_test_train: jax.Array
) -> jax.Array:
    """``A_t = Theta(x, X) V diag(g_t) V^T`` of shape ``(..., m, n)`` (leading time axes of
    ``t``), with ``g_t = (1 - exp(-lr s t / n)) / s`` on the (regularized) eigenvalues ``s``
    and 0 on null directions, so that ``A_t = Theta(x, X) Theta^{-1} (I - exp(-lr Theta t /
    n))``."""
    n = eig.vectors.shape[0]
    g = _flow_coefficients(learning_rate, n)(eig, t)  # (..., n)
    v = eig.vectors
    return jnp.einsum("ij,...j,kj->...ik", k_test_train @ v, g, v)


def ensemble_mean(a_t: jax.Array, y_train: jax.Array) -> jax.Array:
    """``mu_t = A_t y`` with ``y`` of shape ``(n,)`` or ``(n, outputs)``."""
    return _restore(jnp.einsum("...ij,jk->...ik", a_t, _as_2d(y_train)), y_train.ndim)


def ensemble_covariance(
    a_1: jax.Array,
    a_2: jax.Array,
    k_train_train: jax.Array,
    k_1_train: jax.Array,
    k_2_train: jax.Array,
    k_12: jax.Array,
) -> jax.Array:
    """``Sigma_t(x1, x2) = K(x1, x2) + A_1 K(X, X) A_2^T - A_1 K(X, x2) - K(x1, X) A_2^T``
    for two blocks of test points (``a_1 = a_2`` on the diagonal block), with the NNGP ``K``."""
    a_k_a = jnp.einsum("...ij,jk,...lk->...il", a_1, k_train_train, a_2)
    cross_12 = jnp.einsum("...ij,kj->...ik", a_1, k_2_train)  # A_1 K(X, x2)
    cross_21 = jnp.einsum("ij,...kj->...ik", k_1_train, a_2)  # K(x1, X) A_2^T
    return k_12 + a_k_a - cross_12 - cross_21


def ensemble_variance(
    a_t: jax.Array, k_train_train: jax.Array, k_test_train: jax.Array, k_test_var: jax.Array
) -> jax.Array:
    """The diagonal of :func:`ensemble_covariance` for one block, without forming the rest:
    ``K(x, x) + (A K A^T)_xx - 2 (A K(X, x))_xx``; ``k_test_var`` is ``K(x, x)`` per point."""
    a_k = jnp.einsum("...ij,jk->...ik", a_t, k_train_train)
    quad = jnp.sum(a_k * a_t, axis=-1)
    cross = jnp.sum(a_t * k_test_train, axis=-1)
    return jnp.maximum(k_test_var + quad - 2.0 * cross, 0)  # >= 0 exactly; round-off clipped
