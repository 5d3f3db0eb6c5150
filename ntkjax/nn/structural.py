"""Structural layers: indexing, products with a constant, elementwise functions given by their
NNGP map.

:func:`index` is neural-tangents' ``stax.Index(idx)``: ``x[idx]`` on arrays ``(N, *S, C)``. On
a Kernel the positions are independent coordinates of the kernel arrays, so the rule indexes
both position axes of every entry: ``Sigma'[a, b, p, p'] = Sigma[a, b, idx_S(p), idx_S(p')]``
(likewise Theta and the variances); a slice of the channels changes nothing but the width
(channels are exchangeable), the batch axis must be kept whole.

:func:`image_resize` is ``stax.ImageResize``: ``jax.image.resize`` of the spatial axes, a linear
map ``R_i`` (an ``(m, n)`` matrix, :func:`resize_matrix`) per axis, so on a Kernel
``Sigma' = R Sigma R^T`` on both position axes of every entry (likewise Theta and the
variances).

:func:`scale` is ``stax.DotGeneral`` with a scalar constant (``x * c``): ``Sigma' = c^2 Sigma``,
``Theta' = c^2 Theta``.

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

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, declare
from ntkjax.nn.activations import Activation, ActivationMaps

__all__ = ["dot_general", "dot_general_kernel", "elementwise_nngp", "elementwise_nngp_maps",
           "image_resize", "image_resize_kernel",
           "index", "index_kernel", "resize_matrix", "scale", "scale_kernel"]

_NNGPFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def elementwise_nngp_maps(
    nngp_fn: _NNGPFn, d_nngp_fn: _NNGPFn | None, q12: jax.Array, q11: jax.Array, q22: jax.Array
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
    nngp_fn: _NNGPFn,
    d_nngp_fn: _NNGPFn | None = None,
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


def _normalized_index(idx: Any, ndim: int) -> tuple[Any, ...]:
    """``idx`` as one int or slice per axis of an ``ndim``-axis array (``...`` expanded)."""
    items = tuple(idx) if isinstance(idx, tuple | list) else (idx,)
    for item in items:
        if not (item is Ellipsis or isinstance(item, slice)
                or (isinstance(item, int) and not isinstance(item, bool))):
            raise ValueError(f"index: idx may hold ints, slices and one '...'; got {item!r} in "
                             f"{idx!r}.")
    if sum(item is Ellipsis for item in items) > 1:
        raise ValueError(f"index: idx may hold at most one '...'; got {idx!r}.")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        items = items[:at] + (slice(None),) * max(fill, 0) + items[at + 1 :]
    if len(items) > ndim:
        raise ValueError(f"index: idx {idx!r} has {len(items)} entries for inputs with {ndim} "
                         "axes (batch, *spatial, channels).")
    return items + (slice(None),) * (ndim - len(items))


def index_kernel(k: Kernel, idx: Any) -> Kernel:
    """The rule of :func:`index` on a Kernel of inputs ``(N, *S, C)``: the spatial entries of
    ``idx`` index both position axes of the NNGP, the NTK and the variances (``[a, p]`` only,
    for same-position kernels); the channel entry sets the width.

    >>> import ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.ones((2, 4, 3)))
    >>> index_kernel(k, (slice(None), slice(1, 3))).nngp.shape
    (2, 2, 2, 2)
    """
    nd = k.spatial_ndim
    items = _normalized_index(idx, nd + 2)
    batch, spatial, channel = items[0], items[1:-1], items[-1]
    if batch != slice(None):
        raise ValueError(f"index: the kernel rule keeps the batch axis whole; idx {idx!r} "
                         f"indexes it with {batch!r}. Index the inputs before kernel_fn.")
    if not isinstance(channel, slice):
        raise ValueError(f"index: idx {idx!r} removes the channel axis (an int there); the "
                         "layers after it need (N, *S, C) -- use a slice such as i:i+1.")
    width = len(range(k.width)[channel])
    if width == 0:
        raise ValueError(f"index: idx {idx!r} keeps no channel of {k.width}.")
    for i, (item, n) in enumerate(zip(spatial, k.spatial_shape, strict=True)):
        if (isinstance(item, int) and not -n <= item < n) or (
            isinstance(item, slice) and len(range(n)[item]) == 0
        ):
            raise ValueError(f"index: idx {idx!r} selects nothing on spatial axis {i} of size "
                             f"{n}.")
    positions = spatial if k.diagonal_spatial else spatial + spatial

    def take(a: jax.Array | None, lead: int) -> jax.Array | None:
        return None if a is None else a[(slice(None),) * lead + positions]

    var1 = take(k.var1, 1)
    var2 = var1 if k.var2 is k.var1 else take(k.var2, 1)
    out = k.replace(nngp=take(k.nngp, 2), ntk=take(k.ntk, 2), var1=var1, var2=var2,
                    width=width)
    # masks: indexed the same way (neural-tangents' rule)
    return out.map_masks(lambda m: m[(slice(None), *spatial)])


def index(x: Any, idx: Any) -> Any:
    """``x[idx]`` on inputs ``(N, *S, C)`` (neural-tangents' ``stax.Index``); on a Kernel,
    :func:`index_kernel`.

    Args:
      x: an array ``(N, *S, C)`` or its Kernel.
      idx: numpy basic indexing -- a tuple of ints, slices and at most one ``...``, one entry
        per axis (batch, spatial..., channels). On a Kernel the batch entry must be ``:`` and
        the channel entry a slice.

    Returns:
      The indexed array, or its Kernel.

    Raises:
      ValueError: other index entries, an index that removes the channel axis or touches the
        batch axis of a Kernel, or one that selects nothing.

    >>> import ntkjax
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> index(x, (slice(None), slice(1, 7), slice(None, None, 2))).shape
    (2, 6, 4, 3)
    >>> index(ntkjax.kernels.input_kernel(x), (slice(None), 2, ...)).nngp.shape
    (2, 2, 8, 8)
    """
    if isinstance(x, FeatureStandIn):
        return _INDEX.on_features(x, lambda k: index_kernel(k, idx))
    if isinstance(x, Kernel):
        return index_kernel(x, idx)
    x = jnp.asarray(x)
    return x[_normalized_index(idx, x.ndim)]


def scale_kernel(k: Kernel, c: float) -> Kernel:
    """The rule of :func:`scale`: ``c^2`` times the NNGP, the NTK and the variances.

    >>> import ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.ones((2, 3)))
    >>> print(scale_kernel(k, 2.0).nngp)
    [[4. 4.]
     [4. 4.]]
    """
    c2 = float(c) ** 2
    var1, var2 = k.map_variances(lambda v: c2 * v)
    return k.replace(nngp=c2 * k.nngp, ntk=c2 * k.ntk, var1=var1, var2=var2)


def scale(x: Any, c: float) -> Any:
    """The product ``x * c`` with a scalar constant (neural-tangents' ``stax.DotGeneral`` with
    a scalar ``lhs`` or ``rhs``); on a Kernel, :func:`scale_kernel`.

    Args:
      x: an array or its Kernel.
      c: a finite Python or numpy scalar (static).

    Returns:
      ``x * c``, or its Kernel.

    Raises:
      ValueError: a ``c`` that is not a finite scalar.

    >>> print(scale(jnp.array([1.0, -2.0]), 3.0))
    [ 3. -6.]
    """
    if isinstance(c, Sequence) or not math.isfinite(float(c)):
        raise ValueError(f"scale: c must be a finite scalar; got {c!r}.")
    if isinstance(x, FeatureStandIn):
        return _SCALE.on_features(x, lambda k: scale_kernel(k, c), c)
    if isinstance(x, Kernel):
        return scale_kernel(x, c)
    return x * c


def _dot_general_array(x: jax.Array, lhs: Any, rhs: Any, dimension_numbers: Any,
                       precision: Any, batch_first: bool) -> jax.Array:
    """The finite :func:`dot_general` (checked), the input ``x`` in the place of the None
    operand; with ``batch_first`` the input's batch axis moved to the front."""
    x_is_lhs = lhs is None
    const = jnp.asarray(rhs if x_is_lhs else lhs, x.dtype)
    (lc, rc), (lb, rb) = dimension_numbers
    x_contract, x_batch = (lc, lb) if x_is_lhs else (rc, rb)
    c_contract, c_batch = (rc, rb) if x_is_lhs else (lc, lb)
    touched = {int(a) % x.ndim for a in (*x_contract, *x_batch)}
    if 0 in touched or x.ndim - 1 in touched:
        raise ValueError(
            f"dot_general: dimension_numbers {dimension_numbers} contract or batch the input's "
            f"batch axis (0) or channel axis ({x.ndim - 1}) of inputs of shape {x.shape}; only "
            "its spatial axes may be mapped.")
    c_free = const.ndim - len(c_contract) - len(c_batch)
    if x_is_lhs and c_free:
        raise ValueError(
            f"dot_general: with the input as lhs, the constant (shape {const.shape}) may not "
            "keep free axes -- they would follow the channel axis (lax puts lhs free axes "
            "before rhs free axes); pass the input as rhs instead.")
    operands = (x, const) if x_is_lhs else (const, x)
    y = jax.lax.dot_general(*operands, dimension_numbers, precision=precision)
    if batch_first:
        y = jnp.moveaxis(y, len(x_batch) + (0 if x_is_lhs else c_free), 0)
    return y


