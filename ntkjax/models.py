"""Ready-made networks built from :mod:`ntkjax.nn`, usable as finite networks and as kernels:
:class:`MLP` (fully connected), :class:`CNN` (convolutional, with optional pooling),
:class:`Myrtle` (Shankar et al. 2020's convolutional kernels) and :class:`Transformer` (pre-norm
self-attention encoder)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from flax import linen

from ntkjax import nn
from ntkjax._checks import check_choice, check_mask
from ntkjax._meanings import declarations
from ntkjax.kernels import Kernel
from ntkjax.nn.attention import AttentionMechanism
from ntkjax.nn.conv import ConvPadding
from ntkjax.nn.dense import Parameterization
from ntkjax.nn.graphs import AggregateImplementation

__all__ = ["ACTIVATIONS", "CNN", "GNN", "LCN", "MLP", "MYRTLE_DEPTHS", "POOLINGS", "READOUTS",
           "Myrtle", "Readout", "Transformer", "resolve_activation"]

def _parameters_default(activation: nn.Activation) -> bool:
    """Whether every parameter of ``activation`` after its input has a default."""
    try:
        params = list(inspect.signature(activation.fn).parameters.values())[1:]
    except (TypeError, ValueError):  # no introspectable signature: no parameters
        return True
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


# Activations selectable by name: every declared ntkjax.nn activation with a finite network
# whose parameters have defaults (they take their defaults here) -- derived from the
# declarations, so a new activation is selectable by its declaration alone.
ACTIVATIONS: dict[str, Callable] = {
    d.layer.__name__: d.layer for d in declarations()
    if isinstance(d.layer, nn.Activation) and d.finite and _parameters_default(d.layer)
}


Readout = Literal["flatten", "global_average_pool"]

# Readouts of a convolutional network, by name.
READOUTS: dict[str, Callable] = {
    "flatten": nn.flatten,
    "global_average_pool": nn.global_average_pool,
    "global_sum_pool": nn.global_sum_pool,
}

# Pooling between convolutions, by name.
POOLINGS: dict[str, Callable] = {"avg": nn.avg_pool, "sum": nn.sum_pool}


def resolve_activation(activation: str | Callable) -> Callable:
    """An activation from a name in :data:`ACTIVATIONS` or a callable.

    A callable that is not an :mod:`ntkjax.nn` activation works on arrays but raises a
    ValueError when it meets a Kernel (wrap it in :func:`ntkjax.nn.elementwise`).

    Args:
      activation: a name in :data:`ACTIVATIONS` or a callable.

    Returns:
      The activation function.

    >>> from ntkjax import nn
    >>> resolve_activation("relu") is nn.relu
    True
    """
    if isinstance(activation, str):
        if activation == "ab_relu":
            raise ValueError(
                "ab_relu needs its slopes: pass functools.partial(ntkjax.nn.ab_relu, a=..., b=...)."
            )
        check_choice(activation, tuple(ACTIVATIONS), "activation")
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise ValueError(f"activation must be a name or a callable, got {activation!r}.")
    if nn.is_activation(activation):
        return activation

    def guarded(x):
        if isinstance(x, Kernel):
            raise ValueError(
                f"activation {activation!r} has no infinite-width kernel rule; use an ntkjax.nn "
                "activation or wrap it: ntkjax.nn.elementwise(fn)."
            )
        return activation(x)

    return guarded


class _Network(linen.Module):
    """The configuration shared by :class:`MLP` and :class:`CNN` (fields and validation)."""

    features: Sequence[int]
    activation: str | Callable = "relu"
    w_std: float = 1.0
    b_std: float | None = 0.0
    parameterization: Parameterization = "ntk"

    def _activation(self, example: str) -> Callable:
        if len(self.features) < 1:
            raise ValueError(
                f"features must list at least the number of outputs, e.g. {example}."
            )
        return resolve_activation(self.activation)


class MLP(_Network):
    """A fully connected network: ``Dense(h1) -> act -> ... -> Dense(h_L) -> act -> Dense(out)``.

    Attributes:
      features: ``(h1, ..., h_L, out)``: hidden widths then the number of outputs.
      activation: a name in :data:`ACTIVATIONS` (every :mod:`ntkjax.nn` activation whose
        parameters have defaults, at its defaults: ``"relu"``, ``"leaky_relu"`` (slope 0.01),
        ``"erf"``, ...) or an :mod:`ntkjax.nn` activation, with parameters via
        ``functools.partial``.
      w_std, b_std, parameterization: of every :class:`ntkjax.nn.Dense` layer.

    ``MLP(...).init(key, x)`` / ``.apply(variables, x)`` map (N, d) to (N, out);
    ``ntkjax.kernel_fn(MLP(...))`` gives its infinite-width NNGP and NTK (per output).

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> mlp = MLP((16, 1), "relu")
    >>> x = jnp.ones((3, 4))
    >>> mlp.apply(mlp.init(jax.random.key(0), x), x).shape
    (3, 1)
    >>> ntkjax.kernel_fn(mlp)(x).ntk.shape
    (3, 3)
    """

    @linen.compact
    def __call__(self, x):
        act = self._activation("(512, 1)")
        dense = lambda f, i: nn.Dense(
            f, w_std=self.w_std, b_std=self.b_std, parameterization=self.parameterization,
            name=f"Dense_{i}",
        )
        for i, width in enumerate(self.features[:-1]):
            x = act(dense(width, i)(x))
        return dense(self.features[-1], len(self.features) - 1)(x)


class CNN(_Network):
    """A convolutional network: ``Conv(c1) -> act [-> pool] -> ... -> Conv(c_L) -> act ->
    readout -> Dense(out)``, on inputs (N, *spatial, C) (NHWC for images; 1-D and N-D alike).

    Attributes:
      features: ``(c1, ..., c_L, out)``: the convolutions' channels, then the number of outputs.
      kernel_size, strides, padding: of every :class:`ntkjax.nn.Conv` (an int applies to every
        spatial axis; padding ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``).
      activation: as in :class:`MLP` (a name in :data:`ACTIVATIONS` or an :mod:`ntkjax.nn`
        activation).
      readout: ``"flatten"`` (:func:`ntkjax.nn.flatten`), ``"global_average_pool"`` or
        ``"global_sum_pool"``.
      pooling: None (no pooling), ``"avg"`` (:func:`ntkjax.nn.avg_pool`) or ``"sum"``
        (:func:`ntkjax.nn.sum_pool`) after the activation of every convolution but the last
        (or of those listed in ``pool_after``).
      pool_window, pool_strides, pool_padding: the pooling's window (an int for every spatial
        axis, or one per axis), strides (default: the window) and padding (``"VALID"``,
        ``"SAME"``, ``"CIRCULAR"``).
      pool_after: indices of the convolutions followed by pooling (None: all but the last).
      w_std, b_std, parameterization: of every Conv and of the Dense readout.

    ``CNN(...).init(key, x)`` / ``.apply(variables, x)`` map (N, *S, C) to (N, out);
    ``ntkjax.kernel_fn(CNN(...))`` gives its infinite-width NNGP and NTK (per output), the
    CNN-GP / CNTK of Novak et al. 2019 and Arora et al. 2019 (global average pooling: CNTK-GAP).
    Configure by keyword.

    Masks (padded inputs): ``.apply(variables, x, mask=mask)`` with a boolean (N, *S) mask,
    True at padding: convolutions and pooling read masked positions as zeros, the mask follows
    strided layers (:func:`ntkjax.nn.window_mask`), and the readout leaves masked positions out
    (``"global_average_pool"`` averages over the unmasked ones) -- the finite network of
    ``ntkjax.kernel_fn(cnn)(x1, x2, mask1=..., mask2=...)``.

    >>> import jax.numpy as jnp, ntkjax
    >>> cnn = CNN((8, 8, 1), pooling="avg", readout="flatten")
    >>> ntkjax.kernel_fn(cnn)(jnp.ones((2, 8, 8, 3))).ntk.shape
    (2, 2)
    """

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: ConvPadding = "SAME"
    readout: Readout = "flatten"
    pooling: str | None = None
    pool_window: int | Sequence[int] = 2
    pool_strides: int | Sequence[int] | None = None
    pool_padding: str = "VALID"
    pool_after: Sequence[int] | None = None

    _layer = nn.Conv  # the convolution (models.LCN: the locally connected layer)

    @linen.compact
    def __call__(self, x, mask=None):
        act = self._activation("(64, 1)")
        check_choice(self.readout, tuple(READOUTS), "readout")
        if mask is not None and isinstance(x, Kernel):
            raise ValueError("CNN: a Kernel carries its own masks (kernel_fn's mask1 / mask2); "
                             "the mask argument is for arrays.")
        if not isinstance(x, Kernel):
            mask = check_mask(x, mask, x_name="the CNN's input")
        if self.pooling is not None:
            check_choice(self.pooling, tuple(POOLINGS), "pooling")
        n_conv = len(self.features) - 1
        pool_after = (range(n_conv - 1) if self.pool_after is None else self.pool_after)
        for i, channels in enumerate(self.features[:-1]):
            conv = self._layer(
                channels, kernel_size=self.kernel_size, strides=self.strides,
                padding=self.padding, w_std=self.w_std, b_std=self.b_std,
                parameterization=self.parameterization, name=f"{self._layer.__name__}_{i}",
            )
            x = act(conv(x, mask))
            if mask is not None:
                mask = nn.window_mask(mask, self.kernel_size, self.strides, self.padding)
            if self.pooling is not None and i in pool_after:
                x, mask = _pool(x, POOLINGS[self.pooling], self.pool_window, self.pool_strides,
                                self.pool_padding, mask)
        x = READOUTS[self.readout](x, mask=mask)
        return nn.Dense(
            self.features[-1], w_std=self.w_std, b_std=self.b_std,
            parameterization=self.parameterization, name="Dense_0",
        )(x)


class LCN(CNN):
    """A locally connected network: :class:`CNN` with :class:`ntkjax.nn.ConvLocal` layers
    (unshared weights, one bias per output position) in place of the convolutions; the same
    attributes.

    Its kernel is diagonal in the positions, so with a ``"flatten"`` readout (and no pooling)
    the LCN and the CNN of the same configuration have the same NNGP and NTK, while pooling
    (``readout="global_average_pool"``) makes them differ: weight sharing matters only through
    pooling (Novak et al. 2019, section 5.1).

    Attributes:
      features: ``(c1, ..., c_L, out)``: the locally connected layers' channels, then the
        number of outputs.
      kernel_size, strides, padding: of every :class:`ntkjax.nn.ConvLocal`.
      activation: as in :class:`MLP`.
      readout: ``"flatten"``, ``"global_average_pool"`` or ``"global_sum_pool"``.
      pooling, pool_window, pool_strides, pool_padding, pool_after: as in :class:`CNN`.
      w_std, b_std, parameterization: of every ConvLocal and of the Dense readout.

    >>> import jax.numpy as jnp, ntkjax
    >>> x = jnp.arange(24.0).reshape(2, 4, 3) / 24
    >>> lcn = ntkjax.kernel_fn(LCN((8, 1), readout="flatten"))(x).ntk
    >>> cnn = ntkjax.kernel_fn(CNN((8, 1), readout="flatten"))(x).ntk
    >>> bool(jnp.allclose(lcn, cnn))
    True
    """

    _layer = nn.ConvLocal


class GNN(linen.Module):
    """A message-passing graph network: ``Dense(h1) -> act [-> Aggregate] -> ... ->
    Dense(h_L) -> act [-> Aggregate] -> readout over nodes -> Dense(out)``, on node features
    (N, V, C) with one graph per example (the ``pattern`` argument of
    :class:`ntkjax.nn.Aggregate`: dense (N, V, V) adjacency or an (N, E, 2) edge list).

    ``gnn.apply(params, x, pattern)`` is the finite network; its infinite-width kernels,
    ``ntkjax.kernel_fn(gnn)(x1, x2, pattern=(P1, P2))``, are the graph NTK and NNGP (GNTK; Du
    et al. 2019, "Graph Neural Tangent Kernel: Fusing Graph Neural Networks with Graph
    Kernels"), with sum aggregation and the readout summing (or averaging) over nodes. Random
    features take the pattern per input too: ``ntkjax.feature_map(gnn, ...)(x, pattern=A)``.
    For the empirical NTK or anything else that takes one input array, concatenate a dense
    adjacency to the node features (``jnp.concatenate([x, A], -1)``) and split it in the apply
    function.

    Attributes:
      features: ``(h1, ..., h_L, out)``: hidden widths, then the number of outputs.
      aggregate_after: indices of the hidden layers followed by an Aggregate (None: every
        hidden layer but the last, so a readout MLP layer follows the last aggregation).
      implementation: ``"dense"`` or ``"sparse"`` (of every Aggregate).
      readout: ``"global_sum_pool"`` (as the GNTK) or ``"global_average_pool"``.
      activation: as in :class:`MLP`.
      w_std, b_std, parameterization: of every Dense layer.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> x, A = jnp.ones((2, 4, 3)), jnp.tile(jnp.eye(4), (2, 1, 1))
    >>> gnn = GNN((16, 16, 1))
    >>> gnn.apply(gnn.init(jax.random.key(0), x, A), x, A).shape
    (2, 1)
    >>> ntkjax.kernel_fn(gnn)(x, pattern=A).ntk.shape
    (2, 2)
    """

    features: Sequence[int]
    aggregate_after: Sequence[int] | None = None
    implementation: AggregateImplementation = "dense"
    readout: Literal["global_sum_pool", "global_average_pool"] = "global_sum_pool"
    activation: str | Callable = "relu"
    w_std: float = 1.0
    b_std: float | None = 0.0
    parameterization: Parameterization = "ntk"

    @linen.compact
    def __call__(self, x: Any, pattern: Any) -> Any:
        if len(self.features) < 2:
            raise ValueError(f"GNN features must list at least one hidden width and the number "
                             f"of outputs, e.g. (64, 64, 1); got {tuple(self.features)}.")
        check_choice(self.readout, ("global_sum_pool", "global_average_pool"), "readout")
        act = resolve_activation(self.activation)
        hidden = len(self.features) - 1
        after = range(max(hidden - 1, 1)) if self.aggregate_after is None else (
            self.aggregate_after)
        for i, width in enumerate(self.features[:-1]):
            x = act(nn.Dense(width, w_std=self.w_std, b_std=self.b_std,
                             parameterization=self.parameterization, name=f"Dense_{i}")(x))
            if i in after:
                x = nn.Aggregate(implementation=self.implementation,
                                 name=f"Aggregate_{i}")(x, pattern)
        x = READOUTS[self.readout](x)
        return nn.Dense(self.features[-1], w_std=self.w_std, b_std=self.b_std,
                        parameterization=self.parameterization, name=f"Dense_{hidden}")(x)


def _spatial_ndim(x: Any) -> int:
    return x.spatial_ndim if isinstance(x, Kernel) else x.ndim - 2


def _pool(x: Any, pool: Callable, window: int | Sequence[int],
          strides: int | Sequence[int] | None, padding: str, mask: Any = None) -> Any:
    """``(pooled x, its position mask)``; the mask is None without one."""
    nd = _spatial_ndim(x)
    window = (window,) * nd if isinstance(window, int) else tuple(window)
    strides = window if strides is None else (
        (strides,) * nd if isinstance(strides, int) else tuple(strides))
    if mask is None:
        return pool(x, window, strides, padding), None
    return (pool(x, window, strides, padding, mask=mask),
            nn.window_mask(mask, window, strides, padding))  # type: ignore[arg-type]


# Convolutions per stage of Myrtle networks (Shankar et al. 2020, as in neural-tangents'
# Myrtle notebook): stage sizes 32 -> 16 -> 8 pixels for CIFAR-10.
MYRTLE_DEPTHS: dict[int, tuple[int, int, int]] = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


class Myrtle(linen.Module):
    """Myrtle networks (Shankar et al. 2020, "Neural Kernels Without Tangents"), as
    neural-tangents' Myrtle notebook builds them: three stages of 3x3 SAME convolutions with
    ReLU, separated by 2x2 average pooling (stride 2), then 2x2 average pooling until one pixel
    is left, flatten and a Dense readout::

        [Conv(c) -> relu] x n1 -> AvgPool 2 -> [Conv(c) -> relu] x n2 -> AvgPool 2
        -> [Conv(c) -> relu] x n3 -> AvgPool 2 (repeated to 1 x 1) -> Flatten -> Dense(out)

    with ``(n1, n2, n3)`` = (2, 1, 1), (2, 2, 2), (3, 3, 3) for depth 5, 7, 10
    (:data:`MYRTLE_DEPTHS`; depth counts the convolutions and the readout). On 32 x 32 images
    the final pooling runs three times (8 -> 1), on 16 x 16 twice.

    Attributes:
      depth: 5, 7 or 10.
      channels: the convolutions' channels (finite network; the kernel does not depend on it
        in the NTK parameterization).
      num_outputs: the readout's outputs (10 for CIFAR-10).
      activation: as in :class:`MLP` (ReLU in the paper).
      w_std, b_std, parameterization: of every Conv and of the readout (``sqrt(2)``, 0 and the
        NTK parameterization, as in the notebook).
      readout_w_std: the readout's weight standard deviation (None: ``w_std``, as the notebook
        does).
      final_pools: how many 2x2 poolings end the network; None pools until the image is one
        pixel (at most as many as the input allows).

    >>> import jax.numpy as jnp, ntkjax
    >>> ntkjax.kernel_fn(Myrtle(5))(jnp.ones((2, 16, 16, 3))).ntk.shape
    (2, 2)
    """

    depth: int = 5
    channels: int = 128
    num_outputs: int = 10
    activation: str | Callable = "relu"
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.0
    parameterization: Parameterization = "ntk"
    readout_w_std: float | None = None
    final_pools: int | None = None

    @linen.compact
    def __call__(self, x):
        check_choice(self.depth, tuple(MYRTLE_DEPTHS), "depth")
        act = resolve_activation(self.activation)
        nd = _spatial_ndim(x)
        if nd < 1:
            raise ValueError("Myrtle needs inputs of shape (batch, *spatial, channels).")
        conv_index = 0

        def conv(h):
            nonlocal conv_index
            layer = nn.Conv(self.channels, kernel_size=3, padding="SAME", w_std=self.w_std,
                            b_std=self.b_std, parameterization=self.parameterization,
                            name=f"Conv_{conv_index}")
            conv_index += 1
            return act(layer(h))

        def pool(h):
            return nn.avg_pool(h, (2,) * nd, strides=(2,) * nd)

        for stage, count in enumerate(MYRTLE_DEPTHS[self.depth]):
            for _ in range(count):
                x = conv(x)
            if stage < 2:
                x = pool(x)
        spatial = x.spatial_shape if isinstance(x, Kernel) else x.shape[1:-1]
        if self.final_pools is None:
            pools = max(min(spatial), 1).bit_length() - 1  # halvings down to one pixel
        else:
            pools = self.final_pools
        for _ in range(pools):
            x = pool(x)
        x = nn.flatten(x)
        w_std = self.w_std if self.readout_w_std is None else self.readout_w_std
        return nn.Dense(self.num_outputs, w_std=w_std, b_std=self.b_std,
                        parameterization=self.parameterization, name="Dense_0")(x)


class Transformer(linen.Module):
    """A pre-norm self-attention encoder on sequences (N, L, C), finite and infinite:

    ``x = Dense(features)(x)``, then ``depth`` blocks of
    ``x = x + SelfAttention(LayerNorm(x))`` and ``x = x + Dense(features)(act(Dense(mlp)(
    LayerNorm(x))))``, then ``LayerNorm`` (over channels), the readout over positions and
    ``Dense(out_features)``. Every layer is an :mod:`ntkjax.nn` layer in the NTK
    parameterization, so ``ntkjax.kernel_fn(Transformer(...))`` is the exact NNGP / NTK as the
    widths and heads go to infinity (Hron et al. 2020 for the attention; the residual branches
    end in dense layers, so their kernels add).

    Attributes:
      features: the model width (embedding, attention output and residual stream channels).
      out_features: number of outputs.
      depth: number of encoder blocks.
      num_heads: attention heads per block.
      key_features, value_features: per-head key / value widths (default: ``features``).
      mlp_features: hidden width of the blocks' MLPs (default: ``features``).
      activation: the MLP activation, as in :class:`MLP` (a name or an ntkjax.nn activation).
      attention_mechanism: ``"softmax"``, ``"identity"``, ``"abs"`` or ``"relu"``.
      linear_scaling: see :class:`ntkjax.nn.SelfAttention` (True: closed-form kernels for every
        mechanism).
      readout: ``"global_average_pool"`` (mean over positions) or ``"flatten"``.
      w_std, b_std: weight and bias scales of every dense layer (and of the attention's
        projections and output bias).
      epsilon: the LayerNorms' epsilon.
      causal: causal self-attention in every block (position i attends to j <= i; a decoder;
        see :class:`ntkjax.nn.SelfAttention`).
      pos_emb_type: positional embeddings of every attention layer: None (none), ``"sum"``
        or ``"concat"``, as in :class:`ntkjax.nn.SelfAttention`.
      pos_emb_p_norm: p of the distance between positions (as in SelfAttention).
      pos_emb_decay_fn: the positional covariance as a function of the distances, or None
        for the identity (as in SelfAttention).
      pos_emb_features: embedding channels for ``"concat"`` (as in SelfAttention).
      w_pos_emb_std: the embeddings' scale (as in SelfAttention).
      val_pos_emb: whether the values see the embeddings too (as in SelfAttention).

    Masks (padded sequences): ``net.apply(params, x, mask=mask)`` with a boolean (N, L) mask,
    True at padding, which every attention layer excludes as keys and values, and the readout
    excludes too (``"global_average_pool"`` averages over the unmasked positions, so a sequence
    gives the same outputs whatever length it is padded to; ``"flatten"`` counts masked
    positions as zeros). The kernel takes the masks through
    ``ntkjax.kernel_fn(net)(x1, x2, mask1=..., mask2=...)``.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> net = Transformer(16, depth=1, num_heads=2)
    >>> x = jnp.ones((3, 5, 4))
    >>> net.apply(net.init(jax.random.key(0), x), x).shape
    (3, 1)
    >>> ntkjax.kernel_fn(net)(x).ntk.shape
    (3, 3)
    """

    features: int
    out_features: int = 1
    depth: int = 2
    num_heads: int = 4
    key_features: int | None = None
    value_features: int | None = None
    mlp_features: int | None = None
    activation: str | Callable = "relu"
    attention_mechanism: AttentionMechanism = "softmax"
    linear_scaling: bool = True
    readout: str = "global_average_pool"
    w_std: float = 1.0
    b_std: float = 0.0
    epsilon: float = 1e-6
    causal: bool = False
    pos_emb_type: Literal["sum", "concat"] | None = None
    pos_emb_p_norm: float = 2.0
    pos_emb_decay_fn: Callable[[Any], Any] | None = None
    pos_emb_features: int | None = None
    w_pos_emb_std: float = 1.0
    val_pos_emb: bool = False

    @linen.compact
    def __call__(self, x, mask=None):
        act = resolve_activation(self.activation)
        check_choice(self.readout, tuple(READOUTS), "readout")
        if mask is not None and isinstance(x, Kernel):
            raise ValueError("Transformer: a Kernel carries its own masks (kernel_fn's mask1 / "
                             "mask2); the mask argument is for arrays.")
        if not isinstance(x, Kernel):
            mask = check_mask(x, mask, x_name="the Transformer's input")
        if int(self.depth) != self.depth or self.depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {self.depth!r}.")
        width = int(self.features)
        key = self.key_features or width
        value = self.value_features or width
        mlp = self.mlp_features or width
        dense = lambda f, name: nn.Dense(f, w_std=self.w_std, b_std=self.b_std, name=name)
        norm = lambda name: nn.LayerNorm(epsilon=self.epsilon, name=name)
        x = dense(width, "embed")(x)
        for i in range(int(self.depth)):
            h = norm(f"block{i}_norm_attention")(x)
            x = x + nn.SelfAttention(
                width, key_features=key, value_features=value, num_heads=self.num_heads,
                linear_scaling=self.linear_scaling, w_key_std=self.w_std,
                w_query_std=self.w_std, w_value_std=self.w_std, w_out_std=self.w_std,
                b_std=self.b_std, attention_mechanism=self.attention_mechanism,
                causal=self.causal, pos_emb_type=self.pos_emb_type,
                pos_emb_p_norm=self.pos_emb_p_norm, pos_emb_decay_fn=self.pos_emb_decay_fn,
                pos_emb_features=self.pos_emb_features, w_pos_emb_std=self.w_pos_emb_std,
                val_pos_emb=self.val_pos_emb, name=f"block{i}_attention",
            )(h, mask=mask)
            h = norm(f"block{i}_norm_mlp")(x)
            x = x + dense(width, f"block{i}_mlp_out")(act(dense(mlp, f"block{i}_mlp_in")(h)))
        x = READOUTS[self.readout](norm("final_norm")(x), mask=mask)
        return dense(self.out_features, "readout")(x)
