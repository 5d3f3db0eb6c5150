"""Empirical (finite-width) neural tangent kernels of any model ``apply_fn(params, x)``.

The empirical NTK of a network ``f(theta, x) in R^O`` is

    Theta(x, x')_{ij} = sum_p  d f_i(theta, x) / d theta_p  *  d f_j(theta, x') / d theta_p
                      = [J(x) J(x')^T]_{ij},

(Jacot, Gabriel & Hongler 2018, "Neural Tangent Kernel", eq. 2). Three exact ways to compute it
are offered (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel", ICML, sections 3-4):

* ``"jacobian"``: per-sample Jacobians ``J(x_a)`` (``vmap`` of ``jacrev``), contracted parameter
  leaf by leaf -- never concatenated into one ``N x P`` matrix.
* ``"ntk_vp"``: NTK-vector products: for every column ``e_{b,j}`` a vector-Jacobian product
  ``J(x'_b)^T e_j`` followed by a Jacobian-vector product with ``J(x)``; no Jacobian is stored.
* ``"structured"``: for a dense layer ``y = x W`` the weight Jacobian factorizes as
  ``dy/dW = x (x) delta`` so the layer's contribution is ``(x . x') (delta . delta')`` computed
  from layer inputs and output cotangents (see :mod:`ntkjax.structured`).
* ``"auto"``: ``"structured"`` when the model has layers it understands, else ``"jacobian"``
  (or ``"ntk_vp"`` when the per-sample Jacobians would not fit in memory).

Conventions used throughout this module:

* ``apply_fn(params, x)`` maps a batch ``x`` of shape ``(N, *features)`` to outputs of shape
  ``(N, *out)``; ``O = prod(out)`` (``O = 1`` for an output of shape ``(N,)``). Samples must be
  independent (no batch statistics computed in training mode).
* ``params`` is any pytree. When it is a flax linen *variables dict* (a mapping with a
  ``"params"`` key, as returned by ``module.init``), only the ``"params"`` collection is
  differentiated; every other collection (``batch_stats``, constants, ...) passes through
  unchanged. So ``module.apply`` with its variables works directly.
* ``outputs="trace"`` is the SUM over the O outputs, ``sum_i Theta_{ii}``, shape ``(N1, N2)``;
  ``"mean"`` the MEAN over them, ``(1/O) sum_i Theta_{ii}`` (neural-tangents' default
  ``trace_axes=(-1,)``; it estimates the per-output kernel of :func:`ntkjax.kernel_fn`);
  ``"full"`` has shape ``(N1, N2, O, O)``; ``"diagonal"`` is ``Theta_{ii}`` with shape
  ``(N1, N2, O)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from jax.typing import ArrayLike

from ntkjax import _store
from ntkjax._checks import check_choice, check_pair, check_values, is_concrete
from ntkjax._store import describe_object
from ntkjax.blocking import available_memory_bytes, evaluate_in_blocks
from ntkjax.compile_options import cpu_convolution_options, jit_with_options
from ntkjax.jacobians import (
    OUTPUTS,
    PRECISION,
    ApplyFn,
    ModelRefused,
    Outputs,
    batched_fn,
    check_model_inputs,
    contract_leaf_jacobians,
    full_to,
    is_variables_dict,
    per_sample_fn,
    split_params,
    symmetrize,
)
from ntkjax.nn.dropout import Dropout
from ntkjax.structured import (
    count_structured_layers,
    draw_projection,
    last_hidden_features,
    project_leaf_gradients,
    projection_views,
    structured_kernel,
    structured_projected_features,
    two_pass_bytes_per_example,
    two_pass_kernel,
)

__all__ = [
    "BATCH_MODES",
    "KERNEL_OUTPUTS",
    "NTK_METHODS",
    "OUTPUTS",
    "VARIANTS",
    "BatchMode",
    "KernelFn",
    "KernelOutputs",
    "NTKMethod",
    "Outputs",
    "ParamsFilter",
    "Variant",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_matrix",
    "is_batch_coupled",
    "nnx_apply_fn",
    "ntk_operator",
    "projected_ntk_feature_fn",
    "projected_ntk_features",
]

NTKMethod = Literal["auto", "jacobian", "ntk_vp", "structured"]
BatchMode = Literal["auto", "per_sample", "whole"]
BATCH_MODES: tuple[BatchMode, ...] = ("auto", "per_sample", "whole")
NTK_METHODS: tuple[NTKMethod, ...] = ("auto", "jacobian", "ntk_vp", "structured")

# A kernel function as returned here: (params, x1, x2=None) -> array.
KernelFn = Callable[..., jax.Array]

KernelOutputs = Literal["trace", "mean", "full", "diagonal", "pseudo", "logit"]
KERNEL_OUTPUTS: tuple[KernelOutputs, ...] = (*OUTPUTS, "pseudo", "logit")
Variant = Literal["ntk", "signgd"]
VARIANTS: tuple[Variant, ...] = ("ntk", "signgd")

ParamsFilter = Callable[[tuple, Any], bool] | Any
"""Selects the differentiated parameters: a predicate ``(path, leaf) -> bool`` (``path`` a tuple
of the leaf's keys inside the differentiated part, e.g. ``("Dense_1", "kernel")``) or an
optax-style mask, a pytree of bools matching the differentiated part or a prefix of it."""


def _per_sample_jacobians(apply_fn, rebuild, trainable, x):
    """Leaves ``(N, O, *leaf.shape)``: the Jacobian of each example called on its own."""
    jac = jax.vmap(jax.jacrev(per_sample_fn(apply_fn, rebuild)), in_axes=(None, 0))
    return jac(trainable, x)


def _whole_batch_jacobians(apply_fn, rebuild, trainable, x):
    """Leaves ``(N, O, *leaf.shape)``: the Jacobian of the batched function ``f(theta, X)``,
    row ``a`` holding ``d f_a(theta, X) / d theta`` (neural-tangents' ``vmap_axes=None``)."""
    return jax.jacrev(batched_fn(apply_fn, rebuild))(trainable, x)


def _paired_contraction(j1, j2, outputs: Outputs) -> jax.Array | None:
    """``Theta(x1_a, x2_a)`` from Jacobian pytrees with leaves ``(N, O, *leaf)``: shapes
    ``(N,)``, ``(N, O)`` or ``(N, O, O)`` for trace, diagonal, full. None without parameters."""
    spec = {"trace": "aip,aip->a", "diagonal": "aip,aip->ai", "full": "aip,ajp->aij"}[outputs]
    total = None
    for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2), strict=True):
        if a.size == 0:
            continue
        term = jnp.einsum(
            spec, a.reshape(a.shape[0], a.shape[1], -1), b.reshape(b.shape[0], b.shape[1], -1),
            precision=PRECISION,
        )
        total = term if total is None else total + term
    return total


def _jacobian_kernel(apply_fn, params, x1, x2, outputs, whole, paired, sign=False):
    """``<J(x1), J(x2)>`` (``sign``: ``<J(x1), sign J(x2)>``, the SignGD kernel)."""
    trainable, rebuild = split_params(params)
    jacobians = _whole_batch_jacobians if whole else _per_sample_jacobians
    j1 = jacobians(apply_fn, rebuild, trainable, x1)
    j2 = j1 if x2 is None else jacobians(apply_fn, rebuild, trainable, x2)
    if sign:
        j2 = jax.tree_util.tree_map(jnp.sign, j2)
    if paired:
        return _paired_contraction(j1, j2, outputs)
    return contract_leaf_jacobians(j1, j2, outputs)


def _map(fn, xs, batch_size):
    """``vmap`` of ``fn`` over the leading axis of ``xs``, or ``lax.map`` in groups."""
    if batch_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch_size)


def _ntk_vp_kernel(apply_fn, params, x1, x2, outputs, out_dim, dtype, vp_batch_size, whole,
                   paired):
    trainable, rebuild = split_params(params)
    xs2 = x1 if x2 is None else x2
    basis = jnp.eye(out_dim, dtype=dtype)
    if whole:
        # Theta[:, b, :, j] = J(X1) J(X2)^T e_{b,j}, J of the batched function.
        f_batch = batched_fn(apply_fn, rebuild)
        _, jvp1 = jax.linearize(lambda p: f_batch(p, x1), trainable)
        _, vjp2 = jax.vjp(lambda p: f_batch(p, xs2), trainable)
        n2 = xs2.shape[0]
        units = jnp.eye(n2 * out_dim, dtype=dtype).reshape(n2 * out_dim, n2, out_dim)
        cols = _map(lambda e: jvp1(vjp2(e)[0]), units, vp_batch_size)  # (N2 O_j, N1, O_i)
        cols = cols.reshape(n2, out_dim, x1.shape[0], out_dim)
        kernel_full = jnp.transpose(cols, (2, 0, 3, 1))  # (N1, N2, O_i, O_j)
        if paired:
            kernel_full = jnp.moveaxis(jnp.diagonal(kernel_full, axis1=0, axis2=1), -1, 0)
        return full_to(kernel_full, outputs)
    f_single = per_sample_fn(apply_fn, rebuild)

    def block(xa, xb):
        # Theta(xa, xb)[..., j] = J(xa) J(xb)^T e_j, for every output j.
        _, vjp = jax.vjp(lambda p: f_single(p, xb), trainable)
        _, jvp = jax.linearize(lambda p: f_single(p, xa), trainable)
        return jax.vmap(lambda e: jvp(vjp(e)[0]))(basis)  # (O_j, O_i)

    if paired:
        blocks = _map(lambda pair: block(*pair), (x1, xs2), vp_batch_size)  # (N, O_j, O_i)
        return full_to(jnp.transpose(blocks, (0, 2, 1)), outputs)
    f_batch = batched_fn(apply_fn, rebuild)
    _, jvp1 = jax.linearize(lambda p: f_batch(p, x1), trainable)

    def column(xb):
        _, vjp = jax.vjp(lambda p: f_single(p, xb), trainable)
        return jax.vmap(lambda e: jvp1(vjp(e)[0]))(basis)  # (O_j, N1, O_i)

    cols = _map(column, xs2, vp_batch_size)
    kernel_full = jnp.transpose(cols, (2, 0, 3, 1))  # (N1, N2, O_i, O_j)
    return full_to(kernel_full, outputs)


def _structured_paired(apply_fn, params, x1, x2, outputs):
    """``Theta(x1_a, x2_a)`` by the structured method, one example pair at a time."""
    xs2 = x1 if x2 is None else x2

    def one(xa, xb):
        kernel = structured_kernel(apply_fn, params, xa[None], xb[None], outputs=outputs)
        return None if kernel is None else kernel[0, 0]

    if structured_kernel(apply_fn, params, x1[:1], xs2[:1], outputs=outputs) is None:
        return None
    return jax.vmap(one)(x1, xs2)