def dot_general_kernel(k: Kernel, lhs: Any = None, rhs: Any = None,
                       dimension_numbers: Any = (((), ()), ((), ())),
                       precision: Any = None) -> Kernel:
    """The rule of :func:`dot_general` on a Kernel: the layer is a linear map ``M`` of the
    positions (its matrix is the layer applied to one-hot position inputs), so
    ``Sigma'[a, b] = M Sigma[a, b] M^T`` on the two position indices of every entry (likewise
    Theta and the variances); the batch axes stay first. A scalar constant ``c`` is
    :func:`scale_kernel`.

    >>> import ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.ones((2, 3, 1)))
    >>> dot_general_kernel(k, lhs=jnp.ones((1, 3)),
    ...                    dimension_numbers=(((1,), (1,)), ((), ()))).nngp[0, 0].tolist()
    [[9.0]]
    """
    if (lhs is None) == (rhs is None):
        raise ValueError("dot_general: exactly one of lhs and rhs is the constant; the other "
                         "(None) is the layer's input.")
    const = rhs if lhs is None else lhs
    if jnp.ndim(const) == 0:
        return scale_kernel(k, float(const))
    k = k.require_all_pairs("ntkjax.nn.dot_general")
    spatial = k.spatial_shape
    positions = math.prod(spatial)
    probe = jnp.eye(positions, dtype=k.dtype).reshape(positions, *spatial, 1)
    mapped = _dot_general_array(probe, lhs, rhs, dimension_numbers, precision, True)
    new_spatial = tuple(mapped.shape[1:-1])
    m = mapped.reshape(positions, -1).T  # (P', P)
    hi = jax.lax.Precision.HIGHEST

    def pairwise(a: jax.Array) -> jax.Array:
        flat = a.reshape(*a.shape[:2], positions, positions)
        out = jnp.einsum("xp,abpq,yq->abxy", m, flat, m, precision=hi)
        return out.reshape(*a.shape[:2], *new_spatial, *new_spatial)

    def own(v: jax.Array) -> jax.Array:
        flat = v.reshape(v.shape[0], positions, positions)
        out = jnp.einsum("xp,apq,yq->axy", m, flat, m, precision=hi)
        return out.reshape(v.shape[0], *new_spatial, *new_spatial)

    var1, var2 = k.map_variances(own)
    return k.replace(nngp=pairwise(k.nngp), ntk=pairwise(k.ntk), var1=var1, var2=var2)


