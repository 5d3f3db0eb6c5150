"""Structured empirical-NTK rules for the parameters of a standard transformer: norm scales and
biases, multi-axis DenseGeneral (attention projections), against ``ntk_method="jacobian"`` in
float64 (an independent computation: per-sample Jacobians of every leaf, contracted)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ntkjax
from ntkjax.structured import (
    draw_projection,
    project_gradient,
    projection_views,
    structured_fallback_params,
    structured_projected_features,
)


def _agree(model, x1, x2, outputs, *, fallback=()):
    """structured == jacobian at 1e-10 (float64), and exactly ``fallback`` leaves fall back."""
    # model.init and the autodiff truths jitted: op by op, every operation compiles apart
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          jax.jit(model.init)(jax.random.key(1), x1))
    assert structured_fallback_params(model.apply, params, x1) == list(fallback)
    # examples are independent: batch="per_sample" (the default probe would compile a
    # program per kernel function for the same answer)
    want = ntkjax.empirical_ntk_fn(model.apply, ntk_method="jacobian", outputs=outputs,
                                   batch="per_sample")(params, x1, x2)
    got = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs=outputs,
                                  batch="per_sample")(params, x1, x2)
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(want))))


class NormNet(nn.Module):
    """LayerNorm (scale and bias, scale only), RMSNorm, on positions, non-trivial scales."""

    @nn.compact
    def __call__(self, x):  # (N, T, C)
        ones = nn.initializers.ones
        h = nn.LayerNorm(scale_init=nn.initializers.normal(1.0),
                         bias_init=nn.initializers.normal(1.0))(nn.Dense(5)(x))
        h = nn.LayerNorm(use_bias=False, scale_init=nn.initializers.normal(1.0))(jnp.tanh(h))
        h = nn.RMSNorm(scale_init=ones)(nn.gelu(nn.Dense(4)(h)))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def test_norm_scales_and_biases(x64):
    x1 = jax.random.normal(jax.random.key(2), (3, 4, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.key(3), (2, 4, 2), jnp.float64)
    _agree(NormNet(), x1, x2, "full")


def _projected_and_autodiff(model, x):
    """(structured projected features (dim 8, rank 2), per-sample float64 autodiff gradients
    of every leaf as ``(path, (N, O, *leaf))``, key, dim) of ``model`` on ``x``."""
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          jax.jit(model.init)(jax.random.key(1), x))
    key, dim = jax.random.key(5), 8
    views = projection_views(model.apply, params, x, 2)

    @jax.jit  # one program (op by op, every operation would compile apart)
    def features(params, x):
        projections = [None if view is None else
                       draw_projection(jax.random.fold_in(key, i), view, dim, 2, jnp.float64)
                       for i, view in enumerate(views)]
        return structured_projected_features(model.apply, params, x, projections, dim, 2)

    feats = features(params, x)
    assert feats is not None
    grads = jax.jit(jax.vmap(lambda xi: jax.jacrev(lambda p: model.apply(p, xi[None])[0])(
        params)))(x)
    return feats, jax.tree_util.tree_flatten_with_path(grads["params"])[0], key, dim


def _assert_features_of_every_leaf(feats, leaves, key, dim):
    """The features are ``sum_l project_gradient(g_l)`` over every leaf (same key per leaf)
    of the float64 autodiff gradients ``g_l``: the factored weights (never formed) and the
    formed leaves alike. An attention projection's kernel ``(width, heads, head_dim)`` is
    the matrix of its input axis by its two output axes (``split=1``)."""
    splits = [1 if path[-1].key == "kernel" and path[-2].key in ("query", "key", "value")
              else None for path, _ in leaves]

    @jax.jit
    def projected(grads):
        return sum(project_gradient(g, jax.random.fold_in(key, i), dim, 2, split)
                   for i, (g, split) in enumerate(zip(grads, splits, strict=True)))

    want = projected([g for _, g in leaves])
    np.testing.assert_allclose(feats, want, rtol=1e-10, atol=1e-12 * float(jnp.abs(want).max()))


def test_norm_leaves_projected_features(x64):
    """The projected features of a model with norm leaves (LayerNorm scale and bias, scale
    only, RMSNorm) and dense layers are those of the per-sample gradients from float64
    autodiff."""
    x = jax.random.normal(jax.random.key(2), (3, 4, 2), jnp.float64)
    feats, leaves, key, dim = _projected_and_autodiff(NormNet(), x)
    assert sum("Norm" in path[0].key for path, _ in leaves) == 4
    _assert_features_of_every_leaf(feats, leaves, key, dim)


class GPT(nn.Module):
    """Token embedding, learned positions (a parameter table), one pre-LN block (causal
    multi-head attention, GELU MLP), final LayerNorm, and a head on the last token (a Dense,
    or tied: ``Embed.attend``)."""

    vocab: int = 7
    width: int = 8
    heads: int = 2
    tied: bool = False

    @nn.compact
    def __call__(self, tokens):  # (N, T) ints
        t = tokens.shape[1]
        embed = nn.Embed(self.vocab, self.width)
        h = embed(tokens)
        h = h + self.param("pos", nn.initializers.normal(0.5), (t + 2, self.width))[:t]
        a = nn.MultiHeadDotProductAttention(num_heads=self.heads)(
            nn.LayerNorm()(h), mask=nn.make_causal_mask(tokens))
        h = h + a
        m = nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        h = nn.LayerNorm()(h + m)
        return embed.attend(h[:, -1]) if self.tied else nn.Dense(3)(h[:, -1])


def test_gpt_block_is_structured_with_positions_and_tied_head(x64):
    """Nothing falls back: the position table by its add's cotangents, the tied table by the
    sum of its lookup and attend gradients (cross terms included)."""
    x1 = jax.random.randint(jax.random.key(2), (3, 5), 0, 7)
    x2 = jax.random.randint(jax.random.key(3), (2, 5), 0, 7)
    _agree(GPT(tied=True), x1, x2, "full")


class Tables(nn.Module):
    """Parameters added to the activations: a position table sliced and added twice (once
    through ``[None]``), a per-channel shift, and a table that multiplies (not additive: it
    falls back to Jacobians); a tied head."""

    additive_only: bool = True
    positions: str = "param"

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        embed = nn.Embed(5, 3)
        if self.positions == "embed":  # an Embed on arange(T): the same input for every example
            return embed.attend(jnp.tanh(embed(tokens) + nn.Embed(t, 3)(jnp.arange(t)))[:, 0])
        pos = self.param("pos", nn.initializers.normal(0.5), (t + 1, 3))
        h = embed(tokens) + pos[:t]
        h = jnp.tanh(nn.Dense(3)(h)) + pos[None, 1:] + self.param(
            "shift", nn.initializers.normal(0.5), (3,))
        if not self.additive_only:
            h = h * self.param("gain", nn.initializers.normal(1.0), (t, 3))
        return embed.attend(nn.LayerNorm()(h)[:, 0])


def test_additive_tables_and_tied_head(x64):
    x1 = jax.random.randint(jax.random.key(2), (3, 4), 0, 5)
    x2 = jax.random.randint(jax.random.key(3), (2, 4), 0, 5)
    _agree(Tables(), x1, x2, "full")
    # a multiplying table falls back; then every other non-layer leaf takes the per-sample path
    _agree(Tables(additive_only=False), x1, None, "trace",
           fallback=[("gain",), ("pos",), ("shift",)])


def test_position_embed_on_arange_is_structured(x64):
    """An Embed applied to ``jnp.arange(T)`` (the same input for every example) is an Embed
    layer whose gradient is per example; it used to crash the structured method."""
    x1 = jax.random.randint(jax.random.key(2), (3, 4), 0, 5)
    x2 = jax.random.randint(jax.random.key(3), (2, 4), 0, 5)
    _agree(Tables(positions="embed"), x1, x2, "full")


def test_tied_embedding_projected_features(x64):
    """The projected features of the GPT block with a tied head -- the tied table (lookup
    plus attend), the position table, the attention projections (``DenseGeneral``), norms
    and dense layers -- are those of their per-sample gradients from float64 autodiff."""
    x = jax.random.randint(jax.random.key(2), (3, 5), 0, 7)
    feats, leaves, key, dim = _projected_and_autodiff(GPT(tied=True), x)
    names = ["/".join(k.key for k in path) for path, _ in leaves]
    assert {"Embed_0/embedding", "pos", "MultiHeadDotProductAttention_0/query/kernel",
            "MultiHeadDotProductAttention_0/out/kernel"} <= set(names), names
    _assert_features_of_every_leaf(feats, leaves, key, dim)


class Block(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, h, xs=None):
        out = h + nn.Dense(h.shape[-1])(jnp.tanh(nn.Dense(4)(nn.LayerNorm()(h))))
        return (out, xs) if self.scanned else out


class Looped(nn.Module):
    """A block under ``nn.remat`` or ``nn.scan`` (stacked parameters, one per iteration)."""

    how: str = "remat"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3)(x)
        if self.how == "remat":
            h = nn.remat(Block)()(h)
        else:
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                              length=2)(scanned=True)
            h = scanned(h, None)[0]
        return nn.Dense(2)(jnp.asarray(h)[:, -1])


def test_scanned_and_rematted_blocks_fall_back_exactly(x64):
    """Layers called inside ``nn.scan`` / ``nn.remat`` cannot be tapped from outside those
    transformations (their inputs are the inner trace's): their leaves fall back to
    per-sample Jacobians (listed by ``structured_fallback_params``) instead of leaking tracers
    -- or, for a scan, misreading stacked parameters as one layer's."""
    x1 = jax.random.normal(jax.random.key(2), (3, 2, 2), jnp.float64)
    x2 = jax.random.normal(jax.random.key(3), (2, 2, 2), jnp.float64)
    for how, block in (("remat", "CheckpointBlock_0"), ("scan", "ScanBlock_0")):
        leaves = [(block, layer, name) for layer, names in (
            ("Dense_0", ("bias", "kernel")), ("Dense_1", ("bias", "kernel")),
            ("LayerNorm_0", ("bias", "scale"))) for name in names]
        _agree(Looped(how), x1, x2, "trace", fallback=leaves)


class Shared(nn.Module):
    """A Dense called on two sequences of different lengths and once more on a vector, a Conv
    and a LayerNorm each called twice: each is one layer on all its calls' positions."""

    @nn.compact
    def __call__(self, x):  # (N, T, C)
        dense, conv, norm = nn.Dense(3), nn.Conv(3, (2,)), nn.LayerNorm()
        a = jnp.tanh(dense(x))
        b = jnp.tanh(dense(x[:, ::2] ** 2))
        c = conv(norm(a)) + conv(norm(jnp.sin(a)))
        h = c.mean(axis=1) + b.sum(axis=1)
        return nn.Dense(2)(h + jnp.tanh(dense(h)))


def test_modules_called_several_times(x64):
    x1 = jax.random.normal(jax.random.key(2), (3, 5, 3), jnp.float64)
    x2 = jax.random.normal(jax.random.key(3), (2, 5, 3), jnp.float64)
    _agree(Shared(), x1, x2, "full")


class ResBlock(nn.Module):
    """Conv -> BatchNorm (running statistics: attribute, or call argument) -> relu, residual."""

    @nn.compact
    def __call__(self, x):  # (N, H, W, C)
        h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(3, (2, 2))(x)))
        h = nn.BatchNorm()(nn.Conv(3, (2, 2))(h), use_running_average=True)
        return nn.Dense(2)(nn.relu(h + x).mean(axis=(1, 2)))


def test_batch_norm_in_inference_mode(x64):
    x1 = jax.random.normal(jax.random.key(2), (3, 4, 4, 3), jnp.float64)
    x2 = jax.random.normal(jax.random.key(3), (2, 4, 4, 3), jnp.float64)
    model = ResBlock()
    variables = model.init(jax.random.key(1), x1)
    # non-trivial running statistics, scales and biases
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    variables = jax.tree.unflatten(treedef, [
        (jnp.exp if leaf.ndim == 1 else lambda v: v)(
            leaf.astype(jnp.float64) + 0.5 * jax.random.normal(k, leaf.shape, jnp.float64))
        for leaf, k in zip(leaves, keys, strict=True)])
    assert structured_fallback_params(model.apply, variables, x1) == []
    want = ntkjax.empirical_ntk_fn(model.apply, ntk_method="jacobian", outputs="full")(
        variables, x1, x2)
    got = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured", outputs="full")(
        variables, x1, x2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(want))))
