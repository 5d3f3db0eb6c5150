"""Builds ntkjax modules from neural-tangents' ``stax`` layer lists (the ``layers`` field of the
reference entries in ``tests/data/nt_layers``; see its README for the vocabulary).

``build(layers)`` returns a ``flax.linen`` module made of :mod:`ntkjax.nn` layers that computes
the same network; a layer name without a translation raises :class:`Unsupported`, which the
reference tests turn into an explicit skip. Adding a layer: one entry in ``TRANSLATIONS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax import nn

DATA = Path(__file__).resolve().parent / "data" / "nt_layers"


class Unsupported(Exception):
    """A layer of the list has no ntkjax translation (yet)."""


def load_reference() -> tuple[dict, dict[str, np.ndarray]]:
    """(the parsed kernels.json, the arrays of kernels.npz)."""
    meta = json.loads((DATA / "kernels.json").read_text())
    with np.load(DATA / "kernels.npz") as f:
        arrays = dict(f)
    return meta, arrays


def _affine(spec: dict) -> dict[str, Any]:
    return {
        "w_std": spec["W_std"],
        "b_std": 0.0 if spec["b_std"] is None else spec["b_std"],
        "use_bias": spec["b_std"] is not None,
        "parameterization": spec.get("parameterization", "ntk"),
    }


def _dense(spec: dict, x: Any) -> Any:
    return nn.Dense(spec["out_dim"], **_affine(spec))(x)


def _conv(spec: dict, x: Any) -> Any:
    return nn.Conv(spec["out_chan"], kernel_size=tuple(spec["filter_shape"]),
                   strides=tuple(spec["strides"] or (1,) * len(spec["filter_shape"])),
                   padding=spec["padding"], **_affine(spec))(x)


def _conv_transpose(spec: dict, x: Any) -> Any:
    return nn.ConvTranspose(spec["out_chan"], kernel_size=tuple(spec["filter_shape"]),
                            strides=tuple(spec["strides"] or (1,) * len(spec["filter_shape"])),
                            padding=spec["padding"], **_affine(spec))(x)


def _pool_args(spec: dict) -> dict[str, Any]:
    return {"window_shape": tuple(spec["window_shape"]),
            "strides": None if spec["strides"] is None else tuple(spec["strides"]),
            "padding": spec["padding"]}


def _avg_pool(spec: dict, x: Any) -> Any:
    return nn.avg_pool(x, **_pool_args(spec), count_include_pad=not spec["normalize_edges"])


def _sum_pool(spec: dict, x: Any) -> Any:
    return nn.sum_pool(x, **_pool_args(spec))


# layer name -> f(spec, x) -> y, called inside the module's compact __call__
TRANSLATIONS: dict[str, Callable[[dict, Any], Any]] = {
    "Dense": _dense,
    "Conv": _conv,
    "Relu": lambda spec, x: nn.relu(x),
    "LeakyRelu": lambda spec, x: nn.leaky_relu(x, negative_slope=spec["alpha"]),
    "ABRelu": lambda spec, x: nn.ab_relu(x, a=spec["a"], b=spec["b"]),
    "Identity": lambda spec, x: x,
    "Flatten": lambda spec, x: nn.flatten(x),
    "GlobalAvgPool": lambda spec, x: nn.global_average_pool(x),
    "GlobalSumPool": lambda spec, x: nn.global_sum_pool(x),
    "AvgPool": _avg_pool,
    "SumPool": _sum_pool,
    "ConvTranspose": _conv_transpose,
}


TRANSLATIONS.update(
    Gelu=lambda spec, x: nn.gelu(x, approximate=spec["approximate"]),
    Erf=lambda spec, x: nn.erf(x, a=spec["a"], b=spec["b"], c=spec["c"]),
    Sin=lambda spec, x: nn.sin(x, a=spec["a"], b=spec["b"], c=spec["c"]),
    Cos=lambda spec, x: nn.cos(x, a=spec["a"], b=spec["b"], c=spec["c"]),
    Exp=lambda spec, x: nn.exp(x, a=spec["a"], b=spec["b"]),
    Gaussian=lambda spec, x: nn.gaussian(x, a=spec["a"], b=spec["b"]),
    ExpNormalized=lambda spec, x: nn.exp_normalized(x, gamma=spec["gamma"],
                                                    shift=spec["shift"]),
    Monomial=lambda spec, x: nn.monomial(x, degree=spec["degree"]),
    RectifiedMonomial=lambda spec, x: nn.rectified_monomial(x, degree=spec["degree"]),
    Polynomial=lambda spec, x: nn.polynomial(x, coef=tuple(spec["coef"])),
    Hermite=lambda spec, x: nn.hermite(x, degree=spec["degree"]),
    Sigmoid_like=lambda spec, x: nn.sigmoid_like(x),
    Gabor=lambda spec, x: nn.gabor(x),
    Abs=lambda spec, x: nn.abs(x),
)


# names an nt_layers2 function "formula" may use (its README: Python/NumPy syntax)
_FORMULA_NAMES = {name: getattr(jnp, name) for name in (
    "exp", "log1p", "sqrt", "arcsin", "tanh", "sin", "cos", "sinh", "cosh", "pi")}
_FORMULA_NAMES["erf"] = jax.scipy.special.erf


def formula_function(spec: dict | None) -> Callable[..., Any] | None:
    """The function of an nt_layers2 ``{"function", "args", "formula"}`` encoding (None stays
    None): ``lambda args: formula``."""
    if spec is None:
        return None
    args = ", ".join(spec["args"])
    return eval(f"lambda {args}: {spec['formula']}", dict(_FORMULA_NAMES))


def _positions(spec: dict) -> dict[str, Any]:
    if spec["pos_emb_type"] == "NONE":
        return {}
    return {"pos_emb_type": spec["pos_emb_type"].lower(), "pos_emb_p_norm": spec["pos_emb_p_norm"],
            "pos_emb_decay_fn": formula_function(spec["pos_emb_decay_fn"]),
            "pos_emb_features": spec["n_chan_pos_emb"], "w_pos_emb_std": spec["W_pos_emb_std"],
            "val_pos_emb": spec["val_pos_emb"]}


def _attention(spec: dict, x: Any) -> Any:
    return nn.SelfAttention(
        spec["n_chan_out"], key_features=spec["n_chan_key"], value_features=spec["n_chan_val"],
        num_heads=spec["n_heads"], linear_scaling=spec["linear_scaling"],
        w_key_std=spec["W_key_std"], w_value_std=spec["W_value_std"],
        w_query_std=spec["W_query_std"], w_out_std=spec["W_out_std"],
        b_std=0.0 if spec["b_std"] is None else spec["b_std"], use_bias=spec["b_std"] is not None,
        attention_mechanism=spec["attention_mechanism"].lower(), **_positions(spec),
    )(x)


TRANSLATIONS.update(
    LayerNorm=lambda spec, x: nn.LayerNorm(axis=spec["axis"], epsilon=spec["eps"])(x),
    # nt's rate is the keep probability; ntkjax's (flax's) the drop probability
    Dropout=lambda spec, x: nn.Dropout(1 - spec["rate"], deterministic=spec["mode"] == "test")(x),
    GlobalSelfAttention=_attention,
)


def _branches(n: int, x: Any) -> list:
    return [x] * n


class NTNet(linen.Module):
    """The network of an nt layer list (JSON text, so the module is hashable)."""

    layers_json: str

    @linen.compact
    def __call__(self, x: Any) -> Any:
        return _apply(json.loads(self.layers_json), x)


def _apply(layers: list[dict], x: Any) -> Any:
    for spec in layers:
        name = spec["layer"]
        if name == "serial":
            x = _apply(spec["layers"], x)
        elif name == "FanOut":
            x = _branches(spec["num"], x)
        elif name == "parallel":
            x = [_apply([branch], xi) for branch, xi in zip(spec["layers"], x, strict=True)]
        elif name == "FanInSum":
            total = x[0]
            for xi in x[1:]:
                total = total + xi
            x = total
        elif name == "FanInConcat":
            x = nn.concatenate(x, axis=spec["axis"])
        elif name == "FanInProd":
            x = nn.multiply(*x)
        elif name in TRANSLATIONS:
            x = TRANSLATIONS[name](spec, x)
        else:
            raise Unsupported(name)
    return x


def layer_names(layers: list[dict]) -> set[str]:
    """Every layer name in a (nested) layer list."""
    names = set()
    for spec in layers:
        names.add(spec["layer"])
        if "layers" in spec:
            names |= layer_names(spec["layers"])
    return names


def build(layers: list[dict]) -> NTNet:
    """The ntkjax module of an nt layer list; raises :class:`Unsupported` naming what is missing
    (checked here, before any kernel is computed)."""
    structural = {"serial", "FanOut", "parallel", "FanInSum", "FanInConcat", "FanInProd"}
    missing = sorted(layer_names(layers) - structural - set(TRANSLATIONS))
    if missing:
        raise Unsupported(", ".join(missing))
    return NTNet(json.dumps(layers))
