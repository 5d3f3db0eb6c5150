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

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax._checks import check_choice, check_pair, is_concrete
from ntkjax.empirical import (
    OUTPUTS,
    BatchMode,
    NTKMethod,
    Outputs,
    empirical_nngp_fn,
    empirical_ntk_fn,
    is_batch_coupled,
)

__all__ = ["MonteCarloKernel", "monte_carlo_kernel_fn"]


class MonteCarloKernel(NamedTuple):
    """Mean empirical kernels over ``num_samples`` initializations and their standard errors
    (``std over draws / sqrt(num_samples)``, ddof = 1, entrywise); all ``(N1, N2)``, or with
    the output axes that ``outputs`` asks for.

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


def _sample_counts(num_samples: Any) -> tuple[int, ...]:
    """``num_samples`` (an int or a sequence of them) as increasing positive counts."""
    counts = list(num_samples) if isinstance(num_samples, Sequence) else [num_samples]
    if not counts or any(
        isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 1 for c in counts
    ):
        raise ValueError(f"num_samples must be a positive integer or a non-empty sequence of "
                         f"them; got {num_samples!r}.")
    if any(b <= a for a, b in itertools.pairwise(counts)):
        raise ValueError(f"num_samples must be strictly increasing; got {num_samples!r}.")
    return tuple(int(c) for c in counts)


def monte_carlo_kernel_fn(
    model: linen.Module | tuple[Callable[..., Any], Callable[..., Any]],
    key: jax.Array,
    num_samples: int | Sequence[int],
    *,
    batch_size: int | None = None,
    ntk_method: NTKMethod = "auto",
    outputs: Outputs = "mean",
) -> Callable[..., Any]:
    """Returns ``kernel(x1, x2=None) -> MonteCarloKernel``: mean empirical NNGP and NTK per
    output over ``num_samples`` random initializations, with standard errors.

    With a sequence of sample counts ``(S_1 < S_2 < ...)`` (neural-tangents' list
    ``n_samples``) one pass over ``S_max`` draws returns one estimate per count: the estimate
    for ``S_k`` is the mean over the first ``S_k`` draws (the same as a separate call with
    ``num_samples=S_k``), the moments merged on from the previous count.

    Args:
      model: a ``flax.linen`` module (``model.init(key, x)`` / ``model.apply``), or a pair
        ``(init_fn, apply_fn)`` with ``init_fn(key, x) -> params`` and
        ``apply_fn(params, x) -> (N, *out)``.
      key: the PRNG key; draw s uses ``jax.random.split(key, S)[s]`` (``S`` the largest
        count), so a result depends neither on ``batch_size`` (beyond rounding) nor on the
        other counts.
      num_samples: S >= 1 initializations (>= 2 for a standard error; it is NaN for S = 1), or
        a strictly increasing sequence of counts.
      batch_size: draws evaluated at once with ``jax.vmap`` (default: all of them).
      ntk_method: as in :func:`ntkjax.empirical_ntk_fn`.
      outputs: the output axes of the kernels (neural-tangents' ``trace_axes``):
        ``"mean"`` (default; ``trace_axes=(-1,)``) and ``"trace"`` give ``(N1, N2)``,
        ``"diagonal"`` ``(N1, N2, O)``, ``"full"`` (``trace_axes=()``) ``(N1, N2, O, O)``; as
        in :func:`ntkjax.empirical_ntk_fn` and :func:`ntkjax.empirical_nngp_fn`.

    Returns:
      ``kernel(x1, x2=None, *, key=None)``, jitted (one compilation per input shape);
      ``x2=None`` means ``x2 = x1``; ``key`` replaces the construction's key for this call
      (independent draws without recompiling). It returns one ``MonteCarloKernel``, or a
      list of them (one per count) when ``num_samples`` is a sequence. A batch-coupled model
      (:func:`ntkjax.is_batch_coupled`, probed once per input shapes on the first draw) gets
      the NTK of the whole batch.

    >>> import jax
    >>> from ntkjax.models import MLP
    >>> mc = monte_carlo_kernel_fn(MLP(features=(64, 2)), jax.random.key(0), 8, batch_size=4)
    >>> k = mc(jax.random.normal(jax.random.key(1), (3, 5)))
    >>> k.nngp.shape, k.ntk_stderr.shape, k.num_samples
    ((3, 3), (3, 3), 8)
    >>> mc = monte_carlo_kernel_fn(MLP(features=(64, 2)), jax.random.key(0), [2, 8],
    ...                            outputs="full")
    >>> [(k.ntk.shape, k.num_samples) for k in mc(jax.random.normal(jax.random.key(1), (3, 5)))]
    [((3, 3, 2, 2), 2), ((3, 3, 2, 2), 8)]
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
    counts = _sample_counts(num_samples)
    check_choice(outputs, OUTPUTS, "outputs")
    total = counts[-1]
    if batch_size is None:
        batch_size = total
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    batch_size = int(batch_size)
    modes: dict[bool | None, BatchMode] = {None: "auto", False: "per_sample", True: "whole"}
    ntk_fns = {
        coupled: empirical_ntk_fn(apply_fn, ntk_method=ntk_method, outputs=outputs, batch=mode)
        for coupled, mode in modes.items()
    }
    nngp_fn = empirical_nngp_fn(apply_fn, outputs=outputs)
    keys = jax.random.split(key, total)
    decisions: dict[Any, bool] = {}

    def draws(batch_keys, x1, x2, coupled):
        def one(k):
            params = init_fn(k, x1[:1])
            return nngp_fn(params, x1, x2), ntk_fns[coupled](params, x1, x2)

        return jax.vmap(one)(batch_keys)

    def segment(keys, x1, x2, coupled) -> _Moments:
        """The moments of the draws of ``keys``, ``batch_size`` at a time."""
        size = min(batch_size, keys.shape[0])
        full, rest = divmod(keys.shape[0], size)
        acc = _batch_moments(draws(keys[:size], x1, x2, coupled))
        if full > 1:
            batched = keys[size : full * size].reshape(full - 1, size, *keys.shape[1:])

            def step(acc, batch_keys):
                return _merge(acc, _batch_moments(draws(batch_keys, x1, x2, coupled))), None

            acc, _ = jax.lax.scan(step, acc, batched)
        if rest:
            acc = _merge(acc, _batch_moments(draws(keys[full * size :], x1, x2, coupled)))
        return acc

    @functools.partial(jax.jit, static_argnums=3)
    def kernel_impl(keys, x1, x2, coupled):
        estimates = []
        acc = None
        for start, stop in zip((0, *counts[:-1]), counts, strict=True):
            part = segment(keys[start:stop], x1, x2, coupled)
            acc = part if acc is None else _merge(acc, part)
            (nngp, ntk), (m2_nngp, m2_ntk) = acc.mean, acc.m2
            denom = stop - 1
            scale = jnp.asarray(jnp.nan if denom == 0 else 1.0 / (denom * stop), nngp.dtype)
            estimates.append((nngp, ntk, jnp.sqrt(m2_nngp * scale), jnp.sqrt(m2_ntk * scale)))
        return estimates

    def batch_coupling(draw_keys, x1, x2) -> bool | None:
        """Whether the model couples its batch, probed once per input shapes on draw 0
        (None when the inputs are traced)."""
        shapes = tuple((np.shape(a), jnp.result_type(a)) for a in (x1, x2) if a is not None)
        if shapes not in decisions:
            if not all(is_concrete(a) for a in (x1, x2, draw_keys)):
                return None
            params = init_fn(draw_keys[0], x1[:1])
            decisions[shapes] = is_batch_coupled(apply_fn, params, x1, x2)
        return decisions[shapes]

    def kernel(x1: jax.Array, x2: jax.Array | None = None, *, key: jax.Array | None = None
               ) -> Any:
        check_pair(x1, x2)
        draw_keys = keys if key is None else jax.random.split(key, total)
        coupled = batch_coupling(draw_keys, x1, x2)
        estimates = [
            MonteCarloKernel(nngp, ntk, se_nngp, se_ntk, count)
            for (nngp, ntk, se_nngp, se_ntk), count in zip(
                kernel_impl(draw_keys, x1, x2, coupled), counts, strict=True
            )
        ]
        return estimates if isinstance(num_samples, Sequence) else estimates[0]

    return kernel
