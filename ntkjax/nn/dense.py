r"""Dense layers and their infinite-width rule.

A dense layer in the NTK parameterization is ``y = w_std / sqrt(fan_in) x W + b_std b`` with
``W, b ~ N(0, 1)``; in the standard parameterization ``y = x W + b`` with
``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``. Both give the NNGP map
``Sigma' = w_std^2 Sigma + b_std^2``; their NTK maps differ (Jacot et al. 2018; Lee et al. 2019,
appendix; Sohl-Dickstein et al. 2020 for the standard parameterization):

* NTK parameterization: ``Theta' = Sigma' + w_std^2 Theta``;
* standard: ``Theta' = fan_in Sigma + w_std^2 Theta (+ 1 with a bias)``.

In symbols ($\sigma_w$ = ``w_std``, $\sigma_b$ = ``b_std``, $d$ = ``fan_in``):

$$\Sigma' = \sigma_w^2 \Sigma + \sigma_b^2, \qquad
  \Theta'_{\mathrm{ntk}} = \Sigma' + \sigma_w^2 \Theta, \qquad
  \Theta'_{\mathrm{standard}} = d\, \Sigma + \sigma_w^2 \Theta \; (+1 \text{ with a bias}).$$
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax._checks import check_choice, check_scale, float_dtype, is_concrete
from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, declare

__all__ = ["PARAMETERIZATIONS", "Affine", "Dense", "Parameterization", "dense_features",
           "dense_kernel",
           "dense_kernels", "dense_variance"]

Parameterization = Literal["ntk", "standard"]
PARAMETERIZATIONS: tuple[Parameterization, ...] = ("ntk", "standard")


def _weak(v: Any) -> Any:
    """A Python float for a concrete scalar (numpy scalars included), so that it multiplies
    arrays without promoting their dtype (``np.sqrt(2) * float32`` would be float64 under x64);
    anything else (e.g. a traced value) unchanged."""
    return float(v) if isinstance(v, int | float | np.generic) else v


def dense_variance(
    q: jax.Array, *, w_std: float, b_std: float, use_bias: bool = True,
    unit: jax.Array | None = None,
) -> jax.Array:
    """NNGP (or variance) after a dense layer, in either parameterization:
    ``Sigma <- w_std^2 Sigma + b_std^2`` (``b_std^2`` only with a bias). ``unit``: the stored
    value of a true 1 when ``q`` is stored divided by per-input powers of two (a kernel's
    scaled form), by which the constant term is multiplied; None for true values.

    >>> float(dense_variance(jnp.asarray(1.0), w_std=2.0, b_std=0.5))
    4.25
    """
    w_std, b_std = _weak(w_std), _weak(b_std)
    q = w_std**2 * q
    # a traced b_std (hyperparameters by gradient) is always added
    if not use_bias or (isinstance(b_std, float) and b_std == 0):
        return q
    return q + (b_std**2 if unit is None else b_std**2 * unit)


def dense_kernels(
    nngp: jax.Array,
    ntk: jax.Array,
    *,
    w_std: float,
    b_std: float,
    use_bias: bool = True,
    parameterization: Parameterization = "ntk",
    fan_in: int | None = None,
    unit: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(nngp, ntk)`` after a dense layer from the layer's input kernels (Jacot et al. 2018).

    * NTK parameterization (``y = w_std/sqrt(fan_in) x W + b_std b``, W, b ~ N(0, 1)):
      ``Sigma' = w_std^2 Sigma + b_std^2`` and ``Theta' = Sigma' + w_std^2 Theta``.
    * Standard parameterization (``y = x W + b``, W ~ N(0, w_std^2 / fan_in), b ~ N(0, b_std^2)):
      the same ``Sigma'``, and ``Theta' = fan_in Sigma + w_std^2 Theta (+ 1 with a bias)`` -- the
      expected NTK of the finite network, which grows with the actual ``fan_in`` (the gradient
      of ``x W`` w.r.t. W contributes ``x.x' = fan_in Sigma``, the bias's gradient is 1).

    ``unit``: as in :func:`dense_variance`, for kernels stored in a scaled form (every constant
    term, ``b_std^2`` and the standard parameterization's 1, is multiplied by it).

    >>> nngp, ntk = dense_kernels(jnp.asarray(1.0), jnp.asarray(0.0), w_std=1.0, b_std=0.0)
    >>> float(nngp), float(ntk)
    (1.0, 1.0)
    """
    w_std, b_std = _weak(w_std), _weak(b_std)
    new_nngp = dense_variance(nngp, w_std=w_std, b_std=b_std, use_bias=use_bias, unit=unit)
    if parameterization == "ntk":
        return new_nngp, new_nngp + w_std**2 * ntk
    if parameterization == "standard":
        if fan_in is None:
            raise ValueError("the standard parameterization needs the layer's fan_in.")
        new_ntk = fan_in * nngp + w_std**2 * ntk
        if not use_bias:
            return new_nngp, new_ntk
        return new_nngp, new_ntk + (1 if unit is None else unit)
    raise ValueError(
        f"unknown parameterization {parameterization!r}; allowed: 'ntk', 'standard'."
    )


