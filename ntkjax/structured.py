"""The "structured" empirical NTK: per-layer factorization from layer inputs and cotangents.

For a dense layer ``y = c x W + s b`` applied at positions ``t`` (``x_t in R^K``,
``y_t in R^F``), the gradient of output ``i`` with respect to ``W`` is
``sum_t c x_t (x) delta_{i,t}`` where ``delta_{i,t} = d f_i / d y_t`` is the cotangent of the
layer output. Its contribution to the NTK is therefore

    Theta^W(x, x')_{ij} = c^2 sum_{t,s} (x_t . x'_s) (delta_{i,t} . delta'_{j,s}),
    Theta^b(x, x')_{ij} = s^2 (sum_t delta_{i,t}) . (sum_s delta'_{j,s}),

(Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel", section 4, "structured
derivatives"). Without positions (an MLP) this is ``(X X'^T) * (D D'^T)``: two Gram matrices per
layer and no per-sample weight gradient ever formed. With positions (convolutions, dense layers
on sequences) the layer is computed either in this *factored* form or *materialized* as
per-sample gradients ``G_i = sum_t x_t (x) delta_{i,t}`` contracted as ``<G_i, G'_j>``,
whichever needs fewer FLOPs. The factored form runs in blocks of the positions ``t`` (a
``lax.scan`` over blocks of at most 32 MiB of pair products ``x_t . x'_s``, ``delta_t .
delta'_s``), so its peak memory does not grow with ``T * S``. A convolution is a dense
layer on its input patches (``lax.conv_general_dilated_patches``); an embedding is a dense
layer on one-hot tokens, so ``x_t . x'_s = [token_t == token'_s]``.

Layer inputs ``x`` are captured, and the cotangents ``delta`` obtained as gradients with respect
to zero perturbations added to each layer's output, through ``flax.linen.intercept_methods``.
Supported: ``flax.linen`` ``Dense``, ``DenseGeneral`` (without ``batch_dims``), ``Conv`` (shared
weights, one feature group, no mask), ``ConvTranspose`` (no mask, kernel not transposed,
``"SAME"``, ``"VALID"`` or explicit padding: a stride-1 convolution of the stride-dilated input,
so a dense layer on that input's patches) and ``Embed`` (only through ``__call__``), and
``ntkjax.nn.Dense`` (its kernel/bias scales are read off by differentiating the layer once).
``ntkjax.nn.Conv`` and ``ntkjax.nn.ConvTranspose`` are one ``flax.linen.Conv`` each.
``flax.linen`` ``LayerNorm`` and ``RMSNorm`` normalizing over the last axis
(``y_t = gamma * xhat_t + beta``), and ``BatchNorm`` over the last axis normalizing with its
running statistics (inference mode; in training mode it mixes the samples and falls back),
contribute ``<g, g'>`` from per-sample gradients
``g^gamma_i = sum_t xhat_t * delta_{i,t}`` (elementwise) and ``g^beta_i = sum_t delta_{i,t}``,
with ``xhat`` the layer applied with unit scale and zero bias: ``O F`` numbers per sample.
Only exact classes are recognised (not subclasses). A module called more than once through
``__call__`` (shared weights) has the sum of its calls' gradients, so it is one layer on all its
calls' positions joined. A tied embedding (``Embed`` used as a lookup and, through
``Embed.attend``, as the output head) has the sum of both uses' per-sample gradients
``G_i = sum_t onehot(token_t) (x) delta_{i,t} + sum_s zeta_{i,s} (x) q_s`` (cross terms
included), materialized. A layer applied to something without the batch axis (an ``Embed`` on
the positions ``jnp.arange(L)``) is the same for every example and is served per sample. A
parameter that is only added to a batched activation, through slices, reshapes and broadcasts
(a learned positional table ``h + self.param("pos", ...)[:T]``, a per-channel shift), is found
in the model's jaxpr (traced at ``N`` and ``N + 1`` examples, shapes only): its per-example
gradient is the cotangent of that addition's output summed over the broadcast axes -- a
contraction of cotangents only, like a bias. Every other parameter -- unsupported layers,
tables used otherwise, layers called inside ``nn.scan`` or ``nn.remat`` (their inputs belong
to the inner trace of the transformation and cannot be tapped from outside it) -- falls back
to per-sample Jacobian contraction, computed in the same backward pass
(:func:`structured_fallback_params` lists them). When every parameter is covered, the O
backward passes (one per output, reusing one forward pass) run on the whole batch at once;
otherwise per sample.

Blocks and rounding: the per-example taps (inputs, cotangents) mostly come out bit for bit the
same whatever the batch size (a batch of one can differ: matrix-vector kernels), but the pair
stage does not: XLA's CPU matrix
products pick their blocking and vector kernels by operand shape, and the factored or
materialized form is chosen per layer by FLOPs that depend on the block sizes, so a Gram entry
computed in a block of 8 rows may differ in the last bits from the same entry in a block of
512. What is exact is that a block of :func:`ntkjax.empirical_ntk_matrix` equals the kernel
function on that block's (padded) rows -- a diagonal block of its symmetric evaluation the
kernel function's ``x2=None`` call, the other blocks those of the full grid. The
materialized form computes all samples' ``G_i`` as one batched matmul with the outputs folded
into its columns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import operator
import os
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax._src import core as jax_core
from jax.interpreters.ad import JVPTracer
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ntkjax._meanings import declarations
from ntkjax._progress import progress as _progress
from ntkjax._tiling import compiled_footprint, pad_rows
from ntkjax.jacobians import (
    PRECISION,
    Outputs,
    contract_jacobians,
    contract_leaf_jacobians,
    is_variables_dict,
    leaf_jacobian_kernel,
    per_sample_fn,
    split_params,
)
from ntkjax.nn.conv import transpose_padding
from ntkjax.nn.flax_layers import FLAX_LAYERS

__all__ = [
    "count_structured_layers",
    "draw_projection",
    "kronecker_blocks",
    "last_hidden_features",
    "project_gradient",
    "project_leaf_gradients",
    "projection_views",
    "structured_fallback_params",
    "structured_kernel",
    "structured_projected_features",
    "two_pass_bytes_per_example",
    "two_pass_kernel",
]

_PARAM_NAMES = {"dense": {"kernel", "bias"}, "conv": {"kernel", "bias"},
                "conv_transpose": {"kernel", "bias"}, "embed": {"embedding"},
                "norm": {"scale", "bias"}}


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A supported layer (called once or more): where its params live, how to read its
    inputs."""

    path: tuple[str, ...]
    kind: str  # "dense" | "conv" | "conv_transpose" | "embed" | "norm"
    module: Any  # unbound clone, for static attributes and the scale probe
    in_shapes: tuple[tuple[int, ...], ...]  # input shape of each call (batch axis 1 included)
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtypes: tuple[Any, ...]
    probe_scales: bool  # ntkjax.nn.Dense: read c and s off the layer
    # False for a layer applied to something without the batch axis (an Embed on the positions
    # ``jnp.arange(L)``): the same input for every example
    batched: bool = True
    # the calls of a tied ``flax.linen.Embed.attend`` (input and output shapes, output dtypes)
    attend_in_shapes: tuple[tuple[int, ...], ...] = ()
    attend_out_shapes: tuple[tuple[int, ...], ...] = ()
    attend_dtypes: tuple[Any, ...] = ()


def _structured_kinds() -> dict[type, tuple[str, bool]]:
    """``{layer class: (kind, probe_scales)}`` of every declared layer with a structured-NTK
    kind (:mod:`ntkjax.nn.flax_layers`, ``ntkjax.nn.Dense``): read off the declarations."""
    assert FLAX_LAYERS  # (imported for its declarations)
    return {d.layer: (d.structured, d.probe_scales) for d in declarations()
            if isinstance(d.layer, type) and d.structured in _PARAM_NAMES}


def _layer_kind(module) -> tuple[str | None, bool]:
    """(kind, probe_scales) for a supported module, (None, False) otherwise."""
    cls = type(module)
    kind, probe = _structured_kinds().get(cls, (None, False))
    if kind is None or probe:
        return kind, probe
    if kind == "norm":
        axes = module.axis if type(module) is nn.BatchNorm else module.feature_axes
        axes = tuple(axes) if isinstance(axes, tuple | list) else (axes,)
        if axes not in ((-1,),) or module.axis_name is not None:
            return None, False
        return kind, False
    if kind == "dense":
        if module.dot_general is not None or module.dot_general_cls is not None:
            return None, False
        if getattr(module, "batch_dims", ()):
            return None, False
    if kind == "conv" and (
        module.feature_group_count != 1
        or module.mask is not None
        or module.conv_general_dilated is not None
        or module.conv_general_dilated_cls is not None
    ):
        return None, False
    if kind == "conv_transpose" and (
        module.mask is not None
        or module.transpose_kernel
        or (isinstance(module.padding, str) and module.padding not in ("SAME", "VALID"))
    ):
        return None, False
    return kind, False


def _dense_axes(module, ndim: int) -> tuple[int, ...]:
    if type(module) is nn.DenseGeneral:
        axis: Any = module.axis
        axis = axis if isinstance(axis, tuple | list) else (axis,)
        return tuple(sorted(int(a) % ndim for a in axis))
    return (ndim - 1,)


def _batch_norm_inference(module, args, kwargs) -> bool:
    """Whether a ``flax.linen.BatchNorm`` call normalizes with its running statistics (a fixed
    affine map per sample) and without a mask."""
    flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    flag = module.use_running_average if flag is None else flag
    return flag is True and kwargs.get("mask") is None


def _call_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _trace_state():
    """An opaque token of the current JAX trace: a layer called inside a transformation of the
    model itself (``nn.scan``, ``nn.remat``, ``nn.vmap``, a ``jvp``) sees another one, and its
    inputs cannot be tapped from outside that transformation."""
    return jax_core.get_opaque_trace_state()


def _record_calls(apply_fn, trainable, rebuild, x) -> tuple[dict, set, set]:
    """One shape-only trace of ``apply_fn`` on ``x``: ``{(path, method): [(in_shape, out_shape,
    out_dtype, module, kind, probe)]}`` of the supported layers' ``__call__`` and
    ``Embed.attend`` calls, the paths of layers called through another public method, and the
    paths of layers that cannot be tapped."""
    calls: dict[tuple, list] = {}
    other_methods: set[tuple] = set()
    untappable: set[tuple] = set()
    outer: list = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        kind, probe = _layer_kind(module)
        if kind is None:
            return out
        path = tuple(module.path)
        method = context.method_name
        if method == "attend" and kind == "embed" and type(module) is nn.Embed:
            pass
        elif method != "__call__":
            if not method.startswith("_") and method != "setup":
                other_methods.add(path)
            return out
        inp = _call_input(args, kwargs)
        if (isinstance(inp, JVPTracer) or isinstance(out, JVPTracer)
                or _trace_state() != outer[0]):
            # called inside a transformation of the model itself (e.g. the jvp of
            # ntkjax.linearize, nn.scan, nn.remat): its inputs cannot be tapped; the layer
            # falls back to Jacobians
            untappable.add(path)
            return out
        if type(module) is nn.BatchNorm and not _batch_norm_inference(module, args, kwargs):
            untappable.add(path)  # batch statistics mix the samples
            return out
        calls.setdefault((path, method), []).append(
            (tuple(np.shape(inp)), tuple(np.shape(out)), out.dtype, module, kind, probe))
        return out

    def run(p, x):
        outer.append(_trace_state())
        with nn.intercept_methods(interceptor):
            return apply_fn(rebuild(p), x)

    jax.eval_shape(run, trainable, x)
    return calls, other_methods, untappable


