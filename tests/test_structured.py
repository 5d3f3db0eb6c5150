"""The structured empirical NTK: factored and materialized layer forms, ntkjax.nn.Dense scales,
and fallbacks (shared modules, tied embeddings, subclasses, LayerNorm) against brute force."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import ntkjax
from ntkjax import nn as ntk_nn
from ntkjax import structured
from ntkjax.structured import count_structured_layers, structured_kernel
from tests.helpers import max_relative_error
from tests.models_for_ntk import brute_force_ntk, reduce_full


class ConvZoo(nn.Module):
    """Strides, dilation, circular padding and explicit padding in one model."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3), strides=2, padding="CIRCULAR")(x))
        x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=2, padding=((1, 0), (0, 1)))(x))
        x = nn.Conv(2, (1, 1), use_bias=False)(x)
        return x.reshape(x.shape[0], -1)


class Causal1D(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3,), padding="CAUSAL")(x))
        return nn.Dense(2)(x.mean(axis=1))


class SequenceNet(nn.Module):
    """Dense and DenseGeneral applied at positions (tokens), embedding of a small vocabulary."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(6, 4)(tokens)  # (N, T, 4)
        h = nn.gelu(nn.Dense(5)(h))  # positions: T
        h = nn.DenseGeneral((2, 3), axis=-1)(h)  # (N, T, 2, 3)
        return nn.DenseGeneral(2, axis=(1, 2, 3))(jnp.tanh(h))


class ScaledSequence(nn.Module):
    """ntkjax.nn.Dense at positions: its scales are probed, its bias rides with the weight."""

    @nn.compact
    def __call__(self, x):  # (N, T, K)
        h = jnp.tanh(ntk_nn.Dense(5, w_std=1.3, b_std=0.7)(x))
        h = ntk_nn.Dense(3, w_std=1.1, b_std=0.2, parameterization="standard")(h)
        return h.reshape(h.shape[0], -1)


def _case(model, x1, x2):
    params = model.init(jax.random.PRNGKey(0), x1)
    return model.apply, params, x1, x2


def _cases():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    yield "conv_zoo", _case(ConvZoo(), jax.random.normal(k1, (4, 7, 6, 2)),
                            jax.random.normal(k2, (3, 7, 6, 2)))
    yield "causal", _case(Causal1D(), jax.random.normal(k1, (4, 5, 2)),
                          jax.random.normal(k2, (3, 5, 2)))
    t1 = jax.random.randint(k1, (4, 3), 0, 6)
    t2 = jax.random.randint(k2, (3, 3), 0, 6).at[0].set(t1[1])
    yield "sequence", _case(SequenceNet(), t1, t2)
    yield "scaled_sequence", _case(ScaledSequence(), jax.random.normal(k1, (4, 3, 2)),
                                   jax.random.normal(k2, (3, 3, 2)))


CASES = dict(_cases())


@functools.cache
def _truth(name):
    return brute_force_ntk(*CASES[name])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("form", ["factored", "materialized", "auto"])
def test_layer_forms_match_brute_force(name, form):
    apply_fn, params, x1, x2 = CASES[name]
    full = _truth(name)
    assert count_structured_layers(apply_fn, params, x1) >= 2
    for outputs in ("trace", "diagonal", "full"):
        got = jax.jit(lambda p, a, b, outputs=outputs: structured_kernel(
            apply_fn, p, a, b, outputs=outputs, form=form))(params, x1, x2)
        assert max_relative_error(got, reduce_full(full, outputs)) < 1e-5, (name, form, outputs)


@pytest.mark.parametrize("same", [False, True])
def test_output_chunks_match_brute_force(monkeypatch, same):
    # conv_zoo has 12 outputs; with a 3000-byte budget its layers take chunks of 1, 2 and all
    # 12 outputs (per-sample gradients of 7 samples: 19 x 3, 13 x 4 and 4 x 2 floats an output).
    apply_fn, params, x1, x2 = CASES["conv_zoo"]
    if same:
        x2 = None
    full = brute_force_ntk(apply_fn, params, x1, x1 if same else x2)
    for budget in (1, 3000):
        monkeypatch.setattr(structured, "_GRAD_CHUNK_BYTES", budget)
        for outputs in ("trace", "diagonal"):
            got = jax.jit(lambda p, a, b, outputs=outputs: structured_kernel(
                apply_fn, p, a, b, outputs=outputs, form="materialized"))(params, x1, x2)
            assert max_relative_error(got, reduce_full(full, outputs)) < 1e-5, (budget, outputs)


_CONVS = {
    "same_strided": (dict(features=3, kernel_size=(3, 3), padding="SAME", strides=2), (2, 7, 6, 2)),
    "valid_dilated": (dict(features=3, kernel_size=(2, 3), padding="VALID",
                           kernel_dilation=(2, 1)), (2, 7, 6, 2)),
    "input_dilated": (dict(features=2, kernel_size=(3, 3), padding=((2, 1), (0, 2)),
                           input_dilation=2), (2, 5, 4, 3)),
    "int_padding": (dict(features=2, kernel_size=(3, 3), padding=1, strides=(1, 2)),
                    (2, 5, 7, 2)),
    "circular_1d": (dict(features=2, kernel_size=(3,), padding="CIRCULAR", strides=2), (2, 9, 3)),
    "reflect": (dict(features=2, kernel_size=(3, 3), padding="REFLECT"), (2, 6, 5, 2)),
    "causal_dilated": (dict(features=2, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
                       (2, 8, 3)),
    "same_3d": (dict(features=2, kernel_size=(2, 2, 2), padding="SAME"), (2, 4, 3, 5, 2)),
}


@pytest.mark.parametrize("name", list(_CONVS))
def test_conv_patches_reproduce_the_convolution(name):
    """A convolution is a dense layer on its patches: flax's own output is the truth."""
    kwargs, shape = _CONVS[name]
    conv = nn.Conv(**kwargs)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = conv.init(jax.random.PRNGKey(1), x)["params"]
    expected = conv.apply({"params": params}, x)
    patches = structured._conv_patches(conv, x)
    kernel = params["kernel"]
    got = patches @ kernel.reshape(-1, kernel.shape[-1]) + params["bias"]
    assert got.shape == expected.shape
    assert max_relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_ntkjax_dense_scales(parameterization):
    from ntkjax.models import MLP

    model = MLP(features=(16, 8, 3), w_std=1.7, b_std=0.4, parameterization=parameterization)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    params = model.init(jax.random.PRNGKey(2), x1)
    assert count_structured_layers(model.apply, params, x1) == 3  # every layer factorized
    full = brute_force_ntk(model.apply, params, x1, x2)
    got = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs="full")(
        params, x1, x2)
    assert max_relative_error(got, full) < 1e-5