def dense_kernel(
    k: Kernel,
    features: int,
    *,
    w_std: float,
    b_std: float,
    use_bias: bool = True,
    parameterization: Parameterization = "ntk",
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after a dense layer with ``features`` outputs
    (:func:`dense_kernels` with ``fan_in = k.width``).

    With spatial axes the layer acts per position (one weight matrix shared by all positions, as
    ``flax.linen.Dense`` on the channel axis): the rule applies to every entry ``[a, b, p, p']``
    (or ``[a, b, p]`` of a same-position kernel).

    Scale-aware: a kernel's scaled form (:attr:`~ntkjax.Kernel.scaled`, stored = true /
    ``2^(s1_i + s2_j)``) is mapped alongside, the bias term becoming
    ``b_std^2 2^-(s1_i + s2_j)`` (and the standard parameterization's ``+1`` likewise); the
    output keeps the input's scales.

    >>> import jax.numpy as jnp, ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.array([[3e20, 4e20]]))  # x . x / d = 1.25e41
    >>> out = dense_kernel(k, 1, w_std=1.0, b_std=1.0)
    >>> bool(jnp.isinf(out.nngp[0, 0])), float(out.scaled.nngp[0, 0]) > 0
    (True, True)
    """
    if k.scaled is not None:
        return _scaled_dense_kernel(k, features, w_std=w_std, b_std=b_std, use_bias=use_bias,
                                    parameterization=parameterization)
    nngp, ntk = dense_kernels(
        k.nngp, k.ntk, w_std=w_std, b_std=b_std, use_bias=use_bias,
        parameterization=parameterization, fan_in=k.width,
    )
    var1, var2 = k.map_variances(
        lambda v: dense_variance(v, w_std=w_std, b_std=b_std, use_bias=use_bias)
    )
    return k.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=int(features),
                     non_gaussian="")  # a dense layer's outputs are Gaussian again


def _scaled_dense_kernel(k: Kernel, features: int, *, w_std: float, b_std: float,
                         use_bias: bool, parameterization: Parameterization) -> Kernel:
    """:func:`dense_kernel` of a kernel with a scaled form: :func:`dense_kernels` on the stored
    kernels with each constant term divided by the pair's scale ``2^(s1_i + s2_j)`` (each
    input's ``2^(2 s_i)`` for the variances)."""
    p = k.scaled
    assert p is not None
    pairs, ones1, ones2 = p.stored_ones()  # a true 1, stored: 2^-(s1_i + s2_j), 2^-2s
    nngp, ntk = dense_kernels(
        p.nngp, p.ntk, w_std=w_std, b_std=b_std, use_bias=use_bias,
        parameterization=parameterization, fan_in=k.width, unit=pairs,
    )

    def variance(v: jax.Array, one: jax.Array) -> jax.Array:
        return dense_variance(v, w_std=w_std, b_std=b_std, use_bias=use_bias, unit=one)

    var1 = variance(p.var1, ones1)
    var2 = var1 if k.same_inputs else variance(p.var2, ones2)
    return k.with_scaled(p.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2),
                         width=int(features), non_gaussian="")