def dot_general(x: Any, lhs: Any = None, rhs: Any = None,
                dimension_numbers: Any = (((), ()), ((), ())), precision: Any = None, *,
                batch_first: bool = False) -> Any:
    """``lax.dot_general`` of the input with a constant (neural-tangents' ``stax.DotGeneral``):
    the input takes the place of whichever of ``lhs`` / ``rhs`` is None. Output axes follow
    lax -- batch dimensions, then lhs free, then rhs free -- so the input's batch axis may move
    (``batch_first=True`` moves it back to the front, which ntkjax's pooling and readouts
    expect); its channel axis must stay last and it may only map spatial axes. On a Kernel
    (whose batch axes always come first): :func:`dot_general_kernel`.

    Args:
      x: an array ``(N, *S, C)`` or its Kernel.
      lhs: the constant left operand, or None for the input.
      rhs: the constant right operand, or None for the input.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` as
        in ``lax.dot_general``.
      precision: as in ``lax.dot_general``.
      batch_first: move the input's batch axis to the front of the finite output.

    Returns:
      The product, or its Kernel.

    Raises:
      ValueError: both or neither operand given, or dimension numbers that touch the input's
        batch or channel axis or put constant axes after its channels.

    Mixing the 8 time steps of sequences (N, 8, C) into 5 with a (5, 8) matrix:

    >>> mix = jnp.ones((5, 8)) / 8
    >>> dot_general(jnp.ones((2, 8, 3)), lhs=mix, dimension_numbers=(((1,), (1,)), ((), ())),
    ...             batch_first=True).shape
    (2, 5, 3)
    """
    if isinstance(x, FeatureStandIn):
        return _DOT_GENERAL.on_features(
            x, lambda k: dot_general_kernel(k, lhs, rhs, dimension_numbers, precision))
    if isinstance(x, Kernel):
        return dot_general_kernel(x, lhs, rhs, dimension_numbers, precision)
    if (lhs is None) == (rhs is None):
        raise ValueError("dot_general: exactly one of lhs and rhs is the constant; the other "
                         "(None) is the layer's input.")
    x = jnp.asarray(x)
    return _dot_general_array(x, lhs, rhs, dimension_numbers, precision, batch_first)


