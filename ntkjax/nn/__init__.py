"""Flax layers and activations with both a finite-network and an infinite-width meaning.

Every layer and activation here works on arrays (the finite network) and on a
:class:`ntkjax.Kernel` (its infinite-width limit), so one ``flax.linen`` module that calls them --
:class:`ntkjax.models.MLP` or your own ``nn.compact`` module, residual sums included -- gives
``module.init`` / ``module.apply`` for the network and :func:`ntkjax.kernel_fn` for its NNGP and
NTK. On a Kernel a layer creates no parameters.

One module per kind of layer, each holding the layers and their infinite-width rules:

* :mod:`ntkjax.nn.dense`: :class:`Dense`;
* :mod:`ntkjax.nn.conv`: :class:`Conv` and :class:`ConvTranspose` (1-D, 2-D, N-D on
  (N, *spatial, C));
* :mod:`ntkjax.nn.pooling`: the readouts :func:`flatten`, :func:`global_average_pool` and
  :func:`global_sum_pool`, and the windowed poolings :func:`avg_pool` and :func:`sum_pool`;
* :mod:`ntkjax.nn.normalization`: :class:`LayerNorm` (parameter-free);
* :mod:`ntkjax.nn.dropout`: :class:`Dropout`;
* :mod:`ntkjax.nn.attention`: :class:`SelfAttention` (multi-head, Hron et al. 2020);
* :mod:`ntkjax.nn.branches`: :func:`concatenate` and :func:`multiply` of independent branches;
* :mod:`ntkjax.nn.activations`: :class:`Activation` and the activations :data:`relu`,
  :data:`leaky_relu`, :data:`ab_relu`, :data:`abs`, :data:`erf`, :data:`gelu`, :data:`sin`,
  :data:`cos`, :data:`rbf`, :data:`sign`, :data:`identity`, :data:`exp`, :data:`gaussian`,
  :data:`exp_normalized`, :data:`polynomial`, :data:`monomial`, :data:`rectified_monomial`,
  :data:`hermite`, :data:`sigmoid_like`, :data:`gabor` (all with closed-form kernels), and
  :func:`elementwise` for any other elementwise function (kernel by Gauss-Hermite quadrature);
* :mod:`ntkjax.nn.structural`: :func:`index` (slicing), :func:`image_resize`,
  :func:`scale` (product with a constant), :func:`dot_general` (``lax.dot_general`` with a
  constant) and :func:`elementwise_nngp`, an elementwise layer with a user-given NNGP map;
* :mod:`ntkjax.nn.graphs`: :class:`Aggregate` (message passing along a per-example graph) and
  :func:`~ntkjax.nn.graphs.edge_list_to_dense`; :mod:`ntkjax.nn.conv` also holds
  :class:`ConvLocal` (locally connected).

The layer protocol (:mod:`ntkjax._meanings`): each layer dispatches on its input's type -- an
array, a Kernel, or feature_map's :class:`FeatureStandIn` -- and states every meaning it
supports in one declaration beside its finite code (:func:`declare`, :func:`declaration_of`);
a meaning without a rule raises :class:`UnsupportedMeaning`. Your own layers use the same
recipe (docs/development.md, "Adding an activation or a layer").
"""

from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declaration_of, declare
from ntkjax.nn.activations import (
    Activation,
    ab_relu,
    abs,
    cos,
    elementwise,
    erf,
    exp,
    exp_normalized,
    gabor,
    gaussian,
    gelu,
    hermite,
    identity,
    is_activation,
    leaky_relu,
    monomial,
    polynomial,
    rbf,
    rectified_monomial,
    relu,
    sigmoid_like,
    sign,
    sin,
)
from ntkjax.nn.attention import SelfAttention
from ntkjax.nn.branches import concatenate, multiply
from ntkjax.nn.conv import Conv, ConvLocal, ConvTranspose, window_mask
from ntkjax.nn.dense import Dense
from ntkjax.nn.dropout import Dropout
from ntkjax.nn.graphs import Aggregate
from ntkjax.nn.normalization import LayerNorm
from ntkjax.nn.pooling import avg_pool, flatten, global_average_pool, global_sum_pool, sum_pool
from ntkjax.nn.structural import dot_general, elementwise_nngp, image_resize, index, scale

__all__ = [
    "Activation",
    "Aggregate",
    "Conv",
    "ConvLocal",
    "ConvTranspose",
    "Dense",
    "Dropout",
    "FeatureStandIn",
    "LayerNorm",
    "SelfAttention",
    "UnsupportedMeaning",
    "ab_relu",
    "abs",
    "avg_pool",
    "concatenate",
    "cos",
    "declaration_of",
    "declare",
    "dot_general",
    "elementwise",
    "elementwise_nngp",
    "erf",
    "exp",
    "exp_normalized",
    "flatten",
    "gabor",
    "gaussian",
    "gelu",
    "global_average_pool",
    "global_sum_pool",
    "hermite",
    "identity",
    "image_resize",
    "index",
    "is_activation",
    "leaky_relu",
    "monomial",
    "multiply",
    "polynomial",
    "rbf",
    "rectified_monomial",
    "relu",
    "scale",
    "sigmoid_like",
    "sign",
    "sin",
    "sum_pool",
    "window_mask",
]
