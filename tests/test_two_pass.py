"""The two-pass schedule of the exact empirical NTK (issue 25): every example's layer factors
once (in memory or spilled to disk), then layer by layer Gram terms. Checked against the float64
per-sample Jacobian method, and spilled against in memory bit for bit."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import empirical, structured
from tests.helpers import max_relative_error
from tests.models_for_ntk import make_case


class _TinyGPT(nn.Module):
    """GPT-2-shaped: token and learned position embeddings (the positions' table looked up
    once for all examples: served per example), pre-LN blocks (causal multi-head attention,
    GELU MLP), final LayerNorm, a head on the last token."""

    vocab: int = 3
    width: int = 16
    blocks: int = 2

    @nn.compact
    def __call__(self, tokens):
        table = nn.Embed(8, self.width)(jnp.arange(tokens.shape[1]))
        h, mask = nn.Embed(self.vocab, self.width)(tokens) + table, nn.make_causal_mask(tokens)
        for _ in range(self.blocks):
            h = h + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(h), mask=mask)
            h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        return nn.Dense(3)(nn.LayerNorm()(h)[:, -1])


class _Gain(nn.Module):
    """A LayerNorm, a Dense and a parameter no layer rule covers (per-sample Jacobians)."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(nn.Dense(5)(x))
        return nn.Dense(2)(jnp.tanh(h * self.param("gain", nn.initializers.normal(1.0), (5,))))


def _gpt(n=4, t=8):
    model = _TinyGPT()
    tokens = jax.random.randint(jax.random.key(0), (n, t), 0, model.vocab)
    variables = model.init(jax.random.key(1), tokens[:1])
    return model.apply, jax.tree.map(lambda a: a.astype(jnp.float64), variables), tokens


def _jacobian_kernel(apply_fn, params, x, outputs):
    return np.asarray(ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian",
                                              outputs=outputs)(params, x))


def test_gpt_two_pass_equals_the_jacobian_kernel_and_spilling_changes_no_bit(tmp_path, x64):
    """With a budget of 32 KiB pass 2 runs in example blocks; the token table in the gradient
    form (its one-hot rows), the other layers factored."""
    apply_fn, params, tokens = _gpt()
    want = _jacobian_kernel(apply_fn, params, tokens, "trace")
    in_memory = structured.two_pass_kernel(apply_fn, params, tokens, memory_bytes=2**15,
                                           spill=False)
    spilled = structured.two_pass_kernel(apply_fn, params, tokens, memory_bytes=2**15,
                                         spill=True, spill_dir=str(tmp_path))
    assert max_relative_error(in_memory, want) < 1e-10
    np.testing.assert_array_equal(spilled, in_memory)
    assert os.listdir(tmp_path) == []  # the factor files are gone


def _not_first_layer(path, leaf):
    return path[0] != "Dense_0"


@pytest.mark.parametrize("case,outputs,params_filter,memory_bytes", [
    ("mlp", "full", None, None), ("mlp", "pseudo", _not_first_layer, None),
    ("cnn", "mean", None, None)])
def test_two_pass_outputs_equal_the_jacobian_kernel(case, outputs, params_filter, memory_bytes,
                                                    x64):
    _check_against_jacobians(case, outputs, params_filter, memory_bytes)


def test_convolution_patch_columns_in_chunks_the_last_zero_padded(x64):
    """A budget of 8 KiB: the 18 patch columns of the first convolution in chunks of 16."""
    _check_against_jacobians("cnn", "diagonal", None, 2**13)


def _check_against_jacobians(case, outputs, params_filter, memory_bytes):
    apply_fn, params, x, _ = make_case(case, jnp.float64, n1=5)
    want = np.asarray(ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian", outputs=outputs,
                                              params_filter=params_filter)(params, x))
    got = ntkjax.empirical_ntk_matrix(apply_fn, params, x, outputs=outputs, schedule="two_pass",
                                      params_filter=params_filter, memory_bytes=memory_bytes)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert max_relative_error(got, want) < 1e-10


def test_norms_and_fallback_parameters_in_example_and_column_blocks(x64):
    """A budget of a few hundred bytes makes pass 1 one example per block and pass 2 two
    example blocks (the off-diagonal pair mirrored) and column chunks (the last zero-padded);
    still the Jacobian kernel."""
    model = _Gain()
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x))
    timings: dict = {}
    got = structured.two_pass_kernel(model.apply, params, x, outputs="full",
                                     memory_bytes=2**11 + 2**10, timings=timings)
    assert timings["pass1_block"] == 1 and timings["spilled"]
    assert max_relative_error(got, _jacobian_kernel(model.apply, params, x, "full")) < 1e-10


