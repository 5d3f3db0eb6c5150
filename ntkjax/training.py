"""optax training loops that track the empirical NTK, and the theory checks built on them.

Training minimises ntkjax's MSE, ``L(theta) = 1/(2n) sum_i ||f(x_i; theta) - y_i||^2``
(:func:`ntkjax.losses.mse_loss`), with any optax ``GradientTransformation``. The whole run is one
compiled program: an outer ``lax.scan`` over ``num_steps // record_every`` chunks, each an inner
``lax.scan`` of ``record_every`` optimizer steps followed by one record. A record holds

* the full-batch training loss and training/test predictions,
* the relative kernel change ``||Theta_t - Theta_0||_F / ||Theta_0||_F`` of the empirical NTK
  (summed over outputs) on a probe set,
* the relative parameter change ``||theta_t - theta_0||_2 / ||theta_0||_2`` (all leaves).

In the NTK parameterization both changes fall like ``width^(-1/2)`` at a fixed number of steps
(lazy training: Jacot et al. 2018, "Neural Tangent Kernel"; Lee et al. 2019, "Wide Neural
Networks of Any Depth Evolve as Linear Models Under Gradient Descent", Thm 2.1 and Fig. 1), and
the network trains like its linearization ``f_lin`` (``linearized=True`` trains that model with
the same loop, so the two can be compared record by record).

Divergence. A step whose loss is non-finite, exceeds ``divergence_factor`` times the initial
loss, or whose update is non-finite marks the run as diverged at that step; from then on the
parameters are frozen at the last finite values, so every history stays finite. The history
carries ``diverged``, ``diverged_at`` and a ``valid`` mask for the records taken before it.
Before training, :func:`learning_rate_check` compares a learning rate with the gradient-descent
stability edge ``2n / lambda_max(Theta_0)`` of the initial empirical NTK on the training set
(:func:`ntkjax.predict.max_learning_rate`): on the linearized dynamics
``f_{t+1} - y = (I - lr Theta / n)(f_t - y)`` every mode with ``lr lambda / n > 2`` grows.
The linearized model then always diverges; a nonlinear network slightly above the edge may
instead "catapult" (Lewkowycz et al. 2020, "The large learning rate phase of deep learning"):
its loss spikes, its kernel shrinks and it converges with a large kernel change. Far above the
edge (e.g. standard-parameterization networks, whose NTK grows with width, at a fixed lr) it
diverges.

Learning-rate conventions. A loss ``mean((f - y)**2)`` is ``2 L`` at one output, so its
``lr = 0.01`` is ``lr = 0.02`` here (the gradients differ by the factor 2).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkjax._checks import check_batched, check_finite, check_same_features, is_concrete
from ntkjax.empirical import NTKMethod, empirical_ntk_fn
from ntkjax.jacobians import ApplyFn
from ntkjax.linearize import linearize
from ntkjax.losses import mse_loss
from ntkjax.predict import convergence_bound, gradient_descent_mse, max_learning_rate

__all__ = [
    "KernelRegimeReport",
    "StabilityReport",
    "TrainingHistory",
    "kernel_regime_check",
    "learning_rate_check",
    "make_train_fn",
    "train_with_kernel_tracking",
]



class StabilityReport(NamedTuple):
    """Gradient-descent stability of a learning rate on the initial empirical NTK.

    ``max_learning_rate = 2n / lambda_max`` with ``Theta_0`` the empirical NTK on the ``n``
    training inputs (summed over outputs, divided by the number of outputs). ``stable`` is
    ``learning_rate < max_learning_rate``.

    Attributes:
      learning_rate: the learning rate checked.
      max_learning_rate: the stability edge ``2n / lambda_max``.
      lambda_max: the largest eigenvalue of ``Theta_0``.
      lambda_min: the smallest eigenvalue of ``Theta_0``.
      stable: whether ``learning_rate < max_learning_rate``.

    >>> StabilityReport._fields
    ('learning_rate', 'max_learning_rate', 'lambda_max', 'lambda_min', 'stable')
    """

    learning_rate: jax.Array
    max_learning_rate: jax.Array
    lambda_max: jax.Array
    lambda_min: jax.Array
    stable: jax.Array


class TrainingHistory(NamedTuple):
    """What :func:`make_train_fn`'s ``train`` records. R = num_steps // record_every + 1.

    Attributes:
      steps: (R,) optimizer steps taken at each record: 0, k, 2k, ..., num_steps.
      loss: (R,) full-batch training loss ``1/(2n) sum ||f - y||^2`` at each record.
      kernel_change: (R,) ``||Theta_t - Theta_0||_F / ||Theta_0||_F`` on the probe set, or None
        when the kernel is not tracked.
      param_change: (R,) ``||theta_t - theta_0|| / ||theta_0||`` over all parameter leaves.
      train_predictions: (R, num_train, O) network outputs on the training inputs.
      test_predictions: (R, num_test, O) outputs on ``x_test``, or None without ``x_test``.
      step_loss: (num_steps,) the (mini)batch loss each step minimised, before its update.
      valid: (R,) True for records taken before divergence (all True when it never diverged).
      diverged: () bool, True when some step's loss was non-finite or exploded.
      diverged_at: () int, the first such step, or -1.
      final_params: the parameters after training (frozen at divergence).
      stability: a :class:`StabilityReport` when a learning rate was checked, else None.

    >>> TrainingHistory._fields[:4]
    ('steps', 'loss', 'kernel_change', 'param_change')
    """

    steps: jax.Array
    loss: jax.Array
    kernel_change: jax.Array | None
    param_change: jax.Array
    train_predictions: jax.Array
    test_predictions: jax.Array | None
    step_loss: jax.Array
    valid: jax.Array
    diverged: jax.Array
    diverged_at: jax.Array
    final_params: Any
    stability: StabilityReport | None = None


def _trace_ntk_fn(apply_fn: ApplyFn, ntk_method: NTKMethod) -> Callable:
    """The empirical NTK summed over outputs, ``ntk(params, x1, x2=None) -> (N1, N2)``."""
    return empirical_ntk_fn(apply_fn, ntk_method=ntk_method, outputs="trace")


def _tree_all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_train_fn(
    apply_fn: ApplyFn,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    record_every: int,
    batch_size: int | None = None,
    track_kernel: bool = True,
    linearized: bool = False,
    ntk_method: NTKMethod = "auto",
    divergence_factor: float = 1e4,
) -> Callable[..., TrainingHistory]:
    """Builds ``train(params0, x_train, y_train, *, probe_x=None, x_test=None, key=None)``.

    ``train`` is a pure function of arrays: wrap it in ``jax.jit`` (all configuration here is
    static) and ``jax.vmap`` it over ``params0`` and ``key`` to train several seeds in one
    program. It returns a :class:`TrainingHistory` (``stability`` is None).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, O)``, e.g. a linen ``module.apply`` taking the
        variables dict; every leaf of ``params`` is trained.
      optimizer: any optax transformation, e.g. ``optax.sgd(lr)``.
      num_steps: optimizer steps; a positive multiple of ``record_every``.
      record_every: steps between records (one record is also taken at step 0).
      batch_size: None for full-batch steps; else each step draws ``batch_size`` distinct
        training examples from ``jax.random.fold_in(key, step)`` (``key`` is then required).
      track_kernel: compute the probe-set NTK change at every record (needs ``probe_x``).
      linearized: train ``f_lin(params, x) = f(params0, x) + J(params0)(params - params0)``
        (:func:`ntkjax.linearize`) instead of the network.
      ntk_method: the :func:`ntkjax.empirical_ntk_fn` method for the probe kernel.
      divergence_factor: a loss above this multiple of the initial loss counts as divergence.

    Returns:
      ``train(params0, x_train, y_train, *, probe_x=None, x_test=None, key=None)``, a pure
      function returning a :class:`TrainingHistory`.

    >>> import jax.numpy as jnp, optax, ntkjax
    >>> apply_fn = lambda p, x: x @ p["w"]  # a linear model: Theta = x x^T = I here
    >>> x, y, params = jnp.eye(2), jnp.array([[1.0], [2.0]]), {"w": jnp.zeros((2, 1))}
    >>> import jax
    >>> train = jax.jit(ntkjax.make_train_fn(apply_fn, optimizer=optax.sgd(1.0), num_steps=4,
    ...                                      record_every=2, track_kernel=False))
    >>> history = train(params, x, y)
    >>> print(history.steps, history.loss[1] / history.loss[0])  # residual x (1 - lr / n)^2
    [0 2 4] 0.0625
    """
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if not isinstance(record_every, int | np.integer) or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every!r}.")
    if num_steps % record_every:
        raise ValueError(
            f"num_steps ({num_steps}) must be a multiple of record_every ({record_every})."
        )
    if batch_size is not None and (not isinstance(batch_size, int | np.integer) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}.")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}.")
    num_records = num_steps // record_every

    def train(params0, x_train, y_train, *, probe_x=None, x_test=None, key=None):
        n = x_train.shape[0]
        if batch_size is not None and key is None:
            raise ValueError("minibatch training (batch_size set) needs an explicit PRNG key.")
        if batch_size is not None and batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples.")
        if track_kernel and probe_x is None:
            raise ValueError("track_kernel=True needs probe_x (the inputs of the tracked NTK).")
        model = linearize(apply_fn, params0) if linearized else apply_fn
        ntk = _trace_ntk_fn(model, ntk_method)

        def loss_fn(params, x, y):
            return mse_loss(model(params, x), y)

        theta0 = ntk(params0, probe_x) if track_kernel else None
        theta0_norm = jnp.linalg.norm(theta0) if track_kernel else None
        params0_norm = optax.tree.norm(params0)

        def record(params):
            f_train = model(params, x_train)
            out = {
                "loss": mse_loss(f_train, y_train),
                "train_predictions": f_train,
                "param_change": optax.tree.norm(optax.tree.sub(params, params0)) / params0_norm,
                "kernel_change": None,
                "test_predictions": None,
            }
            if track_kernel:
                out["kernel_change"] = jnp.linalg.norm(ntk(params, probe_x) - theta0) / theta0_norm
            if x_test is not None:
                out["test_predictions"] = model(params, x_test)
            return out

        first = record(params0)
        loss0 = first["loss"]
        threshold = divergence_factor * jnp.maximum(loss0, jnp.finfo(loss0.dtype).tiny)

        def batch(step):
            if batch_size is None:
                return x_train, y_train
            assert key is not None  # checked above
            idx = jax.random.permutation(jax.random.fold_in(key, step), n)[:batch_size]
            return x_train[idx], y_train[idx]

        def one_step(carry, step):
            params, opt_state, diverged, diverged_at = carry
            bx, by = batch(step)
            loss, grads = jax.value_and_grad(loss_fn)(params, bx, by)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            bad = ~jnp.isfinite(loss) | (loss > threshold) | ~_tree_all_finite(updates)
            diverged_at = jnp.where(bad & ~diverged, step, diverged_at)
            diverged = diverged | bad
            params = optax.tree.where(diverged, params, new_params)
            opt_state = optax.tree.where(diverged, opt_state, new_opt_state)
            return (params, opt_state, diverged, diverged_at), loss

        def chunk(carry, chunk_index):
            steps = chunk_index * record_every + jnp.arange(record_every, dtype=jnp.int32)
            carry, losses = jax.lax.scan(one_step, carry, steps)
            return carry, (record(carry[0]), losses)

        carry0 = (params0, optimizer.init(params0), jnp.array(False), jnp.array(-1, jnp.int32))
        (params, _, diverged, diverged_at), (records, losses) = jax.lax.scan(
            chunk, carry0, jnp.arange(num_records, dtype=jnp.int32)
        )
        stacked = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a[None], b]), first, records
        )
        steps = jnp.arange(num_records + 1, dtype=jnp.int32) * record_every
        # A record at step s sees the parameters after s updates; it is valid when none of
        # those updates was flagged, i.e. s <= diverged_at.
        valid = ~diverged | (steps <= diverged_at)
        return TrainingHistory(
            steps=steps,
            loss=stacked["loss"],
            kernel_change=stacked["kernel_change"],
            param_change=stacked["param_change"],
            train_predictions=stacked["train_predictions"],
            test_predictions=stacked["test_predictions"],
            step_loss=losses.reshape(num_steps),
            valid=valid,
            diverged=diverged,
            diverged_at=diverged_at,
            final_params=params,
        )

    return train


def learning_rate_check(
    apply_fn: ApplyFn,
    params0: Any,
    x_train: jax.Array,
    *,
    learning_rate: float | jax.Array,
    ntk_method: NTKMethod = "auto",
) -> StabilityReport:
    """Compares ``learning_rate`` with the stability edge ``2n / lambda_max(Theta_0)``.

    ``Theta_0`` is the empirical NTK of ``apply_fn`` at ``params0`` on the ``n`` training inputs,
    summed over outputs and divided by their number O (the per-output kernel when the outputs
    are exchangeable, exactly so at O = 1). Gradient descent on the linearized model,
    ``f_{t+1} - y = (I - lr Theta_0 / n)(f_t - y)``, is stable iff ``lr < 2n / lambda_max``
    (:func:`ntkjax.predict.max_learning_rate`). Pure and jittable/vmappable (returns arrays).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, O)``.
      params0: the parameters at initialization.
      x_train: the ``n`` training inputs.
      learning_rate: the step size to check.
      ntk_method: the :func:`ntkjax.empirical_ntk_fn` method for ``Theta_0``.

    Returns:
      A :class:`StabilityReport`.

    >>> import jax.numpy as jnp, optax, ntkjax
    >>> apply_fn = lambda p, x: x @ p["w"]  # a linear model: Theta = x x^T = I here
    >>> x, y, params = jnp.eye(2), jnp.array([[1.0], [2.0]]), {"w": jnp.zeros((2, 1))}
    >>> rep = ntkjax.learning_rate_check(apply_fn, params, x, learning_rate=1.0)
    >>> float(rep.max_learning_rate), bool(rep.stable)  # 2n / lambda_max = 4
    (4.0, True)
    """
    check_batched(x_train, "x_train")
    _check_learning_rate(learning_rate)
    theta = _trace_ntk_fn(apply_fn, ntk_method)(params0, x_train)
    num_outputs = jax.eval_shape(apply_fn, params0, x_train[:1]).shape[-1]
    theta = theta / num_outputs
    eigenvalues = jnp.linalg.eigvalsh(theta)
    edge = max_learning_rate(theta)
    lr = jnp.asarray(learning_rate, dtype=theta.dtype)
    return StabilityReport(
        learning_rate=lr,
        max_learning_rate=edge,
        lambda_max=eigenvalues[-1],
        lambda_min=eigenvalues[0],
        stable=lr < edge,
    )


def _validate_data(x_train, y_train, probe_x, x_test) -> None:
    check_batched(x_train, "x_train")
    check_batched(y_train, "y_train", min_ndim=2)
    if np.ndim(y_train) != 2 or np.shape(y_train)[0] != np.shape(x_train)[0]:
        raise ValueError(
            f"y_train must have shape (num_train, n_outputs) with num_train = x_train.shape[0] = "
            f"{np.shape(x_train)[0]}; got {tuple(np.shape(y_train))}."
        )
    if probe_x is not None:
        check_batched(probe_x, "probe_x")
        check_same_features(x_train, probe_x, ("x_train", "probe_x"))
    if x_test is not None:
        check_batched(x_test, "x_test")
        check_same_features(x_train, x_test, ("x_train", "x_test"))
    for name, value in (("x_train", x_train), ("y_train", y_train), ("probe_x", probe_x),
                        ("x_test", x_test)):
        if value is not None:
            check_finite(value, name)  # bad data, not a divergence at step 0


def _check_learning_rate(learning_rate: Any) -> None:
    if is_concrete(learning_rate) and not (
        np.ndim(learning_rate) == 0 and np.isfinite(learning_rate) and learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate!r}.")


def train_with_kernel_tracking(
    apply_fn: ApplyFn,
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    record_every: int,
    probe_x: jax.Array | None = None,
    x_test: jax.Array | None = None,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    track_kernel: bool = True,
    linearized: bool = False,
    learning_rate: float | None = None,
    ntk_method: NTKMethod = "auto",
    divergence_factor: float = 1e4,
    warn: bool = True,
) -> TrainingHistory:
    """Trains ``apply_fn`` from ``params0`` on MSE and records loss, kernel and parameter drift.

    Validates the inputs, compiles :func:`make_train_fn`'s ``train`` once and runs it. With
    ``learning_rate`` (the step size the optimizer uses, for plain SGD its ``learning_rate``),
    first runs :func:`learning_rate_check`, warns when it is above the stability edge, and
    stores the report in ``history.stability``. Without ``probe_x`` the kernel is tracked on
    ``x_train``. A run that diverged warns with the step
    (``history.diverged``/``diverged_at``; records after it are masked by ``history.valid``).
    See :func:`make_train_fn` for the arguments.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, O)``, e.g. a linen ``module.apply``.
      params0: the parameters at initialization.
      x_train: training inputs.
      y_train: training targets ``(n, O)``.
      optimizer: any optax transformation.
      num_steps: optimizer steps; a positive multiple of ``record_every``.
      record_every: steps between records.
      probe_x: inputs on which the kernel change is tracked (default ``x_train``).
      x_test: inputs whose predictions are recorded.
      batch_size: None for full-batch steps, else minibatches drawn with ``key``.
      key: PRNG key for minibatches.
      track_kernel: record the kernel change.
      linearized: train the linearized network.
      learning_rate: the optimizer's step size, for the stability check and its warning.
      ntk_method: the :func:`ntkjax.empirical_ntk_fn` method.
      divergence_factor: a loss above this multiple of the initial loss counts as divergence.
      warn: warn when the learning rate is unstable or the run diverged.

    Returns:
      A :class:`TrainingHistory`.

    >>> import jax.numpy as jnp, optax, ntkjax
    >>> apply_fn = lambda p, x: x @ p["w"]  # a linear model: Theta = x x^T = I here
    >>> x, y, params = jnp.eye(2), jnp.array([[1.0], [2.0]]), {"w": jnp.zeros((2, 1))}
    >>> history = ntkjax.train_with_kernel_tracking(
    ...     apply_fn, params, x, y, optimizer=optax.sgd(1.0), num_steps=4, record_every=2,
    ...     learning_rate=1.0)
    >>> print(history.loss[1] / history.loss[0], history.kernel_change)  # a fixed NTK
    0.0625 [0. 0. 0.]
    """
    _validate_data(x_train, y_train, probe_x, x_test)
    if learning_rate is not None:
        _check_learning_rate(learning_rate)
    if track_kernel and probe_x is None:
        probe_x = x_train
    train = make_train_fn(
        apply_fn,
        optimizer=optimizer,
        num_steps=num_steps,
        record_every=record_every,
        batch_size=batch_size,
        track_kernel=track_kernel,
        linearized=linearized,
        ntk_method=ntk_method,
        divergence_factor=divergence_factor,
    )
    stability = None
    if learning_rate is not None:
        stability = jax.jit(
            lambda p, x: learning_rate_check(
                apply_fn, p, x, learning_rate=learning_rate, ntk_method=ntk_method
            )
        )(params0, x_train)
        if warn and not bool(stability.stable):
            warnings.warn(
                f"learning rate {learning_rate:g} is above the gradient-descent stability edge "
                f"2n/lambda_max = {float(stability.max_learning_rate):.4g} of the initial NTK "
                f"(n = {np.shape(x_train)[0]}, lambda_max = {float(stability.lambda_max):.4g}); "
                "expect divergence.",
                RuntimeWarning,
                stacklevel=2,
            )
    history = jax.jit(
        lambda p, x, y, probe, xt, k: train(p, x, y, probe_x=probe, x_test=xt, key=k)
    )(params0, x_train, y_train, probe_x, x_test, key)
    if warn and bool(history.diverged):
        warnings.warn(
            f"training diverged at step {int(history.diverged_at)} (loss non-finite or above "
            f"{divergence_factor:g} x the initial loss); parameters were frozen there and later "
            "records are masked by history.valid.",
            RuntimeWarning,
            stacklevel=2,
        )
    return history._replace(stability=stability)


class KernelRegimeReport(NamedTuple):
    """Network training against kernel gradient descent with the initial empirical NTK.

    Attributes:
      steps: (R,) record steps.
      loss_network: (R,) the network's training loss.
      loss_kernel: (R,) the loss of gradient descent in function space with ``Theta_0``,
        ``f_{t+1} = f_t - (lr/n) Theta_0 (f_t - y)`` (:func:`ntkjax.predict.gradient_descent_mse`).
      residual_network: (R,) ``||f_t - y||`` of the network.
      residual_bound: (R,) ``exp(-lr lambda_min t / n) ||f_0 - y||``
        (:func:`ntkjax.predict.convergence_bound`).
      loss_deviation: ``max_t |loss_network - loss_kernel| / loss_network[0]``.
      prediction_deviation: ``max_t ||f_t - f_t^kernel|| / ||f_0 - y||`` on the training inputs:
        the finite-width error, O(width^(-1/2)) in the NTK parameterization.
      bound_excess: ``max_t (residual_network - residual_bound) / ||f_0 - y||``; <= 0 when the
        network decays at least as fast as the bound.
      stability: the :class:`StabilityReport` of the learning rate.
      diverged: whether the network run diverged.

    >>> KernelRegimeReport._fields[:3]
    ('steps', 'loss_network', 'loss_kernel')
    """

    steps: np.ndarray
    loss_network: np.ndarray
    loss_kernel: np.ndarray
    residual_network: np.ndarray
    residual_bound: np.ndarray
    loss_deviation: float
    prediction_deviation: float
    bound_excess: float
    stability: StabilityReport
    diverged: bool


@functools.partial(jax.jit, static_argnames=("learning_rate",))
def _kernel_descent_and_bound(theta0, y_train, f0, steps, *, learning_rate: float):
    """Kernel gradient descent from ``f0`` at ``steps`` and the convergence bound (one program)."""
    predict = gradient_descent_mse(theta0, y_train, learning_rate=learning_rate, fx_train_0=f0)
    residual0 = jnp.linalg.norm(f0 - y_train)
    bound = convergence_bound(theta0, residual0, learning_rate=learning_rate, t=steps)
    return predict(steps).train, residual0, bound


def kernel_regime_check(
    apply_fn: ApplyFn,
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    learning_rate: float,
    num_steps: int,
    record_every: int,
    linearized: bool = False,
    ntk_method: NTKMethod = "auto",
) -> KernelRegimeReport:
    """Theory check (1): full-batch SGD at ``learning_rate`` against the kernel prediction.

    In the NTK parameterization with ``lr < 2n / lambda_max`` a wide network's training loss
    follows kernel gradient descent with its initial NTK, and ``||f_t - y|| <= exp(-lr
    lambda_min t / n) ||f_0 - y||`` (Jacot et al. 2018; Lee et al. 2019, Thm 2.1; for
    ``lr lambda_max / n <= 1`` every mode contracts by ``1 - lr lambda / n <= exp(-lr lambda_min
    / n)`` per step). Both hold up to a finite-width error that shrinks with width; with
    ``linearized=True`` they hold exactly (up to rounding).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, O)``, e.g. a linen ``module.apply``.
      params0: the parameters at initialization.
      x_train: training inputs ``(n, *features)``.
      y_train: training targets ``(n, O)``.
      learning_rate: the SGD step size.
      num_steps: full-batch steps; a positive multiple of ``record_every``.
      record_every: steps between records.
      linearized: train the linearized network instead (the check then holds exactly).
      ntk_method: the :func:`ntkjax.empirical_ntk_fn` method for ``Theta_0``.

    Returns:
      A :class:`KernelRegimeReport`.

    A linear model is its own linearization, so it follows the kernel prediction exactly:

    >>> import jax.numpy as jnp, optax, ntkjax
    >>> apply_fn = lambda p, x: x @ p["w"]  # a linear model: Theta = x x^T = I here
    >>> x, y, params = jnp.eye(2), jnp.array([[1.0], [2.0]]), {"w": jnp.zeros((2, 1))}
    >>> rep = ntkjax.kernel_regime_check(apply_fn, params, x, y, learning_rate=1.0,
    ...                                  num_steps=4, record_every=2)
    >>> bool(rep.loss_deviation < 1e-5), bool(rep.bound_excess <= 1e-6)
    (True, True)
    """
    _validate_data(x_train, y_train, None, None)
    history = train_with_kernel_tracking(
        apply_fn,
        params0,
        x_train,
        y_train,
        optimizer=optax.sgd(learning_rate),
        num_steps=num_steps,
        record_every=record_every,
        track_kernel=False,
        linearized=linearized,
        learning_rate=learning_rate,
        ntk_method=ntk_method,
        warn=False,
    )
    assert history.stability is not None  # a learning rate was given
    n = x_train.shape[0]
    theta0 = _trace_ntk_fn(apply_fn, ntk_method)(params0, x_train)
    theta0 = theta0 / y_train.shape[1]
    f0 = history.train_predictions[0]
    steps = np.asarray(history.steps)
    f_kernel, residual0, residual_bound = jax.device_get(_kernel_descent_and_bound(
        theta0, jnp.asarray(y_train), f0, jnp.asarray(steps), learning_rate=learning_rate))
    f_kernel = np.asarray(f_kernel)  # (R, n, O)
    loss_kernel = np.asarray(jax.vmap(mse_loss, in_axes=(0, None))(f_kernel, y_train), np.float64)
    residual0 = float(residual0)
    prediction_gap = np.linalg.norm(
        (np.asarray(history.train_predictions) - f_kernel).reshape(len(steps), -1), axis=1
    )
    loss_network = np.asarray(history.loss, dtype=np.float64)
    residual_network = np.sqrt(2.0 * n * loss_network)
    residual_bound = np.asarray(residual_bound)
    return KernelRegimeReport(
        steps=steps,
        loss_network=loss_network,
        loss_kernel=loss_kernel,
        residual_network=residual_network,
        residual_bound=residual_bound,
        loss_deviation=float(np.max(np.abs(loss_network - loss_kernel)) / loss_network[0]),
        prediction_deviation=float(np.max(prediction_gap)) / residual0,
        bound_excess=float(np.max(residual_network - residual_bound) / residual0),
        stability=history.stability,
        diverged=bool(history.diverged),
    )
