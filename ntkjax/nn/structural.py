"""Structural layers: elementwise functions given by their NNGP map.

:func:`elementwise_nngp` is neural-tangents' ``stax.Elementwise(fn, nngp_fn, d_nngp_fn)``: an
elementwise nonlinearity ``phi`` whose infinite-width rule the user states in closed form.
For jointly Gaussian pre-activations ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])``

* the NNGP becomes ``nngp_fn(q12, q11, q22) = E[phi(u) phi(v)]``,
* the NTK becomes ``d_nngp_fn(q12, q11, q22) * Theta`` with
  ``d_nngp_fn = E[phi'(u) phi'(v)] = d nngp_fn / d q12`` (Price's theorem; Novak et al. 2020,
  "Neural Tangents", ``Elementwise``), computed by forward-mode autodiff of ``nngp_fn`` in
  ``q12`` when not given,
* each input's variance becomes ``nngp_fn(q, q, q)``.

Each layer's kernel rule is a small function of its own (:func:`elementwise_nngp_maps`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ntkjax.nn.activations import Activation, ActivationMaps

__all__ = ["elementwise_nngp", "elementwise_nngp_maps"]

NNGPFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def elementwise_nngp_maps(
    nngp_fn: NNGPFn, d_nngp_fn: NNGPFn | None, q12: jax.Array, q11: jax.Array, q22: jax.Array
) -> ActivationMaps:
    """The kernel maps of :func:`elementwise_nngp`: ``sigma = nngp_fn(q12, q11, q22)`` and
    ``sigma_dot = d_nngp_fn(q12, q11, q22)``, or, without ``d_nngp_fn``, the derivative of
    ``nngp_fn`` in ``q12`` by a forward-mode JVP (``nngp_fn`` is elementwise, so the JVP with
    a tangent of ones is the entrywise derivative).

    >>> m = elementwise_nngp_maps(lambda c, a, b: c**2, None, jnp.array([3.0]), 1.0, 1.0)
    >>> print(m.sigma, m.sigma_dot)
    [9.] [6.]
    """
    q12 = jnp.asarray(q12)
    q11 = jnp.broadcast_to(jnp.asarray(q11, q12.dtype), q12.shape)
    q22 = jnp.broadcast_to(jnp.asarray(q22, q12.dtype), q12.shape)
    if d_nngp_fn is not None:
        return ActivationMaps(
            jnp.asarray(nngp_fn(q12, q11, q22), q12.dtype),
            jnp.asarray(d_nngp_fn(q12, q11, q22), q12.dtype),
        )
    sigma, sigma_dot = jax.jvp(lambda c: nngp_fn(c, q11, q22), (q12,), (jnp.ones_like(q12),))
    return ActivationMaps(jnp.asarray(sigma, q12.dtype), jnp.asarray(sigma_dot, q12.dtype))


def elementwise_nngp(
    fn: Callable[[jax.Array], jax.Array],
    nngp_fn: NNGPFn,
    d_nngp_fn: NNGPFn | None = None,
    *,
    name: str | None = None,
) -> Activation:
    """An elementwise layer ``fn`` whose kernel rule is the user's NNGP map (neural-tangents'
    ``Elementwise(fn, nngp_fn, d_nngp_fn)``; see the module doc for the rule).

    Args:
      fn: the elementwise function on arrays (the finite network).
      nngp_fn: ``nngp_fn(cov12, var1, var2) = E[fn(u) fn(v)]`` for jointly Gaussian ``(u, v)``
        with covariance ``cov12`` and variances ``var1``, ``var2`` (elementwise in its
        arguments, written with ``jax.numpy``).
      d_nngp_fn: ``E[fn'(u) fn'(v)]`` with the same arguments; None takes the derivative of
        ``nngp_fn`` in ``cov12`` by autodiff (Price's theorem).
      name: the layer's name (default ``elementwise_nngp(<fn name>)``).

    Returns:
      An :class:`~ntkjax.nn.Activation`: ``fn`` on arrays, the rule on a Kernel.

    Raises:
      ValueError: ``fn``, ``nngp_fn`` or ``d_nngp_fn`` not callable.

    ``erf`` with its NNGP map (Williams 1997), ``(2/pi) arcsin(2 c / sqrt((1 + 2 a)(1 + 2 b)))``:

    >>> import jax, jax.numpy as jnp
    >>> erf = elementwise_nngp(
    ...     jax.scipy.special.erf,
    ...     lambda c, a, b: 2 / jnp.pi * jnp.arcsin(2 * c / jnp.sqrt((1 + 2 * a) * (1 + 2 * b))))
    >>> print(erf(jnp.array([0.0])))
    [0.]
    """
    for arg, label in ((fn, "fn"), (nngp_fn, "nngp_fn")):
        if not callable(arg):
            raise ValueError(f"elementwise_nngp: {label} must be callable, got "
                             f"{type(arg).__name__}.")
    if d_nngp_fn is not None and not callable(d_nngp_fn):
        raise ValueError(f"elementwise_nngp: d_nngp_fn must be callable or None, got "
                         f"{type(d_nngp_fn).__name__}.")

    def maps(q12: jax.Array, q11: jax.Array, q22: jax.Array) -> ActivationMaps:
        return elementwise_nngp_maps(nngp_fn, d_nngp_fn, q12, q11, q22)

    def variance(q: jax.Array) -> jax.Array:
        q = jnp.asarray(q)
        return jnp.asarray(nngp_fn(q, q, q), q.dtype)

    label = name or f"elementwise_nngp({getattr(fn, '__name__', repr(fn))})"
    return Activation(fn, maps, variance, name=label,
                      doc=f"Activation {label} with a user-given NNGP map.")
