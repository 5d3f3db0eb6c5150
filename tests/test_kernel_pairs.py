"""Kernels of two different batches: ``kernel_fn(m)(x1, x2)`` is the off-diagonal block of the
kernel of the joint batch ``concatenate([x1, x2])`` (a truth about kernels that needs no
reference values), for networks whose rules read each input's variances -- residual sums around
self-attention and LayerNorm (the post-LN transformer block), on sequences and images -- in one
call, in blocks of rows, with ``kernel_matrix`` in blocks, over devices and into a store.

Also: the module is traced a bounded number of times per call, the kernel of a batch with
itself is exactly symmetric, and the static facts a kernel carries name the layers that need
all pairs of positions or the same batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

import ntkjax
from ntkjax import models, nn
from ntkjax.kernels import Kernel, input_kernel
from tests.helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]


class PostLN(linen.Module):
    """Post-LN transformer block: LayerNorm after each residual sum (attention, then an MLP)."""

    attention_mechanism: str = "softmax"

    @linen.compact
    def __call__(self, x):
        x = nn.Dense(6, b_std=0.2)(x)
        a = nn.SelfAttention(6, 4, 3, num_heads=2, b_std=0.1,
                             attention_mechanism=self.attention_mechanism)(x)
        x = nn.LayerNorm()(x + a)
        h = nn.Dense(6, w_std=1.3, b_std=0.1)(nn.erf(nn.Dense(8, b_std=0.1)(x)))
        x = nn.LayerNorm()(x + h)
        return nn.Dense(1)(nn.global_average_pool(x))


class ResidualConv(linen.Module):
    """Images: a residual ReLU convolution block, LayerNorm over channels, then a readout."""

    readout: str = "flatten"

    @linen.compact
    def __call__(self, x):
        x = nn.Conv(4, kernel_size=(3, 3), b_std=0.1)(x)
        x = nn.LayerNorm()(x + nn.Conv(4, kernel_size=(2, 2), w_std=1.4)(nn.relu(
            nn.Conv(5, kernel_size=(3, 3), b_std=0.2)(x))))
        x = nn.gelu(nn.Conv(4, b_std=0.1)(x))
        x = nn.flatten(x) if self.readout == "flatten" else nn.global_average_pool(x)
        return nn.Dense(1, b_std=0.1)(x)


class AttentionOnImages(linen.Module):
    """Self-attention over the positions of an image, in a residual sum with LayerNorm."""

    @linen.compact
    def __call__(self, x):
        x = nn.Conv(4, kernel_size=(2, 2))(x)
        x = nn.LayerNorm()(x + nn.SelfAttention(4, 4, 4, attention_mechanism="identity")(x))
        return nn.Dense(1)(nn.flatten(nn.relu(nn.Dense(4, b_std=0.1)(x))))


SEQUENCES = {
    "transformer": models.Transformer(6, depth=2, num_heads=2, b_std=0.1),
    "post_ln": PostLN(),
    "post_ln_relu_attention": PostLN("relu"),
}
IMAGES = {
    "residual_conv_ln_flatten": ResidualConv(),
    "residual_conv_ln_pool": ResidualConv("pool"),
    "attention_on_images": AttentionOnImages(),
}
NETWORKS = {**SEQUENCES, **IMAGES}


def _inputs(name: str, n1: int = 4, n2: int = 3):
    shape = (5, 3) if name in SEQUENCES else (3, 3, 2)
    rng = np.random.default_rng(len(name))
    return rng.standard_normal((n1, *shape)), rng.standard_normal((n2, *shape))


def _assert_off_diagonal_block(got: Kernel, joint: Kernel, n1: int, atol: float = 1e-12):
    for name in ("nngp", "ntk"):
        want = np.asarray(getattr(joint, name))[:n1, n1:]
        np.testing.assert_allclose(np.asarray(getattr(got, name)), want, rtol=1e-12, atol=atol,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(got.var1), np.asarray(joint.var1)[:n1], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got.var2), np.asarray(joint.var1)[n1:], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_two_batches_are_the_off_diagonal_block_of_the_joint_kernel(name, x64):
    m = NETWORKS[name]
    x1, x2 = _inputs(name)
    fn = ntkjax.kernel_fn(m)
    joint = fn(np.concatenate([x1, x2]))
    # the joint kernel is a kernel: symmetric, PSD, its variances its diagonal
    for a in (joint.nngp, joint.ntk):
        np.testing.assert_array_equal(a, np.asarray(a).T)
        assert np.linalg.eigvalsh(np.asarray(a)).min() > -1e-10 * np.abs(a).max()
    np.testing.assert_allclose(np.diagonal(joint.nngp), joint.var1, rtol=1e-12)
    _assert_off_diagonal_block(fn(x1, x2), joint, len(x1))
    own = fn(x1)
    np.testing.assert_allclose(own.ntk, np.asarray(joint.ntk)[:4, :4], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_blocks_of_rows_give_the_joint_kernel(name, monkeypatch, x64):
    # one row per block: every pair of inputs is evaluated as a kernel of two batches of one
    m = NETWORKS[name]
    x1, x2 = _inputs(name)
    joint = ntkjax.kernel_fn(m)(np.concatenate([x1, x2]))
    monkeypatch.setattr(ntkjax.kernels, "_BLOCK_ENTRIES", 1)
    fn = ntkjax.kernel_fn(m)
    _assert_off_diagonal_block(fn(x1, x2), joint, len(x1))
    both = fn(np.concatenate([x1, x2]))
    for field in ("nngp", "ntk", "var1"):
        np.testing.assert_allclose(getattr(both, field), getattr(joint, field), rtol=1e-12,
                                   atol=1e-12, err_msg=field)
    assert both.same_inputs
    np.testing.assert_array_equal(both.var2, both.var1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer", "post_ln", "residual_conv_ln_pool"])
def test_kernel_matrix_in_blocks_and_into_a_store(name, tmp_path, x64):
    m = NETWORKS[name]
    x1, x2 = _inputs(name, 5, 3)
    joint = ntkjax.kernel_fn(m)(np.concatenate([x1, x2]))
    got = ntkjax.kernel_matrix(m, x1, x2, block_size=2, devices=jax.devices())
    _assert_off_diagonal_block(got, joint, len(x1))
    stored = ntkjax.kernel_matrix(m, x1, block_size=2, out=tmp_path / "k.zarr")
    for field in ("nngp", "ntk"):
        np.testing.assert_allclose(np.asarray(getattr(stored, field)[:]),
                                   np.asarray(getattr(joint, field))[:5, :5], rtol=1e-12,
                                   atol=1e-12, err_msg=field)
    np.testing.assert_allclose(stored.var1, np.asarray(joint.var1)[:5], rtol=1e-12)


_FOUR_DEVICES = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, sys.argv[1])
import ntkjax
from tests.test_kernel_pairs import NETWORKS, _inputs
assert len(jax.devices()) == 4
out = {}
for name in ("transformer", "residual_conv_ln_pool"):
    x1, x2 = _inputs(name, 5, 3)
    k = ntkjax.kernel_matrix(NETWORKS[name], x1, x2, block_size=2, devices=jax.devices(),
                             out=sys.argv[2] + "/" + name + ".zarr")
    out[name] = [np.asarray(k.nngp[:]).tolist(), np.asarray(k.ntk[:]).tolist()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernel_matrix_on_four_devices_into_a_store(tmp_path, x64):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(ROOT), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (nngp, ntk) in got.items():
        x1, x2 = _inputs(name, 5, 3)
        joint = ntkjax.kernel_fn(NETWORKS[name])(np.concatenate([x1, x2]))
        np.testing.assert_allclose(nngp, np.asarray(joint.nngp)[:5, 5:], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ntk, np.asarray(joint.ntk)[:5, 5:], rtol=1e-12, atol=1e-12)


# ---- traces, symmetry, static facts ----

TRACES = {"before": 0, "after": 0}


class Counted(linen.Module):
    """The identity, counting how often the module is traced (under ``key``)."""

    key: str = "before"

    @linen.compact
    def __call__(self, x):
        TRACES[self.key] += 1
        return x


class CountedCNN(linen.Module):
    readout: str = "flatten"

    @linen.compact
    def __call__(self, x):
        x = Counted()(nn.relu(nn.Conv(4, b_std=0.1)(x)))
        x = nn.relu(nn.Conv(4)(x))
        x = nn.flatten(x) if self.readout == "flatten" else nn.global_average_pool(x)
        return nn.Dense(1)(Counted("after")(x))


class CountedMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = Counted()(nn.erf(nn.Dense(8, b_std=0.1)(x)))
        return nn.Dense(1)(Counted("after")(nn.relu(nn.Dense(8)(x))))


class CountedPostLN(linen.Module):
    """The post-LN block (attention needs all pairs of positions), counted before the
    attention and after its residual sum."""

    @linen.compact
    def __call__(self, x):
        x = Counted()(nn.Dense(6, b_std=0.2)(x))
        x = nn.LayerNorm()(x + nn.SelfAttention(6, 4, 3, num_heads=2, b_std=0.1)(x))
        x = Counted("after")(x)
        h = nn.Dense(6, w_std=1.3, b_std=0.1)(nn.erf(nn.Dense(8, b_std=0.1)(x)))
        return nn.Dense(1)(nn.global_average_pool(nn.LayerNorm()(x + h)))


def _traces(call) -> tuple[int, int]:
    TRACES.update(before=0, after=0)
    call()
    return TRACES["before"], TRACES["after"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_pool", "post_ln"])
def test_each_kernel_call_traces_the_module_once(name, monkeypatch):
    # Counted by layers inside the module, before and after the first layer that mixes
    # positions. A module that needs no position pairs (the MLP, the flatten CNN) is traced
    # once from its first call; one that does is, on its first call for an input shape,
    # evaluated up to that layer on same-position pairs (which it refuses) and then once in
    # full; every later call -- x2 given, other batch sizes, blocks, kernel_matrix's blocks --
    # traces it once. (A blocked batch with itself of at least kernels._REPLAY_ENTRIES
    # entries traces it twice: once for the diagonal blocks, which record each layer's
    # variances, once for the blocks that replay them; sizes far above these.)
    rng = np.random.default_rng(0)
    module, shape = {"mlp": (CountedMLP(), (4, 5)), "cnn": (CountedCNN(), (4, 3, 3, 2)),
                     "cnn_pool": (CountedCNN("pool"), (4, 3, 3, 2)),
                     "post_ln": (CountedPostLN(), (4, 3, 3))}[name]
    x = rng.standard_normal(shape)
    fn = ntkjax.kernel_fn(module)
    first = _traces(lambda: fn(x))
    mixes = name in ("cnn_pool", "post_ln")
    assert first == ((2, 1) if mixes else (1, 1))
    assert _traces(lambda: fn(x, x[:2])) == (1, 1)  # the facts are the function's own
    assert _traces(lambda: ntkjax.kernel_fn(module)(x, x[:2])) == first  # no shared state
    # kernel_matrix: the output variances of x1 and x2 (which also note the facts; a module
    # that mixes positions is first refused on same-position pairs), then the compiled block
    if len(shape) == 2:
        assert _traces(lambda: jax.jit(fn)(x)) == (1, 1)
        assert _traces(lambda: ntkjax.kernel_matrix(module, x, x[:3], block_size=2)) == (2, 2)
    else:
        assert _traces(lambda: ntkjax.kernel_matrix(module, x, x[:3], block_size=2)) == (
            (3, 2) if mixes else (2, 2))
        monkeypatch.setattr(ntkjax.kernels, "_BLOCK_ENTRIES", 1)  # blocks of one row
        assert _traces(lambda: fn(x[:3])) == (1, 1)


def test_kernels_of_a_batch_with_itself_are_exactly_symmetric():
    # x @ x.T need not be bitwise symmetric; the input kernel is symmetrized
    x = jax.random.normal(jax.random.PRNGKey(0), (37, 13), jnp.float32) * 3.0
    for m in (models.MLP((16, 1), "relu"), models.MLP((16, 16, 1), "erf", b_std=0.1),
              models.MLP((16, 16, 1), "gelu", b_std=0.1)):
        k = ntkjax.kernel_fn(m)(x)
        np.testing.assert_array_equal(k.nngp, k.nngp.T)
        np.testing.assert_array_equal(k.ntk, k.ntk.T)
        # jitted too: XLA fuses each layer's map into one loop and may contract a * b + c into
        # a fused multiply-add, which rounds (i, j) and (j, i) differently unless the map is
        # symmetric by construction
        kj = jax.jit(lambda a, m=m: ntkjax.kernel_fn(m)(a))(x)
        np.testing.assert_array_equal(kj.nngp, kj.nngp.T)
        np.testing.assert_array_equal(kj.ntk, kj.ntk.T)
        np.testing.assert_allclose(np.diagonal(k.nngp), k.var1, rtol=1e-6)
    k = input_kernel(x)
    np.testing.assert_array_equal(k.nngp, k.nngp.T)


@pytest.mark.parametrize("n", [48, 40, 37])  # the transpose in tiles of 16, of 8, of 1
def test_the_jitted_input_gram_matrix_is_exactly_symmetric(n):
    """Jitted, the input kernel of a batch with itself is ``(G + G^T) / 2 / d``: exactly
    symmetric, and within float32 rounding of ``x x^T / d`` computed in float64."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(n), (n, 7), jnp.float32)) * 3.0
    for k in (jax.jit(lambda a: input_kernel(a).nngp)(x), input_kernel(x).nngp):
        k = np.asarray(k)
        np.testing.assert_array_equal(k, k.T)
        exact = x.astype(np.float64) @ x.T.astype(np.float64) / 7
        np.testing.assert_allclose(k, exact, rtol=1e-5, atol=1e-6 * np.max(np.abs(exact)))
    # the symmetrization itself, of a matrix that is not symmetric
    from ntkjax.kernels import _symmetric_gram

    g = np.asarray(jax.random.normal(jax.random.PRNGKey(n + 1), (n, n), jnp.float32))
    got = np.asarray(jax.jit(_symmetric_gram, static_argnums=1)(g, 7))
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_allclose(got, (g.astype(np.float64) + g.T) / 14, rtol=1e-6, atol=1e-7)