def _discover(apply_fn, params, x1) -> dict[tuple[str, ...], _Layer]:
    """Supported layers of a linen model, found by tracing one example and two (shapes only):
    a call whose input has the batch axis in front (1, then 2) is batched; one whose input
    shape does not change (an Embed on ``jnp.arange(L)``) is the same for every example."""
    if not is_variables_dict(params):
        return {}
    trainable, rebuild = split_params(params)
    one = x1[:1]
    calls, other_methods, untappable = _record_calls(apply_fn, trainable, rebuild, one)
    calls2, _, untappable2 = _record_calls(
        apply_fn, trainable, rebuild, jax.ShapeDtypeStruct((2, *one.shape[1:]), one.dtype))
    untappable |= untappable2
    layers = {}
    for (path, method), found in calls.items():
        if method != "__call__" or path in other_methods or path in untappable:
            continue
        attends = calls.get((path, "attend"), [])
        seen = [(f[0], f[1]) for f in found + attends]
        seen2 = [(f[0], f[1]) for f in calls2.get((path, "__call__"), [])
                 + calls2.get((path, "attend"), [])]
        if len(seen) != len(seen2):
            continue
        batched = [a[0][:1] == (1,) and b[0][:1] == (2,) and a[0][1:] == b[0][1:]
                   and a[1][:1] == (1,) and b[1][:1] == (2,) and a[1][1:] == b[1][1:]
                   for a, b in zip(seen, seen2, strict=True)]
        fixed = [a == b for a, b in zip(seen, seen2, strict=True)]
        kind = found[0][4]
        if all(batched):
            is_batched = True
        elif all(fixed) and kind in ("dense", "embed") and not attends:
            is_batched = False
        else:
            continue
        layer = _Layer(
            path=path,
            kind=kind,
            module=found[0][3].clone(parent=None),
            in_shapes=tuple(f[0] for f in found),
            out_shapes=tuple(f[1] for f in found),
            out_dtypes=tuple(f[2] for f in found),
            probe_scales=found[0][5],
            batched=is_batched,
            attend_in_shapes=tuple(f[0] for f in attends),
            attend_out_shapes=tuple(f[1] for f in attends),
            attend_dtypes=tuple(f[2] for f in attends),
        )
        if _layer_params(trainable, layer) is not None and _input_ok(layer):
            layers[path] = layer
    return layers


def _tap_shapes(layers) -> dict[tuple, tuple]:
    """``{tap key: ((out shape, dtype), ...)}``: one zero perturbation per call of each layer,
    keyed by its path, and by ``(*path, _ATTEND)`` for the calls of a tied ``Embed.attend``."""
    taps = {}
    for path, lay in layers.items():
        taps[path] = tuple(zip(lay.out_shapes, lay.out_dtypes, strict=True))
        if lay.attend_out_shapes:
            taps[(*path, _ATTEND)] = tuple(
                zip(lay.attend_out_shapes, lay.attend_dtypes, strict=True))
    return taps


# the tap key suffix of a tied ``Embed.attend`` (not a valid linen module name)
_ATTEND = "@attend"


def _layer_params(trainable, layer: _Layer):
    node = trainable
    for key in layer.path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if not isinstance(node, Mapping) or not set(node) <= _PARAM_NAMES[layer.kind]:
        return None
    if layer.kind == "norm":
        if not node:
            return None
    elif not set(node) & {"kernel", "embedding"}:  # a bias alone (its weight held fixed)
        return None
    if any(isinstance(v, Mapping) for v in node.values()):
        return None
    return node


def _input_ok(layer: _Layer) -> bool:
    if layer.kind in ("conv", "conv_transpose"):
        ks = layer.module.kernel_size
        n_spatial = 1 if isinstance(ks, int) else len(ks)
        return all(len(shape) == n_spatial + 2 for shape in layer.in_shapes)
    if layer.kind == "dense":
        return all(0 not in _dense_axes(layer.module, len(shape)) for shape in layer.in_shapes)
    return True


def count_structured_layers(apply_fn: Callable, params: Any, x1: jax.Array) -> int:
    """How many layers of the model the structured method factorizes."""
    return len(_discover(apply_fn, params, x1))


def _leaf_paths(trainable) -> list[tuple]:
    return [tuple(getattr(k, "key", getattr(k, "name", None)) for k in kp)
            for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]


def structured_fallback_params(
    apply_fn: Callable, params: Any, x1: jax.Array
) -> list[tuple[str, ...]]:
    """Paths of the trainable parameter leaves that ``ntk_method="structured"`` does not
    factorize: their NTK terms come from per-sample Jacobians (every other leaf's from its
    layer's inputs and cotangents, or for an additive table such as learned positions from
    its addition's cotangents, see the module doc). An additive table counts as factorized
    only when nothing else falls back (otherwise the model is served per sample and it is
    listed too). Shapes only; nothing is computed.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         h = nn.LayerNorm()(nn.Dense(4)(x))
        ...         return nn.Dense(1)(h * self.param("gain", nn.initializers.ones, (4,)))
        >>> x = jnp.ones((2, 3))
        >>> params = Net().init(jax.random.key(0), x)
        >>> structured_fallback_params(Net().apply, params, x)
        [('gain',)]
    """
    trainable, _ = split_params(params)
    layers = _discover(apply_fn, params, x1)
    rest_paths = [path for path in _leaf_paths(trainable) if path[:-1] not in layers]
    if layers and rest_paths and _batched_plan(apply_fn, params, layers, x1) is not None:
        return []  # one batched pass: the other leaves are additive (positional tables)
    return rest_paths


# ---------------------------------------------------------------------------------------------
# per-layer inputs in (N, T, K) form
# ---------------------------------------------------------------------------------------------


def _conv_patches(module, x):
    """(N, *out_spatial, prod(kernel) * C) patches such that the conv is a dense layer on them:
    ``y = patches @ kernel.reshape(-1, F)`` for a ``(*kernel, C, F)`` linen kernel."""
    return jnp.concatenate(_conv_patch_parts(module, x), axis=-1)


def _conv_patch_parts(module, x):
    """The patches of :func:`_conv_patches` as ``prod(kernel)`` parts (N, *out_spatial, C): one
    strided slice of the padded (and input-dilated) input per kernel offset. Joining them is a
    copy, where ``lax.conv_general_dilated_patches`` runs a convolution with a one-hot kernel;
    callers join them once, together with any extra columns."""
    ks = module.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    nsp = len(ks)

    def bcast(v):
        v = 1 if v is None else v
        return (v,) * nsp if isinstance(v, int) else tuple(v)

    kernel_dilation = bcast(module.kernel_dilation)
    strides = bcast(module.strides)
    input_dilation = bcast(module.input_dilation)
    dilated = [(k - 1) * d + 1 for k, d in zip(ks, kernel_dilation, strict=True)]
    padding = canonicalize_padding(module.padding, nsp)
    if padding == "CIRCULAR" or padding == "REFLECT":
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (ks[0] - 1), 0), (0, 0)])
        padding = "VALID"
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    else:
        pads = [tuple(int(v) for v in pad) for pad in padding]
    config = [(0, 0, 0)] + [
        (lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation, strict=True)
    ] + [(0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    out = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:-1], dilated, strides, strict=True)]
    slices = []
    for offset in np.ndindex(*ks):
        start = [0] + [o * d for o, d in zip(offset, kernel_dilation, strict=True)] + [0]
        limit = [x.shape[0]] + [
            st + (m - 1) * s + 1 for st, m, s in zip(start[1:-1], out, strides, strict=True)
        ] + [x.shape[-1]]
        slices.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
    return slices


def _conv_transpose_as_conv(module):
    """The stride-1 convolution of the stride-dilated input that ``flax.linen.ConvTranspose``
    (``lax.conv_transpose`` without kernel flip) computes, as the attributes
    :func:`_conv_patch_parts` reads: ``input_dilation`` = the strides, and the padding
    ``lax.conv_transpose`` derives from ``"SAME"`` / ``"VALID"`` for the dilated kernel (explicit
    pairs are the transposed convolution's own padding)."""
    ks = module.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)

    def bcast(v):
        v = 1 if v is None else v
        return (v,) * len(ks) if isinstance(v, int) else tuple(v)

    strides, dilation = bcast(module.strides), bcast(module.kernel_dilation)
    padding = module.padding
    if isinstance(padding, str):
        dilated = tuple((k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True))
        pads = list(transpose_padding(dilated, strides, "SAME" if padding == "SAME" else "VALID"))
    else:
        pads = [tuple(int(v) for v in pad) for pad in canonicalize_padding(padding, len(ks))]
    return types.SimpleNamespace(kernel_size=ks, kernel_dilation=dilation,
                                 strides=(1,) * len(ks), input_dilation=strides, padding=pads)


def _layer_inputs(layer: _Layer, x) -> tuple:
    """Per-sample layer input ``x`` of shape (N, 1, ...) as parts (N, T, K_j) whose join along
    the last axis is the (N, T, K) input of the dense form (one part, ids (N, T), for Embed)."""
    n = x.shape[0]
    if layer.batched:
        x = x[:, 0]
    if layer.kind == "embed":
        return (x.reshape(n, -1),)
    if layer.kind in ("conv", "conv_transpose"):
        module = layer.module
        if layer.kind == "conv_transpose":
            module = _conv_transpose_as_conv(module)
        return tuple(
            part.reshape(n, -1, part.shape[-1]) for part in _conv_patch_parts(module, x)
        )
    lead = 0 if layer.batched else 1  # (an unbatched call's input gained the batch axis)
    axes = [a + lead for a in _dense_axes(layer.module, x.ndim - lead)]
    k = len(axes)
    x = jnp.moveaxis(x, axes, list(range(x.ndim - k, x.ndim)))
    contracted = int(np.prod(x.shape[x.ndim - k :]))
    return (x.reshape(n, -1, contracted),)


def _joined_inputs(layer: _Layer, xs) -> tuple:
    """:func:`_layer_inputs` of every call of the layer, joined along the positions: a module
    called several times (shared weights) is one layer on all its calls' positions, its
    gradient the sum of the calls' gradients."""
    per_call = [_layer_inputs(layer, x) for x in xs]
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(*per_call, strict=True))


def _joined_cotangents(layer: _Layer, ds):
    """:func:`_layer_cotangents` of every call of the layer, joined along the positions."""
    return jnp.concatenate([_layer_cotangents(layer, d) for d in ds], axis=2)


def _layer_cotangents(layer: _Layer, d):
    """Cotangents (O, N, 1, *out) as (O, N, T, F)."""
    o, n = d.shape[:2]
    if layer.kind == "dense" and type(layer.module) is nn.DenseGeneral:
        feats = layer.module.features
        f = int(np.prod(feats)) if isinstance(feats, tuple | list) else int(feats)  # type: ignore[arg-type]
    else:
        f = d.shape[-1]
    return d.reshape(o, n, -1, f)


# ---------------------------------------------------------------------------------------------
# Gram terms
# ---------------------------------------------------------------------------------------------


def _contract_outputs_first(j1, j2, outputs: str):
    """:func:`contract_jacobians` for Jacobians laid out outputs first: (O, N1, P), (O, N2, P)."""
    spec = {"trace": "iap,ibp->ab", "diagonal": "iap,ibp->abi", "full": "iap,jbp->abij"}
    return jnp.einsum(spec[outputs], j1, j2, precision=PRECISION)


def _delta_gram(d1, d2, outputs: str):
    """sum_f d1[i,a,t,f] d2[j,b,s,f] as (a, t, b, s[, i[, j]]) for trace / diagonal / full."""
    if outputs == "trace":
        return jnp.einsum("iatf,ibsf->atbs", d1, d2, precision=PRECISION)
    if outputs == "diagonal":
        return jnp.einsum("iatf,ibsf->atbsi", d1, d2, precision=PRECISION)
    return jnp.einsum("iatf,jbsf->atbsij", d1, d2, precision=PRECISION)


def _combine(a, b):
    """sum_{t,s} a[a,t,b,s] * b[a,t,b,s,...] -> (a, b, ...)."""
    extra = b.ndim - 4
    a = a.reshape(a.shape + (1,) * extra)
    return jnp.sum(a * b, axis=(1, 3))


def _output_factor(outputs: str, o: int) -> int:
    return o * o if outputs == "full" else o


def _sum_terms(terms: Iterable[jax.Array]) -> jax.Array:
    """The sum of a non-empty sequence of arrays (without a Python 0 to start from)."""
    return functools.reduce(operator.add, terms)


