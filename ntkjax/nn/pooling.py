"""Readouts and pooling of convolutional features, with their infinite-width rules.

* :func:`flatten`: ``(N, *S, C) -> (N, prod(S) C)``. A dense layer on flattened features has
  independent weights per position, so only matching positions survive:
  ``Sigma[a, b] = mean_p Sigma[a, b, p, p]`` (likewise Theta and the variances).
* :func:`global_average_pool`: ``(N, *S, C) -> (N, C)``, the mean over positions:
  ``Sigma[a, b] = mean_{p, p'} Sigma[a, b, p, p']`` (likewise Theta; the variances from each
  input's full covariance across positions).

(Novak et al. 2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian
Processes", section 3; Arora et al. 2019, CNTK-GAP.)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ntkjax.kernels import Kernel

__all__ = ["flatten", "global_average_pool"]


def _flatten_kernel(k: Kernel) -> Kernel:
    nd = k.spatial_ndim
    if nd == 0:
        return k
    d1, d2 = k.position_variances()
    var1 = jnp.mean(d1.reshape(d1.shape[0], -1), -1)
    var2 = var1 if d2 is d1 else jnp.mean(d2.reshape(d2.shape[0], -1), -1)
    n1, n2 = k.nngp.shape[:2]
    positions = math.prod(k.spatial_shape)

    def diag_mean(a: jax.Array) -> jax.Array:
        a = a.reshape(n1, n2, positions, positions)
        return jnp.mean(jnp.diagonal(a, axis1=2, axis2=3), axis=-1)

    return Kernel(nngp=diag_mean(k.nngp), ntk=diag_mean(k.ntk), var1=var1, var2=var2,
                  width=positions * k.width)


def flatten(x: Any) -> Any:
    """Readout ``(N, *S, C) -> (N, prod(S) C)``.

    On a :class:`~ntkjax.Kernel`: ``Sigma[a, b] = mean_p Sigma[a, b, p, p]`` (likewise Theta),
    ``width = prod(S) C`` (the next layer's fan_in; module docstring). A kernel without spatial
    axes is returned unchanged.

    >>> flatten(jnp.ones((2, 3, 3, 4))).shape
    (2, 36)
    """
    if isinstance(x, Kernel):
        return _flatten_kernel(x)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"flatten needs inputs with a batch axis, got shape {x.shape}.")
    return x.reshape(x.shape[0], -1)


def _global_average_pool_kernel(k: Kernel) -> Kernel:
    if k.spatial_ndim == 0:
        raise ValueError(
            "global_average_pool needs a kernel with spatial axes (inputs of shape "
            "(batch, *spatial, channels)); this one has none."
        )

    def pool(a: jax.Array, lead: int) -> jax.Array:
        return jnp.mean(a, axis=tuple(range(lead, a.ndim)))

    var1, var2 = k.map_variances(lambda v: pool(v, 1))
    return Kernel(nngp=pool(k.nngp, 2), ntk=pool(k.ntk, 2), var1=var1, var2=var2,
                  width=k.width)


def global_average_pool(x: Any) -> Any:
    """Readout ``(N, *S, C) -> (N, C)``, the mean over all spatial positions.

    On a :class:`~ntkjax.Kernel`: ``Sigma[a, b] = mean_{p, p'} Sigma[a, b, p, p']`` (likewise
    Theta), ``width = C`` (module docstring).

    >>> global_average_pool(jnp.ones((2, 3, 3, 4))).shape
    (2, 4)
    """
    if isinstance(x, Kernel):
        return _global_average_pool_kernel(x)
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            "global_average_pool needs inputs of shape (batch, *spatial, channels), got shape "
            f"{x.shape}."
        )
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
