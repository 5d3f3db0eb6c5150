"""The layer protocol (ntkjax._meanings): one declaration per layer, every registry derived from
the declarations, the one error for a meaning without a rule, and the docs' layer x meaning
table generated from the declarations.

Truths from outside the code under test: the public layers ``ntkjax.nn`` exports, the
registries as they were hand-written before the protocol (every entry kept), the activations'
signatures, and the layers' behaviour on arrays, Kernels and feature_map.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import linen

import ntkjax
from ntkjax import features, models, nn, structured
from ntkjax._meanings import declarations, jax_equivalents, meaning_rows, meaning_table

ROOT = Path(__file__).resolve().parents[1]

# Public names of ntkjax.nn that are not layers (the protocol's own names, helpers).
NOT_LAYERS = {"Activation", "FeatureStandIn", "UnsupportedMeaning", "declaration_of", "declare",
              "elementwise", "elementwise_nngp", "is_activation",
              "window_mask"}  # a helper for masks, not a layer


def _public_layers() -> dict[str, object]:
    return {name: getattr(nn, name) for name in nn.__all__ if name not in NOT_LAYERS}


def test_every_public_layer_is_declared_under_its_public_name():
    layers = _public_layers()
    assert len(layers) >= 30
    for name, layer in layers.items():
        decl = nn.declaration_of(layer)
        assert decl is not None, name
        assert decl.name == f"ntkjax.nn.{name}" and decl.layer is layer
        assert decl.supports("kernel"), name  # every ntkjax.nn layer has its kernel rule
    declared = {d.name for d in declarations() if d.name.startswith("ntkjax.nn.")}
    assert declared == {f"ntkjax.nn.{name}" for name in layers}


def test_unsupported_meaning_names_layer_meaning_and_what_instead():
    err = nn.UnsupportedMeaning("ntkjax.nn.Dropout", "features", "use deterministic=True.")
    assert isinstance(err, ValueError) and ntkjax.UnsupportedMeaning is nn.UnsupportedMeaning
    assert (err.layer, err.meaning, err.instead) == ("ntkjax.nn.Dropout", "features",
                                                     "use deterministic=True.")
    text = str(err)
    assert "ntkjax.nn.Dropout" in text and "'features'" in text and "deterministic" in text
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == text and again.meaning == "features"
    # a meaning the declaration lacks raises it, with the declared alternative
    with pytest.raises(nn.UnsupportedMeaning, match=r"no finite network .* defined only on"):
        nn.exp_normalized(jnp.ones(3))


def _old_activation_names() -> set[str]:
    # the ten names models.ACTIVATIONS listed by hand before the protocol
    return {"relu", "leaky_relu", "abs", "erf", "gelu", "sin", "cos", "rbf", "sign", "identity"}


def test_registries_equal_what_the_declarations_give():
    # models.ACTIVATIONS: every exported activation with a finite network whose parameters
    # all have defaults (read off its signature), each by its name
    expected = {}
    for name, layer in _public_layers().items():
        if not isinstance(layer, nn.Activation):
            continue
        try:
            params = list(inspect.signature(layer.fn).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        defaults = all(p.default is not p.empty for p in params)
        if defaults and nn.declaration_of(layer).supports("finite"):
            expected[name] = layer
    assert models.ACTIVATIONS == expected
    assert _old_activation_names() <= set(models.ACTIVATIONS)
    assert "ab_relu" not in models.ACTIVATIONS and "exp_normalized" not in models.ACTIVATIONS
    assert len(models.ACTIVATIONS) == 18
    # (tests/test_models.py builds a kernel of an MLP by each of these names)

    # features.FEATURE_RULES: the declared feature rules, by layer name
    assert features.FEATURE_RULES == {d.name: d.features for d in declarations()
                                      if d.features is not None}
    assert {"ntkjax.nn.Dense", "ntkjax.nn.Conv", "ntkjax.nn.relu", "ntkjax.nn.flatten",
            "ntkjax.nn.avg_pool", "ntkjax.nn.concatenate"} <= set(features.FEATURE_RULES)

    # kernels' hints for JAX functions met by a Kernel: every entry of the old hand-written
    # table, now from the activations' declarations
    old = {
        "relu": "ntkjax.nn.relu", "erf": "ntkjax.nn.erf", "sin": "ntkjax.nn.sin",
        "cos": "ntkjax.nn.cos", "exp": "ntkjax.nn.exp", "abs": "ntkjax.nn.abs",
        "absolute": "ntkjax.nn.abs", "sign": "ntkjax.nn.sign",
        "leaky_relu": "ntkjax.nn.leaky_relu",
        "maximum": "ntkjax.nn.relu (if this is max(x, 0))",
        "gelu": "ntkjax.nn.gelu (approximate=True matches jax.nn.gelu's default tanh form)",
        "sigmoid": "ntkjax.nn.sigmoid_like (0.5 erf(x / 2.402) + 0.5, a closed-form stand-in "
                   "for the logistic sigmoid)",
    }
    assert dict(jax_equivalents()) == old
    assert dict(jax_equivalents()) == {
        api: d.name + (f" {note}" if note else "")
        for d in declarations() for api, note in d.replaces.items()}

    # structured's recognizer: the hand-written one's classes and kinds
    recognized = {linen.Dense: ("dense", False), linen.DenseGeneral: ("dense", False),
                  linen.Conv: ("conv", False), linen.ConvTranspose: ("conv_transpose", False),
                  linen.Embed: ("embed", False), nn.Dense: ("dense", True),
                  linen.LayerNorm: ("norm", False), linen.RMSNorm: ("norm", False),
                  linen.BatchNorm: ("norm", False)}
    assert structured._structured_kinds() == recognized
    for cls, (kind, probe) in recognized.items():
        args = (3, 2) if cls is linen.Embed else ((2, (3,)) if "Conv" in cls.__name__ else (2,))
        assert structured._layer_kind(cls(*args)) == (kind, probe)
    assert structured._layer_kind(linen.Conv(2, (3,), feature_group_count=2)) == (None, False)
    assert structured._layer_kind(nn.Conv(2)) == (None, False)  # its flax Conv is recognized


def test_declared_feature_rules_are_what_feature_map_does():
    """Every activation with a finite network declares a feature rule (arc-cosine or Hermite);
    a declaration without one makes feature_map raise UnsupportedMeaning naming the layer."""
    for name, layer in _public_layers().items():
        if isinstance(layer, nn.Activation):
            decl = nn.declaration_of(layer)
            assert decl.supports("features") == decl.supports("finite"), name
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    for layer in (functools.partial(nn.ab_relu, a=-0.2, b=1.0), nn.sign, nn.exp_normalized):

        class Net(linen.Module):
            @linen.compact
            def __call__(self, h, layer=layer):
                return nn.Dense(1)(layer(nn.Dense(4)(h)))

        fmap = features.feature_map(Net(), key=jax.random.key(0), num_features=4,
                                    hermite_degree=2, max_truncation_error=1.0)
        if layer is nn.exp_normalized:
            with pytest.raises(nn.UnsupportedMeaning, match=r"ntkjax.nn.exp_normalized has no "
                                                            r"random-feature rule"):
                fmap(x)
        else:
            assert fmap(x).ntk.shape == (2, 4)


@pytest.mark.slow
def test_a_new_activation_gets_every_meaning_from_its_one_declaration(x64):
    """docs/development.md's worked example, a scaled ReLU ``c max(x, 0)`` declared once: its
    finite network, its kernel (c^2 times the ReLU network's, by homogeneity), its random
    features (closed-form arc-cosine features: exactly c times the ReLU network's with the same
    key) and its structured NTK (the Jacobian contraction) all follow."""
    relu, activation_maps = nn.relu, nn.activations.ActivationMaps
    scaled_relu = nn.Activation(
        lambda x, c=2.0: c * jnp.maximum(x, 0),
        lambda q12, q11, q22, c=2.0: activation_maps(
            *(c * c * m for m in relu.kernel_maps(q12, q11, q22))),
        lambda q, c=2.0: c * c * q / 2,
        name="scaled_relu", relu_family=lambda c=2.0: (0.0, c),
        doc="``c max(x, 0)``; kernel c^2 times the arc-cosine kernel (Cho & Saul 2009).",
    )
    decl = nn.declaration_of(scaled_relu)
    assert all(decl.supports(m) for m in ("finite", "kernel", "features", "structured"))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    new, old = (models.MLP((6, 1), act, w_std=1.3) for act in (scaled_relu, relu))
    params = old.init(jax.random.key(0), x)
    assert jnp.allclose(new.apply(params, x), 2.0 * old.apply(params, x))
    k_new, k_old = ntkjax.kernel_fn(new)(x), ntkjax.kernel_fn(old)(x)
    assert jnp.allclose(k_new.nngp, 4 * k_old.nngp, rtol=1e-12)
    assert jnp.allclose(k_new.ntk, 4 * k_old.ntk, rtol=1e-12)
    f_new, f_old = (features.feature_map(m, key=jax.random.key(2), num_features=64)(x)
                    for m in (new, old))
    assert jnp.allclose(f_new.ntk, 2 * f_old.ntk, rtol=1e-10, atol=1e-12)
    assert jnp.allclose(f_new.nngp, 2 * f_old.nngp, rtol=1e-10, atol=1e-12)
    e_new = ntkjax.empirical_ntk_fn(new.apply, ntk_method="structured")(params, x)
    e_old = ntkjax.empirical_ntk_fn(old.apply, ntk_method="structured")(params, x)
    assert jnp.allclose(e_new, 4 * e_old, rtol=1e-10)


def test_the_docs_table_is_the_generated_one():
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- meaning-table -->\n(.*?)\n<!-- /meaning-table -->", text, re.S)
    assert found, "docs/development.md lacks the generated layer x meaning table"
    assert found.group(1) == meaning_table(), (
        "regenerate the table: python -c 'import ntkjax; "
        "from ntkjax._meanings import meaning_table; print(meaning_table())'")
    rows = {row[0]: row for row in meaning_rows()}
    assert rows["ntkjax.nn.SelfAttention"][3] == "UnsupportedMeaning"
    assert rows["ntkjax.nn.avg_pool"][3] == "supported"
    assert rows["flax.linen.Dense"][2] == "UnsupportedMeaning"
