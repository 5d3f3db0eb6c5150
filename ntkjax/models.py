"""Ready-made networks built from :mod:`ntkjax.nn`, usable as finite networks and as kernels:
:class:`MLP` (fully connected) and :class:`CNN` (convolutional)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from flax import linen

from ntkjax import nn
from ntkjax._checks import check_choice
from ntkjax.kernels import Kernel
from ntkjax.nn.conv import ConvPadding
from ntkjax.nn.dense import Parameterization

__all__ = ["ACTIVATIONS", "CNN", "MLP", "READOUTS", "Readout", "resolve_activation"]

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


Readout = Literal["flatten", "global_average_pool"]

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
    padding: ConvPadding = "SAME"
    readout: Readout = "flatten"

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