_RESIZE_METHODS = ("linear", "nearest")


def resize_matrix(n: int, m: int, method: str = "linear", antialias: bool = True,
                  dtype: Any = jnp.float32) -> jax.Array:
    """The ``(m, n)`` matrix of ``jax.image.resize`` along one axis from ``n`` to ``m``
    positions: column ``i`` is the resized unit vector ``e_i`` (the map is linear).

    >>> print(resize_matrix(2, 4, "nearest"))
    [[1. 0.]
     [1. 0.]
     [0. 1.]
     [0. 1.]]
    """
    eye = jnp.eye(n, dtype=dtype)
    return jax.image.resize(eye, (m, n), method=method, antialias=antialias,
                            precision=jax.lax.Precision.HIGHEST)


def _resize_shape(shape: Any, spatial: Sequence[int], width: int) -> tuple[int, ...]:
    """The new spatial shape from ``shape`` = ``(N, *S, C)`` with ``-1`` = unchanged."""
    shape = tuple(shape)
    if len(shape) != len(spatial) + 2:
        raise ValueError(f"image_resize: shape {shape} needs {len(spatial) + 2} entries (batch, "
                         f"*spatial, channels) for inputs with spatial shape {tuple(spatial)}.")
    if shape[0] != -1 or shape[-1] not in (-1, width):
        raise ValueError(f"image_resize: shape {shape} may resize only the spatial axes; give "
                         "-1 for the batch and channel axes.")
    new = tuple(n if s == -1 else s for s, n in zip(shape[1:-1], spatial, strict=True))
    if any(not isinstance(s, int) or s < 1 for s in new):
        raise ValueError(f"image_resize: spatial sizes must be positive ints or -1; got "
                         f"{shape}.")
    return new