def _weight_term(
    kind, x1, d1, x2, d2, outputs, *, vocab=None, form="auto", scale=1.0, bias_scale=None
):
    """The NTK contribution of a layer ``y = scale * x W (+ bias_scale * b)``: its weight and,
    when ``bias_scale`` is not None, its bias, factored or materialized, whichever is cheaper
    (``form="auto"``; ``"factored"`` / ``"materialized"`` force one). ``x1``, ``x2``: the
    layer inputs as parts (see :func:`_layer_inputs`).

    The bias rides along with the weight: it is the weight of a constant input, so the factored
    form uses ``scale^2 (x_t . x'_s) + bias_scale^2`` and the materialized form appends
    ``bias_scale`` to every ``scale * x_t`` -- one Gram product for both, and no separate pass
    over the cotangents to sum them over positions."""
    o, n1, t, f = d1.shape
    n2, s = d2.shape[1], d2.shape[2]
    k = vocab if kind == "embed" else sum(part.shape[-1] for part in x1)
    kx = 1 if kind == "embed" else k
    factored = n1 * n2 * t * s * (kx + f * _output_factor(outputs, o))
    materialized = (n1 + n2) * o * t * k * f + n1 * n2 * k * f * _output_factor(outputs, o)
    bias_sq = 0.0 if bias_scale is None else bias_scale * bias_scale
    if form != "auto":
        factored, materialized = (0, 1) if form == "factored" else (1, 0)
    elif t == 1 and s == 1 and kind != "embed":
        gram = _sum_terms(
            jnp.matmul(p1[:, 0], p2[:, 0].T, precision=PRECISION)
            for p1, p2 in zip(x1, x2, strict=True)
        )
        a = (scale * scale) * gram + bias_sq
        b = _contract_outputs_first(d1[:, :, 0], d2[:, :, 0], outputs)
        return a.reshape(a.shape + (1,) * (b.ndim - 2)) * b
    if factored <= materialized:
        return _factored_term(kind, x1, d1, x2, d2, outputs, scale * scale, bias_sq)

    same = x2 is x1

    def joined(parts):
        """scale * x, then bias_scale, then zeros up to a multiple of 8 columns (aligned
        matmuls; zero columns add nothing), in one concatenation."""
        if kind == "embed":
            assert vocab is not None
            parts = (jax.nn.one_hot(parts[0], vocab, dtype=d1.dtype),)
        if not (isinstance(scale, float) and scale == 1.0):
            parts = tuple(scale * part for part in parts)
        lead = parts[0].shape[:-1]
        dtype = parts[0].dtype
        if bias_scale is not None:
            parts = (*parts, jnp.broadcast_to(jnp.asarray(bias_scale, dtype), (*lead, 1)))
        width = sum(part.shape[-1] for part in parts)
        if width % 8 and len(parts) > 1:
            parts = (*parts, jnp.zeros((*lead, -width % 8), dtype))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    x1 = joined(x1)
    x2 = x1 if same else joined(x2)
    return _materialized_term(x1, d1, x2, d2, outputs)


# Bytes of one token block's pair products in the factored form (x_t . x'_s and delta_t .
# delta'_s, for a block of the first side's positions t against all positions s), so that its
# peak memory does not grow with T * S (a fixed size: the block, hence the rounding, does not
# depend on the machine's state).
_PAIR_BLOCK_BYTES = 32 * 2**20


def _factored_term(kind, x1, d1, x2, d2, outputs, scale_sq, bias_sq):
    """``sum_{t,s} (scale_sq x_t . x'_s + bias_sq) (delta_t . delta'_s)`` as (n1, n2, ...), in
    blocks of the positions ``t`` (``lax.scan``, one block's pair products at a time, at most
    :data:`_PAIR_BLOCK_BYTES`): the ``(n1, T, n2, S)`` Gram arrays are never formed whole.
    ``x1``, ``x2``: input parts (n, T, K_j), or token ids ((n, T),) for ``kind="embed"``."""
    o, n1, t, _ = d1.shape
    n2, s = d2.shape[1], d2.shape[2]

    def pair(parts1, e1):
        if kind == "embed":
            (ids1,), (ids2,) = parts1, x2
            a = (ids1[:, :, None, None] == ids2[None, None, :, :]).astype(e1.dtype)
        else:
            a = _sum_terms(
                jnp.einsum("atk,bsk->atbs", p1, p2, precision=PRECISION)
                for p1, p2 in zip(parts1, x2, strict=True)
            )
        return _combine(scale_sq * a + bias_sq, _delta_gram(e1, d2, outputs))

    per_position = n1 * n2 * s * {"trace": 1, "diagonal": o}.get(outputs, o * o)
    block = _largest_divisor_at_most(t, _PAIR_BLOCK_BYTES // (per_position * d1.dtype.itemsize))
    if block == t:
        return pair(x1, d1)

    def blocks(v, axis):  # positions (axis) split into blocks of `block`, blocks first
        v = v.reshape(*v.shape[:axis], -1, block, *v.shape[axis + 1:])
        return jnp.moveaxis(v, axis, 0)

    def step(total, chunk):
        parts1, e1 = chunk
        return total + pair(parts1, e1), None

    first = pair(tuple(part[:, :block] for part in x1), d1[:, :, :block])
    total, _ = jax.lax.scan(
        step, first,
        (tuple(blocks(part[:, block:], 1) for part in x1), blocks(d1[:, :, block:], 2)),
    )
    return total


# Bytes of per-sample gradients computed at once by the materialized form: a chunk of outputs
# small enough to stay in the last-level cache between its batched matmul and its Gram product.
_GRAD_CHUNK_BYTES = 16 * 2**20


def _materialized_term(x1, d1, x2, d2, outputs):
    """``<G_{a,i}, G'_{b,j}>`` from per-sample gradients ``G[a, k, i, f] = sum_t x[a,t,k]
    d[i,a,t,f]``, each a batched matmul with the outputs folded into its columns.

    For ``"trace"`` and ``"diagonal"`` the outputs are processed in chunks (a ``lax.scan`` over
    the leading output axis of the cotangents, no copy) so that one chunk's gradients stay in
    cache between their matmul and their Gram product; ``"full"`` needs every output at once.
    """
    same = x2 is x1 and d2 is d1
    o, n1, _, f = d1.shape
    n2, k = d2.shape[1], x1.shape[-1]

    def grads(x, d):  # x (n, t, k), d (c, n, t, f) -> (n, k, c, f)
        if d.shape[0] == 1:
            g = jax.lax.dot_general(x, d[0], (((1,), (1,)), ((0,), (0,))), precision=PRECISION)
            return g[:, :, None]
        return jax.lax.dot_general(x, d, (((1,), (2,)), ((0,), (1,))), precision=PRECISION)

    def term(c1, c2):
        g1 = grads(x1, c1)
        g2 = g1 if same else grads(x2, c2)
        if outputs == "trace":  # any common ordering of (k, i, f) will do
            return jnp.matmul(
                g1.reshape(g1.shape[0], -1), g2.reshape(g2.shape[0], -1).T, precision=PRECISION
            )
        n_a, n_b, c = g1.shape[0], g2.shape[0], g1.shape[2]
        g1 = jnp.moveaxis(g1, 2, 1).reshape(n_a, c, -1)
        g2 = g1 if same else jnp.moveaxis(g2, 2, 1).reshape(n_b, c, -1)
        return contract_jacobians(g1, g2, outputs)

    per_output = (n1 + (0 if same else n2)) * k * f * d1.dtype.itemsize
    chunk = o if outputs == "full" else _largest_divisor_at_most(o, _GRAD_CHUNK_BYTES // per_output)
    if chunk == o:
        return term(d1, d2)

    def split(d):  # (o, n, t, f) -> (o // chunk, chunk, n, t, f)
        return d.reshape(o // chunk, chunk, *d.shape[1:])

    c1 = split(d1)
    c2 = c1 if same else split(d2)
    if outputs == "trace":
        total, _ = jax.lax.scan(
            lambda acc, c: (acc + term(*c), None), jnp.zeros((n1, n2), d1.dtype), (c1, c2)
        )
        return total
    parts = jax.lax.map(lambda c: term(*c), (c1, c2))  # (o // chunk, n1, n2, chunk)
    return jnp.moveaxis(parts, 0, 2).reshape(n1, n2, o)


def _largest_divisor_at_most(o: int, limit: int) -> int:
    """The largest divisor of ``o`` that is at most ``max(limit, 1)``."""
    return max(c for c in range(1, o + 1) if o % c == 0 and c <= max(limit, 1))


def _scales(layer: _Layer, node, dtype):
    """(c, s): the layer computes y = c x W + s b. Read off by one gradient of the layer."""
    if not layer.probe_scales:
        return 1.0, 1.0
    k = int(node["kernel"].shape[0])
    unit = jnp.zeros((1, k), dtype).at[0, 0].set(1)

    def first_output(p):
        return layer.module.apply({"params": p}, unit)[0, 0]

    # a parameter held fixed (not in ``node``) still has to be there: zeros of its shape
    shapes = jax.eval_shape(layer.module.init, jax.random.key(0), unit)["params"]
    full = {name: node[name] if name in node else jnp.zeros(v.shape, v.dtype)
            for name, v in shapes.items()}
    grad = jax.grad(first_output)(full)
    c = grad["kernel"][0, 0]
    s = grad["bias"][0] if "bias" in node else 1.0
    return c, s


def _state(variables, path) -> dict[str, Any]:
    """The non-parameter collections of the layer at ``path`` (e.g. ``batch_stats``)."""
    state = {}
    for collection, tree in variables.items():
        if collection == "params":
            continue
        for key in path:
            tree = tree.get(key) if isinstance(tree, Mapping) else None
        if tree is not None:
            state[collection] = tree
    return state


def _norm_grads(layer: _Layer, node, variables, xs, d) -> dict[str, jax.Array]:
    """Per-sample gradients ``{name: (O, N, F)}`` of a norm layer ``y_t = gamma * xhat_t +
    beta`` (LayerNorm, RMSNorm, inference-mode BatchNorm, over the last axis):
    ``sum_t xhat_t * delta_{i,t}`` for the scale, ``sum_t delta_{i,t}`` for the bias --
    elementwise in the feature, so a "diagonal" factorization with ``O F`` numbers per sample.
    ``xhat`` is the layer itself applied with unit scale and zero bias (and its non-parameter
    collections in ``variables``: a BatchNorm's running statistics); ``xs`` its inputs
    (N, 1, ...), one per call, ``d`` the calls' joined cotangents (O, N, T, F) (see
    :func:`_joined_cotangents`)."""
    state = _state(variables, layer.path)
    unit = {name: (jnp.ones if name == "scale" else jnp.zeros)(v.shape, v.dtype)
            for name, v in node.items()}
    module = layer.module
    if type(module) is nn.BatchNorm and module.use_running_average is None:
        module = module.clone(use_running_average=True)  # was given at call time
    xhats: list[jax.Array] = [
        jnp.asarray(module.apply({**state, "params": unit}, x[:, 0])) for x in xs
    ]
    xhat = jnp.concatenate(
        [h.reshape(x.shape[0], -1, h.shape[-1]) for h, x in zip(xhats, xs, strict=True)], axis=1
    ).astype(d.dtype)
    grads = {}
    if "scale" in node:
        grads["scale"] = jnp.einsum("atf,iatf->iaf", xhat, d, precision=PRECISION)
    if "bias" in node:
        grads["bias"] = jnp.sum(d, axis=2)
    return grads


def _tied_embedding_grads(layer: _Layer, node, ids, d, queries, d_att) -> jax.Array:
    """Per-sample gradients ``(O, N, V, F)`` of a ``flax.linen.Embed`` table ``E`` used both as
    a lookup (``y_t = E[token_t]``) and as a tied output head (``Embed.attend``: ``z_s = E
    q_s``, logits over the vocabulary): the sum of both uses' gradients,
    ``G_i = sum_t onehot(token_t) (x) delta_{i,t} + sum_s zeta_{i,s} (x) q_s`` with ``zeta``
    the cotangents of the logits. The kernel ``<G_i, G'_j>`` thus has the lookup-lookup and
    attend-attend terms and both cross terms (a weight shared by two uses, as in Novak et al.
    2022, section 4). ``ids`` (N, T), ``d`` (O, N, T, F); ``queries`` the attend inputs (N, 1,
    ..., F) per call, ``d_att`` their joined cotangents (O, N, S, V)."""
    vocab, feats = node["embedding"].shape
    q = jnp.concatenate([x[:, 0].reshape(x.shape[0], -1, feats) for x in queries], axis=1)
    onehot = jax.nn.one_hot(ids, vocab, dtype=d.dtype)
    lookup = jnp.einsum("ntv,intf->invf", onehot, d, precision=PRECISION)
    attend = jnp.einsum("nsf,insv->invf", q.astype(d.dtype), d_att, precision=PRECISION)
    return lookup + attend


def _attend_cotangents(ds):
    """The cotangents (O, N, 1, ..., V) of each ``Embed.attend`` call as (O, N, S, V)."""
    return jnp.concatenate([d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1]) for d in ds],
                           axis=2)


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------


def _split_rest(trainable, layers):
    """Leaves covered by structured layers vs the rest (by path)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    covered = []
    for key_path, _ in paths_leaves:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in key_path)
        covered.append(len(keys) >= 1 and keys[:-1] in layers)
    leaves = [leaf for _, leaf in paths_leaves]
    rest = [leaf for leaf, c in zip(leaves, covered, strict=True) if not c]

    def merge(rest_leaves):
        it = iter(rest_leaves)
        merged = [leaf if c else next(it) for leaf, c in zip(leaves, covered, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, merged)

    return rest, merge


def _apply_tapped(apply_fn, params, x, eps):
    """``apply_fn(params, x)`` with ``eps[path][c]`` added to the output of call ``c`` of the
    layer at ``path``; also returns each such call's input (``{path: (input, ...)}``)."""
    captured: dict[tuple, list] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name in ("__call__", "attend"):
            path = tuple(context.module.path)
            if context.method_name == "attend":
                path = (*path, _ATTEND)
            if path in eps:
                calls = captured.setdefault(path, [])
                calls.append(_call_input(args, kwargs))
                return out + eps[path][len(calls) - 1].astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, x)
    return out, {path: tuple(calls) for path, calls in captured.items()}