def test_auto_takes_two_pass_only_when_the_factors_do_not_fit(monkeypatch, x64):
    apply_fn, params, x, _ = make_case("mlp", jnp.float64, n1=6)
    calls = []
    real = empirical.two_pass_kernel
    monkeypatch.setattr(empirical, "two_pass_kernel",
                        lambda *a, **k: calls.append(k["memory_bytes"]) or real(*a, **k))
    per_example = structured.two_pass_bytes_per_example(apply_fn, params, x)
    roomy = ntkjax.empirical_ntk_matrix(apply_fn, params, x, memory_bytes=3 * 6 * per_example)
    assert calls == []
    tight = ntkjax.empirical_ntk_matrix(apply_fn, params, x, memory_bytes=3 * 6 * per_example - 1)
    assert calls == [3 * 6 * per_example - 1]
    np.testing.assert_allclose(tight, roomy, rtol=1e-12)
    ntkjax.empirical_ntk_matrix(apply_fn, params, x, memory_bytes=1, block_size=8)
    assert len(calls) == 1  # block_size given: example blocks


def test_spill_files_are_removed_after_an_error(tmp_path, monkeypatch, x64):
    apply_fn, params, x, _ = make_case("mlp", jnp.float64)
    seen = []

    def failing(store, *args):
        seen.extend(os.listdir(store.tmp))
        raise RuntimeError("pass 2 failed")

    monkeypatch.setattr(structured, "_pass_two", failing)
    with pytest.raises(RuntimeError, match="pass 2 failed"):
        ntkjax.empirical_ntk_matrix(apply_fn, params, x, schedule="two_pass", spill_dir=tmp_path)
    assert seen and all(name.endswith(".bin") for name in seen)
    assert os.listdir(tmp_path) == []


def test_two_pass_bad_options_are_named(tmp_path):
    apply_fn, params, x, x2 = make_case("mlp")
    matrix = ntkjax.empirical_ntk_matrix
    with pytest.raises(ValueError, match="schedule"):
        matrix(apply_fn, params, x, schedule="twopass")  # type: ignore[arg-type]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x2": x2}, "x2"), ({"block_size": 2}, "block_size"),
        ({"out": str(tmp_path / "k")}, "out"),
        ({"ntk_method": "jacobian"}, "ntk_method='jacobian'")]
    for kwargs, named in cases:
        with pytest.raises(ValueError, match=named):
            matrix(apply_fn, params, x, schedule="two_pass", **kwargs)
    with pytest.raises(ValueError, match="not an existing directory"):
        matrix(apply_fn, params, x, schedule="two_pass", spill_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="only the two-pass schedule spills"):
        matrix(apply_fn, params, x, schedule="blocks", spill_dir=tmp_path)
    with pytest.raises(ValueError, match="schedule='two_pass'"):  # auto chose blocks
        matrix(apply_fn, params, x, spill_dir=tmp_path)
    with pytest.raises(ValueError, match="no layer that the structured method factorizes"):
        matrix(lambda p, x: jnp.tanh(x @ p["w"]), {"w": jnp.ones((6, 2))}, x,
               schedule="two_pass")
    with pytest.raises(ValueError, match="logit"):
        matrix(apply_fn, params, x, outputs="logit", schedule="two_pass")


def test_prefetching_reads_change_no_bit(tmp_path, monkeypatch, x64):
    """Pass 2 with its reader thread (and one chunk queued ahead) against reading and adding
    in order, on spilled factors in example blocks and column chunks: the same bits; both
    the Jacobian kernel (the thread must not lose float64: JAX's x64 flag can be per thread)."""
    model = _Gain()
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x))
    real = structured._pass_two
    runs = {}
    for prefetch in (True, False):
        monkeypatch.setattr(structured, "_pass_two",
                            lambda *a, prefetch=prefetch: real(*a, prefetch=prefetch))
        runs[prefetch] = structured.two_pass_kernel(
            model.apply, params, x, outputs="full", memory_bytes=2**11 + 2**10, spill=True,
            spill_dir=str(tmp_path))
    assert runs[True].dtype == np.float64
    np.testing.assert_array_equal(runs[True], runs[False])
    assert max_relative_error(runs[True], _jacobian_kernel(model.apply, params, x, "full")) < 1e-10


@pytest.mark.parametrize("width,rows,budget", [(768, 512, 2**18), (18, 8, 2**8), (5, 1, 4),
                                               (3072, 1536, 2**20), (7, 3, 2**30)])
def test_column_chunks_cover_the_columns_within_the_budget(width, rows, budget):
    chunk, count = structured._column_chunks(width, rows, 4, budget)
    assert (count - 1) * chunk < width <= count * chunk  # every column, no empty chunk
    assert chunk == 1 or rows * chunk * 4 <= budget
    most = min(width, max(1, budget // (rows * 4)))
    assert count == -(-width // most)  # no more chunks than the budget needs