class Shared(nn.Module):
    """A Dense called twice (shared weights), a LayerNorm and a tied embedding (``attend``),
    factorized; a Dense subclass, which falls back."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(5, 4)
        shared = nn.Dense(4)
        h = embed(tokens).mean(axis=1)
        h = shared(jnp.tanh(shared(h)))
        h = _MyDense(4)(nn.LayerNorm()(h))
        return embed.attend(h)


class _MyDense(nn.Dense):
    pass


def test_unsupported_uses_fall_back_to_jacobian_contraction():
    tokens1 = jax.random.randint(jax.random.PRNGKey(0), (4, 3), 0, 5)
    tokens2 = jax.random.randint(jax.random.PRNGKey(1), (2, 3), 0, 5)
    model = Shared()
    params = model.init(jax.random.PRNGKey(2), tokens1)
    assert count_structured_layers(model.apply, params, tokens1) == 3
    assert structured.structured_fallback_params(model.apply, params, tokens1) == [
        ("_MyDense_0", "bias"), ("_MyDense_0", "kernel")]
    full = brute_force_ntk(model.apply, params, tokens1, tokens2)
    got = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs="full")(
        params, tokens1, tokens2)
    assert max_relative_error(got, full) < 1e-5


def test_mixed_structured_and_fallback_layers():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            h = nn.LayerNorm()(h)
            h = _MyDense(5)(nn.relu(h))
            return nn.Dense(2)(jnp.tanh(h))

    model = Mixed()
    x1 = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    params = model.init(jax.random.PRNGKey(1), x1)
    assert count_structured_layers(model.apply, params, x1) == 3  # Dense, LayerNorm, Dense
    full = brute_force_ntk(model.apply, params, x1, x1)
    got = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs="full")(params, x1)
    assert max_relative_error(got, full) < 1e-5


def test_last_hidden_needs_a_dense_layer():
    nngp = ntkjax.empirical_nngp_fn(lambda p, x: jnp.tanh(x * p), features="last_hidden")
    with pytest.raises(ValueError, match="Dense"):
        nngp(jnp.float32(2.0), jnp.ones((3, 2)))


_CONV_TRANSPOSES = {
    "same_strided": (dict(features=3, kernel_size=(3, 3), strides=(2, 2), padding="SAME"),
                     (2, 3, 4, 2)),
    "valid_dilated": (dict(features=2, kernel_size=(2, 3), strides=(2, 1), padding="VALID",
                           kernel_dilation=(2, 1)), (2, 3, 4, 2)),
    "explicit_1d": (dict(features=2, kernel_size=(3,), strides=(3,), padding=((1, 2),)),
                    (2, 4, 3)),
}


@pytest.mark.parametrize("name", list(_CONV_TRANSPOSES))
def test_conv_transpose_patches_reproduce_flax(name):
    """A transposed convolution is a dense layer on patches of the stride-dilated input:
    flax.linen.ConvTranspose's own output is the truth."""
    kwargs, shape = _CONV_TRANSPOSES[name]
    layer = nn.ConvTranspose(**kwargs)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    expected = layer.apply({"params": params}, x)
    patches = jnp.concatenate(
        structured._conv_patch_parts(structured._conv_transpose_as_conv(layer), x), axis=-1)
    kernel = params["kernel"]
    got = patches @ kernel.reshape(-1, kernel.shape[-1]) + params["bias"]
    assert got.shape == expected.shape
    assert max_relative_error(got, expected) < 1e-5