def _per_sample_taps(apply_fn, rebuild, merge, layers, out_dim, dtype):
    """x_single -> (rest Jacobians (O, ...), cotangents {path: (O, 1, *out)}, inputs);
    vmapped over samples by the caller, which moves the cotangents' output axis first."""

    def tapped(rest, eps, x):
        out, captured = _apply_tapped(apply_fn, rebuild(merge(rest)), x[None], eps)
        return jnp.reshape(out, (-1,)), captured

    basis = jnp.eye(out_dim, dtype=dtype)

    def per_sample(rest, x):
        eps = {key: tuple(jnp.zeros(shape, dtype) for shape, dtype in calls)
               for key, calls in _tap_shapes(layers).items()}
        _, vjp, captured = jax.vjp(lambda r, e: tapped(r, e, x), rest, eps, has_aux=True)
        rest_jac, deltas = jax.vmap(vjp)(basis)
        return rest_jac, deltas, captured

    return per_sample


def _batched_taps(apply_fn, params, layers, out_dim, dtype):
    """Like :func:`_per_sample_taps` for a model without fallback parameters, through one
    batched forward pass: for a model that treats samples independently the gradient of
    ``sum_a e_i . f(x_a)`` with respect to a perturbation of sample ``a``'s layer output is that
    sample's cotangent, so the O backward passes run on the whole batch at once."""

    def taps(x):
        n = x.shape[0]

        def tapped(eps):
            out, captured = _apply_tapped(apply_fn, params, x, eps)
            return jnp.reshape(out, (n, out_dim)), captured

        eps = {key: tuple(jnp.zeros((n, *shape[1:]), dtype) for shape, dtype in calls)
               for key, calls in _tap_shapes(layers).items()}
        _, vjp, captured = jax.vjp(tapped, eps, has_aux=True)
        basis = jnp.broadcast_to(jnp.eye(out_dim, dtype=dtype)[:, None, :], (out_dim, n, out_dim))
        (deltas,) = jax.vmap(vjp)(basis)  # (O, N, *out): outputs first, as used below
        inputs = {k: tuple(v[:, None] for v in calls) for k, calls in captured.items()}
        return deltas, inputs

    return taps


