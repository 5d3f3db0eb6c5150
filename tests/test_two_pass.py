"""The two-pass schedule of the exact empirical NTK (issue 25): every example's layer factors
once (in memory or spilled to disk), then layer by layer Gram terms. Checked against the float64
per-sample Jacobian method, and spilled against in memory bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import empirical, structured
from tests.helpers import max_relative_error, xla_flags
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

    def failing(store, *args, **kwargs):
        seen.extend(os.listdir(store.tmp))
        raise RuntimeError("pass 2 failed")

    monkeypatch.setattr(structured, "_pass_two", failing)
    with pytest.raises(RuntimeError, match="pass 2 failed"):
        ntkjax.empirical_ntk_matrix(apply_fn, params, x, schedule="two_pass", spill_dir=tmp_path)
    assert seen and all(name.endswith(".bin") for name in seen)
    assert os.listdir(tmp_path) == []


def test_two_pass_bad_options_are_named(tmp_path):
    apply_fn, params, x, _ = make_case("mlp")
    matrix = ntkjax.empirical_ntk_matrix
    with pytest.raises(ValueError, match="schedule"):
        matrix(apply_fn, params, x, schedule="twopass")  # type: ignore[arg-type]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"block_size": 2}, "block_size"),
        ({"devices": [types.SimpleNamespace(process_index=1)]}, "devices of other processes"),
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
                            lambda *a, prefetch=prefetch, **k: real(*a, prefetch=prefetch, **k))
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


class _Tokens(nn.Module):
    """A token embedding (its one-hot gradient form: vocabulary 3) and dense layers on the
    positions, a LayerNorm, the mean over positions."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.gelu(nn.Dense(6)(nn.Embed(3, 4)(tokens)))
        return nn.Dense(2)(nn.LayerNorm()(h).mean(axis=1))


def _tokens(n=8, t=4):
    tokens = jax.random.randint(jax.random.key(0), (n, t), 0, 3)
    params = _TokensModel.init(jax.random.key(1), tokens[:1])
    return _TokensModel.apply, jax.tree.map(lambda a: a.astype(jnp.float64), params), tokens


_TokensModel = _Tokens()


def _gain(n=8, dtype=jnp.float64):
    model = _Gain()
    x = jax.random.normal(jax.random.key(0), (n, 3), dtype)
    return model.apply, jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(1), x)), x


@pytest.mark.parametrize("model,outputs,memory_bytes", [
    ("tokens", "trace", 2**11), ("gain", "diagonal", 2**11 + 2**10), ("gain", "full", None)])
def test_rectangular_kernel_equals_the_jacobian_kernel_spilled_and_in_memory(
        model, outputs, memory_bytes, tmp_path, x64):
    """Theta(x1, x2) with 5 rows against 3: the rows of x1 against those of x2 (in example
    blocks and column chunks with the small budgets), spilled bit for bit as in memory."""
    apply_fn, params, x = _tokens() if model == "tokens" else _gain()
    x1, x2 = x[:5], x[5:]
    want = np.asarray(ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian",
                                              outputs=outputs)(params, x1, x2))
    runs = [ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, outputs=outputs,
                                        schedule="two_pass", memory_bytes=memory_bytes,
                                        spill_dir=spill)
            for spill in (None, tmp_path)]
    assert runs[0].shape == want.shape == (5, 3, *want.shape[2:]) and runs[0].dtype == want.dtype
    assert max_relative_error(runs[0], want) < 1e-10
    np.testing.assert_array_equal(runs[1], runs[0])
    assert os.listdir(tmp_path) == []


def test_auto_takes_two_pass_for_x2_when_the_factors_of_both_do_not_fit(monkeypatch, x64):
    apply_fn, params, x, _ = make_case("mlp", jnp.float64, n1=6)
    x1, x2 = x[:4], x[4:]
    calls = []
    real = empirical.two_pass_kernel
    monkeypatch.setattr(empirical, "two_pass_kernel",
                        lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    per_example = structured.two_pass_bytes_per_example(apply_fn, params, x)
    roomy = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, memory_bytes=3 * 6 * per_example)
    assert calls == []  # 3 x (4 + 2) examples' factors fit
    tight = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2,
                                        memory_bytes=3 * 6 * per_example - 1)
    assert calls == [True]
    np.testing.assert_allclose(tight, roomy, rtol=1e-12)


