r"""Graph layers: message passing along a per-example adjacency, and its infinite-width rule.

:class:`Aggregate` is neural-tangents' ``stax.Aggregate``: node features ``x`` of shape
(N, V, C) -- or (N, H, W, C) for graphs whose nodes sit on a grid -- and one graph per example,
its *pattern*: a dense adjacency ``A`` of shape (N, V, V) (or (N, H, W, H, W)), where
``A[n, t, h]`` is the weight of the arc from tail ``t`` to head ``h``, or an edge list of shape
(N, E, 2) of ``[tail, head]`` node indices ((N, E, 2, 2), coordinates then ``[tail, head]``, on
a grid), padded with rows of -1 (graphs have different numbers of edges; each edge has weight
1 and repeated edges add up). The layer sums the messages of each node's in-neighbours,

$$ y_n[h] = \sum_t A_n[t, h] \, x_n[t] ,$$

with no weights and no normalisation (self loops only where the pattern has them). It is
linear in ``x``, so its NNGP, NTK and variances map as (Du et al. 2019, "Graph Neural Tangent
Kernel"; neural-tangents' ``Aggregate``)

$$ \Sigma'_{ij} = A_i^\top \Sigma_{ij} A_j, \qquad \Theta'_{ij} = A_i^\top \Theta_{ij} A_j $$

on the node (position) indices of each pair of graphs ``(i, j)``. The rule mixes nodes, so
:func:`ntkjax.kernel_fn` keeps the kernel between all pairs of nodes.

How the pattern travels (no ambient state): it is a call argument of the layer,
``Aggregate()(x, pattern)``. A module that contains Aggregate layers takes it in its own
``__call__`` and passes it down (as :class:`ntkjax.models.GNN` does); the finite network is
``module.apply(params, x, pattern=P)``, and the kernels are
``ntkjax.kernel_fn(module)(x1, x2, pattern=(P1, P2))`` or ``(x1, pattern=P1)``
(neural-tangents' convention): kernel_fn hands the layer an :class:`ntkjax.kernels.InputPair`,
whose rows it slices with the inputs' rows when it evaluates in blocks.

Edge lists: :func:`edge_list_to_dense` gives the dense count matrix, which is what the kernel
rule uses (the finite layer scatters the messages directly).

Random features (:func:`ntkjax.feature_map`, the pattern passed per input:
``feature_map(gnn, ...)(x, pattern=A)``): the layer is linear, so features with a node axis map
through the same sums, ``phi'[h] = sum_t A[t, h] phi[t]`` (likewise psi), and
``phi'_i[h] . phi'_j[g] = (A_i^T (phi_i . phi_j) A_j)[h, g]`` is the kernel rule applied to
the features' kernel -- exact, for dense and edge-list patterns and node grids alike.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_choice, check_mask, zero_masked
from ntkjax._kernel import InputPair, Kernel
from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declare

__all__ = ["AGGREGATE_IMPLEMENTATIONS", "Aggregate", "AggregateImplementation",
           "aggregate_kernel", "edge_list_to_dense"]

AggregateImplementation = Literal["dense", "sparse"]
AGGREGATE_IMPLEMENTATIONS: tuple[AggregateImplementation, ...] = ("dense", "sparse")


def _flat_edges(edges: jax.Array, spatial: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(tail, head)`` flat node indices (N, E) of an edge list (N, E, 2) or, on a grid,
    (N, E, len(spatial), 2); -1 where the row is padding (any index negative)."""
    nd = len(spatial)
    edges = jnp.asarray(edges)
    want = 4 if nd > 1 else 3
    if (edges.ndim != want or edges.shape[-1] != 2
            or (nd > 1 and edges.shape[-2] != nd)):
        layout = "(N, E, 2)" if nd == 1 else f"(N, E, {nd}, 2)"
        raise ValueError(f"Aggregate: an edge list for graphs of node shape {spatial} has shape "
                         f"{layout} ([tail, head], -1 = padding); got shape {edges.shape}.")
    if not jnp.issubdtype(edges.dtype, jnp.integer):
        raise ValueError(f"Aggregate: an edge list holds integer node indices; got dtype "
                         f"{edges.dtype} (for a weighted adjacency use implementation='dense').")
    if nd == 1:
        tail, head = edges[..., 0], edges[..., 1]
        valid = (tail >= 0) & (head >= 0)
    else:
        tail = jnp.ravel_multi_index(tuple(edges[..., i, 0] for i in range(nd)), spatial,
                                     mode="clip")
        head = jnp.ravel_multi_index(tuple(edges[..., i, 1] for i in range(nd)), spatial,
                                     mode="clip")
        valid = jnp.all(edges >= 0, axis=(-2, -1))
    return jnp.where(valid, tail, -1), jnp.where(valid, head, -1)