# primitives that move or reshape a parameter without reading the batch (nor mixing values)
_STRUCTURAL = frozenset({"convert_element_type", "reshape", "broadcast_in_dim", "squeeze",
                         "expand_dims", "slice", "transpose", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class _Additive:
    """A parameter leaf added to a batched activation (a learned positional table
    ``h + self.param("pos", ...)[:T]``): ``chain`` the equations that move it (slices,
    reshapes, broadcasts without the batch), ``taps`` ``(equation, operand, kept axes)`` of the
    ``add``s that put it on every example; its per-example gradient is the cotangent of each
    such ``add``'s output, summed over the axes it was broadcast along and moved back through
    ``chain`` -- a contraction of cotangents only (Novak et al. 2022, section 4: a bias)."""

    invar: int  # the leaf's position among the jaxpr's inputs
    chain: tuple[int, ...]
    taps: tuple[tuple[int, int, tuple[int, ...]], ...]


def _forward(apply_fn, rebuild, merge, layers, out_dim):
    """``(eps, rest, x) -> ((N, O) outputs, captured layer inputs)``: the tapped model."""

    def fwd(eps, rest, x):
        out, captured = _apply_tapped(apply_fn, rebuild(merge(rest)), x, eps)
        return jnp.reshape(out, (x.shape[0], out_dim)), captured

    return fwd


def _eps(layers, n: int) -> dict:
    return {key: tuple(jnp.zeros((n, *shape[1:]), dtype) for shape, dtype in calls)
            for key, calls in _tap_shapes(layers).items()}


def _additive_leaves(fwd, layers, rest, x) -> tuple[Any, dict[int, _Additive]]:
    """``(closed jaxpr of fwd on x, {rest leaf index: _Additive})``. The model is traced at
    ``N`` and ``N + 1`` examples (shapes only): a value whose shape does not change is free of
    the batch, an ``add`` output whose first axis follows ``N`` holds one example per row. A
    leaf counts only when every use of it (through ``_STRUCTURAL`` equations) is such an
    ``add`` with a batched other operand."""
    n = x.shape[0]
    spec = jax.ShapeDtypeStruct((n + 1, *x.shape[1:]), x.dtype)
    closed = jax.make_jaxpr(fwd)(_eps(layers, n), rest, x)
    other = jax.make_jaxpr(fwd)(_eps(layers, n + 1), rest, spec)
    eqns, eqns2 = closed.jaxpr.eqns, other.jaxpr.eqns
    found: dict[int, _Additive] = {}
    if len(eqns) != len(eqns2) or any(
            a.primitive != b.primitive for a, b in zip(eqns, eqns2, strict=True)):
        return closed, found
    uses: dict[Any, list[int]] = {}
    for k, eqn in enumerate(eqns):
        for v in eqn.invars:
            if not isinstance(v, jax_core.Literal):
                uses.setdefault(v, []).append(k)
    outvars = {v for v in closed.jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    first = len(jax.tree_util.tree_leaves(_eps(layers, n)))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(rest)):
        var = closed.jaxpr.invars[first + i]
        chain: list[int] = []
        taps: list[tuple[int, int, tuple[int, ...]]] = []
        frontier, ok = [var], jnp.issubdtype(leaf.dtype, jnp.inexact)
        while frontier and ok:
            v = frontier.pop()
            ok = v not in outvars
            for k in uses.get(v, []):
                eqn, out, out2 = eqns[k], eqns[k].outvars[0], eqns2[k].outvars[0]
                name = eqn.primitive.name
                if name in _STRUCTURAL and len(eqn.invars) == 1:
                    ok = ok and out.aval.shape == out2.aval.shape  # free of the batch
                    chain.append(k)
                    frontier.append(out)
                elif name == "add" and len(eqn.invars) == 2 and eqn.invars.count(v) == 1:
                    operand = eqn.invars.index(v)
                    shape, full, full2 = v.aval.shape, out.aval.shape, out2.aval.shape
                    ok = ok and (len(shape) == len(full) and shape[:1] == (1,)
                                 and full[:1] == (n,) and full2[:1] == (n + 1,)
                                 and full[1:] == full2[1:])
                    kept = tuple(a for a in range(1, len(full)) if shape[a] == full[a])
                    taps.append((k, operand, kept))
                else:
                    ok = False
                if not ok:
                    break
        if ok and taps:
            found[i] = _Additive(first + i, tuple(sorted(chain)), tuple(taps))
    return closed, found


def _eval_tapped(closed, args, eps_adds: Mapping[int, jax.Array]):
    """The closed jaxpr evaluated on ``args`` with ``eps_adds[k]`` added to the output of
    equation ``k``."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(closed.jaxpr.invars, args, strict=True))
    for k, eqn in enumerate(closed.jaxpr.eqns):
        outs = eqn.primitive.bind(*map(read, eqn.invars),
                                  **eqn.primitive.get_bind_params(eqn.params))
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        if k in eps_adds:
            outs[0] = outs[0] + eps_adds[k].astype(outs[0].dtype)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in closed.jaxpr.outvars]


def _additive_grads(closed, additive: _Additive, leaf, cotangents):
    """Per-example gradients ``(N, O, *leaf)`` of an additive leaf from the cotangents
    ``{equation: (O, N, *out)}`` of its ``add``s' outputs: each summed over the axes the leaf
    was broadcast along, then pulled back through the leaf's (linear) ``chain``."""
    eqns = closed.jaxpr.eqns

    def moved(p):  # {var: value} of the leaf and of every value its chain makes of it
        env = {closed.jaxpr.invars[additive.invar]: p}
        for k in additive.chain:
            eqn = eqns[k]
            env[eqn.outvars[0]] = eqn.primitive.bind(
                env[eqn.invars[0]], **eqn.primitive.get_bind_params(eqn.params))
        return env

    total = None
    for k, operand, kept in additive.taps:
        var = eqns[k].invars[operand]
        shape = var.aval.shape
        summed = tuple(a + 1 for a in range(1, len(shape)) if a not in kept)
        c = cotangents[k]  # (O, N, *out)
        c = jnp.sum(c, axis=summed, keepdims=True) if summed else c

        def one(ci, var=var, shape=shape):
            _, vjp = jax.vjp(lambda p: moved(p)[var], leaf)
            return vjp(ci.reshape(shape).astype(var.aval.dtype))[0]

        g = jax.vmap(jax.vmap(one))(c)  # (O, N, *leaf)
        total = g if total is None else total + g
    assert total is not None
    return jnp.moveaxis(total, 0, 1)


def _batched_plan(apply_fn, params, layers, x):
    """``(rest, fwd)`` when the whole model can be served by one batched pass: every layer
    batched and every other (non-empty) leaf additive (``fwd`` None when there is none); else
    None."""
    if not all(lay.batched for lay in layers.values()):
        return None
    trainable, rebuild = split_params(params)
    rest, merge = _split_rest(trainable, layers)
    if not any(leaf.size for leaf in rest):
        return rest, None
    out = jax.eval_shape(apply_fn, params, x[:1])
    fwd = _forward(apply_fn, rebuild, merge, layers, int(np.prod(out.shape[1:])))
    _, additive = _additive_leaves(fwd, layers, rest, x)
    if any(leaf.size and i not in additive for i, leaf in enumerate(rest)):
        return None
    return rest, fwd


def _batched_additive_taps(fwd, rest, layers, out_dim, dtype):
    """:func:`_batched_taps` for a model whose only other leaves are additive (see
    :class:`_Additive`): the tapped jaxpr evaluated with perturbations on their ``add``s too;
    returns their per-example gradients in place of Jacobians."""

    def taps(x):
        n = x.shape[0]
        closed, additive = _additive_leaves(fwd, layers, rest, x)
        if any(leaf.size and i not in additive for i, leaf in enumerate(rest)):
            raise NotImplementedError(  # (decided on x1: the same model on other examples)
                "structured NTK: a parameter added to the activations of x1 is used otherwise "
                "on x2; use ntk_method='jacobian'.")
        eps = _eps(layers, n)
        rest_leaves = jax.tree_util.tree_leaves(rest)
        eqns = closed.jaxpr.eqns
        adds = {k: jnp.zeros(eqns[k].outvars[0].aval.shape, eqns[k].outvars[0].aval.dtype)
                for a in additive.values() for k, _, _ in a.taps}

        def tapped(e, a):
            outs = _eval_tapped(closed, [*jax.tree_util.tree_leaves(e), *rest_leaves, x], a)
            return outs[0], outs[1:]

        _, vjp, captured = jax.vjp(tapped, eps, adds, has_aux=True)
        basis = jnp.broadcast_to(jnp.eye(out_dim, dtype=dtype)[:, None, :], (out_dim, n, out_dim))
        deltas, add_cts = jax.vmap(vjp)(basis)
        captured_tree = _captured_tree(layers)
        inputs = jax.tree_util.tree_unflatten(captured_tree, captured)
        inputs = {k: tuple(v[:, None] for v in calls) for k, calls in inputs.items()}
        jac = [
            _additive_grads(closed, additive[i], leaf, add_cts) if i in additive
            else jnp.zeros((n, out_dim, *leaf.shape), leaf.dtype)
            for i, leaf in enumerate(rest_leaves)
        ]
        return jac, deltas, inputs

    return taps


def _captured_tree(layers):
    """The tree structure of the captured inputs of :func:`_apply_tapped` (a dict of tuples,
    one entry per call of each tap key, in key order)."""
    return jax.tree_util.tree_structure(
        {key: tuple(0 for _ in calls) for key, calls in _tap_shapes(layers).items()})


def _taps(apply_fn, params, layers, x):
    """``(rest, per_sample, dtype)``: the leaves not covered by ``layers`` and
    ``per_sample(rest, x) -> (rest Jacobians (N, O, *leaf), cotangents {path: (O, N, 1, *out)},
    inputs {path: (N, 1, ...)})``, through one batched pass when nothing falls back (additive
    leaves -- positional tables -- get their gradients from cotangents, in place of
    Jacobians)."""
    trainable, rebuild = split_params(params)
    out = jax.eval_shape(apply_fn, params, x[:1])
    out_dim = int(np.prod(out.shape[1:]))
    dtype = out.dtype
    plan = _batched_plan(apply_fn, params, layers, x)
    if plan is not None:
        rest, fwd = plan
        if fwd is None:
            taps = _batched_taps(apply_fn, params, layers, out_dim, dtype)

            def batched(_: Any, x: jax.Array) -> tuple:
                return [], *taps(x)

            return rest, batched, dtype
        additive_taps = _batched_additive_taps(fwd, rest, layers, out_dim, dtype)

        def batched_additive(_: Any, x: jax.Array) -> tuple:
            return additive_taps(x)

        return rest, batched_additive, dtype
    rest, merge = _split_rest(trainable, layers)
    vmapped = jax.vmap(
        _per_sample_taps(apply_fn, rebuild, merge, layers, out_dim, dtype),
        in_axes=(None, 0),
    )

    def one_by_one(rest: Any, x: jax.Array) -> tuple:
        jac, deltas, inputs = vmapped(rest, x)
        deltas = {k: tuple(jnp.moveaxis(v, 1, 0) for v in calls) for k, calls in deltas.items()}
        return jac, deltas, inputs

    return rest, one_by_one, dtype


def structured_kernel(
    apply_fn: Callable,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    outputs: Outputs = "trace",
    form: Literal["auto", "factored", "materialized"] = "auto",
) -> jax.Array | None:
    """The empirical NTK by per-layer factorization (see module doc); same contract as
    ``empirical_ntk_fn(..., ntk_method="structured")`` but not jitted and without validation.

    ``form``: ``"auto"`` picks, per layer, the factored or the materialized form by FLOPs;
    ``"factored"`` or ``"materialized"`` force one for every layer (for testing).
    """
    layers = _discover(apply_fn, params, x1)
    trainable, rebuild = split_params(params)
    if not layers:
        return leaf_jacobian_kernel(per_sample_fn(apply_fn, rebuild), trainable, x1, x2, outputs)
    rest, per_sample, dtype = _taps(apply_fn, params, layers, x1)
    jac1, deltas1, inputs1 = per_sample(rest, x1)
    if x2 is None:
        jac2, deltas2, inputs2 = jac1, deltas1, inputs1
    else:
        jac2, deltas2, inputs2 = per_sample(rest, x2)

    total: jax.Array | None = None

    def add(term):
        nonlocal total
        total = term if total is None else total + term

    rest_kernel = contract_leaf_jacobians(jac1, jac2, outputs)
    if rest_kernel is not None:
        add(rest_kernel)
    for path, layer in layers.items():
        node = _layer_params(trainable, layer)
        assert node is not None  # _discover keeps only layers whose params it found
        d1 = _joined_cotangents(layer, deltas1[path])
        d2 = d1 if x2 is None else _joined_cotangents(layer, deltas2[path])
        if layer.kind == "norm":
            g1 = jnp.concatenate(list(_norm_grads(layer, node, params, inputs1[path], d1).values()),
                                 axis=-1)
            g2 = g1 if x2 is None else jnp.concatenate(
                list(_norm_grads(layer, node, params, inputs2[path], d2).values()), axis=-1)
            add(_contract_outputs_first(g1, g2, outputs))
            continue
        xi1 = _joined_inputs(layer, inputs1[path])
        xi2 = xi1 if x2 is None else _joined_inputs(layer, inputs2[path])
        if layer.attend_in_shapes:
            tied = (*path, _ATTEND)
            g1 = _tied_embedding_grads(layer, node, xi1[0], d1, inputs1[tied],
                                       _attend_cotangents(deltas1[tied]))
            g2 = g1 if x2 is None else _tied_embedding_grads(
                layer, node, xi2[0], d2, inputs2[tied], _attend_cotangents(deltas2[tied]))
            add(_contract_outputs_first(g1.reshape(*g1.shape[:2], -1),
                                        g2.reshape(*g2.shape[:2], -1), outputs))
            continue
        c, s = _scales(layer, node, dtype)
        vocab = node["embedding"].shape[0] if layer.kind == "embed" else None
        add(_weight_term(
            layer.kind, xi1, d1, xi2, d2, outputs, vocab=vocab, form=form, scale=c,
            bias_scale=s if "bias" in node else None,
        ))
    return total


# ---------------------------------------------------------------------------------------------
# projected features (random features of the empirical NTK)
# ---------------------------------------------------------------------------------------------

def kronecker_blocks(dim: int, rank: int) -> int:
    """``ceil(dim / rank^2)``: the Kronecker blocks of rank ``rank`` that give ``dim``
    features (the last block's features beyond ``dim`` are dropped)."""
    return -(-dim // (rank * rank))


def _default_view(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The view a leaf of ``shape`` is projected through: ``(d_in, d_out)`` -- a matrix, all
    axes but the last then the last; a vector of more than ``rank**2`` entries, zero-padded
    to ``a x b`` with ``a = ceil(sqrt(size))`` -- projected by Kronecker blocks, or
    ``(size,)``: a shorter vector, projected by a dense Gaussian sketch (a longer one's dense
    sketch would cost ``size D`` multiply-adds per example and output, its Kronecker blocks
    about ``size D / rank``)."""
    size = int(np.prod(shape))
    if len(shape) >= 2:
        return int(np.prod(shape[:-1])), int(shape[-1])
    if size <= rank * rank:
        return (size,)
    rows = int(np.ceil(np.sqrt(size)))
    return rows, -(-size // rows)


def projection_views(apply_fn: Callable, params: Any, x: jax.Array,
                     rank: int) -> list[tuple[int, ...] | None]:
    """Per trainable leaf (in ``jax.tree_util.tree_leaves`` order), the view its projection
    uses, None for a leaf without features (empty or not floating): ``(d_in, d_out)`` for
    Kronecker blocks -- a leaf with two or more axes is the matrix of all axes but the last
    by the last, a ``DenseGeneral`` kernel the matrix of its contracted input axes by its
    output features (the factored form's ``x_t (x) delta_t``), a vector of more than
    ``rank**2`` entries the zero-padded ``a x b`` matrix with ``a = ceil(sqrt(size))`` -- or
    ``(size,)``, a shorter vector, for a dense Gaussian sketch.
    Shapes only."""
    trainable, _ = split_params(params)
    leaves = jax.tree_util.tree_leaves(trainable)
    views: list[tuple[int, ...] | None] = [
        _default_view(tuple(leaf.shape), rank)
        if leaf.size and jnp.issubdtype(leaf.dtype, jnp.inexact) else None
        for leaf in leaves
    ]
    layers = _discover(apply_fn, params, x[:1])
    index = {path: i for i, path in enumerate(_leaf_paths(trainable))}
    for path, layer in layers.items():
        i = index.get((*path, "kernel"))
        if i is not None and layer.kind == "dense" and type(layer.module) is nn.DenseGeneral:
            feats = layer.module.features
            f = int(np.prod(feats)) if isinstance(feats, tuple | list) else int(feats)  # type: ignore[arg-type]
            views[i] = (leaves[i].size // f, f)
    return views


def draw_projection(key: jax.Array, view: tuple[int, ...], dim: int, rank: int,
                    dtype: Any) -> tuple[jax.Array, ...]:
    """One leaf's projection for ``view`` (:func:`projection_views`), standard normal
    entries: ``(P_in, P_out)``, ``(d_in, B rank)`` and ``(d_out, B rank)`` with
    ``B = kronecker_blocks(dim, rank)`` (from ``jax.random.split(key)``), or ``(S,)``, a
    dense ``(size, dim)`` sketch (from ``key``)."""
    if len(view) == 1:
        return (jax.random.normal(key, (view[0], dim), dtype),)
    k_in, k_out = jax.random.split(key)
    columns = kronecker_blocks(dim, rank) * rank
    return (jax.random.normal(k_in, (view[0], columns), dtype),
            jax.random.normal(k_out, (view[1], columns), dtype))


def _kronecker_features(x_proj, d_proj, dim: int, rank: int):
    """``(N, O, dim)`` from ``x_proj`` ``(N, T, B rank)`` (``P_in^T x_t``) and ``d_proj``
    ``(O, N, T, B rank)`` (``P_out^T delta_t``): ``sum_t`` of their outer product per block,
    flattened block by block, the first ``dim`` kept, over ``sqrt(dim)``."""
    n, t, columns = x_proj.shape
    o = d_proj.shape[0]
    blocks = columns // rank
    phi = jnp.einsum("ntbp,intbq->nibpq", x_proj.reshape(n, t, blocks, rank),
                     d_proj.reshape(o, n, t, blocks, rank), precision=PRECISION)
    return phi.reshape(n, o, blocks * rank * rank)[..., :dim] / np.sqrt(dim)


def _project_formed(g, projection, dim: int, rank: int):
    """``(n, O, dim)`` features of formed per-sample gradients ``g`` ``(n, O, *leaf)`` by
    one leaf's ``projection`` (:func:`draw_projection`)."""
    n, o = g.shape[:2]
    flat = g.reshape(n, o, -1)
    if len(projection) == 1:
        return jnp.matmul(flat, projection[0], precision=PRECISION) / np.sqrt(dim)
    p_in, p_out = projection
    d_in, d_out = p_in.shape[0], p_out.shape[0]
    if d_in * d_out > flat.shape[-1]:  # a long vector viewed as a zero-padded matrix
        flat = jnp.pad(flat, ((0, 0), (0, 0), (0, d_in * d_out - flat.shape[-1])))
    right = jnp.einsum("nijf,fc->nijc", flat.reshape(n, o, d_in, d_out), p_out,
                       precision=PRECISION)  # (n, O, d_in, B rank)
    # rows j of G P_out become "positions": sum_j (P_in^T e_j)(P_out^T G^T e_j)^T
    return _kronecker_features(jnp.broadcast_to(p_in, (n, d_in, p_in.shape[1])),
                               jnp.moveaxis(right, 1, 0), dim, rank)


def project_gradient(g: jax.Array, key: jax.Array, dim: int, rank: int,
                     split: int | None = None) -> jax.Array:
    """Features ``(n, O, dim)`` of one leaf's per-sample gradients ``g`` ``(n, O, *leaf)``
    with ``E[phi . phi'] = <g, g'>`` over ``key``.

    The leaf is a matrix ``G`` ``(d_in, d_out)``: its first ``split`` axes by the others
    (default: all but the last by the last; a long vector zero-padded to about a square,
    see :func:`projection_views`), projected as ``vec(P_in^T G P_out) / sqrt(dim)`` by
    ``ceil(dim / rank^2)`` independent Kronecker blocks (``P_in`` ``(d_in, rank)``,
    ``P_out`` ``(d_out, rank)``, standard normal; LoGra, Choe et al. 2024, "What is Your
    Data Worth to GPT?", section 3), the first ``dim`` of their ``rank^2`` features each:
    every feature has ``E[(p^T G q)(p^T G' q)] = tr(G^T G') = <G, G'>``. A vector of at
    most ``rank**2`` entries gets a dense ``(size, dim)`` Gaussian sketch. The projection is
    :func:`draw_projection` of ``key``."""
    shape = tuple(g.shape[2:])
    if split is None:
        view = _default_view(shape, rank)
    else:
        view = (int(np.prod(shape[:split])), int(np.prod(shape[split:])))
    return _project_formed(g, draw_projection(key, view, dim, rank, g.dtype), dim, rank)


def project_leaf_gradients(grads: list, projections: list, dim: int,
                           rank: int) -> jax.Array | None:
    """``sum_l R_l^T g_l``, ``(n, O, dim)``: formed per-sample gradients ``grads[l]``
    ``(n, O, *leaf)`` by their leaves' ``projections[l]`` (:func:`draw_projection`; None
    skips the leaf), None when no leaf has features."""
    parts = [_project_formed(g, p, dim, rank)
             for g, p in zip(grads, projections, strict=True) if p is not None]
    return functools.reduce(operator.add, parts) if parts else None


def _layer_projection(layer: _Layer, xs, d, projection, dim: int, rank: int, scale):
    """``(N, O, dim)``: the Kronecker features of the weight gradient ``G_i = scale sum_t
    x_t (x) delta_{i,t}`` without forming it -- ``sum_t (P_in^T scale x_t) (P_out^T
    delta_{i,t})^T`` per block (LoGra, Choe et al. 2024). ``xs``: the input parts
    (N, T, K_j) (token ids (N, T) for Embed: rows of ``P_in``), ``d`` (O, N, T, F)."""
    p_in, p_out = projection
    if layer.kind == "embed":
        (ids,) = xs
        x_proj = p_in[ids]  # (N, T, B rank): P_in^T of the one-hot tokens
    else:
        x_proj, start = 0.0, 0
        for part in xs:
            width = part.shape[-1]
            x_proj = x_proj + jnp.matmul(part, p_in[start:start + width], precision=PRECISION)
            start += width
    d_proj = jnp.matmul(d, p_out, precision=PRECISION)
    return _kronecker_features(scale * x_proj, d_proj, dim, rank)


def structured_projected_features(
    apply_fn: Callable, params: Any, x: jax.Array, projections: list, dim: int, rank: int
) -> jax.Array | None:
    """``(N, O, dim)`` random features of the empirical NTK, ``sum_l R_l^T g_l`` over the
    trainable leaves ``l`` with the leaves' ``projections`` (:func:`draw_projection` of each
    leaf's :func:`projection_views`, None for a leaf without features), from each supported
    layer's inputs and cotangents: its weight by the Kronecker blocks, never forming a
    per-sample gradient; its bias (``s sum_t delta_t``) and every other leaf (per-sample
    Jacobians) as formed gradients. None for a model without a supported layer."""
    layers = _discover(apply_fn, params, x)
    if not layers:
        return None
    rest, per_sample, dtype = _taps(apply_fn, params, layers, x)
    return _projected_taps(params, layers, per_sample(rest, x), dtype, projections, dim, rank)


def _projected_taps(params, layers, taps, dtype, projections, dim, rank):
    """:func:`structured_projected_features` from the taps ``(rest Jacobians, cotangents,
    inputs)`` of a block of examples."""
    jac, deltas, inputs = taps
    trainable, _ = split_params(params)
    paths = _leaf_paths(trainable)
    index = {path: i for i, path in enumerate(paths)}
    total = None

    def add(features):
        nonlocal total
        total = features if total is None else total + features

    def add_formed(i, g):
        if projections[i] is not None:
            add(_project_formed(g, projections[i], dim, rank))

    rest_indices = [i for i, path in enumerate(paths) if path[:-1] not in layers]
    rest_features = project_leaf_gradients(jax.tree_util.tree_leaves(jac),
                                           [projections[i] for i in rest_indices], dim, rank)
    if rest_features is not None:
        add(rest_features)
    for path, layer in layers.items():
        node = _layer_params(trainable, layer)
        assert node is not None
        d = _joined_cotangents(layer, deltas[path])
        if layer.kind == "norm":
            for name, grad in _norm_grads(layer, node, params, inputs[path], d).items():
                add_formed(index[(*path, name)], jnp.moveaxis(grad, 0, 1))
            continue
        if layer.attend_in_shapes:
            tied = (*path, _ATTEND)
            (ids,) = _joined_inputs(layer, inputs[path])
            g = _tied_embedding_grads(layer, node, ids, d, inputs[tied],
                                      _attend_cotangents(deltas[tied]))
            add_formed(index[(*path, "embedding")], jnp.moveaxis(g, 0, 1))
            continue
        c, s = _scales(layer, node, dtype)
        weight = "embedding" if layer.kind == "embed" else "kernel"
        i = index[(*path, weight)]
        add(_layer_projection(layer, _joined_inputs(layer, inputs[path]), d,
                                 projections[i], dim, rank, c))
        if "bias" in node:
            add_formed(index[(*path, "bias")], jnp.moveaxis(s * jnp.sum(d, axis=2), 0, 1))
    assert total is not None
    return total


def last_hidden_features(apply_fn: Callable, params: Any, x: jax.Array) -> jax.Array:
    """The input of the last Dense-type layer (Dense, DenseGeneral, Conv, ntkjax Dense) that
    the linen model calls on ``x``, flattened to ``(N, features)``."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        kind, _ = _layer_kind(context.module)
        if context.method_name == "__call__" and kind in ("dense", "conv", "conv_transpose"):
            captured.append(_call_input(args, kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(params, x)
    if not captured:
        raise ValueError(
            "features='last_hidden' needs a linen model with a Dense, DenseGeneral or Conv "
            "layer; none was called."
        )
    feats = captured[-1]
    return feats.reshape(feats.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# the two-pass schedule: every example's factors once, then layer by layer Gram products
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Factored:
    """A weight stored as its factors by pass 1: ``x`` the scaled layer inputs ``c x_t``
    ``(N, T, K)`` (token ids ``(N, T)`` for an embedding, vocabulary ``vocab``), ``d`` the
    cotangents ``(N, O, T, F)``."""

    x: str
    d: str
    kind: str
    vocab: int | None


def _two_pass_plan(apply_fn, params, x) -> tuple[Callable, dict, list[str], list[_Factored]]:
    """``(pass one, {name: shape of one example's array}, gradient names, factored weights)``
    of the two-pass schedule: the arrays :func:`_pass_one` stores -- per-example gradients
    ``(N, O, P)`` (norms, tied embeddings, biases, the Jacobians of every other parameter) and
    the factors of each dense, convolution or embedding weight."""
    layers = _discover(apply_fn, params, x)
    trainable, _ = split_params(params)
    one = _pass_one_program(apply_fn, layers, params, x)
    shapes = jax.eval_shape(one, params, x[:1])
    names = sorted(shapes)
    weights = []
    for j, layer in enumerate(layers.values()):
        if f"{j:04d}x" in names:
            node = _layer_params(trainable, layer)
            assert node is not None
            vocab = int(node["embedding"].shape[0]) if layer.kind == "embed" else None
            weights.append(_Factored(f"{j:04d}x", f"{j:04d}d", layer.kind, vocab))
    factored = {name for w in weights for name in (w.x, w.d)}
    return one, shapes, [name for name in names if name not in factored], weights


def two_pass_bytes_per_example(apply_fn: Callable, params: Any, x: jax.Array) -> int:
    """Bytes that pass 1 of :func:`two_pass_kernel` stores per example (every layer's
    factors and per-example gradients); shapes only, nothing is computed."""
    _, shapes, _, _ = _two_pass_plan(apply_fn, params, x[:1])
    return sum(int(np.prod(s.shape[1:])) * s.dtype.itemsize for s in shapes.values())


# pass 1's jitted programs, per apply_fn and the shapes and dtypes of params and one example
# (which decide the layers), so that a later call reuses their traces and compilations
_PASS_ONE_PROGRAMS: dict = {}


def _pass_one_program(apply_fn, layers, params, x):
    """:func:`_pass_one`, jitted; one per ``apply_fn`` and shapes (at most 8 kept; an
    unhashable ``apply_fn`` gets a fresh one)."""
    leaves, tree = jax.tree_util.tree_flatten((params, x[:1]))
    key = (apply_fn, tree, tuple((np.shape(a), str(jnp.result_type(a))) for a in leaves))
    try:
        program = _PASS_ONE_PROGRAMS.get(key)
    except TypeError:
        return jax.jit(_pass_one(apply_fn, layers))
    if program is None:
        if len(_PASS_ONE_PROGRAMS) >= 8:
            _PASS_ONE_PROGRAMS.pop(next(iter(_PASS_ONE_PROGRAMS)))
        program = _PASS_ONE_PROGRAMS[key] = jax.jit(_pass_one(apply_fn, layers))
    return program


def _pass_one(apply_fn, layers):
    """``(params, x) -> {name: per-example array}``: one forward and O backward passes give
    every structured layer's inputs and cotangents; stored are each dense, convolution and
    embedding weight's factors ``{j}x`` (inputs times the layer's kernel scale ``c``),
    ``{j}d`` (cotangents, examples first) and per-example gradients ``(N, O, P)`` of the
    rest: ``{j}b`` a bias (``s sum_t delta_t``), ``{j}g`` a norm's scale and bias or a tied
    embedding, ``rest{i}`` the Jacobian of a parameter no layer rule covers."""

    def factors(params, x):
        trainable, _ = split_params(params)
        n = x.shape[0]
        rest, per_sample, dtype = _taps(apply_fn, params, layers, x)
        jac, deltas, inputs = per_sample(rest, x)
        out = {}
        for i, g in enumerate(jax.tree_util.tree_leaves(jac)):
            if g.size and jnp.issubdtype(g.dtype, jnp.inexact):
                out[f"rest{i:04d}"] = g.reshape(n, g.shape[1], -1)
        for j, (path, layer) in enumerate(layers.items()):
            node = _layer_params(trainable, layer)
            assert node is not None
            d = _joined_cotangents(layer, deltas[path])  # (O, N, T, F)
            if layer.kind == "norm":
                g = jnp.concatenate(
                    list(_norm_grads(layer, node, params, inputs[path], d).values()), axis=-1)
                out[f"{j:04d}g"] = jnp.moveaxis(g, 0, 1)
                continue
            parts = _joined_inputs(layer, inputs[path])
            if layer.attend_in_shapes:
                tied = (*path, _ATTEND)
                g = _tied_embedding_grads(layer, node, parts[0], d, inputs[tied],
                                          _attend_cotangents(deltas[tied]))
                out[f"{j:04d}g"] = jnp.moveaxis(g, 0, 1).reshape(n, g.shape[0], -1)
                continue
            c, s = _scales(layer, node, dtype)
            if layer.kind == "embed":
                out[f"{j:04d}x"] = parts[0]
            else:
                joined = jnp.concatenate(parts, axis=-1).astype(d.dtype)
                out[f"{j:04d}x"] = joined if isinstance(c, float) and c == 1.0 else c * joined
            out[f"{j:04d}d"] = jnp.moveaxis(d, 0, 1)
            if "bias" in node:
                out[f"{j:04d}b"] = jnp.moveaxis(s * jnp.sum(d, axis=2), 0, 1)
        return out

    return factors


class _FactorStore:
    """Pass 1's arrays, layer-major (one array per name, examples first): numpy arrays in
    memory, or raw files written and read by rows with ``pwrite`` / ``pread`` (not memory maps:
    their pages would count towards the process's resident memory) -- in a temporary directory
    under ``spill_dir``, removed by :meth:`close` (also after an error), or in ``directory``
    (a resumable computation's, created if absent: files already there are kept and reused;
    :meth:`close` keeps them, :meth:`remove` deletes them)."""

    def __init__(self, shapes: Mapping[str, Any], n: int, spill_dir: str | None,
                 directory: str | None = None):
        self.keep = directory is not None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self.tmp: str | None = directory
        else:
            self.tmp = None if spill_dir is None else tempfile.mkdtemp(
                prefix="ntkjax_two_pass_", dir=spill_dir)
        self.shapes = {name: (n, *spec.shape[1:]) for name, spec in shapes.items()}
        self.dtypes = {name: np.dtype(spec.dtype) for name, spec in shapes.items()}
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, int] = {}
        try:
            for name, shape in self.shapes.items():
                if self.tmp is None:
                    self.arrays[name] = np.empty(shape, self.dtypes[name])
                else:
                    self.files[name] = os.open(os.path.join(self.tmp, f"{name}.bin"),
                                               os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            self.close()
            raise

    def row_bytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name][1:])) * self.dtypes[name].itemsize

    def write(self, name: str, begin: int, rows: np.ndarray) -> None:
        if self.tmp is None:
            self.arrays[name][begin:begin + rows.shape[0]] = rows
            return
        data = np.ascontiguousarray(rows, self.dtypes[name]).tobytes()
        written = os.pwrite(self.files[name], data, begin * self.row_bytes(name))
        if written != len(data):
            raise OSError(f"two-pass factors: short write to {self.tmp} ({written} of "
                          f"{len(data)} bytes); is the disk full?")

    def sync(self) -> None:
        """Flushes the files to the disk (before a block is recorded as written)."""
        for fd in self.files.values():
            os.fsync(fd)

    def read(self, name: str, rows: slice) -> np.ndarray:
        if self.tmp is None:
            return self.arrays[name][rows]
        count = rows.stop - rows.start
        out = np.empty((count, *self.shapes[name][1:]), self.dtypes[name])
        view = out.data.cast("B")
        offset, done = rows.start * self.row_bytes(name), 0
        while done < view.nbytes:
            got = os.preadv(self.files[name], [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"two-pass factors: short read from {self.tmp}")
            done += got
        return out

    def close(self) -> None:
        self.arrays.clear()
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        if self.tmp is not None and not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def remove(self) -> None:
        """Closes the files and deletes them (a kept ``directory`` too)."""
        self.keep = False
        self.close()


class _Record:
    """What a resumable two-pass computation in ``directory`` has finished: ``state.json``
    (the call's key, the budget and pass-1 block size it was planned with, the finished pass-1
    blocks, the number of finished pass-2 layers ``k``) and ``sum-{k}.npy``, the Gram terms of
    the first ``k`` layers added up. Each file is written under a temporary name and renamed
    into place, the sum before the state that counts it, so the record never runs ahead of
    the data."""

    def __init__(self, directory: str, key: dict):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "state.json")
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            recorded = state.get("key")
            if recorded != key:
                what = next((k for k in key if (recorded or {}).get(k) != key[k]), "key")
                raise ValueError(
                    f"the two-pass record in {directory!r} was written for another call: its "
                    f"{what} is {(recorded or {}).get(what)!r}, this call's {key[what]!r}. "
                    "Pass another directory, or delete it to start over.")
            self.state = state
        else:
            self.state = {"key": key, "memory_bytes": None, "pass1_block": None,
                          "pass1_done": [], "layers_done": 0}

    def _replace(self, name: str, write: Callable) -> None:
        tmp = os.path.join(self.dir, f".{name}.tmp")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, name))

    def save(self) -> None:
        self._replace("state.json", lambda f: f.write(json.dumps(self.state).encode()))

    def block_done(self, k: int) -> None:
        self.state["pass1_done"].append(k)
        self.save()

    def layers_sum(self) -> np.ndarray | None:
        """The recorded sum of the finished layers (None before the first)."""
        k = self.state["layers_done"]
        return None if k == 0 else np.load(os.path.join(self.dir, f"sum-{k}.npy"))

    def layer_done(self, k: int, total: np.ndarray) -> None:
        """Records the sum ``total`` of the first ``k`` layers."""
        self._replace(f"sum-{k}.npy", lambda f: np.save(f, total))
        self.state["layers_done"] = k
        self.save()
        old = os.path.join(self.dir, f"sum-{k - 1}.npy")
        if os.path.exists(old):
            os.remove(old)


def _column_chunks(width: int, rows: int, itemsize: int, budget: int) -> tuple[int, int]:
    """``(chunk, count)``: ``width`` columns in ``count`` chunks of ``chunk`` columns (a
    multiple of 8 where it fits: aligned matmuls) of which ``rows`` rows of ``itemsize`` bytes
    fit ``budget``, as even as that allows, so that zero-padding the last chunk wastes little."""
    most = int(min(width, max(1, budget // max(1, rows * itemsize))))
    count = -(-width // most)
    chunk = -(-width // count)
    if chunk % 8 and -(-chunk // 8) * 8 <= most:
        chunk = -(-chunk // 8) * 8
    return chunk, -(-width // chunk)


# Pass 2's per-example gradients of stored gradients: their Gram product in column chunks.
_gradient_gram = jax.jit(contract_jacobians, static_argnames=("outputs",))

# A factored weight's gradient form runs as one program per layer and block pair, a loop over
# column chunks whose gradients ``(rows, O, width F)`` take at most this many bytes. XLA:CPU
# gives each program's large buffers fresh pages on every call: as two programs per chunk
# (gradients, then their Gram product, chunks of up to a sixteenth of the budget) about half
# of pass 2's CPU time was the kernel's, mostly page faults (perf, the GPT at N = 32-128). In
# one loop the buffers are reused from chunk to chunk; above this size the Gram product's
# packed copy of the gradients faults again (measured on XLA:CPU, N = 256, the GPT's dense
# shapes: 10-25% less time per layer than the two programs).
_LOOP_CHUNK_BYTES = 160 * 2**20


def _chunk_gradients(x, d, start, width: int, ids: bool):
    """Per-example gradients ``G[a, i, k, f] = sum_t x[a, t, k] d[a, i, t, f]`` of input
    columns ``[start, start + width)`` as ``(n, O, width F)``: ``x`` ``(n, T, K)`` (all
    columns, zero-padded to a multiple of ``width``: zero columns add nothing) or, with ``ids``,
    token ids ``(n, T)`` (that slice of their one-hot rows), ``d`` the cotangents as stored,
    ``(n, O, T, F)``. One batched matmul over ``(example, output)`` pairs with ``x`` shared by
    the outputs: the layout ``(n, T, O F)`` would need a transpose of the cotangents first."""
    n, o, t, f = d.shape
    if ids:
        x = jax.nn.one_hot(x - start, width, dtype=d.dtype)
    else:
        x = jax.lax.dynamic_slice_in_dim(x, start, width, axis=2)
    xs = jnp.broadcast_to(x[:, None], (n, o, t, width)).reshape(n * o, t, width)
    g = jax.lax.dot_general(xs, d.reshape(n * o, t, f), (((1,), (1,)), ((0,), (0,))),
                            precision=PRECISION)
    return g.reshape(n, o, width * f)


@functools.partial(jax.jit, static_argnames=("width", "count", "outputs", "ids"))
def _gradient_form(x1, d1, x2, d2, width: int, count: int, outputs: Outputs, ids: bool):
    """A factored weight's Gram term of two example blocks in the gradient form: for each of
    ``count`` chunks of ``width`` input columns (in order), the per-example gradients
    (:func:`_chunk_gradients`) of both blocks and their Gram product, added up. ``x1``,
    ``x2`` layer inputs ``(n, T, K)`` (zero-padded here to ``count width`` columns) or token
    ids ``(n, T)``; cotangents as stored; ``x2``, ``d2`` None: the block against itself."""

    def padded(x):
        return x if ids else jnp.pad(x, ((0, 0), (0, 0), (0, count * width - x.shape[2])))

    x1 = padded(x1)
    x2 = None if x2 is None else padded(x2)

    def step(c, total):
        start = c * width
        g1 = _chunk_gradients(x1, d1, start, width, ids)
        g2 = g1 if d2 is None else _chunk_gradients(x2, d2, start, width, ids)
        return total + contract_jacobians(g1, g2, outputs)

    first = step(0, 0.0)
    return jax.lax.fori_loop(1, count, step, first) if count > 1 else first


@functools.partial(jax.jit, static_argnames=("outputs", "kind", "vocab"))
def _factored_block(x1, d1, x2, d2, outputs, kind, vocab):
    """The factored term (sum over position pairs, in token blocks) of two example blocks;
    cotangents as stored, ``(n, O, T, F)``; ``x2``, ``d2`` None: the block against itself."""
    d1 = jnp.moveaxis(d1, 1, 0)
    if d2 is None:
        return _weight_term(kind, (x1,), d1, (x1,), d1, outputs, vocab=vocab, form="factored")
    return _weight_term(kind, (x1,), d1, (x2,), jnp.moveaxis(d2, 1, 0), outputs, vocab=vocab,
                        form="factored")


def two_pass_kernel(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    x2: jax.Array | None = None,
    *,
    outputs: Literal["trace", "diagonal", "full"] = "trace",
    memory_bytes: int,
    spill_dir: str | None = None,
    spill: bool | None = None,
    block_size: int | None = None,
    timings: dict | None = None,
    show_progress: bool = False,
    resume_dir: str | None = None,
    devices: Sequence[Any] | None = None,
) -> np.ndarray:
    """The empirical NTK ``Theta(x, x2)`` of a linen model by the two-pass schedule (host numpy
    array, ``(N1, N2)``, ``(N1, N2, O)`` or ``(N1, N2, O, O)``; ``x2=None``: ``Theta(x, x)``,
    not symmetrized); not validated: see :func:`ntkjax.empirical_ntk_matrix`
    (``schedule="two_pass"``).

    Pass 1: for each block of examples (the rows of ``x``, then those of ``x2``) one forward
    and O backward passes give every structured layer's factors -- inputs ``x_t`` and
    cotangents ``delta_{i,t}`` of each dense, convolution and embedding weight, per-example
    gradients of norms, biases and every other parameter -- written layer-major (one array
    per layer, examples first), in memory when all of them fit ``memory_bytes / 2``, else (or
    with ``spill=True``) to files in a temporary directory under ``spill_dir`` (the system's
    temporary directory when None), written and read by rows, removed at the end, also after
    an error. Pass 2: layer by layer, for blocks of examples (all N when one layer's factors
    fit the budget), the layer's Gram contribution -- with ``x2``, of the rows of ``x``
    against those of ``x2``; without, of the upper triangle of block pairs, mirrored: of
    per-example gradients ``<g_a, g_b>`` in column chunks; of a factored weight the cheaper by
    FLOPs of the factored sum over position pairs ``sum_{t,s} (x_t . x'_s)(delta_t .
    delta'_s)`` and the gradient form ``<G_a, G_b>``, ``G_a = sum_t x_t (x) delta_t`` formed
    in even chunks of input columns that fit the budget (Novak et al. 2022, section 4), one
    batched matmul per chunk on the cotangents as stored, then one Gram product, the chunks
    a loop in one program per layer and block pair (``_gradient_form``). While a
    layer is computed, a reader thread loads the next one's arrays. Each example's forward
    and backward passes run once, where example blocks recompute them for every block pair.
    The layers are added in a fixed order, so the result does not depend on the schedule of
    reads.

    ``resume_dir`` makes the computation resumable: the factors are written to files there
    (kept until pass 2 ends), and each finished pass-1 block and each finished pass-2 layer
    (the sum of the layers so far) is recorded (``_Record``); a call with the same
    arguments and ``resume_dir`` after an interruption skips the recorded work and gives the
    same bits. It reuses the recorded ``memory_bytes`` and pass-1 block size (which decide
    the order of additions), and refuses a record of another shape of call (``ValueError``).
    At the end the factor files are removed and the record keeps the kernel; the caller
    deletes ``resume_dir`` once it has kept the result.

    ``devices`` (several): pass 1 computes one block on each of them at a time, in one
    ``shard_map`` call (on forced host devices, which share the memory, each block's
    footprint fits ``memory_bytes`` over their number); pass 2 runs on the default device.

    ``block_size`` sets pass 1's examples per block (default: from the budget and the
    compiled program's footprint); ``show_progress`` draws a bar over pass 1's blocks and
    one over pass 2's layers on stderr; ``timings``, when a dict, receives ``setup_s``
    (finding the layers, compiling pass 1), ``pass1_s``, ``pass2_s`` (its compilations
    included), ``factor_bytes``, ``spilled`` and ``pass1_block``.
    """
    n1 = x.shape[0]
    n2 = None if x2 is None else x2.shape[0]
    xs = x if x2 is None else jnp.concatenate([jnp.asarray(x), jnp.asarray(x2)])
    n = xs.shape[0]
    start_time = time.perf_counter()
    one, shapes, grad_names, weights = _two_pass_plan(apply_fn, params, x)
    per_example = sum(int(np.prod(s.shape[1:])) * s.dtype.itemsize for s in shapes.values())
    record = None
    if resume_dir is not None:
        record = _Record(resume_dir, {
            "n1": n1, "n2": n2, "outputs": outputs,
            "factors": {name: [list(s.shape[1:]), str(s.dtype)] for name, s in shapes.items()}})
        recorded_block = record.state["pass1_block"]
        if block_size and recorded_block and block_size != recorded_block:
            raise ValueError(f"block_size={block_size}: the two-pass record in {resume_dir!r} "
                             f"was written in pass-1 blocks of {recorded_block}; pass "
                             "block_size=None to resume it.")
        memory_bytes = record.state["memory_bytes"] or memory_bytes
        block_size = block_size or recorded_block
        spill = True
    if spill is None:
        spill = n * per_example > memory_bytes // 2
    layer_count = len(grad_names) + len(weights)
    pass1_start = pass1_end = time.perf_counter()
    b1 = block_size or 0
    if record is not None and record.state["layers_done"] == layer_count:
        total = record.layers_sum()  # finished before: nothing to compute
        assert total is not None
        pass1_start = pass1_end = time.perf_counter()
    else:
        # forced host devices share the host's memory: a block each
        shared = len(devices) if devices and devices[0].platform == "cpu" else 1
        b1 = min(block_size, n) if block_size else _pass_one_block(
            one, params, xs, per_example, memory_bytes // shared)
        if record is not None:
            record.state.update(memory_bytes=memory_bytes, pass1_block=b1)
            record.save()
        pass1_start = pass1_end = time.perf_counter()
        store = _FactorStore(shapes, n, (spill_dir or tempfile.gettempdir()) if spill else None,
                             None if resume_dir is None else os.path.join(resume_dir, "factors"))
        try:
            _run_pass_one(one, params, xs, b1, store, record, show_progress, devices)
            pass1_end = time.perf_counter()
            total = _pass_two(store, grad_names, weights, n1, n2, outputs, memory_bytes,
                              record=record, show_progress=show_progress)
            if record is not None:
                store.remove()
        finally:
            store.close()
    if timings is not None:
        timings.update(setup_s=pass1_start - start_time, pass1_s=pass1_end - pass1_start,
                       pass2_s=time.perf_counter() - pass1_end,
                       factor_bytes=n * per_example, spilled=bool(spill), pass1_block=b1)
    return total


def _run_pass_one(one, params, xs, b1: int, store: _FactorStore, record: _Record | None,
                  show_progress: bool, devices: Sequence[Any] | None = None) -> None:
    """Pass 1 over the blocks of ``xs`` not recorded as done, each round's program dispatched
    before the previous round's arrays are written (and, with a record, synced and recorded).
    A round is one block, or with ``devices`` one block on each device in one ``shard_map``
    call (the last round filled up with copies of its last block, not written)."""
    starts = range(0, xs.shape[0], b1)
    done = set() if record is None else set(record.state["pass1_done"])
    todo = [k for k in range(len(starts)) if k not in done]
    count = 1 if not devices else len(devices)
    rounds = [todo[i:i + count] for i in range(0, len(todo), count)]

    def rows(k):
        return pad_rows(xs[starts[k]:starts[k] + b1], b1)

    if devices:
        mesh = Mesh(np.array(list(devices)), ("blocks",))
        sharded = jax.jit(jax.shard_map(
            lambda p, x: {name: v[None] for name, v in one.__wrapped__(p, x[0]).items()},
            mesh=mesh, in_specs=(P(), P("blocks")), out_specs=P("blocks"), check_vma=False))
        stacked = NamedSharding(mesh, P("blocks"))
        replicated = jax.device_put(params, NamedSharding(mesh, P()))

        def dispatch(group):
            work = group + [group[-1]] * (count - len(group))
            return sharded(replicated, jax.device_put(
                np.stack([np.asarray(rows(k)) for k in work]), stacked))
    else:
        def dispatch(group):
            return one(params, rows(group[0]))

    def finish(group, result):
        host = {name: np.asarray(value) for name, value in result.items()}
        for i, k in enumerate(group):
            part = {name: value[i] for name, value in host.items()} if devices else host
            _write_block(store, starts[k], min(b1, xs.shape[0] - starts[k]), part)
        if record is not None:
            store.sync()
            for k in group:
                record.block_done(k)

    pending = None
    for group in _progress(rounds, description="two-pass eNTK, pass 1 (example blocks)"
                           + (f" on {count} devices" if devices else ""),
                           enabled=show_progress):
        result = (group, dispatch(group))
        if pending is not None:
            finish(*pending)
        pending = result
    if pending is not None:
        finish(*pending)


def _write_block(store: _FactorStore, begin: int, rows: int, result: Mapping) -> None:
    for name, value in result.items():
        store.write(name, begin, np.asarray(value)[:rows])


def _pass_one_block(jitted, params, x, per_example: int, memory_bytes: int) -> int:
    """Examples per pass-1 block: a power of two (at most N) whose compiled footprint
    (arguments, outputs and temporaries) fits ``memory_bytes``, starting from three times the
    stored bytes per example (at least 1). The compilation is the one ``jitted`` then uses."""
    n = x.shape[0]
    size = 1 << (int(min(n, max(1, memory_bytes // (3 * per_example)))).bit_length() - 1)
    while True:
        spec = jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype)
        footprint = compiled_footprint(jitted.lower(params, spec).compile())
        if size == 1 or footprint is None or footprint <= memory_bytes:
            return size
        size //= 2


def _pass_two(store: _FactorStore, grad_names, weights, n1: int, n2: int | None, outputs: str,
              memory_bytes: int, prefetch: bool = True, record: _Record | None = None,
              show_progress: bool = False) -> np.ndarray:
    """Pass 2 of :func:`two_pass_kernel`: the sum of every stored layer's Gram term, each over
    pairs of example blocks (all examples at once when one layer's arrays fit a quarter of
    ``memory_bytes``, else blocks of which a pair fits an eighth): with ``n2`` the rows
    ``[0, n1)`` against ``[n1, n1 + n2)``; without, the upper triangle of pairs of the ``n1``
    rows, an off-diagonal pair added twice (mirrored). With ``prefetch`` a reader thread loads
    the next pair's arrays while the current one is computed (the same arithmetic: only the
    order of reads changes), and one chunk's products are queued before the previous chunk's
    result is awaited. With ``record`` the layers it counts as finished are skipped (their sum
    is the start) and each finished layer's sum is recorded."""
    n = n1 + (n2 or 0)
    total: np.ndarray | None = None if record is None else record.layers_sum()

    def add(rows1, rows2, term):
        nonlocal total
        term = np.asarray(term)
        if total is None:
            total = np.zeros((n1, n1 if n2 is None else n2, *term.shape[2:]), term.dtype)
        if n2 is not None:
            total[rows1, rows2.start - n1:rows2.stop - n1] += term
            return
        total[rows1, rows2] += term
        if rows1 != rows2:
            total[rows2, rows1] += np.transpose(term, (1, 0, *range(term.ndim - 1, 1, -1)))

    def row_blocks(per_example: int):
        size = n if n * per_example <= memory_bytes // 4 else max(
            1, memory_bytes // (16 * per_example))
        blocks = [slice(b, min(b + size, n1)) for b in range(0, n1, size)]
        if n2 is not None:
            return [(a, slice(b, min(b + size, n))) for a in blocks for b in range(n1, n, size)]
        return [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]

    # per layer, its jobs: (names of the arrays to read, rows1, rows2, weight)
    layers: list[list[tuple[tuple[str, ...], slice, slice, _Factored | None]]] = []
    for name in grad_names:
        layers.append([((name,), r1, r2, None)
                       for r1, r2 in row_blocks(store.row_bytes(name))])
    for w in weights:
        per_example = store.row_bytes(w.x) + store.row_bytes(w.d)
        layers.append([((w.x, w.d), r1, r2, w) for r1, r2 in row_blocks(per_example)])
    skip = 0 if record is None else record.state["layers_done"]
    numbered = list(enumerate(layers, 1))[skip:]
    jobs = [job for _, layer in numbered for job in layer]

    def load(job):
        """``(arrays of rows1, arrays of rows2 or None)``, host arrays."""
        names, rows1, rows2, _ = job
        a1 = {name: store.read(name, rows1) for name in names}
        return a1, None if rows1 == rows2 else {name: store.read(name, rows2) for name in names}

    def placed(arrays):
        """The loaded arrays as device arrays. Here, not in the reader thread: JAX's dtype
        configuration (``enable_x64``) may be local to this thread."""
        return None if arrays is None else {name: jnp.asarray(a) for name, a in arrays.items()}

    queued: list = []  # (rows1, rows2, term) dispatched, not yet added

    def queue(rows1, rows2, term):
        if prefetch:
            queued.append((rows1, rows2, term))
            while len(queued) > 1:
                add(*queued.pop(0))
        else:
            add(rows1, rows2, term)

    pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    try:
        pending = pool.submit(load, jobs[0]) if pool and jobs else None
        i = 0
        for number, layer in _progress(numbered, description="two-pass eNTK, pass 2 (layers)",
                                       enabled=show_progress):
            for job in layer:
                if pool is None:
                    a1, a2 = load(job)
                else:
                    assert pending is not None
                    a1, a2 = pending.result()
                    pending = pool.submit(load, jobs[i + 1]) if i + 1 < len(jobs) else None
                i += 1
                _, rows1, rows2, w = job
                a1, a2 = placed(a1), placed(a2)
                if w is None:
                    _gradient_terms(a1, a2, rows1, rows2, outputs, memory_bytes, queue)
                else:
                    _weight_terms(w, store, a1, a2, rows1, rows2, outputs, memory_bytes, queue)
                del a1, a2
            if record is not None:
                while queued:
                    add(*queued.pop(0))
                assert total is not None
                record.layer_done(number, total)
        while queued:
            add(*queued.pop(0))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    assert total is not None
    return total


def _gradient_terms(a1, a2, rows1, rows2, outputs, memory_bytes, queue) -> None:
    """Queues ``<g_a, g_b>`` of stored per-example gradients ``(n, O, P)`` in column chunks."""
    (g1,), g2 = a1.values(), None if a2 is None else next(iter(a2.values()))
    rows, o, p = g1.shape[0] + (0 if g2 is None else g2.shape[0]), g1.shape[1], g1.shape[2]
    width, count = _column_chunks(p, rows * o, g1.dtype.itemsize, memory_bytes // 16)
    for c in range(count):
        c1 = g1[:, :, c * width:(c + 1) * width]
        queue(rows1, rows2, _gradient_gram(
            c1, c1 if g2 is None else g2[:, :, c * width:(c + 1) * width], outputs))


def _weight_terms(w: _Factored, store, a1, a2, rows1, rows2, outputs, memory_bytes,
                  queue) -> None:
    """Queues a factored weight's Gram term of two example blocks: the factored sum over
    position pairs or the gradient form in column chunks (``_gradient_form``), whichever
    needs fewer FLOPs."""
    xs1, d1 = a1[w.x], a1[w.d]
    xs2, d2 = (xs1, None) if a2 is None else (a2[w.x], a2[w.d])
    n1, o, t, f = d1.shape
    n2 = n1 if d2 is None else d2.shape[0]
    k = store.shapes[w.x][-1] if w.vocab is None else w.vocab  # a vocabulary: one-hot columns
    kx = 1 if w.kind == "embed" else k
    factored = n1 * n2 * t * t * (kx + f * _output_factor(outputs, o))
    materialized = (n1 + (0 if d2 is None else n2)) * o * t * k * f + (
        n1 * n2 * k * f * _output_factor(outputs, o))
    if factored <= materialized:
        queue(rows1, rows2, _factored_block(xs1, d1, None if d2 is None else xs2, d2, outputs,
                                            w.kind, w.vocab))
        return
    width, count = _column_chunks(k, (n1 + (0 if d2 is None else n2)) * o * f,
                                  d1.dtype.itemsize, min(memory_bytes // 16, _LOOP_CHUNK_BYTES))
    queue(rows1, rows2, _gradient_form(xs1, d1, None if d2 is None else xs2, d2, width, count,
                                       outputs, w.kind == "embed"))