def test_progress_bars_over_pass_one_blocks_and_pass_two_layers(capsys, x64):
    apply_fn, params, x = _gain(n=4)
    structured.two_pass_kernel(apply_fn, params, x[:3], x[3:], memory_bytes=2**11 + 2**10,
                               show_progress=True)
    err = capsys.readouterr().err
    layers = len(structured._two_pass_plan(apply_fn, params, x)[2]) + len(
        structured._two_pass_plan(apply_fn, params, x)[3])
    assert "pass 1 (example blocks)" in err and "4/4" in err  # one example per block
    assert "pass 2 (layers)" in err and f"{layers}/{layers}" in err


class _Interrupt:
    """Wraps a function of ``structured``: counts its calls, and raises KeyboardInterrupt at
    call number ``at`` (None: never), before doing anything."""

    def __init__(self, monkeypatch, name, at=None, tag=None):
        self.real, self.at, self.tag, self.calls = getattr(structured, name), at, tag, []
        monkeypatch.setattr(structured, name, self)

    def __call__(self, *args, **kwargs):
        if self.at is not None and len(self.calls) + 1 == self.at:
            self.at = None
            raise KeyboardInterrupt
        self.calls.append(None if self.tag is None else self.tag(*args))
        return self.real(*args, **kwargs)


def _layer_of(*args):
    """The pass-2 layer a ``_gradient_terms`` / ``_weight_terms`` call computes."""
    return args[0].x if isinstance(args[0], structured._Factored) else next(iter(args[0]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_store_resumes_an_interrupted_call_without_redoing_finished_work(
        symmetric, tmp_path, monkeypatch, x64):
    """Interrupted in pass 1 (after 2 of 8 blocks), then in pass 2 (during its 4th layer),
    then finished: the blocks and layers recorded are not computed again, the kernel is the
    uninterrupted one bit for bit (layers added in a fixed order) and the Jacobian kernel;
    the factors are gone, the kernel stays."""
    apply_fn, params, x = _gain(n=8)
    x1, x2 = (x, None) if symmetric else (x[:5], x[5:])
    budget, out = 2**11 + 2**10, str(tmp_path / "kernel")

    def call():
        return ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, outputs="full",
                                           schedule="two_pass", memory_bytes=budget, out=out)

    def counters(write_at=None, terms_at=None):
        return (_Interrupt(monkeypatch, "_write_block", write_at),
                _Interrupt(monkeypatch, "_gradient_terms", terms_at, _layer_of),
                _Interrupt(monkeypatch, "_weight_terms", None, _layer_of))

    want = ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, outputs="full",
                                       schedule="two_pass", memory_bytes=budget)
    writes, grads, weights = counters()
    ntkjax.empirical_ntk_matrix(apply_fn, params, x1, x2, outputs="full", schedule="two_pass",
                                memory_bytes=budget)  # the reference order of the layers
    order = list(dict.fromkeys(grads.calls + weights.calls))
    jobs = {layer: (grads.calls + weights.calls).count(layer) for layer in order}
    assert len(writes.calls) == 8 and len(order) > 4

    counters(write_at=3)
    with pytest.raises(KeyboardInterrupt):
        call()
    writes, grads, _ = counters(terms_at=sum(jobs[layer] for layer in order[:3]) + 1)
    with pytest.raises(KeyboardInterrupt):
        call()
    assert len(writes.calls) == 6  # blocks 0 and 1 were recorded
    assert len(grads.calls) == sum(jobs[layer] for layer in order[:3])
    with open(os.path.join(out, "two_pass", "state.json")) as f:
        assert '"layers_done": 3' in f.read()
    writes, grads, weights = counters()
    got = call()
    assert writes.calls == []
    done = grads.calls + weights.calls
    assert list(dict.fromkeys(done)) == order[3:]
    assert all(done.count(layer) == jobs[layer] for layer in order[3:])
    np.testing.assert_array_equal(got[:], want)
    jac = np.asarray(ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian",
                                             outputs="full")(params, x1, x2))
    assert max_relative_error(got[:], jac) < 1e-10
    assert not os.path.exists(os.path.join(out, "two_pass"))
    with pytest.raises(Exception):  # noqa: B017 - read-only zarr array: any error type
        got[0, 0] = 0.0
    writes, grads, weights = counters()
    np.testing.assert_array_equal(call()[:], want)  # finished: read back, nothing computed
    assert writes.calls == grads.calls == weights.calls == []


