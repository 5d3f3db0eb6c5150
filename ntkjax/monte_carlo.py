"""Monte Carlo kernels: the empirical NNGP and NTK averaged over random initializations.

For a network ``f(theta, x) in R^O`` with ``theta`` drawn by its initializer, the Monte Carlo
estimates over S independent draws are (Novak et al. 2019, "Neural Tangents", section 3;
neural-tangents' ``monte_carlo_kernel_fn``)::

    nngp(x, x') = (1/S) sum_s (1/O) sum_i f_i(theta_s, x) f_i(theta_s, x'),
    ntk(x, x')  = (1/S) sum_s (1/O) sum_i [J(theta_s, x) J(theta_s, x')^T]_ii,

i.e. the per-output empirical kernels (``outputs="mean"``) averaged over draws. For a network of
:mod:`ntkjax.nn` layers in the NTK parameterization they converge to :func:`ntkjax.kernel_fn`'s
per-output NNGP and NTK as S and the widths grow: the sampling error falls like ``S^-1/2``
(reported as the standard error ``std / sqrt(S)`` over draws), the finite-width bias like
``1/width`` (zero for the NNGP and NTK of one hidden layer, whose draws average to the limit).

Draws are evaluated ``batch_size`` at a time with ``jax.vmap`` inside a ``lax.scan`` over
batches (memory of one batch, one compiled program); the mean and the variance are merged
batch by batch (Chan, Golub & LeVeque 1979), so no draw is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_pair
from ntkjax.empirical import NTKMethod, empirical_nngp_fn, empirical_ntk_fn

__all__ = ["MonteCarloKernel", "monte_carlo_kernel_fn"]


class MonteCarloKernel(NamedTuple):
    """Mean empirical kernels over ``num_samples`` initializations and their standard errors
    (``std over draws / sqrt(num_samples)``, ddof = 1); all ``(N1, N2)``.

    Attributes:
      nngp: the mean empirical NNGP.
      ntk: the mean empirical NTK.
      nngp_stderr: the standard error of ``nngp``.
      ntk_stderr: the standard error of ``ntk``.
      num_samples: the number of initializations averaged.

    >>> MonteCarloKernel._fields
    ('nngp', 'ntk', 'nngp_stderr', 'ntk_stderr', 'num_samples')
    """

    nngp: jax.Array
    ntk: jax.Array
    nngp_stderr: jax.Array
    ntk_stderr: jax.Array
    num_samples: int


class _Moments(NamedTuple):
    n: jax.Array
    mean: Any
    m2: Any  # sum of squared deviations from the mean


def _batch_moments(values: Any) -> _Moments:
    first = jax.tree_util.tree_leaves(values)[0]
    count = jnp.asarray(first.shape[0], first.dtype)  # the kernels' dtype: exact small counts
    mean = jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), values)
    m2 = jax.tree_util.tree_map(lambda v, m: jnp.sum((v - m) ** 2, axis=0), values, mean)
    return _Moments(count, mean, m2)


def _merge(a: _Moments, b: _Moments) -> _Moments:
    """Chan et al.'s pairwise update of count, mean and sum of squared deviations."""
    count = a.n + b.n
    weight = b.n / count
    cross = a.n * b.n / count
    mean = jax.tree_util.tree_map(lambda ma, mb: ma + (mb - ma) * weight, a.mean, b.mean)
    m2 = jax.tree_util.tree_map(
        lambda sa, sb, ma, mb: sa + sb + (mb - ma) ** 2 * cross, a.m2, b.m2, a.mean, b.mean
    )
    return _Moments(count, mean, m2)