def test_the_variance_fusion_boundary_is_exactly_the_identity(x64):
    """Each layer's variances pass through ``v / (1 + 0 sign(v))`` when traced: IEEE division
    by 1 returns v itself -- signed zeros, the smallest and largest normal floats, infinities
    and NaN included -- eagerly and compiled, in float32 and float64. (Subnormals flush to zero
    here as in every arithmetic operation of XLA:CPU.)"""
    from ntkjax._kernel import fusion_boundary

    for dtype in (jnp.float32, jnp.float64):
        info = jnp.finfo(dtype)
        tiny, big = float(info.tiny), float(info.max)
        v = jnp.asarray([0.0, -0.0, 1.0, -2.5, tiny, -tiny, -big, big, np.inf, -np.inf, np.nan],
                        dtype)
        for fn in (fusion_boundary, jax.jit(fusion_boundary)):
            out = np.asarray(fn(v))
            assert out.dtype == v.dtype
            np.testing.assert_array_equal(out, np.asarray(v))  # NaN where v is NaN
            np.testing.assert_array_equal(np.signbit(out), np.signbit(np.asarray(v)))


def test_static_facts_name_the_layers_that_need_them():
    x = jnp.ones((1, 4, 4, 2))
    k = ResidualConv("pool").apply({}, input_kernel(x))
    assert k.all_pairs_layers == ("global_average_pool",) and not k.same_batch_layers
    assert not ResidualConv().apply({}, input_kernel(x)).all_pairs_layers

    class Dropped(linen.Module):
        @linen.compact
        def __call__(self, x):
            a = nn.Dropout(0.5, deterministic=False)(nn.Dense(3)(x))
            return nn.Dense(1)(nn.SelfAttention(3, 3, 3)(nn.Dense(3)(x)) + nn.Dense(3)(a))

    k = Dropped().apply({}, input_kernel(jnp.ones((1, 4, 2))))
    assert k.same_batch_layers == ("ntkjax.nn.Dropout (train mode)",)
    assert k.all_pairs_layers == ("SelfAttention",)
    with pytest.raises(ValueError, match=r"cannot evaluate a module with ntkjax\.nn\.Dropout"):
        ntkjax.kernel_matrix(Dropped(), jnp.ones((3, 4, 2)))
    with pytest.raises(ntkjax.kernels.AllPairsRequired, match="SelfAttention needs"):
        Dropped().apply({}, input_kernel(jnp.ones((1, 4, 2)), diagonal_spatial=True))


