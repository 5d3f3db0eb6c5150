"""Function-space training dynamics of wide networks for any differentiable loss.

A network whose tangent kernel stays at ``Theta`` (the infinite-width / linearized regime, Jacot
et al. 2018; Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models Under
Gradient Descent", section 2.2) trained by gradient flow ``d theta/dt = -lr grad_theta L`` on a
loss ``L(f(X), y)`` of its training outputs moves its outputs by the chain rule
``df/dt = J dtheta/dt = -lr J J^T grad_f L``::

    df(X)/dt = -lr Theta(X, X) grad_f L(f(X), y),
    df(x)/dt = -lr Theta(x, X) grad_f L(f(X), y),

``Theta`` acting on the example axis (the kernel of one output: the full NTK is
``Theta (x) I_O``). ``L`` is the training objective exactly as optax minimizes it -- ntkjax's
convention averages over the n training examples (:func:`ntkjax.losses.mse_loss`,
:func:`ntkjax.losses.softmax_cross_entropy`), ``L = (1/n) sum_i l_i``, so this is
``df/dt = -(lr / n) Theta grad_f sum_i l_i``. Time ``t`` counts gradient-descent steps at
learning rate ``lr`` (t steps of ``optax.sgd(lr)`` at small ``lr`` reach time t). For
``L = mse_loss`` the solution is :func:`ntkjax.gradient_flow_mse`'s closed form.

Momentum (heavy ball, ``optax.sgd(lr, momentum=m)``: ``theta_{k+1} - theta_k = m (theta_k -
theta_{k-1}) - lr grad L``). Replacing the differences by derivatives (second difference by
``f''``, first by ``f'``) gives the damped second-order system, in the same time units::

    f'' + (1 - m) f' = -lr Theta grad_f L,    f(0) = f_0,  f'(0) = 0,

integrated as the first-order system ``f' = q``, ``q' = -(1 - m) q - lr Theta grad_f L`` (for
train and test outputs). This is neural-tangents' ``predict.gradient_descent`` momentum ODE
(written there in units of ``sqrt(lr)``); it is the continuous limit, accurate when the
discrete trajectory is smooth on the scale of ``1 / (1 - m)`` steps.

Solver: diffrax (Kidger 2021, "On Neural Differential Equations"), ``Tsit5`` (Tsitouras' 5(4)
Runge-Kutta pair) with a PID step-size controller at the stated ``rtol`` / ``atol``. Why: the
function-space ODE is an autonomous, non-stiff system at every learning rate where training
converges (its fastest time scale is ``n / (lr lambda_max)`` -- of the order of one training
step below the stability edge ``lr < 2n / lambda_max``), so an explicit adaptive pair needs a
few evaluations of ``Theta @ grad`` per step and no Jacobian solves of size ``n * outputs``,
which an implicit method would need. diffrax is maintained, runs under ``jit`` / ``vmap`` /
``grad``, saves at any sorted set of times in one pass, reports its accepted and rejected
steps, and accepts any other solver (e.g. ``diffrax.Kvaerno5()`` for a stiff problem) through
``solver=``; ``jax.experimental.ode.odeint`` offers none of the step statistics or solver
choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import check_finite, float_dtype, is_concrete
from ntkjax._spectral import check_kernel_psd, symmetrized
from ntkjax.predict import Predictions

__all__ = ["ODEState", "SolverStats", "check_sorted_times", "gradient_flow"]

# Default tolerances of the adaptive solver (relative, absolute), per dtype.
_TOLERANCES = {4: (1e-5, 1e-6), 8: (1e-10, 1e-12)}


class SolverStats(NamedTuple):
    """What the ODE solver did for one call: accepted and rejected steps, and evaluations of
    the vector field (6 per step attempt for Tsit5, plus one).

    Attributes:
      num_steps: step attempts.
      num_accepted_steps: accepted steps.
      num_rejected_steps: rejected steps.

    >>> stats = SolverStats(jnp.array(5), jnp.array(4), jnp.array(1))
    >>> int(stats.num_accepted_steps + stats.num_rejected_steps) == int(stats.num_steps)
    True
    """

    num_steps: jax.Array
    num_accepted_steps: jax.Array
    num_rejected_steps: jax.Array


class ODEState(NamedTuple):
    """The state of the function-space ODE at the requested times: outputs and, with momentum,
    their velocities ``q = df/dt`` (neural-tangents' ``ODEState``). Passing them back as
    ``fx_train_0``/``fx_test_0``/``qx_train_0``/``qx_test_0`` resumes the dynamics there.

    Attributes:
      fx_train: training outputs.
      fx_test: test outputs (None without ``k_test_train``).
      qx_train: training velocities (None without momentum).
      qx_test: test velocities (None without momentum or test kernel).

    >>> ODEState._fields
    ('fx_train', 'fx_test', 'qx_train', 'qx_test')
    """

    fx_train: jax.Array
    fx_test: jax.Array | None
    qx_train: jax.Array | None
    qx_test: jax.Array | None


def _check_output_kernel(k, name: str, rows: int | None, cols: int | None,
                         outputs: int) -> None:
    """A full ``(rows, cols, O, O)`` kernel over examples and outputs."""
    shape = tuple(np.shape(k))
    if len(shape) != 4 or (rows is not None and shape[0] != rows) or (
        cols is not None and shape[1] != cols
    ) or shape[2:] != (outputs, outputs):
        want = f"({'m' if rows is None else rows}, {'n' if cols is None else cols}, " \
               f"{outputs}, {outputs})"
        raise ValueError(
            f"{name} must be a {want} kernel over examples and the {outputs} outputs of "
            f"y_train (a full kernel, as empirical_ntk_fn(..., outputs='full') gives); got "
            f"shape {shape}. (A kernel with spatial axes (N1, N2, *S, *S) is no dynamics "
            "kernel: end a convolutional network with ntkjax.nn.flatten or "
            "ntkjax.nn.global_average_pool.)"
        )
    check_finite(k, name)


def _check_kernel_matrix(k, name: str, rows: int | None, cols: int | None) -> None:
    """A 2-D kernel matrix; kernels with spatial axes get their own message."""
    shape = tuple(np.shape(k))
    if len(shape) > 2:
        raise ValueError(
            f"{name} has shape {shape}: a kernel with spatial axes (N1, N2, *S, *S) or output "
            "axes, but the dynamics need the (N1, N2) kernel of one output. End a convolutional "
            "network with ntkjax.nn.flatten or ntkjax.nn.global_average_pool, or pass an "
            "empirical NTK with outputs='mean'."
        )
    if len(shape) != 2 or (rows is not None and shape[0] != rows) or (
        cols is not None and shape[1] != cols
    ):
        want = f"({'m' if rows is None else rows}, {'n' if cols is None else cols})"
        raise ValueError(f"{name} must be a {want} matrix; got shape {shape}.")
    check_finite(k, name)


def check_sorted_times(t: Any, name: str = "t") -> None:
    """Raises ValueError unless ``t`` is a finite scalar or 1-D array of non-decreasing times
    ``>= 0`` (value checks only on concrete arrays)."""
    if np.ndim(t) > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array of times; got shape "
                         f"{np.shape(t)}.")
    if not is_concrete(t):
        return
    v = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite (an ODE is integrated up to the last time); "
                         f"got {t!r}. For t = inf use ntkjax.gradient_flow_mse (MSE).")
    if np.any(v < 0):
        raise ValueError(f"{name} must be >= 0; got {t!r}.")
    if np.any(np.diff(v) < 0):
        raise ValueError(f"{name} must be sorted (non-decreasing); got {t!r}.")


def _check_momentum(momentum) -> None:
    if momentum is None:
        return
    if not is_concrete(momentum):
        return
    v = np.asarray(momentum, dtype=np.float64)
    if v.shape != () or not np.isfinite(v) or not (0.0 <= v < 1.0):
        raise ValueError(f"momentum must be a scalar in [0, 1) (or None for plain gradient "
                         f"flow); got {momentum!r}.")


def _check_loss(loss, f0: jax.Array, y: jax.Array) -> None:
    if not callable(loss):
        raise ValueError(f"loss must be a function loss(fx_train, y_train) -> scalar; got "
                         f"{loss!r}.")
    try:
        out = jax.eval_shape(loss, f0, y)
    except Exception as err:  # re-raised with the shapes involved
        raise ValueError(
            f"loss(fx_train, y_train) failed on outputs of shape {tuple(f0.shape)} and targets "
            f"of shape {tuple(y.shape)}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss(fx_train, y_train) must return a scalar (the training objective, e.g. a mean "
            f"over examples); it returned {shape}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss must return a floating scalar; it returned dtype {out.dtype}.")


def gradient_flow(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: jax.Array,
    y_train: jax.Array,
    *,
    learning_rate: float,
    momentum: float | None = None,
    k_test_train: jax.Array | None = None,
    fx_train_0: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    qx_train_0: jax.Array | None = None,
    qx_test_0: jax.Array | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    solver: Any = None,
) -> Callable[..., Any]:
    """Outputs of a wide network trained on any loss, by integrating its function-space ODE.

    ``df(X)/dt = -lr Theta(X, X) grad_f L(f(X), y)`` and ``df(x)/dt = -lr Theta(x, X) grad_f L``
    (Lee et al. 2019, section 2.2), or with ``momentum = m`` the heavy-ball limit
    ``f'' + (1 - m) f' = -lr Theta grad_f L`` (see the module doc), solved by diffrax's
    ``Tsit5`` with adaptive steps. With ``L = ntkjax.losses.mse_loss`` it reproduces
    :func:`ntkjax.gradient_flow_mse`.

    Args:
      loss: ``loss(fx_train, y_train) -> scalar``, differentiable in ``fx_train`` (shape of
        ``y_train``): the objective optax would minimize, e.g.
        :func:`ntkjax.losses.softmax_cross_entropy` (mean over examples).
      k_train_train: ``(n, n)`` NTK of one output on the training inputs (the full kernel is
        ``Theta (x) I_O``), or the full ``(n, n, O, O)`` NTK over examples and outputs
        (``Theta(x_a, x_b)_{ij}``, e.g. ``empirical_ntk_fn(..., outputs="full")``), which
        then acts as ``(Theta g)_{a,i} = sum_{b,j} Theta_{abij} g_{b,j}``.
      y_train: ``(n,)`` or ``(n, outputs)`` targets (one-hot rows for cross-entropy);
        ``(n, O)`` with a full kernel.
      learning_rate: ``lr``; time is measured in steps at this learning rate.
      momentum: None for gradient flow, or ``m`` in ``[0, 1)`` for the momentum system.
      k_test_train: optional ``(m, n)`` NTK between test and training inputs
        (``(m, n, O, O)`` with a full kernel).
      fx_train_0, fx_test_0: outputs at the start (zeros when omitted).
      qx_train_0, qx_test_0: only with momentum: velocities ``df/dt`` at the start (zeros
        when omitted, as at initialization). With the outputs, an :class:`ODEState` returned
        at ``t1`` (``return_state=True``) resumes the dynamics: running ``t2 - t1`` from it is
        running ``t2`` from the start (up to the solver tolerance).
      rtol, atol: the solver's relative and absolute tolerances (per step, on every output);
        default ``1e-5, 1e-6`` in float32 and ``1e-10, 1e-12`` in float64.
      max_steps: the most solver steps one call may take (an error beyond it).
      solver: a diffrax solver instance; default ``diffrax.Tsit5()``.

    Returns:
      ``predict(t, *, return_stats=False, return_state=False)``: ``t`` a scalar or a sorted
      1-D array of finite times ``>= 0`` (outputs then carry a leading time axis); returns
      ``Predictions(train, test)`` (``test`` None without ``k_test_train``) -- or with
      ``return_state=True`` an :class:`ODEState` (outputs and velocities) in its place -- and
      ``(..., SolverStats)`` with ``return_stats=True``. The whole trajectory is one
      solve from 0 to ``t[-1]`` saving at every ``t``; ``predict`` is pure (jit / vmap).

    Raises:
      ValueError: a loss that does not return a scalar, negative or unsorted times, momentum
        outside [0, 1), a kernel with spatial axes, velocities without momentum, shapes
        that disagree, or a ``k_train_train`` that is not symmetric and positive
        semi-definite up to round-off (the same tolerances as
        :func:`ntkjax.gradient_flow_mse`; a concrete kernel is checked, one O(n^3)
        eigenvalue computation; it is read as ``(K + K^T) / 2``). A negative
        eigenvalue would make the flow diverge exponentially, which the adaptive
        solver follows until it runs out of ``max_steps``.

    >>> import jax.numpy as jnp
    >>> from ntkjax.losses import softmax_cross_entropy
    >>> k = jnp.eye(2) + 0.5
    >>> y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> predict = gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0)
    >>> predict(jnp.array([0.0, 10.0])).train.shape
    (2, 2, 2)

    Resuming with momentum from the state at ``t = 4`` (outputs and velocities):

    >>> predict = gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0, momentum=0.9)
    >>> s = predict(4.0, return_state=True)
    >>> resumed = gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0, momentum=0.9,
    ...                         fx_train_0=s.fx_train, qx_train_0=s.qx_train)
    >>> bool(jnp.allclose(resumed(6.0).train, predict(10.0).train, atol=1e-4))
    True
    """
    full_kernel = np.ndim(k_train_train) == 4
    if full_kernel:
        y_shape = tuple(np.shape(y_train))
        n = np.shape(k_train_train)[0]
        if len(y_shape) != 2:
            raise ValueError(f"with a full (n, n, O, O) kernel y_train must have shape (n, O); "
                             f"got shape {y_shape}.")
        _check_output_kernel(k_train_train, "k_train_train", y_shape[0], y_shape[0],
                             y_shape[1])
    else:
        _check_kernel_matrix(k_train_train, "k_train_train", None, None)
        n = np.shape(k_train_train)[0]
        _check_kernel_matrix(k_train_train, "k_train_train", n, n)
        check_kernel_psd(k_train_train, "k_train_train")  # as gradient_flow_mse
    y_shape = tuple(np.shape(y_train))
    if len(y_shape) not in (1, 2) or y_shape[0] != n:
        raise ValueError(f"y_train must have shape ({n},) or ({n}, outputs) to match the "
                         f"kernel's {n} training points; got shape {y_shape}.")
    check_finite(y_train, "y_train")
    if is_concrete(learning_rate):
        lr_value = np.asarray(learning_rate, dtype=np.float64)
        if lr_value.shape != () or not np.isfinite(lr_value) or lr_value <= 0:
            raise ValueError(f"learning_rate must be a positive finite scalar; got "
                             f"{learning_rate!r}.")
    _check_momentum(momentum)
    if k_test_train is not None:
        if full_kernel:
            _check_output_kernel(k_test_train, "k_test_train", None, n, y_shape[1])
        else:
            _check_kernel_matrix(k_test_train, "k_test_train", None, n)
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("fx_test_0 needs k_test_train (the test-train kernel).")
    if momentum is None and (qx_train_0 is not None or qx_test_0 is not None):
        raise ValueError("qx_train_0 / qx_test_0 (velocities) need momentum: gradient flow "
                         "without momentum is first order, its state is the outputs alone.")
    if qx_test_0 is not None and k_test_train is None:
        raise ValueError("qx_test_0 needs k_test_train (the test-train kernel).")
    dtype = float_dtype(k_train_train, y_train, k_test_train, fx_train_0, fx_test_0,
                        qx_train_0, qx_test_0)
    k = jnp.asarray(k_train_train, dtype)
    # read as gradient_flow_mse reads it (equal within round-off, checked)
    k = symmetrized(k, (1, 0, 3, 2) if full_kernel else None)
    y = jnp.asarray(y_train, dtype)
    f0 = jnp.zeros(y_shape, dtype) if fx_train_0 is None else jnp.asarray(fx_train_0, dtype)
    if f0.shape != y_shape:
        raise ValueError(f"fx_train_0 must have shape {y_shape}; got {f0.shape}.")
    check_finite(f0, "fx_train_0")
    k_xt = ft0 = None
    if k_test_train is not None:
        k_xt = jnp.asarray(k_test_train, dtype)
        test_shape = (k_xt.shape[0], *y_shape[1:])
        ft0 = jnp.zeros(test_shape, dtype) if fx_test_0 is None else jnp.asarray(fx_test_0, dtype)
        if ft0.shape != test_shape:
            raise ValueError(f"fx_test_0 must have shape {test_shape}; got {ft0.shape}.")
        check_finite(ft0, "fx_test_0")
    q0 = qt0 = None
    if momentum is not None:
        q0 = jnp.zeros(y_shape, dtype) if qx_train_0 is None else jnp.asarray(qx_train_0, dtype)
        if q0.shape != y_shape:
            raise ValueError(f"qx_train_0 must have shape {y_shape}; got {q0.shape}.")
        check_finite(q0, "qx_train_0")
        if ft0 is not None:
            qt0 = (jnp.zeros_like(ft0) if qx_test_0 is None
                   else jnp.asarray(qx_test_0, dtype))
            if qt0.shape != ft0.shape:
                raise ValueError(f"qx_test_0 must have shape {ft0.shape}; got {qt0.shape}.")
            check_finite(qt0, "qx_test_0")
    _check_loss(loss, f0, y)
    default_rtol, default_atol = _TOLERANCES.get(jnp.dtype(dtype).itemsize, _TOLERANCES[4])
    config = _SolverConfig(
        loss=loss,
        momentum=momentum is not None,
        solver=diffrax.Tsit5() if solver is None else solver,
        rtol=float(default_rtol if rtol is None else rtol),
        atol=float(default_atol if atol is None else atol),
        max_steps=int(max_steps),
    )
    lr = jnp.asarray(learning_rate, dtype)
    mom = jnp.asarray(0.0 if momentum is None else momentum, dtype)

    def predict(t, *, return_stats: bool = False, return_state: bool = False):
        check_sorted_times(t)
        times = jnp.asarray(t, dtype)
        state, stats = _solve(config, jnp.atleast_1d(times), k, k_xt, y, f0, ft0, q0, qt0, lr,
                              mom)
        if times.ndim == 0:
            state = jax.tree_util.tree_map(lambda a: a[0], state)
        out = state if return_state else Predictions(state.fx_train, state.fx_test)
        return (out, stats) if return_stats else out

    return predict


class _SolverConfig(NamedTuple):
    """The static part of a solve (hashable: one compilation per configuration and shapes)."""

    loss: Callable[[jax.Array, jax.Array], jax.Array]
    momentum: bool
    solver: Any
    rtol: float
    atol: float
    max_steps: int


@functools.partial(jax.jit, static_argnums=0)
def _solve(config: _SolverConfig, ts, k, k_xt, y, f0, ft0, q0, qt0, lr, momentum):
    """One diffrax solve from 0 to ``ts[-1]`` saving at ``ts``: ``(ODEState, stats)``."""
    dtype = k.dtype
    grad_loss = jax.grad(lambda f: config.loss(f, y).astype(dtype))
    # (n, n) kernel: Theta acts on the example axis; (n, n, O, O): on examples and outputs
    apply_axes = ((1, 3), (0, 1)) if k.ndim == 4 else 1

    def force(f_train):
        """``-lr Theta grad_f L`` on the training and test outputs."""
        g = grad_loss(f_train)
        d_train = -lr * jnp.tensordot(k, g, axes=apply_axes)
        d_test = None if k_xt is None else -lr * jnp.tensordot(k_xt, g, axes=apply_axes)
        return d_train, d_test

    def first_order(t, state, args):
        return force(state[0])

    damping = 1.0 - momentum

    def second_order(t, state, args):
        (f_train, _), (q_train, q_test) = state
        force_train, force_test = force(f_train)
        dq_train = force_train - damping * q_train
        dq_test = None if q_test is None else force_test - damping * q_test
        return (q_train, q_test), (dq_train, dq_test)

    state0: Any = ((f0, ft0), (q0, qt0)) if config.momentum else (f0, ft0)
    term = diffrax.ODETerm(second_order if config.momentum else first_order)
    solution = diffrax.diffeqsolve(
        term, config.solver, jnp.zeros((), dtype), ts[-1], None, state0,
        stepsize_controller=diffrax.PIDController(rtol=config.rtol, atol=config.atol),
        saveat=diffrax.SaveAt(ts=ts), max_steps=config.max_steps,
    )
    if config.momentum:
        (train, test), (q_train, q_test) = solution.ys  # type: ignore[misc]
    else:
        (train, test), q_train, q_test = solution.ys, None, None  # type: ignore[misc]
    stats = solution.stats
    return ODEState(train, test, q_train, q_test), SolverStats(
        num_steps=stats["num_steps"],
        num_accepted_steps=stats["num_accepted_steps"],
        num_rejected_steps=stats["num_rejected_steps"],
    )