class UpDown(nn.Module):
    """ntkjax's ConvTranspose (one flax Conv on the dilated input), a flax ConvTranspose,
    average pooling and a convolution."""

    @nn.compact
    def __call__(self, x):
        h = ntk_nn.relu(ntk_nn.ConvTranspose(3, kernel_size=3, strides=2, w_std=1.4,
                                             b_std=0.3)(x))
        h = ntk_nn.avg_pool(h, (2, 2), (2, 2))
        h = jnp.tanh(nn.ConvTranspose(2, (2, 2), strides=(2, 2), padding="VALID")(h))
        h = ntk_nn.Conv(2, kernel_size=3, strides=2, padding="CIRCULAR")(h)
        return ntk_nn.Dense(3)(ntk_nn.flatten(h))


def test_conv_transpose_networks_all_methods_agree_with_brute_force():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 4, 2))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 2))
    model = UpDown()
    params = model.init(jax.random.PRNGKey(2), x1)
    assert count_structured_layers(model.apply, params, x1) == 4  # every layer factorized
    full = brute_force_ntk(model.apply, params, x1, x2)
    for method in ("jacobian", "ntk_vp", "structured"):  # no probe per method: per_sample
        got = ntkjax.empirical_ntk_fn(model.apply, ntk_method=method, outputs="full",
                                      batch="per_sample")(params, x1, x2)
        assert max_relative_error(got, full) < 1e-5, method
