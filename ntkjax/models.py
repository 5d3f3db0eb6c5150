"""Ready-made networks built from :mod:`ntkjax.nn`, usable as finite networks and as kernels:
:class:`MLP` (fully connected), :class:`CNN` (convolutional) and :class:`Transformer`
(pre-norm self-attention encoder)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import linen

from ntkjax import nn
from ntkjax._checks import check_choice
from ntkjax.kernels import Kernel
from ntkjax.nn.attention import AttentionMechanism

__all__ = ["ACTIVATIONS", "CNN", "MLP", "READOUTS", "Transformer", "resolve_activation"]

# Activations selectable by name (those needing a parameter take their default here).
ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "abs": nn.abs,
    "erf": nn.erf,
    "gelu": nn.gelu,
    "sin": nn.sin,
    "cos": nn.cos,
    "rbf": nn.rbf,
    "sign": nn.sign,
    "identity": nn.identity,
}


# Readouts of a convolutional network, by name.
READOUTS: dict[str, Callable] = {
    "flatten": nn.flatten,
    "global_average_pool": nn.global_average_pool,
}


def resolve_activation(activation: str | Callable) -> Callable:
    """An activation from a name in :data:`ACTIVATIONS` or a callable.

    A callable that is not an :mod:`ntkjax.nn` activation works on arrays but raises a
    ValueError when it meets a Kernel (wrap it in :func:`ntkjax.nn.elementwise`).
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
    b_std: float = 0.0
    parameterization: str = "ntk"

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
      activation: a name (``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"abs"``, ``"erf"``,
        ``"gelu"``, ``"sin"``, ``"cos"``, ``"rbf"`` (gamma 1), ``"sign"``, ``"identity"``) or an
        :mod:`ntkjax.nn` activation, with parameters via ``functools.partial``.
      w_std, b_std, parameterization: of every :class:`ntkjax.nn.Dense` layer.

    ``MLP(...).init(key, x)`` / ``.apply(variables, x)`` map (N, d) to (N, out);
    ``ntkjax.kernel_fn(MLP(...))`` gives its infinite-width NNGP and NTK (per output).
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
    """A convolutional network: ``Conv(c1) -> act -> ... -> Conv(c_L) -> act -> readout ->
    Dense(out)``, on inputs (N, *spatial, C) (NHWC for images; 1-D and N-D alike).

    Attributes:
      features: ``(c1, ..., c_L, out)``: the convolutions' channels, then the number of outputs.
      kernel_size, strides, padding: of every :class:`ntkjax.nn.Conv` (an int applies to every
        spatial axis; padding ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``).
      activation: as in :class:`MLP` (a name in :data:`ACTIVATIONS` or an :mod:`ntkjax.nn`
        activation).
      readout: ``"flatten"`` (:func:`ntkjax.nn.flatten`) or ``"global_average_pool"``
        (:func:`ntkjax.nn.global_average_pool`).
      w_std, b_std, parameterization: of every Conv and of the Dense readout.

    ``CNN(...).init(key, x)`` / ``.apply(variables, x)`` map (N, *S, C) to (N, out);
    ``ntkjax.kernel_fn(CNN(...))`` gives its infinite-width NNGP and NTK (per output), the
    CNN-GP / CNTK of Novak et al. 2019 and Arora et al. 2019 (global average pooling: CNTK-GAP).
    Configure by keyword.
    """

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str = "SAME"
    readout: str = "flatten"

    @linen.compact
    def __call__(self, x):
        act = self._activation("(64, 1)")
        check_choice(self.readout, tuple(READOUTS), "readout")
        for i, channels in enumerate(self.features[:-1]):
            conv = nn.Conv(
                channels, kernel_size=self.kernel_size, strides=self.strides,
                padding=self.padding, w_std=self.w_std, b_std=self.b_std,
                parameterization=self.parameterization, name=f"Conv_{i}",
            )
            x = act(conv(x))
        x = READOUTS[self.readout](x)
        return nn.Dense(
            self.features[-1], w_std=self.w_std, b_std=self.b_std,
            parameterization=self.parameterization, name="Dense_0",
        )(x)


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

    >>> import jax, ntkjax
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

    @linen.compact
    def __call__(self, x):
        act = resolve_activation(self.activation)
        check_choice(self.readout, tuple(READOUTS), "readout")
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
                name=f"block{i}_attention",
            )(h)
            h = norm(f"block{i}_norm_mlp")(x)
            x = x + dense(width, f"block{i}_mlp_out")(act(dense(mlp, f"block{i}_mlp_in")(h)))
        x = READOUTS[self.readout](norm("final_norm")(x))
        return dense(self.out_features, "readout")(x)