def dense_features(
    phi: jax.Array,
    psi: jax.Array,
    *,
    w_std: float,
    b_std: float,
    use_bias: bool,
    parameterization: Parameterization,
    fan_in: int,
) -> tuple[jax.Array, jax.Array]:
    """Random features after a dense layer, exact: a sum of kernels has the concatenated
    features and a scaled kernel the scaled ones, so from ``Sigma' = w^2 Sigma + b^2`` and
    ``Theta' = Sigma' + w^2 Theta`` (NTK parameterization) or
    ``Theta' = fan_in Sigma + w^2 Theta (+ 1)`` (standard): ``phi' = [w phi, b]`` and
    ``psi' = [phi', w psi]`` or ``[sqrt(fan_in) phi, w psi, 1]`` (the last axis holds the
    features; a zero bias adds no column).
    """
    w, b = float(w_std), float(b_std)
    ones = jnp.ones((*phi.shape[:-1], 1), phi.dtype)
    parts = [w * phi]
    if use_bias and b != 0:
        parts.append(b * ones)
    new_phi = jnp.concatenate(parts, axis=-1)
    if parameterization == "ntk":
        return new_phi, jnp.concatenate([new_phi, w * psi], axis=-1)
    parts = [math.sqrt(fan_in) * phi, w * psi]
    if use_bias:
        parts.append(ones)
    return new_phi, jnp.concatenate(parts, axis=-1)


class Affine(linen.Module):
    """The configuration shared by :class:`Dense` and :class:`~ntkjax.nn.Conv` (fields and
    validation)."""

    features: int
    _: dataclasses.KW_ONLY
    w_std: float = 1.0
    b_std: float | None = 0.0
    use_bias: bool = True
    parameterization: Parameterization = "ntk"
    param_dtype: Any = None

    def _check(self) -> None:
        check_choice(self.parameterization, PARAMETERIZATIONS, "parameterization")
        if int(self.features) != self.features or self.features < 1:
            raise ValueError(f"features must be a positive integer, got {self.features!r}.")
        check_scale(self.w_std, "w_std")
        if self.b_std is not None:
            check_scale(self.b_std, "b_std")

    @property
    def _bias_std(self) -> float:
        """``b_std`` (0 for ``b_std=None``)."""
        return 0.0 if self.b_std is None else self.b_std

    @property
    def _with_bias(self) -> bool:
        """Whether the layer adds a bias: ``use_bias`` and ``b_std`` is not None (nt's
        ``b_std=None`` means no bias)."""
        return self.use_bias and self.b_std is not None

    @property
    def _bias_parameter(self) -> bool:
        """Whether the finite layer has a ``bias`` parameter: with a bias in the standard
        parameterization (it starts at ``N(0, b_std^2)``, 0 for ``b_std = 0``, and is trained);
        in the NTK parameterization only for ``b_std > 0`` (``b_std * b`` with ``b_std = 0``
        has neither an effect nor a gradient)."""
        if self.parameterization == "standard":
            return self._with_bias
        return self._with_bias and not (is_concrete(self._bias_std) and self._bias_std == 0)

    def _check_fan_in(self, fan_in: int, shape: tuple[int, ...]) -> None:
        if fan_in < 1:
            raise ValueError(
                f"{type(self).__name__} needs at least one input feature; got inputs of shape "
                f"{shape} (fan_in {fan_in})."
            )

    def _param_dtype(self, x: jax.Array) -> Any:
        """``param_dtype``, or the input's floating dtype (the default float for integers)."""
        return self.param_dtype if self.param_dtype is not None else float_dtype(x)