def edge_list_to_dense(edges: jax.Array, spatial_shape: int | tuple[int, ...],
                       dtype: Any = None) -> jax.Array:
    """The dense adjacency of edge lists: ``A[n, t, h]`` = number of edges ``(t, h)`` of graph
    ``n`` (rows with -1 are padding).

    Args:
      edges: int (N, E, 2) ``[tail, head]``, or (N, E, d, 2) for nodes on a d-D grid.
      spatial_shape: the number of nodes V, or the grid's shape.
      dtype: float dtype of the result (default: the default float).

    Returns:
      (N, V, V), or (N, *grid, *grid) for a grid.

    >>> import jax.numpy as jnp
    >>> edge_list_to_dense(jnp.array([[[0, 1], [1, 1], [-1, -1]]]), 2)[0].tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    """
    spatial = (spatial_shape,) if isinstance(spatial_shape, int) else tuple(spatial_shape)
    tail, head = _flat_edges(edges, spatial)
    v = math.prod(spatial)
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    valid = (tail >= 0).astype(dtype)
    index = jnp.where(tail >= 0, tail * v + head, 0)

    def one(i, w):
        return jnp.zeros((v * v,), dtype).at[i].add(w)

    dense = jax.vmap(one)(index, valid)
    return dense.reshape(tail.shape[0], *spatial, *spatial)


def _check_nodes(pattern: jax.Array, spatial: tuple[int, ...], n: int, where: str) -> None:
    want = (n, *spatial, *spatial)
    if tuple(pattern.shape) != want:
        raise ValueError(
            f"Aggregate: the adjacency for {where} has shape {tuple(pattern.shape)}, but the "
            f"inputs have {n} graphs of node shape {spatial}: it needs shape {want} "
            "(A[n, tail, head]).")


def _dense_pattern(pattern: Any, implementation: str, spatial: tuple[int, ...], n: int,
                   dtype: Any, where: str) -> jax.Array:
    """The (N, *S, *S) dense adjacency of a pattern (dense, or an edge list), checked."""
    pattern = jnp.asarray(pattern)
    if implementation == "sparse":
        if pattern.ndim < 1 or pattern.shape[0] != n:
            raise ValueError(f"Aggregate: the edge list for {where} has shape "
                             f"{tuple(pattern.shape)}, but there are {n} graphs (inputs of "
                             f"node shape {spatial}).")
        return edge_list_to_dense(pattern, spatial, dtype)
    _check_nodes(pattern, spatial, n, where)
    return pattern.astype(dtype)