def test_store_of_another_call_is_refused_naming_the_difference(tmp_path, x64):
    apply_fn, params, x = _gain(n=4)
    out = str(tmp_path / "kernel")
    matrix = ntkjax.empirical_ntk_matrix
    matrix(apply_fn, params, x, schedule="two_pass", out=out)
    with pytest.raises(ValueError, match="inputs x1"):
        matrix(apply_fn, params, x + 1.0, schedule="two_pass", out=out)
    with pytest.raises(ValueError, match="inputs x2"):
        matrix(apply_fn, params, x, x[:2], schedule="two_pass", out=out)
    with pytest.raises(ValueError, match="parameters"):
        matrix(apply_fn, jax.tree.map(lambda a: a + 1.0, params), x, schedule="two_pass",
               out=out)
    with pytest.raises(ValueError, match="model"):
        matrix(apply_fn, params, x, outputs="diagonal", schedule="two_pass", out=out)
    # schedule="auto" resumes a store with the schedule that wrote it
    np.testing.assert_array_equal(matrix(apply_fn, params, x, out=out)[:],
                                  matrix(apply_fn, params, x, schedule="two_pass"))


def test_two_pass_record_of_another_call_is_refused(tmp_path, x64):
    apply_fn, params, x = _gain(n=4)
    structured._Record(str(tmp_path), {"n1": 4, "n2": None})
    record = structured._Record(str(tmp_path), {"n1": 4, "n2": None})
    record.save()
    with pytest.raises(ValueError, match="its n1 is 4, this call's 3"):
        structured.two_pass_kernel(apply_fn, params, x[:3], memory_bytes=2**20,
                                   resume_dir=str(tmp_path))


def test_column_padding_appends_zero_columns_and_keeps_host_arrays():
    from ntkjax._tiling import pad_axis

    x = np.arange(12.0).reshape(2, 2, 3)
    padded = pad_axis(x, 5, axis=-1, mode="zeros")
    assert isinstance(padded, np.ndarray) and padded.shape == (2, 2, 5)
    np.testing.assert_array_equal(padded[..., :3], x)
    assert not padded[..., 3:].any()
    assert pad_axis(x, 3, axis=-1) is x
    with pytest.raises(ValueError, match="cannot pad 3 entries of axis 2 to 2"):
        pad_axis(x, 2, axis=-1)


_FOUR_DEVICES = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import ntkjax
from tests.test_two_pass import _gain
assert len(jax.devices()) == 4
apply_fn, params, x = _gain(n=10)
runs = {}
for name, devices in (("one", None), ("four", jax.devices())):
    runs[name] = np.asarray(ntkjax.empirical_ntk_matrix(
        apply_fn, params, x[:7], x[7:], outputs="full", schedule="two_pass",
        memory_bytes=2**11 + 2**10, devices=devices, out=sys.argv[2] + "/" + name)[:]).tolist()
print(json.dumps(runs))
"""


def test_pass_one_blocks_on_four_devices(tmp_path, x64):
    """Ten one-example blocks over four forced host devices (rounds of 4, 4 and 2 filled up),
    into a store: the one-device kernel bit for bit, and the Jacobian kernel."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, root, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(runs["four"], runs["one"])
    apply_fn, params, x = _gain(n=10)
    want = np.asarray(ntkjax.empirical_ntk_fn(apply_fn, ntk_method="jacobian",
                                              outputs="full")(params, x[:7], x[7:]))
    assert max_relative_error(np.asarray(runs["four"]), want) < 1e-10
