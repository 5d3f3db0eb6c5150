"""Exact infinite-width NNGP and NTK of a Flax module built from :mod:`ntkjax.nn` layers.

The same ``flax.linen`` module defines the finite network (``module.init`` / ``module.apply`` on
arrays) and its infinite-width limit: :func:`kernel_fn` feeds the module a :class:`Kernel` instead
of an array, and every :mod:`ntkjax.nn` layer and activation maps the kernel by the closed-form
rule it declares beside its finite computation. Residual sums of independent branches add
kernels. A Flax built-in layer that meets a :class:`Kernel` (``flax.linen.Dense``, ``Dropout``,
...) has no such rule and raises a ValueError naming it.

Per output: a readout with O outputs gives the kernel of one output, of shape (N1, N2); the
outputs are independent and identically distributed, so the full NNGP / NTK is
``kernel (x) I_O`` (Kronecker product with the O x O identity).

Images. Inputs of shape (N, *S, C) (NHWC for 2-D; any number of spatial axes) keep, per pair of
inputs, the kernel between pairs of positions. The input kernel is ``x_a[p] . x_b[p'] / C``;
:class:`ntkjax.nn.Conv` averages it over patches (:func:`ntkjax.nn.conv.patch_average`) and
applies the dense rule; activations act entrywise; :func:`ntkjax.nn.flatten` and the global
poolings remove the spatial axes (Novak et al. 2019; Arora et al. 2019). A dense layer on a
kernel with spatial axes acts per position, as ``flax.linen.Dense`` on the channel axis does.

Only the pairs of positions the readout needs are kept. Convolutions, dense layers and
activations map the kernel between positions ``(p, p)`` to kernels between positions
``(o, o)`` (a convolution averages ``k[o + delta, o + delta]`` over its window), and a flatten
readout reads only those: such a network needs the *same-position* kernel, of shape
(N1, N2, *S) (``Kernel.diagonal_spatial``). Pooling and anything else that mixes positions needs
*all pairs*, (N1, N2, *S, *S). :func:`kernel_fn` decides from the module itself, as
neural-tangents propagates its diagonal masks back from the readout: it first traces the module
on a same-position kernel, and a layer that needs all pairs raises :class:`AllPairsRequired`
(through :meth:`Kernel.require_all_pairs`), upon which the module is run with all pairs.

Variances. The activation rules read each input's variance at each position; nothing else
does. With ``x2 = None`` they are read off the diagonal of the NNGP itself. Otherwise (and for
every block of a blocked evaluation) each input's variances are computed once, by running the
module on that input alone and recording every variance a layer reads
(:meth:`Kernel.position_variances`); the pairwise pass then replays them, so no per-input
covariance is carried through the pairwise computation.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import linecache
import math
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, struct

from ntkjax._checks import check_choice, check_pair, float_dtype, is_concrete
from ntkjax._meanings import jax_equivalents
from ntkjax._store import describe_object
from ntkjax.blocking import _pad_rows, evaluate_in_blocks

__all__ = [
    "POSITION_PAIRS",
    "AllPairsRequired",
    "ForeignFunctionError",
    "Kernel",
    "PositionPairs",
    "input_kernel",
    "kernel_fn",
    "kernel_matrix",
    "note_same_batch_rule",
    "position_diagonal",
]

PositionPairs = Literal["auto", "all", "same"]
POSITION_PAIRS: tuple[PositionPairs, ...] = ("auto", "all", "same")


class AllPairsRequired(Exception):
    """Raised by a layer rule that needs the kernel between all pairs of positions when it
    meets a :class:`Kernel` that holds only same-position pairs; :func:`kernel_fn` catches it
    and runs the module with all pairs."""


@struct.dataclass
class Kernel:
    """Infinite-width kernels of a layer's outputs at two batches of inputs (a pytree).

    Attributes:
      nngp: (N1, N2) NNGP -- the covariance ``Sigma(x1_i, x2_j)`` of one output unit. With
        spatial axes S (images): (N1, N2, *S, *S), ``Sigma(x1_i at p, x2_j at p')`` for all pairs
        of positions; or, with ``diagonal_spatial``, (N1, N2, *S): the same-position entries
        ``Sigma(x1_i at p, x2_j at p)`` only.
      ntk: the NTK ``Theta(x1_i, x2_j)`` of one output unit, shaped like ``nngp``.
      var1: (N1,) the NNGP variances ``Sigma(x1_i, x1_i)``; with spatial axes, (N1, *S, *S): each
        input's covariance across all pairs of positions ((N1, *S) with ``diagonal_spatial``).
        ``None`` inside :func:`kernel_fn`'s own evaluation: the variances are then read off the
        NNGP's diagonal (``x2 = None``) or replayed from a per-input pass (see the module
        docstring); layers read them through :meth:`position_variances` and propagate them
        through :meth:`map_variances`, both of which handle ``None``.
      var2: the same for x2.
      width: number of features (channels) of the layer (static); the next dense layer's
        ``fan_in`` (a convolution's is ``|window| * width``), which the standard
        parameterization's NTK uses.
      diagonal_spatial: whether only same-position pairs are held (static).
      non_gaussian: (static) ``""`` when the layer's outputs are, in the limit, zero-mean
        Gaussian processes with i.i.d. channels -- the outputs of Dense, Conv and SelfAttention
        layers, their sums and normalizations -- else the name of the layer that made them
        otherwise (an activation, a channel concatenation or product of branches, train-mode
        Dropout). Activation rules and LayerNorm assume Gaussian inputs and raise a ValueError
        naming that layer (as neural-tangents' ``is_gaussian``); a dense layer makes outputs
        Gaussian again. (Readouts such as :func:`ntkjax.nn.flatten` start a fresh kernel and do
        not carry the mark.)

    Inputs: ``x2 = None`` (``kernel_fn(module)(x1)``) means the same batch of examples on both
    sides; then ``var2`` is the very same array object as ``var1`` (:attr:`same_inputs`), which
    the layers keep, and rules that depend on it (train-mode :class:`ntkjax.nn.Dropout` scales
    each example's kernel with itself) see it. A given ``x2`` is a different batch, even when
    equal in value.

    Arithmetic follows the networks it describes: ``k1 + k2`` is the kernel of the sum of two
    independent branches (kernels add; valid when each branch, or all but one, ends in a dense
    layer with fresh zero-mean weights, as in a residual block), and ``alpha * k`` (or
    ``k / alpha``) is the kernel of ``alpha`` times the outputs (kernels scale by ``alpha^2``).

    >>> import jax.numpy as jnp, ntkjax
    >>> k = ntkjax.kernel_fn(ntkjax.nn.Dense(1, w_std=1.0, b_std=0.0))(jnp.eye(2) * 2.0)
    >>> print(k.nngp)  # x1 x2^T / d
    [[2. 0.]
     [0. 2.]]
    >>> print((3.0 * k).ntk[0, 0], (k + k).ntk[0, 0])  # alpha^2 k; independent branches add
    18.0 4.0
    """

    nngp: jax.Array
    ntk: jax.Array
    var1: jax.Array | None
    var2: jax.Array | None
    width: int = struct.field(pytree_node=False)
    diagonal_spatial: bool = struct.field(pytree_node=False, default=False)
    non_gaussian: str = struct.field(pytree_node=False, default="")

    @property
    def same_inputs(self) -> bool:
        """True when the kernel is of a batch with itself (``x2 = None``): ``var2 is var1``
        (kernels without variances replaying a per-input pass are of two batches)."""
        if self.var1 is None:
            tape = _TAPE.get()
            return not (tape is not None and tape.replaying)
        return self.var2 is self.var1

    def replace(self, **changes: Any) -> Kernel:
        """A copy with the given fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def shape(self) -> tuple[int, ...]:
        """``nngp.shape``: ``(N1, N2)``, ``(N1, N2, *S, *S)``, or ``(N1, N2, *S)`` with
        ``diagonal_spatial``."""
        return tuple(self.nngp.shape)

    @property
    def spatial_ndim(self) -> int:
        """The number of spatial axes (0 for a kernel of feature vectors)."""
        extra = len(self.nngp.shape) - 2
        return extra if self.diagonal_spatial else extra // 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``S``: the spatial shape of the layer's outputs (``()`` without spatial axes)."""
        return tuple(self.nngp.shape[2 : 2 + self.spatial_ndim])

    @property
    def dtype(self):
        return self.nngp.dtype

    def require_all_pairs(self, layer: str) -> None:
        """For layer rules that mix positions: raises :class:`AllPairsRequired` when this kernel
        holds only same-position pairs (``kernel_fn`` then runs the module with all pairs)."""
        if self.diagonal_spatial:
            raise AllPairsRequired(
                f"{layer} needs the kernel between all pairs of positions, but this kernel "
                "holds only same-position pairs (kernel_fn(module, position_pairs='same'))."
            )

    def __add__(self, other: Any) -> Kernel:
        if not isinstance(other, Kernel):
            return NotImplemented
        if (self.width != other.width or self.shape != other.shape
                or self.diagonal_spatial != other.diagonal_spatial):
            raise ValueError(
                "can only add kernels of branches with the same width and inputs; got widths "
                f"{self.width} and {other.width}, shapes {self.shape} and {other.shape}."
            )
        if self.non_gaussian and other.non_gaussian:
            raise ValueError(
                "the sum of two branches that both end in a layer with non-Gaussian outputs "
                f"({self.non_gaussian} and {other.non_gaussian}) has no kernel here: their "
                "means do not vanish, so the cross terms E[f] E[g'] would be missing. End at "
                "least one branch in a Dense/Conv layer (as in a residual block)."
            )
        a, b = (self, other) if (self.var1 is None) == (other.var1 is None) else (
            self.with_variances(), other.with_variances())
        var1 = None if a.var1 is None or b.var1 is None else a.var1 + b.var1
        same = a.same_inputs and b.same_inputs
        return a.replace(
            nngp=a.nngp + b.nngp,
            ntk=a.ntk + b.ntk,
            var1=var1,
            var2=var1 if same or a.var2 is None or b.var2 is None else a.var2 + b.var2,
            non_gaussian=a.non_gaussian or b.non_gaussian,
        )

    def __mul__(self, scale: Any) -> Kernel:
        if isinstance(scale, Kernel) or jnp.ndim(scale) != 0:
            raise ValueError(
                "a Kernel can only be multiplied by a scalar (the network output times alpha has "
                f"kernel alpha^2 K); got {type(scale).__name__} of shape {jnp.shape(scale)}."
            )
        s2 = jnp.asarray(scale, self.dtype) ** 2
        var1, var2 = self.map_variances(lambda v: v * s2)
        return self.replace(nngp=self.nngp * s2, ntk=self.ntk * s2, var1=var1, var2=var2)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> Kernel:
        if isinstance(scale, Kernel):
            return NotImplemented
        return self * (1 / jnp.asarray(scale, self.dtype))

    def __neg__(self) -> Kernel:
        return self

    def __getitem__(self, index: Any) -> Kernel:
        """``k[rows, cols]``: the kernel of a subset of x1 (``rows``) and x2 (``cols``) -- any
        numpy-style index of one axis each (``k[rows]`` keeps every x2). ``nngp`` and ``ntk``
        are indexed on their two batch axes, ``var1`` by ``rows`` and ``var2`` by ``cols``."""
        k = self.with_variances()
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        assert k.var1 is not None and k.var2 is not None
        return k.replace(nngp=k.nngp[rows][:, cols], ntk=k.ntk[rows][:, cols],
                         var1=k.var1[rows], var2=k.var2[cols])

    def map_variances(
        self, fn: Callable[[jax.Array], jax.Array]
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """``(fn(var1), fn(var2))``, evaluated once when ``var2`` is ``var1`` (``x2 = None``), so
        the two stay one array and the diagonal of a symmetric kernel stays consistent;
        ``(None, None)`` when the variances are not carried (``var1 is None``)."""
        if self.var1 is None or self.var2 is None:
            return None, None
        var1 = fn(self.var1)
        return var1, (var1 if self.var2 is self.var1 else fn(self.var2))

    def position_variances(self) -> tuple[jax.Array, jax.Array]:
        """Each input's variance at each position, ``var[a, p, p]``, shaped (N, *S), for x1 and
        x2 (the variances themselves, (N,), without spatial axes).

        Every layer rule that reads variances reads them here (see the module docstring): from
        ``var1`` / ``var2``, or, when they are not carried, from the NNGP's diagonal
        (``x2 = None``) or from the per-input pass's record."""
        if self.var1 is None or self.var2 is None:
            tape = _TAPE.get()
            if tape is not None and tape.replaying:
                return tape.next()
            d = _batch_diagonal(self.nngp)
            if not self.diagonal_spatial and self.spatial_ndim:
                d = position_diagonal(d, self.spatial_ndim)
            if tape is not None:
                tape.record(d)
            return d, d
        nd = self.spatial_ndim
        if nd == 0 or self.diagonal_spatial:
            return self.var1, self.var2
        d1, d2 = self.map_variances(lambda v: position_diagonal(v, nd))
        assert d1 is not None and d2 is not None
        return d1, d2

    def self_covariances(self) -> tuple[jax.Array, jax.Array]:
        """Each input's kernel with itself across all its positions, ``(N, *S, *S)`` (``(N, *S)``
        for same-position kernels, ``(N,)`` without spatial axes), for x1 and x2: ``var1`` and
        ``var2`` when carried, else -- like :meth:`position_variances` -- the NNGP's diagonal
        (``x2 = None``) or the per-input pass's record (for rules that mix positions)."""
        if self.var1 is not None and self.var2 is not None:
            return self.var1, self.var2
        tape = _TAPE.get()
        if tape is not None and tape.replaying:
            return tape.next()
        d = _batch_diagonal(self.nngp)
        if tape is not None:
            tape.record(d)
        return d, d

    def with_variances(self) -> Kernel:
        """This kernel with ``var1`` and ``var2`` as arrays (taken from the NNGP's diagonal when
        they are not carried, which needs ``x2 = x1``)."""
        if self.var1 is not None and self.var2 is not None:
            return self
        tape = _TAPE.get()
        if (tape is not None and tape.replaying) or self.nngp.shape[0] != self.nngp.shape[1]:
            raise ValueError("this kernel carries no variances and is not a kernel of x with "
                             "itself; its variances are unknown here.")
        var = _batch_diagonal(self.nngp)
        return self.replace(var1=var, var2=var)


def _batch_diagonal(a: jax.Array) -> jax.Array:
    """``a[i, i, ...]`` of shape (N, ...) from ``a`` of shape (N, N, ...)."""
    return jnp.moveaxis(jnp.diagonal(a, axis1=0, axis2=1), -1, 0)


def position_diagonal(v: jax.Array, nd: int) -> jax.Array:
    """``v[a, p, p]`` of shape (N, *S) from per-input covariances ``v`` of shape (N, *S, *S)."""
    n, spatial = v.shape[0], v.shape[1 : 1 + nd]
    positions = math.prod(spatial)
    flat = v.reshape(n, positions, positions)
    return jnp.diagonal(flat, axis1=1, axis2=2).reshape(n, *spatial)


class _VarianceTape:
    """The variances the layers read (:meth:`Kernel.position_variances`), in the order they read
    them: recorded by a per-input pass, replayed by the pairwise pass."""

    def __init__(self, replay: tuple[list, list] | None = None) -> None:
        self.recorded: list[jax.Array] = []
        self._replay = replay
        self._index = 0

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    def record(self, d: jax.Array) -> None:
        self.recorded.append(d)

    def next(self) -> tuple[jax.Array, jax.Array]:
        assert self._replay is not None
        tape1, tape2 = self._replay
        if self._index >= len(tape1):
            raise ValueError(
                "the module read more variances on a pair of inputs than on one input alone; "
                "kernel_fn needs a module that runs the same layers on any inputs."
            )
        i = self._index
        self._index += 1
        return tape1[i], tape2[i]

    def done(self) -> bool:
        return self._replay is None or self._index == len(self._replay[0])


_TAPE: contextvars.ContextVar[_VarianceTape | None] = contextvars.ContextVar(
    "ntkjax_variance_tape", default=None
)


def _float_inputs(x1: Any, x2: Any) -> tuple[jax.Array, jax.Array | None]:
    """Validated inputs in one floating dtype: (batch, features) or (batch, *spatial, channels)."""
    check_pair(x1, x2)
    dtype = float_dtype(x1, x2)
    return jnp.asarray(x1, dtype), (None if x2 is None else jnp.asarray(x2, dtype))


def input_kernel(
    x1: jax.Array, x2: jax.Array | None = None, *, diagonal_spatial: bool = False
) -> Kernel:
    """The kernel of the inputs themselves: ``nngp = x1 x2^T / d``, ``ntk = 0``, ``width = d``.

    With ``x2 = None`` the variances are the diagonal of the same Gram matrix, so the diagonal is
    exactly consistent. Inputs of shape (N, d); integer inputs become the default float dtype.
    Images (N, *S, C): ``nngp[a, b, p, p'] = x1[a, p] . x2[b, p'] / C`` of shape
    (N1, N2, *S, *S), ``var1[a, p, p'] = x1[a, p] . x1[a, p'] / C``, ``width = C``; with
    ``diagonal_spatial`` only ``p = p'``: (N1, N2, *S) and (N1, *S).
    """
    x1, x2 = _float_inputs(x1, x2)
    if x1.ndim > 2:
        return _image_input_kernel(x1, x2, diagonal=diagonal_spatial, variances=True)
    d = x1.shape[1]
    same = x2 is None
    x2 = x1 if same else x2
    (x1s, s1), (x2s, s2) = _unit_scaled(x1), _unit_scaled(x2)
    gram = jnp.matmul(x1s, x2s.T, precision=jax.lax.Precision.HIGHEST) / d / s1 / s2
    if same:
        var1 = var2 = jnp.diagonal(gram)
    else:
        var1, var2 = _self_covariance(x1), _self_covariance(x2)
    return Kernel(nngp=gram, ntk=jnp.zeros_like(gram), var1=var1, var2=var2, width=d)


def _unit_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x * s, s)`` with ``s`` the power of two that brings ``max |x|`` into [0.5, 1).

    Gram matrices are formed from the scaled inputs and divided by ``s1 s2`` afterwards: the
    products are exact (powers of two), so the result is bit-identical to ``x1 x2^T / d``
    wherever that is representable, and nothing overflows (or underflows) in between --
    ``x . x'`` of inputs of size 1e18 overflows float32 long before ``x . x' / d`` does.
    """
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x)))
    scale = jnp.ldexp(jnp.ones((), x.dtype), -exponent)
    return x * scale, scale


def _image_input_kernel(
    x1: jax.Array, x2: jax.Array | None, *, diagonal: bool, variances: bool
) -> Kernel:
    """The input kernel of images; without ``variances`` it carries none (``var1 = None``: read
    off the NNGP's diagonal for x2 = None, or replayed)."""
    c, spatial = x1.shape[-1], x1.shape[1:-1]
    x1s, s1 = _unit_scaled(x1)
    x2s, s2 = (x1s, s1) if x2 is None else _unit_scaled(x2)
    flat1 = x1s.reshape(x1.shape[0], -1, c)
    flat2 = x2s.reshape(x2s.shape[0], -1, c)
    hi = jax.lax.Precision.HIGHEST
    if diagonal:
        gram = jnp.einsum("apc,bpc->abp", flat1, flat2, precision=hi) / c / s1 / s2
        gram = gram.reshape(*gram.shape[:2], *spatial)
    else:
        gram = jnp.einsum("apc,bqc->abpq", flat1, flat2, precision=hi) / c / s1 / s2
        gram = gram.reshape(*gram.shape[:2], *spatial, *spatial)
    k = Kernel(nngp=gram, ntk=jnp.zeros_like(gram), var1=None, var2=None, width=c,
               diagonal_spatial=diagonal)
    if not variances:
        return k
    if x2 is None:
        return k.with_variances()
    return k.replace(var1=_self_covariance(x1, diagonal), var2=_self_covariance(x2, diagonal))


def _self_covariance(x: jax.Array, diagonal: bool = False) -> jax.Array:
    """Each input's kernel with itself: (N,) for (N, d); (N, *S, *S) for images (N, *S, C), or
    (N, *S) with ``diagonal``."""
    c = x.shape[-1]
    x, s = _unit_scaled(x)
    if x.ndim == 2 or diagonal:
        return jnp.sum(x * x, axis=-1) / c / s / s
    flat = x.reshape(x.shape[0], -1, c)
    hi = jax.lax.Precision.HIGHEST
    cov = jnp.einsum("apc,aqc->apq", flat, flat, precision=hi) / c / s / s
    return cov.reshape(x.shape[0], *x.shape[1:-1], *x.shape[1:-1])


def _contains_kernel(args, kwargs) -> bool:
    leaves = jax.tree_util.tree_leaves((args, kwargs), is_leaf=lambda a: isinstance(a, Kernel))
    return any(isinstance(leaf, Kernel) for leaf in leaves)


_CONTAINERS = (linen.Sequential,)


def _reject_flax_layers(next_fun, args, kwargs, context):
    """Interceptor: a Flax built-in layer (other than a container) must not receive a Kernel."""
    module = context.module
    cls = type(module)
    if (
        cls.__module__.startswith("flax.")
        and not isinstance(module, _CONTAINERS)
        and _contains_kernel(args, kwargs)
    ):
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} (module {module.name!r}) has no infinite-width "
            "kernel rule: ntkjax.kernel_fn needs layers from ntkjax.nn -- use ntkjax.nn.Dense "
            "instead of flax.linen.Dense and the ntkjax.nn activations (ntkjax.nn.elementwise "
            "for any other one), ntkjax.nn.LayerNorm, ntkjax.nn.Dropout and "
            "ntkjax.nn.SelfAttention instead of their flax counterparts."
        )
    return next_fun(*args, **kwargs)


# ------------------------------------------------------------- foreign functions on a Kernel

class ForeignFunctionError(ValueError):
    """A function without an infinite-width rule (``jax.nn.relu``, ``jnp.tanh``, a lambda) was
    applied to a :class:`Kernel`."""


# ntkjax equivalents of JAX functions, by the name of the JAX function that met the Kernel:
# derived from the layers' declarations (each activation names the JAX functions it replaces).
_EQUIVALENTS = jax_equivalents()
_API_DIRS = {
    "/jax/_src/nn/": "jax.nn.",
    "/jax/_src/numpy/": "jnp.",
    "/jax/_src/lax/": "jax.lax.",
    "/jax/_src/scipy/": "jax.scipy.",
    "/jax/_src/ops/": "jax.ops.",
}
_LIBRARY_DIRS = ("/jax/", "/jaxlib/", "/flax/", "/numpy/", "/ntkjax/kernels.py")


def _describe_foreign_call(frames: list[tuple[str, int, str]]) -> str:
    """The message for a Kernel that reached a plain JAX function, from the call stack as
    ``(filename, lineno, function)`` tuples, outermost first: the user's frame is the innermost
    one outside JAX/Flax, the function applied the first public JAX function inside it."""
    paths = [f.replace("\\", "/") for f, _, _ in frames]
    user = None
    for i in range(len(frames) - 1, -1, -1):
        if not any(d in paths[i] for d in _LIBRARY_DIRS):
            user = i
            break
    api, qualified = None, None
    for i in range(0 if user is None else user + 1, len(frames)):
        name = frames[i][2]
        prefix = next((p for d, p in _API_DIRS.items() if d in paths[i]), None)
        if prefix and not name.startswith(("_", "<")):
            api, qualified = name, prefix + name
            break
    where = ""
    if user is not None:
        filename, lineno, function = frames[user]
        line = linecache.getline(filename, lineno).strip()
        where = f" in {function} ({filename}:{lineno}{': ' + repr(line) if line else ''})"
        if function == "<lambda>" and qualified:
            qualified = f"a lambda calling {qualified}"
    what = qualified or "a function that is not an ntkjax activation"
    if api in _EQUIVALENTS:
        fix = f"use {_EQUIVALENTS[api]} instead"
    else:
        fix = ("wrap the function in ntkjax.nn.elementwise(fn) (its kernel then comes from "
               "Gauss-Hermite quadrature)")
    return (
        f"{what} was applied to an ntkjax Kernel{where}. ntkjax.kernel_fn applies the module to "
        "a Kernel, and only ntkjax.nn layers and activations have an infinite-width rule: "
        f"{fix}."
    )


def _kernel_as_array(self: Kernel) -> Any:
    """``Kernel.__jax_array__``: JAX asks for an array when a jnp / jax.nn function receives a
    Kernel -- raise a :class:`ForeignFunctionError` naming the function and what to use."""
    stack = [(f.filename, f.lineno, f.function) for f in reversed(inspect.stack(0)[1:])]
    raise ForeignFunctionError(_describe_foreign_call(stack))


Kernel.__jax_array__ = _kernel_as_array  # type: ignore[attr-defined]


# Rules whose result depends on whether x2 is the same batch as x1 (train-mode dropout), noted
# while a module is traced inside :func:`kernel_matrix`.
_SAME_BATCH_RULES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "ntkjax_same_batch_rules", default=None
)


def note_same_batch_rule(name: str) -> None:
    """Called by a layer rule whose kernel depends on :attr:`Kernel.same_inputs` (e.g.
    train-mode :class:`ntkjax.nn.Dropout`), so that :func:`kernel_matrix`, which evaluates
    blocks of one batch as pairs of different batches, can refuse ``x2 = None``."""
    rules = _SAME_BATCH_RULES.get()
    if rules is not None:
        rules.append(name)


def _traceback_frames(err: BaseException) -> list[tuple[str, int, str]]:
    return [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(err.__traceback__)]


def _apply_to_kernel(module: linen.Module, kernel: Kernel) -> Kernel:
    try:
        with linen.intercept_methods(_reject_flax_layers):
            out = module.apply({}, kernel)
    except ForeignFunctionError:
        raise
    except (TypeError, ValueError) as err:
        # JAX functions that abstractify their arguments (lax ops, jitted jax.nn functions)
        # reject a Kernel before asking for __jax_array__: name the call from the traceback.
        text = str(err)
        if "__jax_array__" in text or "ntkjax.kernels.Kernel" in text:
            raise ForeignFunctionError(_describe_foreign_call(_traceback_frames(err))) from err
        raise
    if not isinstance(out, Kernel):
        raise ValueError(
            f"{type(module).__name__} returned {type(out).__name__} for a Kernel input; "
            "kernel_fn needs a module whose output is a single array built from ntkjax.nn layers."
        )
    return out


def _apply_with_tape(module: linen.Module, kernel: Kernel, tape: _VarianceTape) -> Kernel:
    token = _TAPE.set(tape)
    try:
        out = _apply_to_kernel(module, kernel)
    finally:
        _TAPE.reset(token)
    if not tape.done():
        raise ValueError(
            "the module read fewer variances on a pair of inputs than on one input alone; "
            "kernel_fn needs a module that runs the same layers on any inputs."
        )
    return out


def kernel_fn(
    module: linen.Module, *, position_pairs: PositionPairs = "auto"
) -> Callable[..., Kernel]:
    """The infinite-width kernels of ``module``: ``kernel_fn(module)(x1, x2=None) -> Kernel``.

    ``module`` is any ``flax.linen`` module built from :mod:`ntkjax.nn` layers and activations
    (for example :class:`ntkjax.models.MLP`); it is applied to the input kernel
    ``x1 x2^T / d`` (:func:`input_kernel`) with no parameters. The result's ``.nngp`` and
    ``.ntk`` have shape (N1, N2) and are the kernels of ONE output: for a readout with O outputs
    the full NNGP / NTK is ``kernel (x) I_O``. ``x2 = None`` means ``x2 = x1``.

    The returned function is pure and jit-compatible (wrap it in ``jax.jit``; the module is
    closed over, i.e. static). It keeps the input dtype (float32 or float64). Inputs of shape
    (N, d), or images (N, *S, C) for convolutional networks (:class:`ntkjax.nn.Conv`,
    :class:`ntkjax.models.CNN`); a module whose output still has spatial axes gives kernels of
    shape (N1, N2, *S, *S) (see :class:`Kernel`). Image inputs are always evaluated as one
    compiled call (the function jits itself outside a trace; compilation is cached per input
    shape). For matrices larger than one compiled call should hold, use :func:`kernel_matrix`.

    Args:
      module: the network.
      position_pairs: for images, which pairs of positions the evaluation keeps (module
        docstring): ``"auto"`` -- only same-position pairs when the module allows it (no layer
        mixes positions and the output has no spatial axes), else all pairs; ``"all"`` --
        always all pairs; ``"same"`` -- only same-position pairs (a module whose output keeps
        spatial axes then gives (N1, N2, *S) kernels; a module that mixes positions is a
        ValueError). The kernels are the same either way.

    Returns:
      ``fn(x1, x2=None)``, a pure function giving the :class:`Kernel` of the module's outputs.

    Raises:
      ValueError: for inputs without a feature axis or that disagree in their per-example
        shape, and when the module uses a layer without an infinite-width rule (e.g.
        ``flax.linen.Dense``).

    >>> import jax.numpy as jnp, ntkjax
    >>> cnn = ntkjax.models.CNN((8, 1), readout="flatten")
    >>> ntkjax.kernel_fn(cnn)(jnp.ones((3, 4, 4, 2))).ntk.shape
    (3, 3)
    """
    check_choice(position_pairs, POSITION_PAIRS, "position_pairs")

    def fn(x1: jax.Array, x2: jax.Array | None = None) -> Kernel:
        x1, x2 = _float_inputs(x1, x2)
        if x1.ndim == 2:
            return _vector_kernels(module, x1, x2)
        diagonal = _use_diagonal(module, x1, position_pairs)
        out = _image_kernels(module, x1, x2, diagonal)
        if x2 is None:
            # Dense layers and activations map symmetric kernels to exactly symmetric ones;
            # pooling sums positions in a different order for k[a, b] and k[b, a].
            out = out.replace(nngp=_symmetrized(out.nngp, out.diagonal_spatial),
                              ntk=_symmetrized(out.ntk, out.diagonal_spatial))
        return out

    jitted = jax.jit(fn)

    def dispatch(x1: jax.Array, x2: jax.Array | None = None) -> Kernel:
        # Images outside jit: op-by-op dispatch compiles every one of the many spatial ops
        # separately (seconds for a small CNN); one compiled call is ~10x faster to first result.
        if jnp.ndim(x1) > 2 and is_concrete(x1):
            check_pair(x1, x2)  # inside the jitted program the values are not known
            return jitted(x1, x2)
        return fn(x1, x2)

    return dispatch


def _symmetrized(k: jax.Array, diagonal_spatial: bool) -> jax.Array:
    """``(k + k^T) / 2`` for a kernel of shape (N, N, *S, *S) (x1 and x2 swapped, and with them
    the two position axes of each pair) or, same-position pairs, (N, N, *S)."""
    if diagonal_spatial:
        return 0.5 * (k + jnp.swapaxes(k, 0, 1))
    nd = (k.ndim - 2) // 2
    axes = (1, 0, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return 0.5 * (k + jnp.transpose(k, axes))


def _two_graphs(apply: Callable[[Kernel], Kernel], k: Kernel) -> Kernel:
    """``apply(k)`` with the NNGP taken from a second, structurally distinct copy of the graph.

    XLA fuses an elementwise chain into one loop only when all its users are in that loop; with
    both outputs drawn from one graph it materializes every layer (4-10x slower). Two
    independent chains -- the NTK one also computes the NNGP internally -- each fuse into a
    single loop over the (N1, N2) entries. Outside a trace, one application."""
    out = apply(k)
    if is_concrete(k.nngp):
        return out
    k_copy = k.replace(nngp=k.nngp + _opaque_zero(k.nngp))
    return out.replace(nngp=apply(k_copy).nngp)


def _vector_kernels(module: linen.Module, x1: jax.Array, x2: jax.Array | None) -> Kernel:
    return _two_graphs(lambda k: _apply_to_kernel(module, k), input_kernel(x1, x2))


def _use_diagonal(module: linen.Module, x1: jax.Array, position_pairs: PositionPairs) -> bool:
    """Whether the module's kernels can be computed from same-position pairs only: traced on
    shapes, a layer that mixes positions raises :class:`AllPairsRequired`."""
    if position_pairs == "all":
        return False
    one = jax.ShapeDtypeStruct((1, *x1.shape[1:]), x1.dtype)
    try:
        out = jax.eval_shape(
            lambda a: _apply_to_kernel(
                module, _image_input_kernel(a, None, diagonal=True, variances=False)
            ),
            one,
        )
    except AllPairsRequired as err:
        if position_pairs == "same":
            raise ValueError(f"position_pairs='same' is not possible for this module: {err}") \
                from err
        return False
    return not (position_pairs == "auto" and out.spatial_ndim)


# Per-input pass: inputs evaluated together (vmap) in chunks of at most this many kernel entries.
_PER_INPUT_ENTRIES = 2**24


def _per_input_pass(
    module: linen.Module, x: jax.Array, diagonal: bool
) -> tuple[list[jax.Array], jax.Array]:
    """Runs the module on each input alone (x2 = None, one input at a time): returns the
    variances every layer reads, stacked over inputs (each (N, *S_l) or (N,)), and each input's
    output variances ((N,), or (N, *S, *S) / (N, *S) for a spatial output)."""

    def one(xi: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        tape = _VarianceTape()
        k = _image_input_kernel(xi[None], None, diagonal=diagonal, variances=False)
        token = _TAPE.set(tape)
        try:
            out = _apply_to_kernel(module, k)
        finally:
            _TAPE.reset(token)
        return [d[0] for d in tape.recorded], _batch_diagonal(out.nngp)[0]

    spatial = math.prod(x.shape[1:-1])
    entries = spatial if diagonal else spatial * spatial
    chunk = max(1, min(x.shape[0], _PER_INPUT_ENTRIES // max(entries, 1)))
    if chunk >= x.shape[0]:
        return jax.vmap(one)(x)
    return jax.lax.map(one, x, batch_size=chunk)


def _pairwise(
    module: linen.Module,
    x1: jax.Array,
    x2: jax.Array,
    tapes: tuple[list[jax.Array], list[jax.Array]],
    diagonal: bool,
) -> Kernel:
    """The module on the kernel of x1 against x2, replaying the per-input variances (the
    result carries no variances)."""
    k = _image_input_kernel(x1, x2, diagonal=diagonal, variances=False)
    return _apply_with_tape(module, k, _VarianceTape(tapes))


def _image_kernels(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, diagonal: bool
) -> Kernel:
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    block = _block_rows(x1, diagonal)
    if x2 is None and (block >= n1 or not _blocks_replay_exactly(module, x1, diagonal)):
        k = _image_input_kernel(x1, None, diagonal=diagonal, variances=False)
        return _apply_to_kernel(module, k).with_variances()
    both = x1 if x2 is None else jnp.concatenate([x1, x2])
    tape, var = _per_input_pass(module, both, diagonal)
    if x2 is None:
        out = _blocked_pairwise(module, x1, None, (tape, tape), diagonal, block)
        return out.replace(var1=var, var2=var)
    tapes = ([t[:n1] for t in tape], [t[n1:] for t in tape])
    out = _blocked_pairwise(module, x1, x2, tapes, diagonal, min(block, max(n1, n2)))
    return out.replace(var1=var[:n1], var2=var[n1:])


def _blocks_replay_exactly(module: linen.Module, x: jax.Array, diagonal: bool) -> bool:
    """Whether the kernel of ``x`` with itself may be assembled from kernels of pairs of row
    blocks that replay the per-input variances. Not when a rule's kernel of a batch with itself
    differs from that of two batches (train-mode dropout: :func:`note_same_batch_rule`), nor
    when a layer needs variances that the replay does not carry (e.g. a residual sum around
    self-attention); both are found by tracing shapes only, and such modules are evaluated on
    the whole batch at once."""
    token = _SAME_BATCH_RULES.set([])
    try:
        _output_kernel_shape(module, x)
        if _SAME_BATCH_RULES.get():
            return False

        def one_pair(a: jax.Array) -> Kernel:
            tape, _ = _per_input_pass(module, a, diagonal)
            tapes = ([t[:1] for t in tape], [t[1:] for t in tape])
            return _pairwise(module, a[:1], a[1:], tapes, diagonal)

        jax.eval_shape(one_pair, jax.ShapeDtypeStruct((2, *x.shape[1:]), x.dtype))
        return True
    except ValueError:
        return False
    finally:
        _SAME_BATCH_RULES.reset(token)


# Pairwise evaluation in blocks of rows whose kernels hold about this many entries per array
# (64 KiB in float32): blocks whose whole layer-by-layer computation stays in the processor's
# caches (measured on the 2-core machine: a depth-3 flatten CNN on 256 8x8 images takes 0.18 s
# in blocks of 2^14 entries, 0.35 s in blocks of 2^20 and 0.48 s in one block); and for
# x2 = None only the blocks on and above the diagonal (the others are their mirror images).
_BLOCK_ENTRIES = 2**14
# Blocks evaluated together (vmapped inside each step of the ``lax.map`` over blocks) until they
# hold about this many entries per array: fewer loop steps, each with larger fused operations.
# Measured on the 2-core machine (depth-3 flatten CNN, x2 = None): 256 8x8 images 0.158 s one
# block per step, 0.089 s sixteen; 128 16x16 images 0.130 s and 0.028 s (2 to 64 blocks per step
# tried; 2^17 to 2^19 entries per step were within 15% of the best).
_STEP_ENTRIES = 2**18


def _entries_per_pair(x: jax.Array, diagonal: bool) -> int:
    """Kernel entries per pair of inputs: positions (same-position pairs) or their square."""
    positions = math.prod(x.shape[1:-1])
    return positions if diagonal else positions * positions


def _block_rows(x: jax.Array, diagonal: bool) -> int:
    """Rows of x1 (and x2) per block of the pairwise evaluation (a power of two)."""
    per_pair = _entries_per_pair(x, diagonal)
    rows = 1
    while rows * 2 <= x.shape[0] and (rows * 2) ** 2 * per_pair <= _BLOCK_ENTRIES:
        rows *= 2
    return rows


def _blocked_pairwise(
    module: linen.Module,
    x1: jax.Array,
    x2: jax.Array | None,
    tapes: tuple[list[jax.Array], list[jax.Array]],
    diagonal: bool,
    block: int,
) -> Kernel:
    """:func:`_pairwise` over blocks of ``block`` rows of x1 and x2 (``lax.map``, several
    blocks per step: ``_STEP_ENTRIES``), assembled into the (N1, N2, ...) kernel. With
    ``x2 = None`` only the blocks (i, j), i <= j, are computed; block (j, i) is block (i, j)
    with its two inputs (and their positions) swapped."""
    symmetric = x2 is None
    x2v = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], x2v.shape[0]
    r1, r2 = -(-n1 // block), -(-n2 // block)
    if r1 * r2 == 1:
        return _pairwise(module, x1, x2v, tapes, diagonal)

    def rows(a: jax.Array, r: int) -> jax.Array:
        return jnp.asarray(_pad_rows(a, r * block)).reshape(r, block, *a.shape[1:])

    xb1, xb2 = rows(x1, r1), rows(x2v, r2)
    tb1 = [rows(t, r1) for t in tapes[0]]
    tb2 = tb1 if symmetric else [rows(t, r2) for t in tapes[1]]
    pairs = [(i, j) for i in range(r1) for j in range(r2) if not symmetric or j >= i]
    index1 = jnp.asarray([i for i, _ in pairs], jnp.int32)
    index2 = jnp.asarray([j for _, j in pairs], jnp.int32)

    def one(ij):
        i, j = ij
        k = _pairwise(module, xb1[i], xb2[j], ([t[i] for t in tb1], [t[j] for t in tb2]),
                      diagonal)
        return k.nngp, k.ntk

    per_block = block * block * _entries_per_pair(x1, diagonal)
    per_step = max(1, min(len(pairs), _STEP_ENTRIES // per_block))
    nngp_blocks, ntk_blocks = jax.lax.map(one, (index1, index2), batch_size=per_step)
    out_shape = jax.eval_shape(
        lambda: _pairwise(module, xb1[0], xb2[0], ([t[0] for t in tb1], [t[0] for t in tb2]),
                          diagonal))

    def assemble(blocks: jax.Array) -> jax.Array:
        trailing = blocks.shape[3:]
        grid = jnp.zeros((r1, r2, block, block, *trailing), blocks.dtype)
        grid = grid.at[index1, index2].set(blocks)
        if symmetric:
            grid = grid.at[index2, index1].set(_swap_inputs(blocks, out_shape, batch_ndim=1))
        grid = jnp.moveaxis(grid, 2, 1).reshape(r1 * block, r2 * block, *trailing)
        return grid[:n1, :n2]

    return out_shape.replace(nngp=assemble(nngp_blocks), ntk=assemble(ntk_blocks))


def _swap_inputs(a: jax.Array, k: Kernel, *, batch_ndim: int = 0) -> jax.Array:
    """The kernel array of (x2, x1) from that of (x1, x2): the two input axes transposed, and,
    with all pairs of positions, the two groups of position axes too."""
    lead = tuple(range(batch_ndim))
    b = batch_ndim
    nd = k.spatial_ndim
    if nd == 0 or k.diagonal_spatial:
        rest = tuple(range(b + 2, a.ndim))
    else:
        rest = (*range(b + 2 + nd, b + 2 + 2 * nd), *range(b + 2, b + 2 + nd))
    return jnp.transpose(a, (*lead, b + 1, b, *rest))


def _opaque_zero(a: jax.Array) -> jax.Array:
    """An exact 0 that XLA cannot constant-fold (so the copy is not merged back by CSE)."""
    s = jnp.sum(a[:1, :1])
    return jnp.where(jnp.isnan(s), 0, 0 * jnp.sign(s)).astype(a.dtype)


def kernel_matrix(
    module: linen.Module,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    memory_bytes: int | None = None,
    block_size: int | None = None,
    devices: Sequence[Any] | None = None,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Kernel:
    """The kernels of ``module`` for large N, computed in blocks into host (numpy) arrays.

    Same result as ``kernel_fn(module)(x1, x2)`` but evaluated block by block with
    :func:`ntkjax.blocking.evaluate_in_blocks`: each block is one compiled call whose memory
    (arguments, outputs, temporaries) fits ``memory_bytes`` (default: half of the free memory
    after the result is allocated), so the result is limited only by host RAM -- e.g. the
    40,000 x 40,000 float32 NNGP and NTK of a depth-3 ReLU MLP (2 x 6.4 GB). With
    ``x2 = None`` only the blocks on and above the diagonal are computed and mirrored.

    Images: whichever readout (flatten, global pooling, ...), the pairs of positions are chosen
    as in :func:`kernel_fn`, and each input's variances at every layer are computed once, in a
    per-input pass, and handed to every block that needs them (module docstring).

    Devices and out of core (:func:`ntkjax.blocking.evaluate_in_blocks`): the blocks are
    spread over ``devices`` (default: all devices of all processes); with ``out`` (a directory
    path) the kernels go to a resumable zarr store, arrays ``nngp`` and ``ntk``, recorded with
    the inputs and ``repr(module)``.

    Returns:
      A :class:`Kernel` whose ``nngp`` and ``ntk`` are numpy arrays of shape (N1, N2) (with
      ``out``: read-only ``zarr.Array`` of the store, ``k.ntk[i:j]`` reads rows as numpy) and
      ``var1``, ``var2`` the NNGP variances (numpy).

    Raises:
      ValueError: when the module's output kernel still has spatial axes (end a convolutional
        network with :func:`ntkjax.nn.flatten` or a global pooling and a Dense readout).

    Args:
      module: a flax module built from :mod:`ntkjax.nn` layers, as in :func:`kernel_fn`.
      x1: inputs ``(N1, *features)``.
      x2: inputs ``(N2, *features)``, or None for ``x2 = x1``.
      memory_bytes: budget for one block call; None for half of the free memory.
      block_size: rows per block (overrides ``memory_bytes``).
      show_progress: progress bar on stderr.

    >>> import jax.numpy as jnp, ntkjax
    >>> dense = ntkjax.nn.Dense(1, w_std=1.0, b_std=0.0)  # NNGP = NTK = x1 x2^T / d
    >>> print(ntkjax.kernel_matrix(dense, jnp.eye(3) * 3.0, block_size=2).ntk)
    [[3. 0. 0.]
     [0. 3. 0.]
     [0. 0. 3.]]
    """
    x1, x2 = _float_inputs(x1, x2)
    token = _SAME_BATCH_RULES.set([])
    try:
        shape = _output_kernel_shape(module, x1)
        same_batch_rules = _SAME_BATCH_RULES.get()
    finally:
        _SAME_BATCH_RULES.reset(token)
    if x2 is None and same_batch_rules:
        raise ValueError(
            f"kernel_matrix(module, x1) cannot evaluate a module with {same_batch_rules[0]}: "
            "its kernel of a batch with itself differs from that of two batches, and the "
            "blocks are evaluated as pairs of batches. Use kernel_fn(module)(x1), or pass "
            "x2=x1 for the kernel between two independent batches."
        )
    if shape.spatial_ndim:
        raise ValueError(
            "kernel_matrix needs a module whose output has no spatial axes; this one's output "
            f"kernel has spatial shape {shape.spatial_shape}. End the network with "
            "ntkjax.nn.flatten or ntkjax.nn.global_average_pool and a Dense readout."
        )
    if x1.ndim > 2:
        return _image_kernel_matrix(module, x1, x2, memory_bytes=memory_bytes,
                                    block_size=block_size, show_progress=show_progress,
                                    devices=devices, out=out)
    compute = kernel_fn(module)

    def block_fn(a, b):
        k = compute(a, b)
        return {"nngp": k.nngp, "ntk": k.ntk}

    blocks = evaluate_in_blocks(
        block_fn, x1, x2, block_size=block_size, memory_bytes=memory_bytes,
        show_progress=show_progress, description="kernel blocks", devices=devices, out=out,
        fingerprint=f"kernel_matrix {describe_object(module)}",
    )
    nngp, ntk = blocks["nngp"], blocks["ntk"]
    x2v = x1 if x2 is None else x2
    diag = jax.jit(lambda a: _apply_to_kernel(module, _row_kernel(a)).var1)
    var1 = jax.device_get(diag(x1))
    var2 = var1 if x2 is None else jax.device_get(diag(x2v))
    return Kernel(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=shape.width)


def _image_kernel_matrix(module, x1, x2, *, memory_bytes, block_size, show_progress, devices,
                         out) -> Kernel:
    diagonal = _use_diagonal(module, x1, "auto")
    per_input = jax.jit(lambda a: _per_input_pass(module, a, diagonal))
    tape1, var1 = per_input(x1)
    tape2, var2 = (tape1, var1) if x2 is None else per_input(x2)
    width = _output_kernel_shape(module, x1).width

    def block_fn(i1, i2, a1, a2, t1, t2):
        rows1, rows2 = i1[:, 0], i2[:, 0]
        tapes = ([t[rows1] for t in t1], [t[rows2] for t in t2])
        k = _pairwise(module, a1[rows1], a2[rows2], tapes, diagonal)
        return {"nngp": k.nngp, "ntk": k.ntk}

    index1 = jnp.arange(x1.shape[0])[:, None]
    index2 = None if x2 is None else jnp.arange(x2.shape[0])[:, None]
    blocks = evaluate_in_blocks(
        block_fn, index1, index2,
        fn_args=(x1, x1 if x2 is None else x2, tape1, tape2),
        block_size=block_size, memory_bytes=memory_bytes, show_progress=show_progress,
        description="kernel blocks", devices=devices, out=out,
        fingerprint=f"kernel_matrix(images) {describe_object(module)}",
    )
    nngp, ntk = blocks["nngp"], blocks["ntk"]
    var1 = np.asarray(jax.device_get(var1))
    var2 = var1 if x2 is None else np.asarray(jax.device_get(var2))
    return Kernel(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=width)  # type: ignore[arg-type]


def _row_kernel(x: jax.Array) -> Kernel:
    """An (N, 1) kernel of feature vectors x whose ``var1`` carries every row's variance through
    the network (its ``nngp`` column is a placeholder of the right shape)."""
    var = _self_covariance(x)
    return Kernel(nngp=var[:, None], ntk=jnp.zeros_like(var)[:, None], var1=var,
                  var2=var[:1], width=x.shape[-1])


def _output_kernel_shape(module: linen.Module, x: jax.Array) -> Kernel:
    """The shapes (``jax.ShapeDtypeStruct`` leaves) and width of the module's output kernel."""
    return jax.eval_shape(lambda a: _apply_to_kernel(module, input_kernel(a)), x[:1])