def _sum_messages(x: jax.Array, dense: jax.Array) -> jax.Array:
    """``y[n, h] = sum_t A[n, t, h] x[n, t]`` for node features (N, *S, C) and a dense
    adjacency (N, *S, *S)."""
    n, spatial, c = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    v = math.prod(spatial)
    a = dense.reshape(n, v, v).astype(x.dtype)
    out = jnp.einsum("nth,ntc->nhc", a, x.reshape(n, v, c), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(x.shape)


def _aggregate_features(x: FeatureStandIn, exact: Kernel, pattern: Any,
                        implementation: AggregateImplementation):
    """Features after :class:`Aggregate`: the layer's own sums applied to ``phi`` and ``psi``
    (it is linear; module docstring) -- exact."""
    phi = x.phi
    dense = _dense_pattern(pattern, implementation, tuple(phi.shape[1:-1]), phi.shape[0],
                           phi.dtype, "the inputs")
    return _sum_messages(phi, dense), _sum_messages(x.psi, dense)


def aggregate_kernel(k: Kernel, pattern: InputPair, implementation: AggregateImplementation
                     = "dense") -> Kernel:
    """The rule of :class:`Aggregate` on a Kernel: ``Sigma'_ij = A_i^T Sigma_ij A_j`` on the
    node indices of every pair (likewise Theta), and ``var_i' = A_i^T var_i A_i``.

    Args:
      k: the kernel of node features (N1, N2, *S, *S).
      pattern: the adjacencies of x1 and x2 (:class:`ntkjax.kernels.InputPair`).
      implementation: ``"dense"`` (adjacency) or ``"sparse"`` (edge lists).

    Returns:
      The kernel after the layer.

    >>> import jax.numpy as jnp, ntkjax
    >>> from ntkjax.kernels import InputPair, input_kernel
    >>> k = input_kernel(jnp.eye(2)[None])          # one graph, two nodes
    >>> swap = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
    >>> aggregate_kernel(k, InputPair(swap, swap)).nngp[0, 0].tolist()
    [[0.5, 0.0], [0.0, 0.5]]
    """
    if not isinstance(pattern, InputPair):
        raise ValueError(
            "Aggregate on a Kernel needs the adjacency of both batches: call "
            "ntkjax.kernel_fn(module)(x1, x2, pattern=(P1, P2)) (or (x1, pattern=P1)), which "
            f"passes an InputPair; got {type(pattern).__name__}.")
    nd = k.spatial_ndim
    if nd == 0:
        raise ValueError("Aggregate needs node features (N, V, C) or (N, *grid, C); got a "
                         "kernel without node axes (inputs (N, d), or after a readout).")
    k = k.require_all_pairs("ntkjax.nn.Aggregate")
    spatial = k.spatial_shape
    v = math.prod(spatial)
    n1, n2 = k.nngp.shape[:2]
    a1 = _dense_pattern(pattern.first, implementation, spatial, n1, k.dtype, "x1")
    a2 = (a1 if pattern.second is pattern.first and n1 == n2 else
          _dense_pattern(pattern.second, implementation, spatial, n2, k.dtype, "x2"))
    a1 = a1.reshape(n1, v, v)
    a2 = a2.reshape(n2, v, v)
    hi = jax.lax.Precision.HIGHEST

    def pairwise(a: jax.Array) -> jax.Array:
        flat = a.reshape(n1, n2, v, v)
        out = jnp.einsum("ath,abts,bsg->abhg", a1, flat, a2, precision=hi)
        return out.reshape(n1, n2, *spatial, *spatial)

    def own(var: jax.Array, adj: jax.Array) -> jax.Array:
        flat = var.reshape(var.shape[0], v, v)
        out = jnp.einsum("ath,ats,asg->ahg", adj, flat, adj, precision=hi)
        return out.reshape(var.shape[0], *spatial, *spatial)

    var1 = own(k.var1, a1)
    var2 = var1 if k.same_inputs else own(k.var2, a2)
    return k.replace(nngp=pairwise(k.nngp), ntk=pairwise(k.ntk), var1=var1, var2=var2)


class Aggregate(linen.Module):
    r"""Sums each node's incoming messages along a per-example graph (neural-tangents'
    ``stax.Aggregate``): ``y[n, h] = sum_t A[n, t, h] x[n, t]`` (module docstring).

    Inputs (N, V, C) with a pattern (N, V, V) (dense, ``implementation="dense"``) or an edge
    list (N, E, 2) ``[tail, head]`` padded with -1 (``implementation="sparse"``); on a grid of
    nodes, (N, H, W, C) with (N, H, W, H, W) or (N, E, 2, 2). No parameters. On a
    :class:`~ntkjax.Kernel` the pattern is an :class:`~ntkjax.kernels.InputPair` (what
    ``ntkjax.kernel_fn(module)(x1, x2, pattern=(P1, P2))`` passes) and the layer applies
    :func:`aggregate_kernel`. Padding nodes: ``mask=`` (boolean (N, V), True = padding) on
    arrays, ``kernel_fn(...)(x1, x2, mask1=, mask2=, pattern=)`` on kernels; masked nodes send
    nothing (their entries are 0 before the sums) and keep their mask (neural-tangents' rule).
    On :func:`ntkjax.feature_map`'s stand-in the pattern is the batch's own array
    (``feature_map(module, ...)(x, pattern=P)``) and the same sums map the features (exact;
    no masks).

    Attributes:
      implementation: ``"dense"`` (adjacency matrices, any weights) or ``"sparse"`` (integer
        edge lists, weight 1 per edge).

    Raises:
      ValueError: a pattern whose node count (or batch size) disagrees with the inputs, an
        edge list of the wrong layout, a Kernel pattern that is not a pair.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> x = jnp.ones((1, 3, 2))                      # one graph, 3 nodes, 2 channels
    >>> path = jnp.array([[[0, 1], [1, 2], [-1, -1]]])  # arcs 0->1, 1->2, one padding row
    >>> Aggregate(implementation="sparse").apply({}, x, path)[0, :, 0].tolist()
    [0.0, 1.0, 1.0]
    >>> A = ntkjax.nn.graphs.edge_list_to_dense(path, 3)
    >>> ntkjax.kernel_fn(Aggregate())(x, pattern=A).nngp.shape
    (1, 1, 3, 3)
    """

    implementation: AggregateImplementation = "dense"

    @linen.compact
    def __call__(self, x: Any, pattern: Any, mask: Any = None) -> Any:
        check_choice(self.implementation, AGGREGATE_IMPLEMENTATIONS, "implementation")
        if isinstance(x, FeatureStandIn):
            if mask is not None:
                raise UnsupportedMeaning(
                    "ntkjax.nn.Aggregate", "features",
                    "random features carry no masks; for masked nodes use "
                    "ntkjax.kernel_fn(module)(x1, x2, mask1=..., mask2=..., pattern=...).")
            if isinstance(pattern, InputPair):
                raise ValueError("Aggregate on random features takes the batch's own pattern "
                                 "(feature_map(...)(x, pattern=P)), not an InputPair.")
            if x.exact.spatial_ndim == 0:
                raise ValueError("Aggregate needs node features (N, V, C) or (N, *grid, C); got "
                                 "features without node axes (after a readout).")
            _dense_pattern(pattern, self.implementation, x.exact.spatial_shape, x.phi.shape[0],
                           x.phi.dtype, "the inputs")  # checked before the exact part
            # the exact part: each input's own graph on both sides (the stand-in's kernel is
            # each input with itself; its second batch is the first input)
            pair = InputPair(pattern, jnp.asarray(pattern)[:1])
            return _AGGREGATE.on_features(
                x, lambda k: aggregate_kernel(k, pair, self.implementation), pattern,
                self.implementation)
        if isinstance(x, Kernel):
            if mask is not None:
                raise ValueError("Aggregate: on a Kernel the masks are the kernel's own "
                                 "(kernel_fn's mask1 / mask2); got a mask argument as well.")
            # masked nodes send nothing: their entries are 0 before the sums (nt's remasking)
            return aggregate_kernel(x.masked(), pattern, self.implementation)
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(f"Aggregate needs node features (N, V, C) or (N, *grid, C); got "
                             f"shape {x.shape}.")
        if mask is not None:  # masked (padding) nodes send nothing
            mask = check_mask(x, mask)
            x = zero_masked(x, mask)
        if isinstance(pattern, InputPair):
            raise ValueError("Aggregate on arrays takes the batch's own pattern (an array), "
                             "not an InputPair.")
        n, spatial, c = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        v = math.prod(spatial)
        flat = x.reshape(n, v, c)
        if self.implementation == "dense":
            pattern = jnp.asarray(pattern)
            _check_nodes(pattern, spatial, n, "the inputs")
            return _sum_messages(x, pattern)
        pattern = jnp.asarray(pattern)
        if pattern.ndim < 1 or pattern.shape[0] != n:
            raise ValueError(f"Aggregate: the edge list has shape {tuple(pattern.shape)}, but "
                             f"the inputs have shape {x.shape} ({n} graphs).")
        tail, head = _flat_edges(pattern, spatial)

        def one(xg, t, h):
            msg = xg[jnp.maximum(t, 0)] * (t >= 0)[:, None].astype(xg.dtype)
            return jax.ops.segment_sum(msg, jnp.maximum(h, 0), num_segments=v)

        return jax.vmap(one)(flat, tail, head).reshape(x.shape)


_AGGREGATE = declare(
    Aggregate, kernel=aggregate_kernel, features=_aggregate_features,
    structured="parameter-free", all_pairs=True,
)