def test_blocks_of_a_batch_with_itself_replay_the_diagonal_blocks_variances(monkeypatch, x64):
    # x2 = None in blocks of one row: the blocks above the diagonal take each layer's
    # variances (LayerNorm and the activations read them) from the diagonal blocks, where
    # they are computed once; the kernel is the whole batch's, exactly symmetric
    m = ResidualConv("pool")
    x, _ = _inputs("residual_conv_ln_pool", n1=3)
    whole = ntkjax.kernel_fn(m)(x)
    real, replayed = ntkjax.kernels._replaying_pairs, []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        replayed.append(len(out[1]))
        return out

    monkeypatch.setattr(ntkjax.kernels, "_BLOCK_ENTRIES", 1)
    monkeypatch.setattr(ntkjax.kernels, "_REPLAY_ENTRIES", 1)
    monkeypatch.setattr(ntkjax.kernels, "_replaying_pairs", spy)
    blocked = ntkjax.kernel_fn(m)(x)
    assert replayed == [6]  # 3 blocks on the diagonal, 3 above it
    for field in ("nngp", "ntk", "var1"):
        np.testing.assert_allclose(getattr(blocked, field), getattr(whole, field), rtol=1e-12,
                                   atol=1e-12, err_msg=field)
    np.testing.assert_array_equal(blocked.ntk, np.asarray(blocked.ntk).T)
    np.testing.assert_array_equal(blocked.var2, blocked.var1)