def _zeros(x1, x2, out_dim, outputs, dtype, paired):
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    shape = {"trace": (n1, n2), "diagonal": (n1, n2, out_dim), "full": (n1, n2, out_dim, out_dim)}
    return jnp.zeros(shape[outputs][1:] if paired else shape[outputs], dtype)


def _result_dtype(params, out):
    leaves = [
        leaf for leaf in jax.tree_util.tree_leaves(split_params(params)[0])
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.result_type(out.dtype, *leaves) if leaves else out.dtype


def _jacobian_bytes(params, n: int, out_dim: int) -> int:
    trainable, _ = split_params(params)
    return sum(
        n * out_dim * int(np.size(leaf)) * jnp.result_type(leaf).itemsize
        for leaf in jax.tree_util.tree_leaves(trainable)
    )


# ---------------------------------------------------------------------------------------------
# views of a model: a parameter subset, reduced outputs, NNX modules
# ---------------------------------------------------------------------------------------------


def _plain_path(key_path) -> tuple:
    """A jax key path as plain keys (``("Dense_0", "kernel")``); an NNX Variable's trailing
    ``.value`` is dropped."""
    keys = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            keys.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            keys.append(k.key)
        else:
            keys.append(str(k))
    if keys and keys[-1] in ("value", "raw_value"):
        keys.pop()
    return tuple(keys)


def _describe_filter(params_filter) -> str:
    if callable(params_filter):
        return f"params_filter={describe_object(params_filter)}"
    return f"params_filter (a mask with structure {jax.tree_util.tree_structure(params_filter)})"


def _filter_flags(params_filter, trainable) -> list[bool]:
    """One bool per leaf of ``trainable``: whether ``params_filter`` selects it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(trainable)
    paths = [_plain_path(kp) for kp, _ in flat]
    if callable(params_filter):
        flags = []
        for path, (_, leaf) in zip(paths, flat, strict=True):
            try:
                flags.append(bool(params_filter(path, leaf)))
            except jax.errors.ConcretizationTypeError as err:
                raise ValueError(
                    f"{_describe_filter(params_filter)} must decide from the path and the "
                    f"leaf's shape/dtype, not its values (it was called on {path!r}): {err}"
                ) from err
        return flags
    mask = {_plain_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(
        params_filter, is_leaf=lambda v: isinstance(v, bool | np.bool_))[0]}
    for value in mask.values():
        if not isinstance(value, bool | np.bool_):
            raise ValueError(
                f"params_filter: a mask must hold Python bools, got {type(value).__name__} "
                f"{value!r}; pass a predicate (path, leaf) -> bool for anything else."
            )
    flags = []
    for path in paths:
        found = [mask[path[:i]] for i in range(len(path), -1, -1) if path[:i] in mask]
        if not found:
            raise ValueError(
                f"{_describe_filter(params_filter)} does not match the differentiated "
                f"parameters: no entry for {'/'.join(map(str, path))} (the parameters are "
                f"{[('/'.join(map(str, p))) for p in paths][:20]}). A mask must have the "
                "structure of the differentiated part (a linen model's 'params' collection) "
                "or of a prefix of it."
            )
        flags.append(bool(found[0]))
    return flags


def _prune(node, path: tuple, chosen: set) -> Any:
    """``node`` with only the leaves whose plain path is in ``chosen``: mappings lose their
    unselected keys (so a linen layer keeps only its selected ``kernel``/``bias``), other nodes
    hold None in place of an unselected leaf. None when nothing below is selected."""
    if isinstance(node, Mapping):
        kept = {}
        for key, child in node.items():
            sub = _prune(child, (*path, key), chosen)
            if sub is not None:
                kept[key] = sub
        return kept or None
    flat, treedef = jax.tree_util.tree_flatten_with_path(node)
    hits = [_plain_path((*_as_keys(path), *kp)) in chosen for kp, _ in flat]
    if not any(hits):
        return None
    if all(hits):
        return node
    return jax.tree_util.tree_unflatten(
        treedef, [leaf if hit else None for (_, leaf), hit in zip(flat, hits, strict=True)]
    )


def _as_keys(path: tuple) -> tuple:
    return tuple(jax.tree_util.DictKey(k) for k in path)


def _select_params(apply_fn, params, params_filter):
    """``(apply_fn', params')``: the same model, differentiated only in the parameters that
    ``params_filter`` selects -- the others are closed over as constants (no Jacobian, no
    cotangent is formed for them). For a linen variables dict ``params'`` is again one, its
    ``"params"`` holding only the selected leaves."""
    trainable, _ = split_params(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    flags = _filter_flags(params_filter, trainable)
    if not any(flags):
        raise ValueError(
            f"{_describe_filter(params_filter)} selects no parameter of the model (its "
            f"parameters are {['/'.join(map(str, _plain_path(kp))) for kp, _ in flat][:20]}); "
            "the kernel over no parameter is zero. Select at least one parameter."
        )
    paths = [_plain_path(kp) for kp, _ in flat]
    chosen = {p for p, f in zip(paths, flags, strict=True) if f}
    pruned = _prune(trainable, (), chosen)

    def merge(sub):
        picked = {_plain_path(kp): leaf
                  for kp, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]}
        return jax.tree_util.tree_unflatten(treedef, [
            picked[p] if f else leaf for p, f, (_, leaf) in zip(paths, flags, flat, strict=True)
        ])

    if is_variables_dict(params):

        def apply_selected(variables, x):
            return apply_fn({**variables, "params": merge(variables["params"])}, x)

        return apply_selected, {**params, "params": pruned}
    return (lambda p, x: apply_fn(merge(p), x)), pruned


def _summed_outputs(apply_fn):
    """The model reduced to ``sum_i f_i(x) / sqrt(O)`` (the pseudo-NTK's output), ``(N, 1)``."""

    def summed(params, x):
        out = apply_fn(params, x)
        out = jnp.reshape(out, (out.shape[0], -1))
        return jnp.sum(out, axis=1, keepdims=True) / math.sqrt(out.shape[1])

    return summed


def _pack_index(x, index):
    """``x`` flattened per example with its chosen output index appended as one more column
    (a float dtype that holds both exactly: integer inputs such as token ids below 2^24)."""
    n = x.shape[0]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4 else (
        jnp.result_type(x.dtype, jnp.float32))
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    index = jnp.broadcast_to(jnp.asarray(index), (n,))
    return jnp.concatenate([x.reshape(n, -1).astype(dtype), index[:, None].astype(dtype)], 1)


def _chosen_output(apply_fn, example_shape, x_dtype):
    """The model on packed inputs (:func:`_pack_index`): ``f_{i_a}(x_a)``, shape ``(N, 1)``.
    An index outside ``[0, O)`` under an outer ``jit`` (not checked there) gives NaN."""

    def chosen(params, packed):
        n = packed.shape[0]
        x = packed[:, :-1].astype(x_dtype).reshape(n, *example_shape)
        index = packed[:, -1].astype(jnp.int32)
        out = apply_fn(params, x)
        out = jnp.reshape(out, (n, -1))
        return jnp.take_along_axis(out, index[:, None], axis=1, mode="fill",
                                   fill_value=jnp.nan)

    return chosen


def _check_index(index, name: str, n: int, out_dim: int) -> None:
    if index is None:
        raise ValueError(
            f"outputs='logit' needs {name}: the index of the chosen output per example (an "
            f"int or an int array of shape ({n},)), e.g. the label logit."
        )
    shape = np.shape(index)
    if shape not in ((), (n,)):
        raise ValueError(f"{name} must be an int or have shape ({n},); got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(index), jnp.integer):
        raise ValueError(f"{name} must hold integers; got dtype {jnp.result_type(index)}.")
    if is_concrete(index):
        bad = np.flatnonzero((np.asarray(index).reshape(-1) < 0)
                             | (np.asarray(index).reshape(-1) >= out_dim))
        if bad.size:
            raise ValueError(
                f"{name} must lie in [0, {out_dim}) (the model has {out_dim} outputs per "
                f"example); entries {bad[:5].tolist()} do not."
            )


def _is_nnx_module(obj) -> bool:
    nnx = _nnx_or_none()
    return nnx is not None and isinstance(obj, nnx.Module)


def _is_nnx_state(obj) -> bool:
    nnx = _nnx_or_none()
    return nnx is not None and isinstance(obj, nnx.State)


def _nnx_or_none():
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx here
        return None
    return nnx


def _is_linen_apply(apply_fn) -> bool:
    return isinstance(getattr(apply_fn, "__self__", None), linen.Module)


class _NNXModel:
    """An ``nnx.Module`` as ``apply_fn(variables, x)`` on ``{"params": Param state, "rest":
    other state}`` (a variables-dict: only ``"params"`` is differentiated)."""

    def __init__(self, module):
        self.graphdef, params, rest = _split_nnx(module)
        self.default = {"params": params, "rest": rest}

    def __call__(self, variables, x):
        nnx = _nnx_or_none()
        assert nnx is not None
        return nnx.merge(self.graphdef, variables["params"], variables["rest"])(x)

    def variables(self, params):
        """The variables dict for what a kernel function was called with."""
        if _is_nnx_module(params):
            graphdef, p, rest = _split_nnx(params)
            if graphdef != self.graphdef:
                raise ValueError(
                    "params: the nnx Module passed has another structure than the one the "
                    "kernel function was built from; build one per architecture."
                )
            return {"params": p, "rest": rest}
        if _is_nnx_state(params):
            return {"params": params, "rest": self.default["rest"]}
        if isinstance(params, Mapping) and set(params) == {"params", "rest"} and _is_nnx_state(
                params["params"]):
            return params
        if params is None:
            return self.default
        raise ValueError(
            "params: this kernel function was built from a flax.nnx Module; call it with that "
            "Module (e.g. after training), its nnx.Param state (nnx.split(module, nnx.Param, "
            f"...)[1]) or None (the module's own parameters); got {type(params).__name__}"
            + (" -- linen variables, which belong to a flax.linen module's apply."
               if is_variables_dict(params) else ".")
        )


def empirical_ntk_fn(
    apply_fn: ApplyFn,
    *,
    ntk_method: NTKMethod = "auto",
    outputs: KernelOutputs = "trace",
    vp_batch_size: int | None = None,
    batch: BatchMode = "auto",
    diagonal_batch: bool = False,
    params_filter: ParamsFilter | None = None,
    variant: Variant = "ntk",
) -> KernelFn:
    """Returns a jitted ``ntk(params, x1, x2=None)``: the empirical NTK of ``apply_fn``.

    ``Theta(x, x')_{ij} = sum_p df_i(x)/dtheta_p df_j(x')/dtheta_p`` (Jacot et al. 2018), summed
    over every differentiated parameter (for a linen variables dict: the ``"params"``
    collection only; other collections pass through unchanged).

    Batch coupling. The fast methods differentiate each example on its own,
    ``f(theta, x_a[None])``, which is right when examples do not interact. A function that
    uses its batch (a batch mean, a train-mode ``flax.linen.BatchNorm`` applied with
    ``mutable=["batch_stats"]``) has instead the kernel of the batched function
    ``F(theta, X) in R^{N x O}``: ``Theta(X1, X2) = J(X1) J(X2)^T`` with ``J(X) = dF(theta,
    X)/dtheta`` of shape ``(N O, P)`` -- neural-tangents' ``vmap_axes=None``; each of x1 and x2
    is one batch. ``batch="auto"`` tells the two apart by a probe (:func:`is_batch_coupled`:
    the outputs and a random Jacobian-vector product of the batched call against the
    per-example calls) and computes the batched kernel for a coupled function; the decision
    is kept per input shapes. Under an outer ``jit`` without an earlier concrete call the
    probe runs while tracing, on stand-in values of the traced arguments' shapes and dtypes
    (floating parameters in [0.5, 1.5), floating inputs in [-1, 1), integer inputs 0 or 1,
    all pseudo-random), so the program holds only the kernel it decides on; a model whose
    coupling those values hide needs ``batch=`` (or a concrete call first). A model that
    closes over values of the outer trace has no concrete stand-in: the program probes it and
    ``lax.cond`` picks the kernel. A probe that is not a number counts as coupled.

    Kernel variants used in the literature on real models (each is the kernel of a reduced
    model, so every ``ntk_method`` computes it at the cost of its one output):

    * ``outputs="pseudo"``: the pseudo-NTK of Mohamadi, Bae & Sutherland 2023 ("A Fast,
      Well-Founded Approximation to the Empirical Neural Tangent Kernel", ICML), the kernel of
      the summed outputs scaled by ``1/sqrt(O)``:
      ``pNTK(x, x') = (1/O) <d(sum_i f_i(x))/dtheta, d(sum_j f_j(x'))/dtheta>
      = (1/O) sum_{ij} Theta_{ij}(x, x')``, shape ``(N1, N2)``.
    * ``outputs="logit"``: the kernel of one chosen output per example, ``K(x_a, x'_b) =
      <df_{i_a}(x_a)/dtheta, df_{j_b}(x'_b)/dtheta> = Theta_{i_a j_b}(x_a, x'_b)`` (e.g. the
      label logit), shape ``(N1, N2)``; the indices (into the flattened outputs) are given when
      calling: ``ntk(params, x1, x2, index1=i, index2=j)``, each an int or an int array of one
      entry per example (``index2`` defaults to ``index1`` when ``x2`` is None).
    * ``variant="signgd"``: the asymmetric SignGD kernel of Malladi et al. 2023 ("A
      Kernel-Based View of Language Model Fine-Tuning", ICML, section 4.2, Definition 4.3),
      ``K_{ij}(x, x') = <df_i(x)/dtheta, sign(df_j(x')/dtheta)>`` -- the kernel of the
      early-time dynamics of sign-based (Adam-like) updates; ``sign(0) = 0``. It is not
      symmetric (also for ``x2=None``) and is computed from per-sample Jacobians.
    * ``params_filter``: the kernel over a subset of the parameters (the head only, the last
      blocks, LoRA adapters): ``sum_{p in S}``. The other parameters are held as constants, so
      neither their Jacobians nor their structured terms are computed.

    Args:
      apply_fn: ``(params, x) -> (N, *out)``, e.g. a linen ``module.apply``, or a
        ``flax.nnx.Module`` (in evaluation mode): its ``nnx.Param`` state is differentiated and
        the kernel function takes as ``params`` that module (e.g. after training), its Param
        state (``nnx.split(module, nnx.Param, ...)[1]``) or None (its parameters at
        construction); the other state (batch statistics) comes from the module passed.
      ntk_method: ``"auto"``, ``"jacobian"``, ``"ntk_vp"`` or ``"structured"`` (see module doc).
        All give the same kernel up to rounding. The batched kernel of a coupled function is
        computed by ``"jacobian"`` (for ``"structured"`` too) or ``"ntk_vp"``.
      outputs: ``"trace"`` -- the SUM over outputs, shape ``(N1, N2)``; ``"mean"`` -- the
        MEAN over outputs (neural-tangents' ``trace_axes=(-1,)``), shape ``(N1, N2)``;
        ``"full"`` -- shape ``(N1, N2, O, O)``; ``"diagonal"`` -- shape ``(N1, N2, O)``;
        ``"pseudo"`` and ``"logit"`` (above), shape ``(N1, N2)``.
      vp_batch_size: only for ``"ntk_vp"``: evaluate the columns ``x2[b]`` sequentially in
        groups of this size (``lax.map``) to bound memory; None vectorizes over all of x2.
      batch: ``"auto"`` (probe, above), ``"per_sample"`` (examples are independent: no probe)
        or ``"whole"`` (the batched kernel, always).
      diagonal_batch: only the pairs ``Theta(x1_a, x2_a)`` (``x2=None``: ``Theta(x_a, x_a)``),
        without forming the ``N1 x N2`` matrix -- neural-tangents' ``diagonal_axes=(0,)``.
        Shapes ``(N,)``, ``(N, O)`` or ``(N, O, O)``; x1 and x2 need the same N.
      params_filter: None (every parameter) or the parameters to differentiate: a predicate
        ``(path, leaf) -> bool`` deciding from the leaf's path in the differentiated part
        (a tuple of keys such as ``("Dense_1", "kernel")``; for a linen variables dict the
        ``"params"`` collection, for an NNX module its Param state) and the leaf's
        shape/dtype; or an optax-style mask, a pytree of bools with the structure of the
        differentiated part or of a prefix of it (``{"Dense_0": False, "Dense_1": True}``).
      variant: ``"ntk"`` or ``"signgd"`` (above).

    Returns:
      ``ntk(params, x1, x2=None)``, a ``jax.jit`` of a pure function (``ntk.__wrapped__``);
      it may be called inside another ``jit``, ``lax.scan`` or ``grad`` with traced params.
      ``x2=None`` means ``x2 = x1``: the per-sample work is done once and the result is
      exactly symmetric. Configuration (ntk_method, outputs, batch) is fixed at construction.

    Raises:
      ValueError: unknown ntk_method/outputs/batch (here); when called: inputs without a batch
        axis, empty or without features, x1 and x2 with different per-example shapes (or
        different N with ``diagonal_batch``), params that do not fit the model, concrete inputs
        holding NaN or Inf (under an outer ``jit`` the values are unknown and not checked), and
        a linen model with a train-mode dropout (``flax.linen.Dropout`` or
        :class:`ntkjax.nn.Dropout` with ``deterministic=False`` and ``rate > 0``): its masks
        depend on RNG state and on how examples are batched, so it has no one kernel; a
        ``params_filter`` that selects no parameter or does not match the parameters; for
        ``outputs="logit"`` missing or out-of-range indices; an NNX module called with linen
        variables, or a linen ``apply`` called with an NNX module or state.

    A linear model ``f(x) = x w`` has the NTK ``x1 x2^T``:

    >>> import jax.numpy as jnp, ntkjax
    >>> apply_fn = lambda params, x: x @ params["w"]
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> print(ntkjax.empirical_ntk_fn(apply_fn)({"w": jnp.ones((2, 1))}, x))
    [[ 5. 11.]
     [11. 25.]]
    >>> print(ntkjax.empirical_ntk_fn(apply_fn, diagonal_batch=True)({"w": jnp.ones((2, 1))}, x))
    [ 5. 25.]

    Centering by the batch mean couples the examples; the kernel is that of the batch:

    >>> centered = lambda params, x: (x - x.mean(0)) @ params["w"]
    >>> print(ntkjax.empirical_ntk_fn(centered)({"w": jnp.ones((2, 1))}, x))
    [[ 2. -2.]
     [-2.  2.]]

    Only the parameter ``"b"`` of ``f(x) = x w + b``: each example's gradient is 1:

    >>> affine = lambda params, x: x @ params["w"] + params["b"]
    >>> p = {"w": jnp.ones((2, 1)), "b": jnp.zeros(1)}
    >>> print(ntkjax.empirical_ntk_fn(affine, params_filter={"w": False, "b": True})(p, x))
    [[1. 1.]
     [1. 1.]]
    """
    check_choice(ntk_method, NTK_METHODS, "ntk_method")
    check_choice(outputs, KERNEL_OUTPUTS, "outputs")
    check_choice(batch, BATCH_MODES, "batch")
    check_choice(variant, VARIANTS, "variant")
    if not isinstance(diagonal_batch, bool):
        raise ValueError(f"diagonal_batch must be True or False, got {diagonal_batch!r}.")
    if vp_batch_size is not None and (
        not isinstance(vp_batch_size, int | np.integer) or vp_batch_size < 1
    ):
        raise ValueError(
            f"vp_batch_size must be None or a positive integer, got {vp_batch_size!r}."
        )
    if variant == "signgd" and ntk_method not in ("auto", "jacobian"):
        raise ValueError(
            f"variant='signgd' needs each per-sample gradient's sign, so it is computed from "
            f"per-sample Jacobians: use ntk_method='jacobian' (or 'auto'), not {ntk_method!r}."
        )
    nnx_model = _NNXModel(apply_fn) if _is_nnx_module(apply_fn) else None
    model: ApplyFn = apply_fn if nnx_model is None else nnx_model

    # "mean": the trace over O; "pseudo" and "logit": the trace of a one-output model
    inner: Outputs = "trace" if outputs in ("mean", "pseudo", "logit") else outputs  # type: ignore[assignment]
    symmetric = variant == "ntk"
    decisions: dict[Any, bool] = {}  # coupled or not, per input shapes (batch="auto")

    def as_variables(params):
        """What the kernel function was called with, as the model's params."""
        if nnx_model is not None:
            return nnx_model.variables(params)
        if _is_nnx_module(params) or (_is_nnx_state(params) and _is_linen_apply(apply_fn)):
            raise ValueError(
                f"params: got a flax.nnx {type(params).__name__} for a flax.linen apply_fn "
                f"({describe_object(apply_fn)}); pass the nnx Module itself as apply_fn (or "
                "use ntkjax.nnx_apply_fn), or the linen module's variables as params."
            )
        return params

    def compute(params, x1, x2, whole, index1=None, index2=None):
        with linen.intercept_methods(_reject_active_dropout):
            return _ntk(params, x1, x2, whole, index1, index2)

    def _ntk(params, x1, x2, whole, index1, index2):
        out = check_model_inputs(model, params, x1, x2)
        if diagonal_batch and x2 is not None and x1.shape[0] != x2.shape[0]:
            raise ValueError(
                f"diagonal_batch pairs x1[a] with x2[a], so x1 and x2 need the same number of "
                f"examples; got x1 of shape {tuple(x1.shape)} and x2 of shape "
                f"{tuple(x2.shape)}."
            )
        fn = model
        if params_filter is not None:
            fn, params = _select_params(fn, params, params_filter)
        same = x2 is None
        if outputs == "pseudo":
            fn = _summed_outputs(fn)
        elif outputs == "logit":
            full_dim = int(np.prod(out.shape[1:]))
            _check_index(index1, "index1", x1.shape[0], full_dim)
            if x2 is None and index2 is not None:
                x2 = x1
            if x2 is not None:
                index2 = index1 if same and index2 is None else index2
                _check_index(index2, "index2", x2.shape[0], full_dim)
                x2 = _pack_index(x2, index2)
            fn = _chosen_output(fn, x1.shape[1:], x1.dtype)
            x1 = _pack_index(x1, index1)
        if outputs in ("pseudo", "logit"):
            out = jax.eval_shape(fn, params, x1)
        out_dim = int(np.prod(out.shape[1:]))
        dtype = _result_dtype(params, out)
        chosen = ntk_method
        if variant == "signgd":
            chosen = "jacobian"
        elif ntk_method == "auto" or (whole and ntk_method == "structured"):
            chosen = _auto_method(fn, params, x1, x2, out_dim, whole)
        if chosen == "jacobian":
            kernel = _jacobian_kernel(fn, params, x1, x2, inner, whole, diagonal_batch,
                                      sign=variant == "signgd")
        elif chosen == "ntk_vp":
            kernel = _ntk_vp_kernel(
                fn, params, x1, x2, inner, out_dim, dtype, vp_batch_size, whole,
                diagonal_batch,
            )
        elif diagonal_batch:
            kernel = _structured_paired(fn, params, x1, x2, inner)
        else:
            kernel = structured_kernel(fn, params, x1, x2, outputs=inner)
        if kernel is None:  # no parameter at all
            kernel = _zeros(x1, x2, out_dim, inner, dtype, diagonal_batch)
        kernel = kernel.astype(dtype)
        if outputs == "mean":
            kernel = kernel / out_dim
        if x2 is not None or not symmetric:
            return kernel
        if diagonal_batch:
            return 0.5 * (kernel + jnp.swapaxes(kernel, -1, -2)) if inner == "full" else kernel
        return symmetrize(kernel, inner)

    def ntk(params, x1, x2=None, *, index1=None, index2=None):
        params = as_variables(params)
        if batch != "auto":
            return compute(params, x1, x2, batch == "whole", index1, index2)
        key = _shapes_key(params, x1, x2, index1, index2)
        if key not in decisions:  # traced values: probe stand-ins of their shapes and dtypes
            with linen.intercept_methods(_reject_active_dropout):
                stand_ins = _stand_ins(params, x1, x2)
                traced = probe.trace(*stand_ins)  # traced once: checked, then compiled
                if _reads_enclosing_trace(traced, stand_ins):
                    # e.g. a model linearized around traced parameters: no concrete stand-in
                    # exists, so the program probes and lax.cond picks the kernel (NaN: coupled)
                    coupled = jnp.logical_not(probe(params, x1, x2) <= _COUPLING_TOLERANCE)
                    return jax.lax.cond(
                        coupled,
                        lambda: compute(params, x1, x2, True, index1, index2),
                        lambda: compute(params, x1, x2, False, index1, index2),
                    )
                # a compiled program runs on concrete values even inside a trace
                gap = traced.lower().compile()(*stand_ins)
            decisions[key] = _is_coupled(gap)
        return compute(params, x1, x2, decisions[key], index1, index2)

    options = cpu_convolution_options()
    per_sample = jit_with_options(functools.partial(compute, whole=False), options)
    whole_batch = jit_with_options(functools.partial(compute, whole=True), options)
    probe = jax.jit(functools.partial(_coupling_gap, model))
    selecting = jax.jit(ntk)

    def checked(params: Any, x1: jax.Array, x2: jax.Array | None = None, *,
                index1: ArrayLike | None = None, index2: ArrayLike | None = None) -> jax.Array:
        check_values(x1, x2)
        if outputs != "logit" and (index1 is not None or index2 is not None):
            raise ValueError(
                f"index1 / index2 choose one output per example for outputs='logit'; this "
                f"kernel function has outputs={outputs!r}."
            )
        params = as_variables(params)
        if outputs == "logit":  # validated here, where the values are known
            out = check_model_inputs(model, params, x1, x2)
            full_dim = int(np.prod(out.shape[1:]))
            _check_index(index1, "index1", np.shape(x1)[0], full_dim)
            if x2 is not None or index2 is not None:
                n2 = np.shape(x1 if x2 is None else x2)[0]
                _check_index(index1 if index2 is None and x2 is None else index2, "index2", n2,
                             full_dim)
        if batch == "per_sample":
            return per_sample(params, x1, x2, index1=index1, index2=index2)
        if batch == "whole":
            return whole_batch(params, x1, x2, index1=index1, index2=index2)
        key = _shapes_key(params, x1, x2, index1, index2)
        if key not in decisions and all(
            is_concrete(leaf) for leaf in jax.tree_util.tree_leaves((params, x1, x2))
        ):
            check_pair(x1, x2)
            with linen.intercept_methods(_reject_active_dropout):
                check_model_inputs(model, params, x1, x2)
                decisions[key] = _is_coupled(probe(params, x1, x2))
        if key in decisions:
            return (whole_batch if decisions[key] else per_sample)(
                params, x1, x2, index1=index1, index2=index2)
        return selecting(params, x1, x2, index1=index1, index2=index2)

    checked.__wrapped__ = ntk  # type: ignore[attr-defined]
    return checked


def _shapes_key(*trees: Any) -> tuple:
    """The tree structure, shapes and dtypes of ``trees``: what a decision kept per input
    shapes is keyed on."""
    leaves = jax.tree_util.tree_leaves(trees)
    return jax.tree_util.tree_structure(trees), tuple(
        (np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves
    )


def _coupling_decisions(apply_fn) -> dict:
    """Batch coupling of ``apply_fn`` found by :func:`empirical_ntk_matrix`'s probe, per
    parameter and input shapes, and its two-pass bytes per example (one dict per
    ``apply_fn``, through :func:`_shared`)."""
    del apply_fn
    return {}


# A batched call whose outputs or Jacobian-vector product differ from the per-example calls
# by more than this (relative to their largest entry) is batch-coupled.
_COUPLING_TOLERANCE = 1e-3
# Rows of x1 and x2 on which empirical_ntk_matrix probes for batch coupling.
_PROBE_ROWS = 16


def _is_coupled(gap: ArrayLike) -> bool:
    """Whether a probe's gap (:func:`_coupling_gap`) says the examples interact. A gap that is
    not a number (the probe's inputs gave NaN outputs) counts as coupled: the whole-batch
    kernel is exact for either kind of function, the per-example one only for independent
    examples."""
    return not bool(np.asarray(gap) <= _COUPLING_TOLERANCE)


def _coupling_gap(apply_fn, params, x1, x2=None) -> jax.Array:
    """The largest relative difference between the batched call ``F(theta, X)`` and the
    per-example calls ``f(theta, x_a[None])``, in the outputs and in a Jacobian-vector product
    along a fixed pseudo-random parameter direction, over x1 and x2 (0 for independent
    examples, up to rounding)."""
    trainable, rebuild = split_params(params)
    f_batch = batched_fn(apply_fn, rebuild)
    f_single = per_sample_fn(apply_fn, rebuild)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    tangent = jax.tree_util.tree_unflatten(treedef, [
        _probe_direction(leaf, index)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) else jnp.zeros_like(leaf)
        for index, leaf in enumerate(leaves)
    ])
    gap = jnp.zeros(())
    for x in (x1, x2):
        if x is None:
            continue
        batched = jax.jvp(lambda p, x=x: f_batch(p, x), (trainable,), (tangent,))
        single = jax.vmap(
            lambda xa: jax.jvp(lambda p: f_single(p, xa), (trainable,), (tangent,))
        )(x)
        for b, s in zip(batched, single, strict=True):
            scale = jnp.maximum(jnp.max(jnp.abs(b)), jnp.max(jnp.abs(s)))
            diff = jnp.max(jnp.abs(b - s)) / jnp.where(scale > 0, scale, 1.0)
            gap = jnp.maximum(gap, diff.astype(gap.dtype))
    return gap


def _reads_enclosing_trace(traced: jax.stages.Traced, args: tuple) -> bool:
    """Whether a jitted function traced on ``args`` reads values of an enclosing trace (a model
    that closes over traced arrays, e.g. linearized around traced parameters): JAX passes them
    to its program as inputs beyond ``args`` (or keeps them as constants of its jaxpr), so it
    cannot run on concrete stand-ins."""
    closed = traced.jaxpr
    return (len(closed.jaxpr.invars) > len(jax.tree_util.tree_leaves(args))
            or not all(is_concrete(c) for c in closed.consts))


def _stand_ins(params, x1, x2) -> tuple:
    """Concrete values of the shapes and dtypes of ``(params, x1, x2)`` on which to probe for
    batch coupling when they are traced (under an outer ``jit``); concrete leaves are kept.
    Stand-ins are sine-hash values (:func:`_probe_direction`), so the rows differ: floating
    parameters in [0.5, 1.5) (positive, as variances and scales need), floating inputs in
    [-1, 1), integer inputs 0 or 1 (valid token ids), boolean inputs both."""

    def stand_in(leaf, index, shift):
        if is_concrete(leaf):
            return leaf
        dtype = jnp.result_type(leaf)
        hashed = _sine_hash(np, np.shape(leaf), index)  # numpy: nothing to compile
        if jnp.issubdtype(dtype, jnp.inexact):
            return (shift + (0.5 if shift else 1.0) * hashed).astype(dtype)
        return (hashed > 0).astype(dtype)

    leaves, tree = jax.tree_util.tree_flatten(params)
    stand_params = jax.tree_util.tree_unflatten(
        tree, [stand_in(leaf, i, 1.0) for i, leaf in enumerate(leaves)])
    return (stand_params, stand_in(x1, -1, 0.0),
            None if x2 is None else stand_in(x2, -2, 0.0))


def _probe_direction(leaf, index: int) -> jax.Array:
    """A fixed pseudo-random direction of ``leaf``'s shape and dtype, entries in [-1, 1): the
    sine hash ``2 frac(43758.5453 sin(12.9898 k + 78.233 index)) - 1`` of each entry's flat
    position ``k`` -- a few elementwise operations, where a PRNG sampler per leaf (threefry)
    would make most of the probe's compile time."""
    return _sine_hash(jnp, jnp.shape(leaf), index).astype(jnp.result_type(leaf))


def _sine_hash(xp, shape, index: int):
    """The sine hash of :func:`_probe_direction` in float32, computed by ``xp`` (``jax.numpy``
    or ``numpy``)."""
    k = xp.arange(int(np.prod(shape)), dtype=xp.float32).reshape(shape)
    hashed = xp.float32(43758.5453) * xp.sin(xp.float32(12.9898) * k + xp.float32(78.233 * index))
    return xp.float32(2.0) * (hashed - xp.floor(hashed)) - xp.float32(1.0)


def is_batch_coupled(apply_fn: ApplyFn, params: Any, x1: ArrayLike,
                     x2: ArrayLike | None = None) -> bool:
    """Whether ``apply_fn`` couples the examples of a batch (e.g. through a batch mean).

    Compares the batched call ``F(theta, X)`` with the per-example calls
    ``f(theta, x_a[None])``: their outputs and their Jacobian-vector products along a fixed
    pseudo-random parameter direction ``v`` (``J(X) v`` against ``J(x_a) v``, so a difference
    in the Jacobians is found with probability one). Coupled when the largest difference
    exceeds ``1e-3`` of the largest entry; independent examples agree up to rounding. This is
    the probe of :func:`empirical_ntk_fn`'s ``batch="auto"``.

    Args:
      apply_fn: ``(params, x) -> (N, *out)``.
      params: the model parameters (any pytree / linen variables dict).
      x1: ``(N1, *features)``, concrete.
      x2: ``(N2, *features)`` or None, concrete.

    Returns:
      True when the examples of x1 (or of x2) interact.

    >>> import jax.numpy as jnp, ntkjax
    >>> x = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    >>> w = {"w": jnp.ones((2, 1))}
    >>> ntkjax.is_batch_coupled(lambda p, x: x @ p["w"], w, x)
    False
    >>> ntkjax.is_batch_coupled(lambda p, x: (x - x.mean(0)) @ p["w"], w, x)
    True
    """
    check_pair(x1, x2)
    x1 = jnp.asarray(x1)
    x2 = None if x2 is None else jnp.asarray(x2)
    with linen.intercept_methods(_reject_active_dropout):
        check_model_inputs(apply_fn, params, x1, x2)
        gap = _shared(_coupling_probe, apply_fn)(params, x1, x2)
    return _is_coupled(gap)


def _coupling_probe(apply_fn):
    """:func:`_coupling_gap` of ``apply_fn``, jitted."""
    return jax.jit(functools.partial(_coupling_gap, apply_fn))


@functools.lru_cache(maxsize=32)
def _cached(factory, *args):
    return factory(*args)


def _shared(factory: Callable, *args: Any) -> Any:
    """``factory(*args)``, made once per configuration and reused by later calls with equal
    (hashable) ``args`` -- so a jitted function built from it is traced and compiled once, not
    once per call; unhashable ``args`` (an optax-style mask dict) get a fresh one."""
    try:
        hash(args)
    except TypeError:
        return factory(*args)
    return _cached(factory, *args)


def _checking_values(kernel: Callable) -> KernelFn:
    """``kernel`` jitted (:func:`ntkjax.compile_options.jit_with_options`), behind a check that
    concrete inputs are finite -- inside the jitted program they are tracers, whose values are
    unknown. Keeps ``__wrapped__`` (the pure function) and ``lower``."""
    jitted = jit_with_options(kernel, cpu_convolution_options())

    def checked(params: Any, x1: jax.Array, x2: jax.Array | None = None) -> jax.Array:
        check_values(x1, x2)
        return jitted(params, x1, x2)

    checked.__wrapped__ = kernel  # type: ignore[attr-defined]
    checked.lower = jitted.lower  # type: ignore[attr-defined]
    return checked


def _active_dropout(module: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of a (flax or ntkjax) Dropout module drops units."""
    if not isinstance(module, linen.Dropout | Dropout):
        return False
    deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
    if deterministic is None:
        deterministic = module.deterministic
    return not deterministic and float(module.rate) > 0


def _reject_active_dropout(next_fun, args, kwargs, context):
    """Interceptor: the empirical NTK of a train-mode dropout network is not one kernel."""
    if context.method_name == "__call__" and _active_dropout(context.module, args, kwargs):
        cls = type(context.module)
        raise ModelRefused(
            f"empirical_ntk_fn: {cls.__module__}.{cls.__qualname__} (module "
            f"{context.module.name!r}) is in train mode (deterministic=False, rate "
            f"{context.module.rate}). Its masks depend on how the examples are batched -- the "
            "per-sample methods draw one mask per single-example call, the batched ones one "
            "per batch row -- so the empirical NTK would differ between methods. Apply the "
            "model with deterministic=True (or make the masks explicit inputs)."
        )
    return next_fun(*args, **kwargs)


def _auto_method(apply_fn, params, x1, x2, out_dim, whole) -> str:
    if not whole and count_structured_layers(apply_fn, params, x1) > 0:
        return "structured"
    n = x1.shape[0] + (0 if x2 is None else x2.shape[0])
    if _jacobian_bytes(params, n, out_dim) > available_memory_bytes() // 4:
        return "ntk_vp"
    return "jacobian"


def empirical_ntk_matrix(
    apply_fn: ApplyFn,
    params: Any,
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    ntk_method: NTKMethod = "auto",
    outputs: KernelOutputs = "trace",
    memory_bytes: int | None = None,
    block_size: int | None = None,
    devices: Sequence[Any] | None = None,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
    params_filter: ParamsFilter | None = None,
    schedule: Literal["auto", "blocks", "two_pass"] = "auto",
    spill_dir: str | os.PathLike | None = None,
) -> Any:
    """The empirical NTK of large inputs, computed in memory-bounded blocks into host memory.

    Blocks of x1 and x2 rows are evaluated with :func:`empirical_ntk_fn` through
    :func:`ntkjax.blocking.evaluate_in_blocks` (params are passed as traced arguments, so one
    compilation serves every block). With ``x2=None`` only the upper triangle of blocks is
    computed and mirrored, and each diagonal block is the kernel function's ``x2=None`` call
    (each example's forward and cotangents computed once, the block exactly symmetric). The
    block functions are made once per configuration (``apply_fn``, ``ntk_method``,
    ``outputs``, a hashable ``params_filter``): a later call with the same input shapes
    reuses their traces and compiled programs, and the batch-coupling probe's decision, so it
    costs the kernel's own time.

    Args:
      apply_fn, ntk_method, outputs, params_filter: as in :func:`empirical_ntk_fn`
        (``outputs="logit"``, whose indices are per example, is not offered here).
      params: the model parameters (any pytree / linen variables dict).
      x1: ``(N1, *features)``.
      x2: ``(N2, *features)`` or None for x2 = x1.
      memory_bytes: budget for one block call; half of the free memory when None.
      block_size: rows per block (overrides ``memory_bytes``).
      devices: devices to spread the blocks over (default: all, of all processes; with the
        two-pass schedule pass 1's blocks, this process's devices, default the default one).
      out: path of a resumable zarr store (array ``kernel``) to write to instead of RAM,
        recorded with the inputs, the parameters, ``apply_fn``, ``ntk_method`` and ``outputs``
        (:func:`ntkjax.blocking.evaluate_in_blocks`; the two-pass schedule's: below).
      show_progress: progress bar on stderr (over the blocks; with the two-pass schedule
        one over pass 1's example blocks, one over pass 2's layers).
      schedule: ``"blocks"`` (above), ``"two_pass"`` or ``"auto"``. ``"two_pass"``
        (:func:`ntkjax.structured.two_pass_kernel`; the structured method) takes ``x2``
        (``Theta(x1, x2)``; None: ``Theta(x1, x1)``, symmetrized), ``outputs``,
        ``memory_bytes``, ``params_filter``, ``show_progress``, ``out``, ``spill_dir`` and
        ``devices`` (this process's: pass 1's example blocks spread over them, one per device
        at a time; None: the default device), and refuses ``block_size`` (its blocks are
        sized from ``memory_bytes``), devices of other processes and an ``ntk_method`` other
        than ``"auto"``/``"structured"``. Pass 1 computes every
        example's (rows of x1, then of x2) forward and backward passes once -- each
        structured layer's inputs and cotangents, the per-example gradients of norms, biases
        and other parameters -- and stores them layer by layer, in memory when they fit half
        of ``memory_bytes``, else in temporary files (removed at the end, also after an
        error); pass 2 adds each layer's Gram term over all example pairs (of x1 with x2, or
        of x1 with itself), in the factored form or from per-example gradients formed in
        chunks of columns, whichever needs fewer FLOPs. Example blocks instead recompute both
        blocks' forward and backward passes for every block pair, so for a large model whose
        factors of all N examples do not fit the budget the two-pass schedule does a
        fraction of the work (e.g. a GPT-2-shaped model of 86.7M parameters, N = 256 within
        8 GB: about 43 TFLOP against 450). With ``out`` it is resumable: the factors are
        written under the store (``two_pass/``) and each finished pass-1 block and pass-2
        layer (the running sum, layers added in a fixed order) is recorded, so a call
        interrupted at any point and repeated with the same arguments resumes where it
        stopped and gives the same bits (the budget recorded at the start is reused); at the
        end the factors are removed and the array ``kernel`` remains. ``"auto"`` takes the
        two-pass schedule exactly when the structured method applies, ``devices`` and
        ``block_size`` are not given, and three times the bytes pass 1 stores for all
        N1 (+ N2) examples (its footprint while it runs) exceed ``memory_bytes`` (checked once
        per ``apply_fn`` and shapes); with ``out`` naming an existing store, the schedule that
        wrote it. Its result equals the kernel function's up to rounding (not bit for bit).
      spill_dir: directory for the two-pass factors: given, they are always written there
        (in a temporary subdirectory); None: kept in memory when they fit, else in the
        system's temporary directory (with ``out``: in the store). Only with the two-pass
        schedule.

    Raises:
      ValueError: as :func:`empirical_ntk_fn`, and for a batch-coupled ``apply_fn``
        (:func:`is_batch_coupled` on the first rows, probed once per ``apply_fn``, parameter
        and input shapes), whose kernel has no blocks; an unknown ``schedule``,
        ``schedule="two_pass"`` with what it does not take (above) or a model without a
        layer the structured method factorizes, ``spill_dir`` that is not a directory or
        with ``schedule="blocks"``; an ``out`` store written for other inputs, parameters,
        model or outputs (the message names the difference).

    Returns:
      A numpy array of shape ``(N1, N2)``, ``(N1, N2, O)`` or ``(N1, N2, O, O)``; with ``out``
      a read-only ``zarr.Array`` of that shape (``a[i:j]`` reads rows as numpy).

    >>> import jax.numpy as jnp, ntkjax
    >>> apply_fn = lambda params, x: x @ params["w"]  # linear: the NTK is x1 x2^T
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> print(ntkjax.empirical_ntk_matrix(apply_fn, {"w": jnp.ones((2, 1))}, x, block_size=2))
    [[ 1.  3.  5.]
     [ 3. 13. 23.]
     [ 5. 23. 41.]]
    """
    if outputs == "logit":
        raise ValueError(
            "empirical_ntk_matrix does not take outputs='logit' (its indices are per example); "
            "use ntkjax.empirical_ntk_fn(apply_fn, outputs='logit') on blocks of examples."
        )
    check_choice(schedule, ("auto", "blocks", "two_pass"), "schedule")
    if spill_dir is not None and (schedule == "blocks" or not os.path.isdir(spill_dir)):
        raise ValueError(
            f"spill_dir={os.fspath(spill_dir)!r}: " + (
                "only the two-pass schedule spills (schedule='two_pass' or 'auto')."
                if schedule == "blocks" else "not an existing directory."))
    if schedule == "auto" and out is not None:
        schedule = _store_schedule(os.fspath(out))
    if schedule == "two_pass":
        given = ["block_size"] if block_size is not None else []
        if devices is not None and any(
                d.process_index != jax.process_index() for d in devices):
            given.append("devices of other processes")
        if given or ntk_method not in ("auto", "structured"):
            raise ValueError(
                "schedule='two_pass' computes the kernel by the structured method in one "
                "process, its blocks sized from memory_bytes; it does not take "
                + ", ".join(given + ([f"ntk_method={ntk_method!r}"]
                                     if ntk_method not in ("auto", "structured") else []))
                + ". Use schedule='blocks' for those.")
    check_pair(x1, x2)
    x1 = jnp.asarray(x1)
    x2 = None if x2 is None else jnp.asarray(x2)
    check_model_inputs(apply_fn, params, x1[:1], None if x2 is None else x2[:1])
    rows = _PROBE_ROWS
    probe_x2 = None if x2 is None else x2[:rows]
    decisions = _shared(_coupling_decisions, apply_fn)
    key = _shapes_key(params, x1[:rows], probe_x2)
    if key not in decisions:  # probed once per shapes, like empirical_ntk_fn's batch="auto"
        decisions[key] = is_batch_coupled(apply_fn, params, x1[:rows], probe_x2)
    if decisions[key]:
        raise ValueError(
            "empirical_ntk_matrix: apply_fn couples the examples of a batch (its output on "
            "one example depends on the others, e.g. through a batch mean), so its kernel is "
            "that of one whole batch and cannot be assembled from blocks. Use "
            "ntkjax.empirical_ntk_fn(apply_fn, batch='whole') on the whole batch."
        )

    budget = available_memory_bytes() // 2 if memory_bytes is None else int(memory_bytes)
    if schedule == "two_pass" or (
        schedule == "auto" and devices is None
        and block_size is None and ntk_method in ("auto", "structured")
        and _two_pass_pays(apply_fn, params, x1, x2, outputs, params_filter, budget, decisions)
    ):
        return _two_pass_matrix(apply_fn, params, x1, x2, outputs, params_filter, budget,
                                spill_dir, schedule == "two_pass", out, show_progress, devices)
    if spill_dir is not None:
        raise ValueError(
            f"spill_dir={os.fspath(spill_dir)!r}: schedule='auto' chose example blocks here "
            "(the factors of all examples fit the budget, or the call needs blocks), which "
            "spill nothing; pass schedule='two_pass' to use the two-pass schedule.")
    block_fn, diagonal_fn = _shared(_matrix_block_fns, apply_fn, ntk_method, outputs,
                                    params_filter)
    return evaluate_in_blocks(
        block_fn,
        x1,
        x2,
        fn_args=(params,),
        block_size=block_size,
        memory_bytes=memory_bytes,
        show_progress=show_progress,
        description="empirical NTK blocks",
        devices=devices,
        out=out,
        diagonal_fn=diagonal_fn,
        fingerprint=(
            f"empirical_ntk_matrix ntk_method={ntk_method} outputs={outputs} "
            f"apply_fn={describe_object(apply_fn)}"
            + ("" if params_filter is None else f" {_describe_filter(params_filter)}")
        ),
    )


def _two_pass_view(apply_fn, params, outputs, params_filter):
    """``(apply_fn', params', inner outputs)``: the model :func:`two_pass_kernel` sees for
    ``outputs`` and ``params_filter`` (an NNX module as its variables dict)."""
    fn: Any = apply_fn
    if _is_nnx_module(apply_fn):
        fn = _NNXModel(apply_fn)
        params = fn.variables(params)
    if params_filter is not None:
        fn, params = _select_params(fn, params, params_filter)
    if outputs == "pseudo":
        fn = _summed_outputs(fn)
    inner = "trace" if outputs in ("mean", "pseudo") else outputs
    return fn, params, inner


def _two_pass_pays(apply_fn, params, x, x2, outputs, params_filter, budget, decisions) -> bool:
    """Whether ``schedule="auto"`` takes the two-pass schedule: the structured method applies
    and pass 1's footprint for all examples of ``x`` and ``x2`` (three times what it stores)
    exceeds ``budget``.
    The bytes per example are kept in ``decisions`` per shapes and configuration."""
    key = ("two_pass", _shapes_key(params, x[:1]), outputs,
           None if params_filter is None else _describe_filter(params_filter))
    if key not in decisions:
        fn, p, _ = _two_pass_view(apply_fn, params, outputs, params_filter)
        with linen.intercept_methods(_reject_active_dropout):
            layers = count_structured_layers(fn, p, x[:1])
            decisions[key] = two_pass_bytes_per_example(fn, p, x[:1]) if layers else None
    per_example = decisions[key]
    n = x.shape[0] + (0 if x2 is None else x2.shape[0])
    return per_example is not None and 3 * n * per_example > budget


_TWO_PASS_STORE = "empirical_ntk_matrix schedule=two_pass"


def _store_schedule(path: str) -> Literal["auto", "blocks", "two_pass"]:
    """The schedule that wrote the store at ``path`` (``"auto"`` when there is none), so that
    ``schedule="auto"`` resumes a store with the schedule that began it."""
    meta = _store.read_meta(path)
    if meta is None:
        return "auto"
    described = meta["fingerprint"]["model"]["description"]
    return "two_pass" if described.startswith(_TWO_PASS_STORE) else "blocks"


def _two_pass_matrix(apply_fn, params, x, x2, outputs, params_filter, budget, spill_dir,
                     explicit: bool, out, show_progress: bool, devices=None) -> Any:
    """:func:`empirical_ntk_matrix` by :func:`ntkjax.structured.two_pass_kernel`; with
    ``out`` in a resumable store (:func:`_two_pass_store`)."""
    fn, p, inner = _two_pass_view(apply_fn, params, outputs, params_filter)
    with linen.intercept_methods(_reject_active_dropout):
        if explicit and count_structured_layers(fn, p, x[:1]) == 0:
            raise ValueError(
                f"schedule='two_pass': the model ({describe_object(apply_fn)}) has no layer "
                "that the structured method factorizes (see ntkjax.structured); use "
                "schedule='blocks'.")
        shape = jax.eval_shape(fn, p, x[:1])
        dtype = _result_dtype(p, shape)
        store = None if out is None else _two_pass_store(
            os.fspath(out), fn, p, x, x2, outputs, params_filter, apply_fn, shape, dtype)
        if store is not None and store.complete():
            shutil.rmtree(_factors_dir(store), ignore_errors=True)
            return store.readers()[0]
        kernel = two_pass_kernel(
            fn, p, x, x2, outputs=inner, memory_bytes=budget,
            spill=True if spill_dir is not None else None,
            spill_dir=None if spill_dir is None else os.fspath(spill_dir),
            show_progress=show_progress, devices=None if devices is None else list(devices),
            resume_dir=None if store is None else _factors_dir(store))
    if x2 is None:
        kernel = symmetrize(jnp.asarray(kernel), inner)
    kernel = np.asarray(kernel).astype(dtype)
    if outputs == "mean":
        kernel = kernel / int(np.prod(shape.shape[1:]))
    if store is None:
        return kernel
    store.write(0, 0, [kernel], None)
    shutil.rmtree(_factors_dir(store), ignore_errors=True)
    return store.readers()[0]


def _factors_dir(store) -> str:
    """Where a two-pass call into ``store`` keeps the records of its finished pass-1 blocks and
    pass-2 layers (``two_pass_kernel``'s ``resume_dir``); removed once the kernel is stored."""
    return os.path.join(store.path, "two_pass")


def _two_pass_store(path, fn, p, x, x2, outputs, params_filter, apply_fn, shape, dtype):
    """The resumable store of a two-pass call (:mod:`ntkjax._store`'s layout, one chunk: the
    whole kernel), created when absent, else checked against this call: the inputs, the
    parameters, the model's computation (its jaxpr on one example, with ``outputs`` and the
    filter) and the kernel's shape and dtype."""
    computation = hashlib.sha256(
        f"{outputs} {_store.describe_computation(jax.make_jaxpr(fn)(p, x[:1]))}".encode()
    ).hexdigest()
    prints = {
        "x1": _store.describe_array(x),
        "x2": None if x2 is None else _store.describe_array(x2),
        "model": {"computation": computation,
                  "description": f"{_TWO_PASS_STORE} outputs={outputs} "
                                 f"apply_fn={describe_object(apply_fn)}"
                                 + ("" if params_filter is None
                                    else f" {_describe_filter(params_filter)}")},
        "arguments": _store.describe_tree(p),
    }
    n1, n2 = x.shape[0], x.shape[0] if x2 is None else x2.shape[0]
    o = int(np.prod(shape.shape[1:]))  # two_pass_kernel's outputs, flattened
    kernel_shape = [n1, n2, *{"diagonal": [o], "full": [o, o]}.get(outputs, [])]
    layout = {"block": [n1, n2], "shapes": [kernel_shape], "dtypes": [str(np.dtype(dtype))],
              "names": ["kernel"], "symmetric": x2 is None}
    if _store.read_meta(path) is None:  # one process: nobody else creates it meanwhile
        _store.create(path, prints, layout, layout["shapes"], layout["dtypes"])
    store = _store.open_store(path)
    _store.check_meta(path, store.meta, prints)
    _store.check_layout(path, store.meta, layout)
    return store


def _matrix_block_fns(apply_fn, ntk_method, outputs, params_filter):
    """``(x1_block, x2_block, params) -> kernel block`` of :func:`empirical_ntk_matrix`, and
    ``(x_block, params) -> kernel block`` for its diagonal blocks (the kernel function's
    ``x2=None``: each row's per-sample work once); one pair per configuration
    (:func:`_shared`), so that later calls find their traces and compiled programs in JAX's
    caches instead of rebuilding them."""
    ntk = empirical_ntk_fn(
        apply_fn, ntk_method=ntk_method, outputs=outputs, batch="per_sample",
        params_filter=params_filter,
    )

    def block_fn(a, b, p):
        return ntk(p, a, b)

    def diagonal_fn(a, p):
        return ntk(p, a)

    return block_fn, diagonal_fn


def ntk_operator(
    apply_fn: ApplyFn,
    params: Any,
    x: jax.Array,
    *,
    ridge: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    """Matrix-free ``v -> (Theta(x, x) + ridge I) v`` for conjugate-gradient solves.

    ``(Theta v)_{a,i} = sum_{b,j} Theta(x_a, x_b)_{ij} v_{b,j} = [J (J^T v)]_{a,i}``: one
    vector-Jacobian product then one Jacobian-vector product over the batch, so memory is that
    of a forward/backward pass, whatever N. ``v`` has the shape of ``apply_fn(params, x)``.
    The forward pass is linearized once, so repeated calls (CG iterations) reuse it.

    Use e.g. ``jax.scipy.sparse.linalg.cg(ntk_operator(apply_fn, params, x), y)``.

    Args:
      apply_fn: ``(params, x) -> (N, *out)``, as in :func:`empirical_ntk_fn`.
      params: the model parameters (any pytree / linen variables dict).
      x: the inputs ``(N, *features)``.
      ridge: added multiple of the identity.

    Returns:
      The function ``v -> (Theta + ridge I) v`` on arrays of the output shape.

    >>> import jax.numpy as jnp, ntkjax
    >>> apply_fn = lambda params, x: x @ params["w"]  # linear: Theta = x x^T
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> op = ntkjax.ntk_operator(apply_fn, {"w": jnp.ones((2, 1))}, x, ridge=1.0)
    >>> print(op(jnp.array([[1.0], [0.0]])))  # (x x^T + I) e_1
    [[ 6.]
     [11.]]
    """
    out = check_model_inputs(apply_fn, params, x)
    trainable, rebuild = split_params(params)

    def f(p):
        return apply_fn(rebuild(p), x)

    _, jvp = jax.linearize(f, trainable)
    vjp = jax.linear_transpose(jvp, trainable)

    def apply(v):
        v = jnp.asarray(v)
        if v.shape != out.shape:
            raise ValueError(
                f"v must have the output shape {out.shape} of apply_fn(params, x); got {v.shape}."
            )
        (cot,) = vjp(v.astype(out.dtype))
        result = jvp(cot)
        return result + ridge * v if ridge else result

    return apply


def empirical_nngp_fn(
    apply_fn: ApplyFn,
    *,
    features: str = "outputs",
    outputs: Outputs = "trace",
    normalize: bool = False,
) -> KernelFn:
    """Returns a jitted ``nngp(params, x1, x2=None)``: the empirical output covariance.

    ``K(x, x')_{ij} = phi_i(x) phi_j(x')`` where ``phi`` is

    * ``features="outputs"``: the network output ``apply_fn(params, x)`` flattened to ``O``;
      pass any feature function as ``apply_fn`` (e.g. ``lambda p, x: model.apply(p, x,
      method=model.features)``) to get its kernel;
    * ``features="last_hidden"``: the input of the LAST Dense-type layer (``flax.linen``
      ``Dense``/``DenseGeneral``/``Conv`` or ``ntkjax.nn.Dense``) called by a linen model --
      the last hidden layer's post-activation features, flattened per example.

    ``outputs``: ``"trace"`` sums over the O features (divided by O with ``normalize=True``,
    which for a readout ``y = sigma_w / sqrt(O) W phi`` with ``W ~ N(0, 1)`` is the NNGP
    ``E[y y'] / sigma_w^2`` at initialization); ``"mean"`` averages over them (the trace
    divided by O, neural-tangents' ``trace_axes=(-1,)``: for ``features="outputs"`` it
    estimates :func:`ntkjax.kernel_fn`'s per-output NNGP); ``"full"`` ``(N1, N2, O, O)``;
    ``"diagonal"`` ``(N1, N2, O)``.

    Args:
      apply_fn: ``(params, x) -> (N, *out)``, e.g. a linen ``module.apply``.
      features: ``"outputs"`` or ``"last_hidden"`` (above).
      outputs: ``"trace"``, ``"mean"``, ``"full"`` or ``"diagonal"`` (above).
      normalize: divide the ``"trace"`` kernel by the number of features O.

    Returns:
      ``nngp(params, x1, x2=None)``, jitted; ``x2=None`` means ``x2 = x1``.

    >>> import jax.numpy as jnp, ntkjax
    >>> apply_fn = lambda params, x: x * params["scale"]  # features 2 x: K = 4 x1 x2^T
    >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    >>> print(ntkjax.empirical_nngp_fn(apply_fn)({"scale": 2.0}, x))
    [[4. 4.]
     [4. 8.]]
    """
    check_choice(features, ("outputs", "last_hidden"), "features")
    check_choice(outputs, OUTPUTS, "outputs")

    def phi(params, x):
        if features == "outputs":
            out = apply_fn(params, x)
        else:
            out = last_hidden_features(apply_fn, params, x)
        return jnp.reshape(out, (out.shape[0], -1))

    def nngp(params, x1, x2=None):
        check_model_inputs(apply_fn, params, x1, x2)
        p1 = phi(params, x1)
        p2 = p1 if x2 is None else phi(params, x2)
        if outputs in ("trace", "mean"):
            kernel = jnp.matmul(p1, p2.T, precision=PRECISION)
            if normalize or outputs == "mean":
                kernel = kernel / p1.shape[1]
        elif outputs == "diagonal":
            kernel = p1[:, None, :] * p2[None, :, :]
        else:
            kernel = p1[:, None, :, None] * p2[None, :, None, :]
        return symmetrize(kernel, inner) if x2 is None else kernel

    inner: Outputs = "trace" if outputs == "mean" else outputs
    return _checking_values(nngp)


def nnx_apply_fn(module: Any) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(apply_fn, params)`` for a ``flax.nnx`` module, usable with every function here.

    ``graphdef, params, rest = nnx.split(module, nnx.Param, ...)``; ``apply_fn(params, x)``
    merges them back (``nnx.merge``) and calls the module, so only ``nnx.Param`` variables are
    differentiated and the other state (batch statistics, RNG counters) is held fixed.

    Raises:
      ValueError: for anything but an ``nnx.Module`` (a linen module's ``apply`` and variables
        work directly), and for a module in training mode -- a Dropout that is not
        deterministic or a BatchNorm that uses batch statistics makes samples depend on their
        batch or on RNG state; call ``module.eval()`` first.

    Args:
      module: a ``flax.nnx.Module`` in evaluation mode.

    Returns:
      ``(apply_fn, params)``: ``apply_fn(params, x)`` calls the module with ``params`` (the
      module's ``nnx.Param`` state).

    >>> import jax.numpy as jnp, ntkjax
    >>> from flax import nnx
    >>> apply_fn, params = ntkjax.nnx_apply_fn(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> apply_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
    >>> ntkjax.empirical_ntk_fn(apply_fn)(params, jnp.ones((4, 3))).shape
    (4, 4)
    """
    graphdef, params, rest = _split_nnx(module)

    def apply_fn(p, x):
        from flax import nnx

        return nnx.merge(graphdef, p, rest)(x)

    return apply_fn, params


def _split_nnx(module: Any) -> tuple[Any, Any, Any]:
    """``nnx.split(module, nnx.Param, ...)`` of a module in evaluation mode (ValueError for
    anything else)."""
    from flax import nnx  # nnx is imported only by users of NNX models

    if not isinstance(module, nnx.Module):
        raise ValueError(
            f"nnx_apply_fn needs a flax.nnx Module, got {type(module).__name__}; for a "
            "flax.linen module pass module.apply and its variables to the kernel functions."
        )
    training = [
        f"{type(node).__name__} at {'/'.join(map(str, path)) or '<root>'}"
        for path, node in nnx.iter_graph(module)
        if (isinstance(node, nnx.Dropout) and not node.deterministic)
        or (isinstance(node, nnx.BatchNorm) and not node.use_running_average)
    ]
    if training:
        raise ValueError(
            f"the module is in training mode ({', '.join(training)}): its outputs depend on "
            "the batch or on RNG state, so it has no per-sample NTK; call module.eval() first."
        )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params, rest


# ---------------------------------------------------------------------------------------------
# projected eNTK features
# ---------------------------------------------------------------------------------------------


def _check_projection(dim, rank) -> None:
    for value, name in ((dim, "dim"), (rank, "rank")):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _projected_block(apply_fn, params, x, projections, dim, rank):
    """``(n, O, dim)`` projected per-sample gradients of a block of examples,
    ``sum_l R_l^T g_l`` with the leaves' drawn ``projections`` (the same for every block)."""
    factored = structured_projected_features(apply_fn, params, x, projections, dim, rank)
    if factored is not None:
        return factored
    trainable, rebuild = split_params(params)
    jac = _per_sample_jacobians(apply_fn, rebuild, trainable, x)
    features = project_leaf_gradients(jax.tree_util.tree_leaves(jac), projections, dim, rank)
    if features is None:
        raise ValueError("projected_ntk_features: the model has no floating parameter to "
                         "differentiate.")
    return features


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _draw_leaf(key, index, view, dim, rank, dtype):
    """Leaf ``index``'s projection, from ``fold_in(key, index)``; one program per view (a
    model's many leaves of a few shapes share them)."""
    return draw_projection(jax.random.fold_in(key, index), view, dim, rank, dtype)


def _draw_all(key, views, dim, rank, dtype) -> list:
    """Every leaf's projection (None for a leaf without features)."""
    return [None if view is None else _draw_leaf(key, i, view, dim, rank, dtype)
            for i, view in enumerate(views)]


def _projections(apply_fn, params, example, key, dim, rank, params_filter) -> list:
    """The leaves' projections (:func:`ntkjax.structured.projection_views` of one
    ``example``), drawn once per call -- outside the blocks' program, which would otherwise
    draw them again for every block -- and evaluated now even under an outer trace (they
    depend on ``key`` and shapes only)."""
    with jax.ensure_compile_time_eval():
        fn, p = apply_fn, params
        if params_filter is not None:
            fn, p = _select_params(fn, p, params_filter)
        views = projection_views(fn, p, example, rank)
        dtype = jnp.dtype(jax.eval_shape(fn, p, example).dtype)
        return _draw_all(key, views, dim, rank, dtype)


def projected_ntk_features(
    apply_fn: ApplyFn,
    params: Any,
    x: ArrayLike,
    *,
    dim: int,
    key: jax.Array,
    rank: int = 16,
    params_filter: ParamsFilter | None = None,
    block_size: int | None = None,
    memory_bytes: int | None = None,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Any:
    """Random features of the empirical NTK: projected per-sample gradients, ``(N, O, D)``.

    ``phi_i(x) = sum_l R_l^T g_{i,l}(x)``, ``D = dim``: every parameter leaf ``l``'s
    per-sample gradient ``g_{i,l} = df_i(x)/dtheta_l`` projected into ONE shared
    ``D``-dimensional space by its own random ``R_l`` (``P_l x D``, independent across
    leaves, ``E[R_l R_l^T] = I``), so ``E[phi_i(x) . phi_j(x')] = Theta_{ij}(x, x')``: the
    estimate is unbiased (the cross terms between leaves have mean zero), and its error falls
    like ``D^{-1/2}`` -- every leaf is estimated from all ``D`` features, with about the
    variance of a ``D``-dimensional Gaussian sketch of the whole gradient (TRAK, Park et al.
    2023, "TRAK: Attributing Model Behavior at Scale", section 3). The features of the trace
    kernel are ``phi`` flattened to ``(N, O D)``.

    ``R_l`` of a weight matrix ``G`` (``d_in x d_out``; any leaf with two or more axes:
    all but the last by the last) is ``ceil(D / rank^2)`` independent Kronecker blocks
    (LoGra, Choe et al. 2024, "What is Your Data Worth to GPT?", section 3): block ``b``
    gives the ``rank^2`` features ``vec(P_in^T G P_out)`` with ``P_in`` (``d_in x rank``),
    ``P_out`` (``d_out x rank``) standard normal, so each feature has ``E[(p^T G q)(p^T G'
    q)] = <G, G'>``; the first ``D`` of them, over ``sqrt(D)``, are kept. It stores
    ``(d_in + d_out) D / rank`` numbers where a dense Gaussian ``R`` would store ``d_in d_out
    D``. A vector (bias, norm scale) of more than ``rank^2`` entries gets Kronecker blocks of
    the vector zero-padded to about a square matrix, a shorter one a dense Gaussian sketch.
    ``rank`` trades cost for variance: a block's relative variance for a rank-one ``G`` is
    about ``4 / rank`` (``(4 rank + 2) / D`` for ``D`` features, against ``2 / D`` for a
    Gaussian sketch), but it costs ``T (d_in + O d_out) D / rank`` multiply-adds per example
    for a layer on ``T`` positions; summed over many leaves the excess shrinks by the
    leaves' shares of the kernel squared.

    Cost: for the layers the structured method factorizes (linen ``Dense``, ``DenseGeneral``,
    ``Conv``, ``ConvTranspose``, ``Embed``, ``ntkjax.nn.Dense``; see :mod:`ntkjax.structured`)
    the weight gradient ``G_i = sum_t x_t (x) delta_{i,t}`` is never formed: its features are
    ``sum_t (P_in^T x_t)(P_out^T delta_{i,t})^T``, from the layer's inputs and output
    cotangents (one forward pass and O backward passes to the activations per block of
    examples); biases and every other parameter (norm scales, custom layers, non-linen
    models) are projected from their per-sample gradients. The examples are processed in
    blocks, so time and memory are linear in N; the projections are drawn from ``key``
    (leaf ``l``'s from ``fold_in(key, l)``) once per call, and are the same for every
    block. With ``out`` the features stream to a resumable zarr store
    (:func:`ntkjax.blocking.evaluate_in_blocks`; array shape ``(N, 1, O, D)``) for N beyond
    memory. Use :func:`projected_ntk_feature_fn` to feed :func:`ntkjax.feature_ridge`.

    Args:
      apply_fn: ``(params, x) -> (N, *out)`` returning an array of logits (floating).
      params: the model parameters (any pytree / linen variables dict).
      x: ``(N, *features)``.
      dim: ``D``, the number of features per output (shared by all parameter leaves).
      key: the PRNG key of the projection.
      rank: the Kronecker blocks' rank (``P_in``, ``P_out`` have ``rank`` columns).
      params_filter: the parameters to differentiate (as in :func:`empirical_ntk_fn`).
      block_size, memory_bytes: rows per block, or the memory budget it is chosen from.
      out: path of a resumable zarr store to write the features to instead of RAM.
      show_progress: progress bar on stderr.

    Returns:
      A numpy array ``(N, O, D)``; with ``out`` a read-only ``zarr.Array`` ``(N, 1, O, D)``.

    Raises:
      ValueError: ``dim`` or ``rank`` not a positive integer, a model whose output is not
        one floating array ``(N, *out)``, and as :func:`empirical_ntk_fn` for the inputs,
        params and ``params_filter``.

    The features of ``f(x) = x w`` are ``x R`` with ``E[R R^T] = I``:

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> x = jax.random.normal(jax.random.key(0), (3, 5))
    >>> phi = ntkjax.projected_ntk_features(lambda p, x: x @ p, jnp.ones((5, 1)), x, dim=16,
    ...                                     key=jax.random.key(1))
    >>> phi.shape
    (3, 1, 16)
    """
    _check_projection(dim, rank)
    check_pair(x, None)
    x = jnp.asarray(x)
    out_shape = check_model_inputs(apply_fn, params, x[:1])
    if not jnp.issubdtype(out_shape.dtype, jnp.floating):
        raise ValueError(
            f"apply_fn must return an array of logits (floating); it returns dtype "
            f"{out_shape.dtype}, which has no gradient features."
        )
    block = _jitted_projection(apply_fn, dim, rank, params_filter)
    projections = _projections(apply_fn, params, x[:1], key, dim, rank, params_filter)
    if out is None:  # in memory, in blocks of rows, every block of the same shape
        n = x.shape[0]
        rows = block_size or _projection_rows(apply_fn, params, x, dim, memory_bytes)
        parts = []
        for start in range(0, n, rows):
            part = x[start:start + rows]
            m = part.shape[0]
            if m < rows:  # the last block, padded so that its program is the others'
                part = jnp.concatenate([part, jnp.zeros((rows - m, *part.shape[1:]),
                                                        part.dtype)])
            parts.append(np.asarray(block(params, part, projections))[:m])
        return np.concatenate(parts, axis=0)
    anchor = x[:1]  # one column, not used: the store's rows are the examples
    return evaluate_in_blocks(
        _shared(_projected_rows_fn, block),
        x,
        anchor,
        fn_args=(params, projections),  # (recorded by content: another key is another store)
        block_size=block_size,
        memory_bytes=memory_bytes,
        show_progress=show_progress,
        description="projected eNTK features",
        out=out,
        fingerprint=(
            f"projected_ntk_features (one shared space) dim={dim} rank={rank} "
            f"apply_fn={describe_object(apply_fn)} "
            f"params_filter={None if params_filter is None else _describe_filter(params_filter)}"
        ),
    )


def _projection_rows(apply_fn, params, x, dim, memory_bytes) -> int:
    """Rows per block: a block's per-sample Jacobians (and their projections) within the
    budget (half of the free memory by default), rounded down to a power of two unless one
    block holds every row."""
    budget = memory_bytes or available_memory_bytes() // 2
    out = jax.eval_shape(apply_fn, params, x[:1])
    out_dim = int(np.prod(out.shape[1:]))
    leaves = jax.tree_util.tree_leaves(split_params(params)[0])
    per_row = 3 * (_jacobian_bytes(params, 1, out_dim) + 8 * out_dim * dim * max(len(leaves), 1))
    rows = int(max(1, min(x.shape[0], budget // max(per_row, 1))))
    if rows == x.shape[0]:
        return rows
    # A power of two: the block shape (and its compiled program) stays the same from call to
    # call while the free memory drifts.
    return 1 << (rows.bit_length() - 1)


def _projected_rows_fn(block):
    """``(x_rows, anchor, params, projections) -> (n, 1, O, D)``: the store's block function
    of :func:`projected_ntk_features`, one per jitted ``block`` (:func:`_shared`), so a later
    call finds its program compiled."""

    def rows_fn(a, _b, p, projections):
        return block(p, a, projections)[:, None]

    return rows_fn


def _jitted_projection(apply_fn, dim, rank, params_filter):
    """The jitted block function, shared by calls with the same (hashable) configuration."""
    return _shared(_jitted_projected_block, apply_fn, dim, rank, params_filter)


def _jitted_projected_block(apply_fn, dim, rank, params_filter):
    return jax.jit(_projected_feature_block(apply_fn, dim, rank, params_filter))


def _projected_feature_block(apply_fn, dim, rank, params_filter):
    """``(params, x, projections) -> (n, O, D)``: :func:`_projected_block` of the (selected)
    model."""

    def block(params, x, projections):
        fn = apply_fn
        if params_filter is not None:
            fn, params = _select_params(fn, params, params_filter)
        return _projected_block(fn, params, x, projections, dim, rank)

    return block


def projected_ntk_feature_fn(
    apply_fn: ApplyFn,
    params: Any,
    *,
    dim: int,
    key: jax.Array,
    rank: int = 16,
    params_filter: ParamsFilter | None = None,
) -> Callable[[jax.Array], Any]:
    """A jitted feature map ``x -> Features`` of the projected empirical NTK, for
    :func:`ntkjax.feature_ridge` (and anything else that takes a feature map).

    ``Features.ntk`` is :func:`projected_ntk_features` flattened to ``(N, O D)``: the random
    features of the trace eNTK ``sum_i Theta_ii`` (unbiased); ``Features.nngp`` is the network
    output flattened to ``(N, O)`` (the empirical output covariance). The projections are
    drawn from ``key`` once per example shape, so every batch gets the same ones.

    Args:
      apply_fn: ``(params, x) -> (N, *out)`` returning an array of logits (floating).
      params: the model parameters (any pytree / linen variables dict), held fixed.
      dim: ``D``, the number of features per output (shared by all parameter leaves).
      key: the PRNG key of the projection.
      rank: the Kronecker blocks' rank.
      params_filter: the parameters to differentiate (as in :func:`empirical_ntk_fn`).

    Returns:
      ``features(x) -> Features`` (jitted), with ``ntk`` of shape ``(N, O D)``.

    Raises:
      ValueError: ``dim`` or ``rank`` not a positive integer.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> x = jax.random.normal(jax.random.key(0), (20, 5))
    >>> fmap = ntkjax.projected_ntk_feature_fn(lambda p, x: x @ p, jnp.ones((5, 1)), dim=16,
    ...                                        key=jax.random.key(1))
    >>> fit = ntkjax.feature_ridge(fmap, x, x[:, :1], diag_reg=1e-6)
    >>> fit.predict(x).shape
    (20, 1)
    """
    from ntkjax.features import Features

    _check_projection(dim, rank)
    block = _projected_feature_block(apply_fn, dim, rank, params_filter)
    drawn: dict = {}

    @jax.jit
    def jitted(x, projections):
        phi = block(params, x, projections)
        outputs = apply_fn(params, x)
        return Features(nngp=jnp.reshape(outputs, (x.shape[0], -1)),
                        ntk=jnp.reshape(phi, (x.shape[0], -1)))

    def features(x):
        x = jnp.asarray(x)
        example = (tuple(x.shape[1:]), str(x.dtype))
        projections = drawn.get(example)
        if projections is None:
            projections = _projections(apply_fn, params, jnp.zeros((1, *example[0]), x.dtype),
                                       key, dim, rank, params_filter)
            if all(is_concrete(leaf)  # (not with a key traced by an outer jit)
                   for leaf in jax.tree_util.tree_leaves(projections)):
                drawn[example] = projections
        return jitted(x, projections)

    return features