def monte_carlo_kernel_fn(
    model: linen.Module | tuple[Callable[..., Any], Callable[..., Any]],
    key: jax.Array,
    num_samples: int,
    *,
    batch_size: int | None = None,
    ntk_method: NTKMethod = "auto",
) -> Callable[..., MonteCarloKernel]:
    """Returns ``kernel(x1, x2=None) -> MonteCarloKernel``: mean empirical NNGP and NTK per
    output over ``num_samples`` random initializations, with standard errors.

    Args:
      model: a ``flax.linen`` module (``model.init(key, x)`` / ``model.apply``), or a pair
        ``(init_fn, apply_fn)`` with ``init_fn(key, x) -> params`` and
        ``apply_fn(params, x) -> (N, *out)``.
      key: the PRNG key; draw s uses ``jax.random.split(key, num_samples)[s]``, so a result
        does not depend on ``batch_size`` (beyond rounding).
      num_samples: S >= 1 initializations (>= 2 for a standard error; it is NaN for S = 1).
      batch_size: draws evaluated at once with ``jax.vmap`` (default: all of them).
      ntk_method: as in :func:`ntkjax.empirical_ntk_fn`.

    Returns:
      ``kernel(x1, x2=None, *, key=None)``, jitted (one compilation per input shape);
      ``x2=None`` means ``x2 = x1``; ``key`` replaces the construction's key for this call
      (independent draws without recompiling).

    >>> import jax
    >>> from ntkjax.models import MLP
    >>> mc = monte_carlo_kernel_fn(MLP(features=(64, 2)), jax.random.key(0), 8, batch_size=4)
    >>> k = mc(jax.random.normal(jax.random.key(1), (3, 5)))
    >>> k.nngp.shape, k.ntk_stderr.shape, k.num_samples
    ((3, 3), (3, 3), 8)
    """
    init_fn: Callable[..., Any]
    apply_fn: Callable[..., Any]
    if isinstance(model, linen.Module):
        init_fn, apply_fn = model.init, model.apply
    elif isinstance(model, tuple) and len(model) == 2 and all(map(callable, model)):
        init_fn, apply_fn = model
    else:
        raise ValueError("model must be a flax.linen module or a pair (init_fn, apply_fn); got "
                         f"{type(model).__name__}.")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    num_samples = int(num_samples)
    if batch_size is None:
        batch_size = num_samples
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    batch_size = min(int(batch_size), num_samples)
    ntk_fn = empirical_ntk_fn(apply_fn, ntk_method=ntk_method, outputs="mean")
    nngp_fn = empirical_nngp_fn(apply_fn, outputs="mean")
    keys = jax.random.split(key, num_samples)
    full, rest = divmod(num_samples, batch_size)

    def draws(batch_keys, x1, x2):
        def one(k):
            params = init_fn(k, x1[:1])
            return nngp_fn(params, x1, x2), ntk_fn(params, x1, x2)

        return jax.vmap(one)(batch_keys)

    @jax.jit
    def kernel_impl(keys, x1, x2):
        first = _batch_moments(draws(keys[:batch_size], x1, x2))
        if full > 1:
            batched = keys[batch_size : full * batch_size].reshape(
                full - 1, batch_size, *keys.shape[1:]
            )

            def step(acc, batch_keys):
                return _merge(acc, _batch_moments(draws(batch_keys, x1, x2))), None

            first, _ = jax.lax.scan(step, first, batched)
        if rest:
            first = _merge(first, _batch_moments(draws(keys[full * batch_size :], x1, x2)))
        (nngp, ntk), (m2_nngp, m2_ntk) = first.mean, first.m2
        denom = max(num_samples - 1, 0)
        scale = jnp.asarray(jnp.nan if denom == 0 else 1.0 / (denom * num_samples), nngp.dtype)
        return nngp, ntk, jnp.sqrt(m2_nngp * scale), jnp.sqrt(m2_ntk * scale)

    def kernel(
        x1: jax.Array, x2: jax.Array | None = None, *, key: jax.Array | None = None
    ) -> MonteCarloKernel:
        check_pair(x1, x2)
        draw_keys = keys if key is None else jax.random.split(key, num_samples)
        nngp, ntk, se_nngp, se_ntk = kernel_impl(draw_keys, x1, x2)
        return MonteCarloKernel(nngp, ntk, se_nngp, se_ntk, num_samples)

    return kernel