class Dense(Affine):
    """A dense layer in the NTK or the standard parameterization.

    * ``parameterization="ntk"``: ``y = w_std / sqrt(fan_in) * x @ W + b_std * b`` with
      ``W, b ~ N(0, 1)`` (Jacot et al. 2018).
    * ``parameterization="standard"``: ``y = x @ W + b`` with ``W ~ N(0, w_std^2 / fan_in)``,
      ``b ~ N(0, b_std^2)`` (b starts at 0 when b_std = 0 but is still trained).

    Both give the same function distribution at initialization and the same NNGP
    (``Sigma <- w_std^2 Sigma + b_std^2``); their NTKs differ (see :func:`dense_kernels`).
    Parameters ``kernel`` (fan_in, features) and ``bias`` (features,), in ``param_dtype``
    (default: the input's floating dtype). The ``bias`` parameter exists with a bias in the
    standard parameterization (even at ``b_std = 0``: it starts at 0 and is trained) and, in the
    NTK parameterization, only for ``b_std > 0`` (``0 * b`` has no effect and no gradient) --
    the same rule as :class:`~ntkjax.nn.Conv`. ``b_std=None`` means no bias, as in
    neural-tangents (the same as ``use_bias=False``). On a :class:`~ntkjax.Kernel` the layer
    applies its kernel rule (:func:`dense_kernel`) and creates no parameters. Configuration
    after ``features`` is keyword-only.

    Attributes:
      features: number of outputs.
      w_std: weight standard deviation (>= 0).
      b_std: bias standard deviation (>= 0), or None for no bias.
      use_bias: whether the layer has a bias.
      parameterization: ``"ntk"`` or ``"standard"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.

    >>> import jax, ntkjax
    >>> layer = Dense(3, w_std=1.5)
    >>> x = jnp.ones((2, 4))
    >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
    (2, 3)
    >>> ntkjax.kernel_fn(layer)(x).ntk.shape
    (2, 2)
    """

    _: dataclasses.KW_ONLY  # (the fields of Affine after features are keyword-only too)

    @linen.compact
    def __call__(self, x: Any) -> Any:
        self._check()
        if isinstance(x, FeatureStandIn):
            return _MEANINGS.on_features(x, self.__call__, self)
        if isinstance(x, Kernel):
            return dense_kernel(
                x, self.features, w_std=self.w_std, b_std=self._bias_std,
                use_bias=self._with_bias, parameterization=self.parameterization,
            )
        x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Dense needs inputs with a feature axis, got shape {x.shape}.")
        dtype = self._param_dtype(x)
        fan_in = x.shape[-1]
        self._check_fan_in(fan_in, x.shape)
        shape = (fan_in, self.features)
        if self.parameterization == "ntk":
            w = self.param("kernel", linen.initializers.normal(1.0), shape, dtype)
            y = (float(self.w_std) / math.sqrt(fan_in)) * jnp.matmul(x.astype(dtype), w)
            if self._bias_parameter:
                b = self.param("bias", linen.initializers.normal(1.0), (self.features,), dtype)
                y = y + float(self._bias_std) * b
            return y
        w_init = linen.initializers.normal(self.w_std / math.sqrt(fan_in))
        w = self.param("kernel", w_init, shape, dtype)
        y = jnp.matmul(x.astype(dtype), w)
        if self._bias_parameter:
            b_init = linen.initializers.normal(self._bias_std)
            b = self.param("bias", b_init, (self.features,), dtype)
            y = y + b
        return y


def _dense_layer_features(x: FeatureStandIn, exact: Kernel, module: Dense):
    return dense_features(x.phi, x.psi, w_std=module.w_std, b_std=module._bias_std,
                          use_bias=module._with_bias, parameterization=module.parameterization,
                          fan_in=x.exact.width)


_MEANINGS = declare(
    Dense, kernel=dense_kernel, features=_dense_layer_features, structured="dense",
    probe_scales=True, scale_aware=True,
)
