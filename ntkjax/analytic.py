"""Closed-form kernels of the two-layer ReLU network without biases (Jacot et al. 2018).

``f(x) = (1/sqrt(m)) sum_j v_j relu(w_j . x)`` with ``w_j ~ N(0, I_d)``, ``v_j ~ N(0, 1)``, no
biases, ``m -> infinity``. :func:`two_layer_relu_nngp` is the kernel of training the readout
alone; :func:`two_layer_relu_ntk` the NTK of training both layers. Every other architecture's
kernels come from :func:`ntkjax.kernel_fn` of its module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ntkjax._checks import check_pair, float_dtype
from ntkjax.nn.activations import relu

__all__ = ["two_layer_relu_nngp", "two_layer_relu_ntk"]


def _two_layer_inputs(x1: Any, x2: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    check_pair(x1, x2)
    x1 = jnp.asarray(x1)
    x2 = x1 if x2 is None else jnp.asarray(x2)
    dtype = float_dtype(x1, x2)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    gram = jnp.matmul(x1, x2.T, precision=jax.lax.Precision.HIGHEST)
    return gram, jnp.sum(x1 * x1, axis=1)[:, None], jnp.sum(x2 * x2, axis=1)[None, :]


def two_layer_relu_nngp(x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
    r"""The NNGP of the two-layer ReLU network: the NTK with the first layer frozen.

    For ``f(x) = (1/sqrt(m)) sum_j v_j relu(w_j . x)`` with ``w_j ~ N(0, I_d)``, ``v_j ~ N(0, 1)``
    (no biases, no 1/sqrt(d) on the first layer) and ``m -> infinity``:

    $$K(x, x') = \mathbb{E}[\mathrm{relu}(w \cdot x)\, \mathrm{relu}(w \cdot x')]
      = \frac{\|x\| \|x'\|}{2\pi} \left(\sin t + (\pi - t) \cos t\right),$$

    ``t`` the angle between x and x'. It is the NTK of training only the readout ``v`` -- not the
    NTK of the network, which is :func:`two_layer_relu_ntk`. Shapes: ``(N1, d), (N2, d) ->
    (N1, N2)``; ``x2 = None`` means ``x2 = x1``.

    Args:
      x1: inputs ``(N1, d)``.
      x2: inputs ``(N2, d)``, or None for ``x2 = x1``.

    Returns:
      The ``(N1, N2)`` kernel matrix.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(two_layer_relu_nngp(x).round(4))  # 1/2 on the diagonal, 1/(2 pi) off it
    [[0.5    0.1592]
     [0.1592 0.5   ]]
    """
    gram, q11, q22 = _two_layer_inputs(x1, x2)
    return relu.kernel_maps(gram, q11, q22).sigma


def two_layer_relu_ntk(x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
    r"""NTK of the two-layer ReLU network with both layers trained (Jacot et al. 2018).

    Same network as :func:`two_layer_relu_nngp`, ``f(x) = (1/sqrt(m)) sum_j v_j relu(w_j . x)``
    with ``w_j ~ N(0, I_d)``, ``v_j ~ N(0, 1)``, m -> infinity. The gradient w.r.t. ``v`` gives the
    NNGP, the gradient w.r.t. ``w`` adds ``x.x' E[relu'(w.x) relu'(w.x')]``:

    $$\Theta(x, x') = \frac{\|x\| \|x'\|}{2\pi} \left(\sin t + (\pi - t) \cos t\right)
      + x \cdot x' \, \frac{\pi - t}{2\pi}.$$

    In ntkjax terms it is ``d * kernel_fn(MLP((m, 1), "relu", w_std=1, b_std=0))(x1, x2).ntk``
    (NTK parameterization divides the first layer by sqrt(d)).

    Args:
      x1: inputs ``(N1, d)``.
      x2: inputs ``(N2, d)``, or None for ``x2 = x1``.

    Returns:
      The ``(N1, N2)`` kernel matrix.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(two_layer_relu_ntk(x).round(4))  # 1/2 + 1/2 on the diagonal; x.x' = 0 off it
    [[1.     0.1592]
     [0.1592 1.    ]]
    """
    gram, q11, q22 = _two_layer_inputs(x1, x2)
    maps = relu.kernel_maps(gram, q11, q22)
    return maps.sigma + gram * maps.sigma_dot
