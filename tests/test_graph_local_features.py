"""Random features of graph and locally connected networks (nn.Aggregate, nn.ConvLocal) against
the exact kernels of kernel_fn: Aggregate's rule is exact (the layer is linear), ConvLocal's
per-position projections are unbiased, and with activations the error falls like D^-1/2
(fitted slope)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen

import ntkjax
from ntkjax import models, nn
from ntkjax.features import feature_map
from tests.helpers import assert_feature_error_falls_like_inverse_sqrt, assert_unbiased_estimate


def _grams(f) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(p) @ np.asarray(p).T for p in (f.nngp, f.ntk))


def _graphs(n=4, v=5, c=3, seed=0):
    """Node features (n, v, c) and symmetric adjacencies with self loops (n, v, v), float64."""
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, v, v)) < 0.5, 1)
    a = (upper | upper.transpose(0, 2, 1) | np.eye(v, dtype=bool)).astype(np.float64)
    return rng.standard_normal((n, v, c)), a


def _edges(dense: np.ndarray) -> np.ndarray:
    """The edge lists [tail, head] of 0/1 adjacencies, padded with -1 rows to one length."""
    lists = [np.argwhere(a > 0) for a in dense]
    e = max(len(x) for x in lists) + 2
    out = -np.ones((len(lists), e, 2), np.int32)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


class _GridGraph(linen.Module):
    """Dense -> Aggregate on a 2-D grid of nodes -> global_sum_pool -> Dense (linear)."""

    @linen.compact
    def __call__(self, x, pattern):
        h = nn.Aggregate()(nn.Dense(4, w_std=1.2, b_std=0.3)(x), pattern)
        return nn.Dense(1, w_std=0.9, b_std=0.1)(nn.global_sum_pool(h))


def _aggregate_case(case: str):
    x, a = _graphs()
    if case == "weighted-dense":
        weights = a * np.random.default_rng(1).uniform(0.5, 1.5, a.shape)
        return models.GNN((5, 4, 1), activation="identity", aggregate_after=(0, 1), w_std=1.3,
                          b_std=0.2), x, weights
    if case == "edge-list":
        return models.GNN((5, 4, 1), activation="identity", aggregate_after=(0, 1), w_std=1.3,
                          b_std=0.2, implementation="sparse"), x, _edges(a)
    rng = np.random.default_rng(2)  # nodes on a 2 x 3 grid, weighted dense adjacency
    return _GridGraph(), rng.standard_normal((3, 2, 3, 2)), rng.uniform(0, 1, (3, 2, 3, 2, 3))


@pytest.mark.parametrize("case", ["weighted-dense", "edge-list", "grid"])
def test_aggregate_features_are_exact(x64, case):
    """Linear graph networks (two Aggregates on a weighted dense adjacency, on edge lists; one
    on a 2-D grid of nodes): Aggregate's feature rule is exact, so the Gram matrices equal
    kernel_fn's NNGP and NTK (float64) to rounding, with x and its pattern passed per input."""
    module, xs, pattern = _aggregate_case(case)
    exact = ntkjax.kernel_fn(module)(xs, pattern=pattern)
    nngp, ntk = _grams(feature_map(module, key=jax.random.key(0),
                                   num_features=256)(xs, pattern=pattern))
    np.testing.assert_allclose(nngp, exact.nngp, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ntk, exact.ntk, rtol=1e-11, atol=1e-12)


def test_aggregate_features_refuse_bad_patterns_and_masks(x64):
    """A pattern whose node count or rows disagree with the inputs is a ValueError naming the
    shapes; a mask beside the features is UnsupportedMeaning naming Aggregate."""
    x, a = _graphs()
    gnn = models.GNN((4, 1), aggregate_after=(0,))
    fmap = feature_map(gnn, key=jax.random.key(0), num_features=16)
    with pytest.raises(ValueError, match=r"adjacency for the inputs has shape \(\d, 4, 4\).*"
                                         r"node shape \(5,\)"):
        fmap(x, pattern=a[:, :4, :4])
    with pytest.raises(ValueError, match=r"'pattern'.*one row per input"):
        fmap(x, pattern=a[:3])

    class Masked(linen.Module):
        @linen.compact
        def __call__(self, x, pattern):
            mask = np.zeros(x.shape[:2], bool)
            return nn.Dense(1)(nn.global_sum_pool(nn.Aggregate()(x, pattern, mask=mask)))

    with pytest.raises(ntkjax.UnsupportedMeaning, match=r"Aggregate.*masks"):
        feature_map(Masked(), key=jax.random.key(0), num_features=16)(x, pattern=a)


# Global average pooling sums the cross-position terms, which a weight-shared (convolutional)
# projection would keep: these kernels differ from their CNN twins' (Novak et al. 2019).
LOCAL_CASES = {
    "2d-same-ntk": (models.LCN((3, 1), kernel_size=2, activation="identity",
                               readout="global_average_pool", w_std=1.3, b_std=0.4),
                    (4, 3, 3, 2)),
    "1d-valid-strided-standard": (
        models.LCN((3, 1), kernel_size=2, strides=2, padding="VALID", activation="identity",
                   readout="global_average_pool", w_std=1.2, b_std=0.3,
                   parameterization="standard"), (4, 5, 2)),
}


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_conv_local_features_are_unbiased(x64, case):
    """ConvLocal -> flatten -> Dense (linear): the only random step is ConvLocal's projection
    per output position, which is unbiased: over 48 keys every kernel entry's mean is within
    4.5 standard errors of kernel_fn's, and the mean is much closer than one draw (a genuine
    estimate whose cross-position terms average out)."""
    module, shape = LOCAL_CASES[case]
    x = np.random.default_rng(3).standard_normal(shape)
    exact = ntkjax.kernel_fn(module)(x)
    keys = 48
    draws = [_grams(feature_map(module, key=jax.random.key(s), num_features=16)(x))
             for s in range(keys)]
    for which, truth in ((0, exact.nngp), (1, exact.ntk)):
        assert_unbiased_estimate(np.stack([d[which] for d in draws]), truth, closer=0.35,
                                 label=which)


def _gnn_case():
    x, a = _graphs()
    return models.GNN((8, 8, 1), w_std=1.4, b_std=0.1), x, {"pattern": a}


def _lcn_case():
    x = np.random.default_rng(4).standard_normal((4, 3, 3, 2))
    return models.LCN((8, 1), readout="global_average_pool", w_std=1.4, b_std=0.1), x, {}


@pytest.mark.parametrize("case", ["gnn-relu", "lcn-relu-gap"])
def test_feature_error_falls_like_inverse_sqrt_of_the_features(x64, case):
    """ReLU GNN (Dense, ReLU, Aggregate) and ReLU LCN with global average pooling: the relative
    Frobenius error of the NNGP and NTK features against kernel_fn, root-mean-square over 6
    keys, has fitted log-log slope in [-0.65, -0.35] over D = 64 .. 1024 (Monte Carlo's
    -1/2): no plateau, so no bias from a missing or extra term."""
    module, x, per_input = _gnn_case() if case == "gnn-relu" else _lcn_case()
    exact = ntkjax.kernel_fn(module)(x, **per_input)
    assert_feature_error_falls_like_inverse_sqrt(
        lambda d, key: feature_map(module, key=key, num_features=d)(x, **per_input), exact,
        [64, 256, 1024], 6, final_below=0.15)