def image_resize_kernel(k: Kernel, shape: Any, method: str = "linear",
                        antialias: bool = True) -> Kernel:
    """The rule of :func:`image_resize`: ``R_i`` (:func:`resize_matrix`) applied to both
    position axes ``i`` of the NNGP, the NTK and the variances.

    >>> import ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.ones((2, 4, 3)))
    >>> image_resize_kernel(k, (-1, 8, -1)).nngp.shape
    (2, 2, 8, 8)
    """
    if method not in _RESIZE_METHODS:
        raise ValueError(f"image_resize: method must be one of {_RESIZE_METHODS} (a linear map "
                         f"of the positions); got {method!r}.")
    k = k.require_all_pairs("image_resize").masked()  # it mixes positions
    nd = k.spatial_ndim
    new = _resize_shape(shape, k.spatial_shape, k.width)

    def resized_mask(m: jax.Array) -> jax.Array:
        """Masks (neural-tangents' rule): an output is masked iff every input it reads is."""
        for i, (n, size) in enumerate(zip(k.spatial_shape, new, strict=True)):
            if n != size:
                reads = resize_matrix(n, size, method, antialias, jnp.float32) != 0
                unmasked = jnp.tensordot(reads.astype(jnp.int32), (~m).astype(jnp.int32),
                                         axes=((1,), (1 + i,)))
                m = jnp.moveaxis(unmasked == 0, 0, 1 + i)
        return m

    def apply(a: jax.Array | None, lead: int) -> jax.Array | None:
        if a is None:
            return None
        for i, (n, m) in enumerate(zip(k.spatial_shape, new, strict=True)):
            if n == m:
                continue
            r = resize_matrix(n, m, method, antialias, a.dtype)
            for ax in (lead + i, lead + nd + i):
                a = jnp.moveaxis(jnp.tensordot(r, a, axes=((1,), (ax,)),
                                               precision=jax.lax.Precision.HIGHEST), 0, ax)
        return a

    var1 = apply(k.var1, 1)
    var2 = var1 if k.var2 is k.var1 else apply(k.var2, 1)
    out = k.replace(nngp=apply(k.nngp, 2), ntk=apply(k.ntk, 2), var1=var1, var2=var2)
    return out.map_masks(resized_mask)


def image_resize(x: Any, shape: Any, method: str = "linear", antialias: bool = True) -> Any:
    """``jax.image.resize`` of the spatial axes of ``(N, *S, C)`` inputs (neural-tangents'
    ``stax.ImageResize``); on a Kernel, :func:`image_resize_kernel`.

    Args:
      x: an array ``(N, *S, C)`` or its Kernel.
      shape: the new shape ``(-1, *S', -1)``; ``-1`` keeps an axis.
      method: ``"linear"`` or ``"nearest"`` (the linear maps neural-tangents supports).
      antialias: as in ``jax.image.resize`` (for downsampling).

    Returns:
      The resized array, or its Kernel.

    Raises:
      ValueError: another method, or a shape that resizes the batch or channel axes or has
        the wrong length. (A same-position Kernel raises ``AllPairsRequired``, on which
        ``kernel_fn`` reruns the module with all position pairs.)

    >>> image_resize(jnp.ones((2, 4, 4, 3)), (-1, 8, 2, -1)).shape
    (2, 8, 2, 3)
    """
    if isinstance(x, FeatureStandIn):
        return _IMAGE_RESIZE.on_features(
            x, lambda k: image_resize_kernel(k, shape, method, antialias))
    if isinstance(x, Kernel):
        return image_resize_kernel(x, shape, method, antialias)
    if method not in _RESIZE_METHODS:
        raise ValueError(f"image_resize: method must be one of {_RESIZE_METHODS}; got "
                         f"{method!r}.")
    x = jnp.asarray(x)
    new = _resize_shape(shape, x.shape[1:-1], x.shape[-1])
    return jax.image.resize(x, (x.shape[0], *new, x.shape[-1]), method=method,
                            antialias=antialias, precision=jax.lax.Precision.HIGHEST)


def _scale_features(x: FeatureStandIn, exact: Kernel, c: float):
    """Random features after :func:`scale`, exact: kernels scale by ``c^2``, features by ``c``."""
    return x.phi * c, x.psi * c


_NO_FEATURES = "kernel_fn for the exact kernel (no random-feature rule yet)"
_INDEX = declare(index, kernel=index_kernel, features=None, structured="parameter-free",
                 instead={"features": _NO_FEATURES})
_SCALE = declare(scale, kernel=scale_kernel, features=_scale_features,
                 structured="parameter-free")
_DOT_GENERAL = declare(dot_general, kernel=dot_general_kernel, features=None,
                       structured="parameter-free", all_pairs=True,
                       instead={"features": _NO_FEATURES})
_IMAGE_RESIZE = declare(image_resize, kernel=image_resize_kernel, features=None,
                        structured="parameter-free", all_pairs=True,
                        instead={"features": _NO_FEATURES})
