"""Declarations of the flax.linen layers ntkjax knows: finite networks only.

A ``flax.linen`` built-in layer has its finite meaning (flax's code) but no infinite-width or
random-feature rule: on a :class:`~ntkjax.Kernel` or feature_map's stand-in it raises, naming
the ntkjax layer to use instead. Some have a structured-NTK form -- :mod:`ntkjax.structured`
contracts their Jacobians layer by layer, recognizing them by these declarations (``"dense"``,
``"conv"``, ``"conv_transpose"``, ``"embed"``).
"""

from __future__ import annotations

from flax import linen

from ntkjax._meanings import Declaration, declare

__all__ = ["FLAX_LAYERS"]


def _flax(layer: type, structured: str, instead: str) -> Declaration:
    use = f"use {instead} instead (flax's layer has only its finite meaning)."
    return declare(layer, name=f"flax.linen.{layer.__name__}", structured=structured,
                   instead={"kernel": use, "features": use})


#: The declared flax layers.
FLAX_LAYERS: tuple[Declaration, ...] = (
    _flax(linen.Dense, "dense", "ntkjax.nn.Dense"),
    _flax(linen.DenseGeneral, "dense", "ntkjax.nn.Dense"),
    _flax(linen.Conv, "conv", "ntkjax.nn.Conv"),
    _flax(linen.ConvTranspose, "conv_transpose", "ntkjax.nn.ConvTranspose"),
    _flax(linen.Embed, "embed", "an ntkjax.nn.Dense on one-hot inputs"),
    _flax(linen.LayerNorm, "norm", "ntkjax.nn.LayerNorm"),
    _flax(linen.RMSNorm, "norm", "ntkjax.nn.LayerNorm"),
    _flax(linen.BatchNorm, "norm", "ntkjax.nn.LayerNorm"),
)
