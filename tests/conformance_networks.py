"""The networks of the conformance matrix (tests/test_conformance.py): every public layer of
``ntkjax.nn`` and every model of ``ntkjax.models`` in a small network, each built at any hidden
width (the NTK parameterization: the infinite-width kernel does not depend on it), with the
inputs it takes. Imported by the test and, run as a script, by the one subprocess that evaluates
every network's ``kernel_matrix`` on 4 forced CPU devices (``python
tests/conformance_networks.py devices OUT.npz``; the caller sets ``XLA_FLAGS`` and
``JAX_ENABLE_X64``)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import numpy as np

# Layers that have no random-feature rule: feature_map raises UnsupportedMeaning for a network
# that uses one (the expected column of the matrix; compare with the generated docs table).
FEATURELESS_LAYERS = frozenset({
    "ConvTranspose", "SelfAttention", "Dropout(train)", "exp_normalized",
})
# Layers whose finite network (apply on arrays) is refused, so the empirical NTK and its
# Monte Carlo limit are too: ValueError matching the text.
FINITE_REFUSALS = {
    "Dropout(train)": "train mode",  # the Jacobian depends on the batching of the masks
    "exp_normalized": "exp_normalized",  # defined on kernels only (as in neural-tangents)
}
# Networks whose infinite-width kernel is refused (so every kernel meaning, its random features
# and the wide limit that compares with it are too), while the finite network and its
# empirical NTK are defined: ValueError matching the text.
KERNEL_REFUSALS = {
    # relu(x) . relu(x') / d is not the arc-cosine kernel of Gaussian pre-activations
    "activation on the inputs": "needs Gaussian pre-activations",
}


@dataclasses.dataclass(frozen=True)
class Net:
    """A network of the matrix: ``make(width)`` is the flax module, ``kind`` its inputs
    (``"vector"`` (N, 3), ``"image"`` (N, 4, 4, 2) or ``"sequence"`` (N, 4, 2)), ``layers`` the
    ntkjax.nn layers and activations it uses (by name)."""

    name: str
    make: Callable[[int], object]
    kind: str
    layers: tuple[str, ...]

    @property
    def train_dropout(self) -> bool:
        return "Dropout(train)" in self.layers


def inputs(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """x1 (3 examples) and x2 (2 examples) of ``kind``, float64."""
    shape = {"vector": (3,), "image": (4, 4, 2), "sequence": (4, 2)}[kind]
    rng = np.random.default_rng(11)
    return rng.standard_normal((3, *shape)), rng.standard_normal((2, *shape))


def _exp_decay(d):
    """A positional covariance exp(-d / 2) of the distance between positions."""
    return np.exp(-d / 2)


@functools.cache
def networks() -> tuple[Net, ...]:
    """Every network of the matrix (built lazily: this module imports no JAX at import time, so
    the device worker can set its flags first)."""
    import jax.numpy as jnp
    from flax import linen

    from ntkjax import models, nn

    act_args = {
        "ab_relu": dict(a=-0.3, b=1.2),
        "polynomial": dict(coef=(0.1, 1.0, 0.5)),
        "monomial": dict(degree=2),
        "rectified_monomial": dict(degree=2),
        "hermite": dict(degree=3),
        # exp(b u)'s empirical NTK fluctuates like exp(4 b^2 q) / width: at b = 1 with these
        # inputs (q up to ~4) even a 2e6-wide two-layer Monte Carlo is 12 % off the closed form
        # (measured); at b = 0.35 it is 0.08 %, and widths 16..256 see the D^-1/2 law
        "exp": dict(b=0.35),
    }

    class ActNet(linen.Module):
        """Dense -> activation -> Dense(1)."""

        width: int
        act: str

        @linen.compact
        def __call__(self, x):
            fn = (nn.elementwise(jnp.tanh) if self.act == "elementwise(tanh)"
                  else getattr(nn, self.act))
            h = fn(nn.Dense(self.width, w_std=1.2, b_std=0.2)(x), **act_args.get(self.act, {}))
            return nn.Dense(1, w_std=1.1, b_std=0.1)(h)

    class DropNet(linen.Module):
        """Dense -> relu -> Dense -> Dropout -> Dense(1)."""

        width: int
        train: bool

        @linen.compact
        def __call__(self, x):
            h = nn.Dense(self.width, w_std=1.4, b_std=0.1)(nn.relu(nn.Dense(self.width)(x)))
            h = nn.Dropout(0.3, deterministic=not self.train)(h)
            return nn.Dense(1)(h)

    class NormNet(linen.Module):
        """Dense -> LayerNorm -> erf -> Dense(1)."""

        width: int

        @linen.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.erf(nn.LayerNorm()(nn.Dense(self.width, b_std=0.3)(x))))

    class Branches(linen.Module):
        """[relu(Dense), erf(Dense)] joined by concatenate or multiply -> Dense(1)."""

        width: int
        join: str

        @linen.compact
        def __call__(self, x):
            a = nn.relu(nn.Dense(self.width, w_std=1.3, b_std=0.1)(x))
            b = nn.erf(nn.Dense(self.width, w_std=0.9, b_std=0.2)(x))
            h = nn.concatenate([a, b]) if self.join == "concatenate" else nn.multiply(a, b)
            return nn.Dense(1)(h)

    class Residual(linen.Module):
        """Dense -> x + Dense(relu(x)) -> relu -> Dense(1) (a residual sum, scaled)."""

        width: int

        @linen.compact
        def __call__(self, x):
            x = nn.Dense(self.width, b_std=0.1)(x)
            x = (x + nn.Dense(self.width, w_std=1.4)(nn.relu(x))) / 2**0.5
            return nn.Dense(1)(nn.relu(x))

    class TransposeNet(linen.Module):
        """ConvTranspose (stride 2) -> relu -> Conv -> erf -> flatten -> Dense(1)."""

        width: int

        @linen.compact
        def __call__(self, x):
            h = nn.relu(nn.ConvTranspose(self.width, kernel_size=2, strides=2, b_std=0.1)(x))
            h = nn.erf(nn.Conv(self.width, kernel_size=3, padding="VALID")(h))
            return nn.Dense(1)(nn.flatten(h))

    class ImageNorm(linen.Module):
        """Conv -> LayerNorm over positions and channels -> relu -> Dropout(eval) ->
        global_average_pool -> Dense(1)."""

        width: int

        @linen.compact
        def __call__(self, x):
            h = nn.Conv(self.width, kernel_size=3, padding="CIRCULAR", b_std=0.2)(x)
            h = nn.relu(nn.LayerNorm(axis=(1, 2, 3))(h))
            h = nn.Dropout(0.5, deterministic=True)(h)
            return nn.Dense(1)(nn.global_average_pool(h))

    class Attention(linen.Module):
        """Dense -> SelfAttention -> relu -> global_average_pool -> Dense(1)."""

        width: int
        mechanism: str = "softmax"
        linear_scaling: bool = True
        positions: bool = False  # causal, with concatenated positional embeddings

        @linen.compact
        def __call__(self, x):
            h = nn.Dense(self.width, b_std=0.1)(x)
            extra = {} if not self.positions else dict(
                pos_emb_type="concat", pos_emb_decay_fn=_exp_decay, val_pos_emb=True,
                causal=True)
            h = nn.SelfAttention(self.width, self.width, self.width,
                                 num_heads=max(1, self.width // 8),
                                 linear_scaling=self.linear_scaling,
                                 attention_mechanism=self.mechanism, w_value_std=1.2,
                                 b_std=0.1, **extra)(h)
            return nn.Dense(1)(nn.global_average_pool(nn.relu(h)))

    class PostLN(linen.Module):
        """A post-LN transformer block: LayerNorm(x + SelfAttention(x)), then
        LayerNorm(x + Dense(relu(Dense(x)))), global_average_pool, Dense(1)."""

        width: int

        @linen.compact
        def __call__(self, x):
            x = nn.Dense(self.width, b_std=0.1)(x)
            h = nn.SelfAttention(self.width, self.width, self.width,
                                 num_heads=max(1, self.width // 8))(x)
            x = nn.LayerNorm()(x + h)
            h = nn.Dense(self.width)(nn.relu(nn.Dense(self.width, w_std=1.4)(x)))
            x = nn.LayerNorm()(x + h)
            return nn.Dense(1)(nn.global_average_pool(x))

    class InputAct(linen.Module):
        """relu on the raw inputs -> Dense -> erf -> Dense(1)."""

        width: int

        @linen.compact
        def __call__(self, x):
            h = nn.Dense(self.width, w_std=1.2, b_std=0.2)(nn.relu(x))
            return nn.Dense(1)(nn.erf(h))

    class SequenceConv(linen.Module):
        """1-D Conv -> gelu -> avg_pool (SAME, stride 1) -> global_sum_pool -> Dense(1) on
        sequences."""

        width: int

        @linen.compact
        def __call__(self, x):
            h = nn.gelu(nn.Conv(self.width, kernel_size=3, b_std=0.1)(x))
            h = nn.avg_pool(h, (2,), strides=(1,), padding="SAME")
            return nn.Dense(1)(nn.global_sum_pool(h))

    activations = ["relu", "leaky_relu", "ab_relu", "abs", "erf", "gelu", "sin", "cos", "rbf",
                   "sign", "identity", "exp", "gaussian", "exp_normalized", "polynomial",
                   "monomial", "rectified_monomial", "hermite", "sigmoid_like", "gabor",
                   "elementwise(tanh)"]
    nets = [
        Net(f"act_{a}", functools.partial(ActNet, act=a), "vector", ("Dense", a))
        for a in activations
    ]
    cnn = functools.partial(models.CNN, kernel_size=2, w_std=1.4, b_std=0.1)
    nets += [
        Net("models.MLP", lambda w: models.MLP((w, w, 1), "relu", w_std=1.4, b_std=0.1),
            "vector", ("Dense", "relu")),
        Net("residual", Residual, "vector", ("Dense", "relu", "residual")),
        Net("concatenate", functools.partial(Branches, join="concatenate"), "vector",
            ("Dense", "relu", "erf", "concatenate")),
        Net("multiply", functools.partial(Branches, join="multiply"), "vector",
            ("Dense", "relu", "erf", "multiply")),
        Net("LayerNorm", NormNet, "vector", ("Dense", "LayerNorm", "erf")),
        Net("Dropout(eval)", functools.partial(DropNet, train=False), "vector",
            ("Dense", "relu", "Dropout(eval)")),
        Net("Dropout(train)", functools.partial(DropNet, train=True), "vector",
            ("Dense", "relu", "Dropout(train)")),
        Net("models.CNN(flatten)", lambda w: cnn((w, w, 1)), "image",
            ("Conv", "relu", "flatten", "Dense")),
        Net("models.CNN(avg,flatten)", lambda w: cnn((w, w, 1), pooling="avg"), "image",
            ("Conv", "relu", "avg_pool", "flatten", "Dense")),
        Net("models.CNN(sum,gap)",
            lambda w: cnn((w, w, 1), pooling="sum", readout="global_average_pool",
                          padding="CIRCULAR"),
            "image", ("Conv", "relu", "sum_pool", "global_average_pool", "Dense")),
        Net("models.CNN(global_sum_pool)",
            lambda w: cnn((w, 1), readout="global_sum_pool", activation="erf"), "image",
            ("Conv", "erf", "global_sum_pool", "Dense")),
        Net("ConvTranspose", TransposeNet, "image",
            ("ConvTranspose", "relu", "Conv", "erf", "flatten", "Dense")),
        Net("models.LCN(gap)",
            lambda w: models.LCN((w, w, 1), readout="global_average_pool", w_std=1.4,
                                 b_std=0.1), "image",
            ("ConvLocal", "relu", "global_average_pool", "Dense")),
        Net("image LayerNorm", ImageNorm, "image",
            ("Conv", "LayerNorm", "relu", "Dropout(eval)", "global_average_pool", "Dense")),
        Net("models.Myrtle", lambda w: models.Myrtle(5, channels=w, num_outputs=1), "image",
            ("Conv", "relu", "avg_pool", "flatten", "Dense")),
        Net("SelfAttention", Attention, "sequence",
            ("Dense", "SelfAttention", "relu", "global_average_pool")),
        Net("SelfAttention(positions, causal)", functools.partial(Attention, positions=True),
            "sequence", ("Dense", "SelfAttention", "relu", "global_average_pool")),
        Net("SelfAttention(identity)",
            functools.partial(Attention, mechanism="identity", linear_scaling=False),
            "sequence", ("Dense", "SelfAttention", "relu", "global_average_pool")),
        Net("post-LN transformer", PostLN, "sequence",
            ("Dense", "SelfAttention", "LayerNorm", "relu", "residual", "global_average_pool")),
        Net("models.Transformer",
            lambda w: models.Transformer(w, depth=1, num_heads=max(1, w // 8), b_std=0.1),
            "sequence", ("Dense", "SelfAttention", "LayerNorm", "relu", "residual",
                         "global_average_pool")),
        Net("sequence Conv", SequenceConv, "sequence",
            ("Conv", "gelu", "avg_pool", "global_sum_pool", "Dense")),
        Net("relu on the inputs", InputAct, "vector",
            ("activation on the inputs", "relu", "Dense", "erf")),
    ]
    return tuple(nets)


# A network's random-feature cell (tests/test_conformance.py): its two feature counts D, as far
# apart as a key's cost allows (the fitted slope's scatter over keys falls like
# 1 / log(D_hi / D_lo)), and its number of keys (the scatter falls like 1 / sqrt(keys)).
# D_lo = 64: below it the O(1/D^2) terms of composed sketches steepen the slope. Measured on 32
# keys (notes of session 9, slopes21): the relative error of one key scatters by a factor
# e^0.4 .. e^0.5, e^0.7 for hermite and exp (one input's variance, 46 and 2.4, dominates the
# Frobenius norm), so a slope over 64 .. 4096 from 32 keys scatters by 0.02 .. 0.04.
# * one random layer on exact features, vector inputs: 64 and 4096 (a key costs at most
#   0.1 CPU-s at 4096);
# * two ReLU layers (their m x m Gaussian: 0.5 CPU-s a key at 4096): 64 and 2048, 48 keys;
# * image and sequence inputs (per-position features; Myrtle: 0.7 CPU-s a key at 1024):
#   64 and 1024; 64 keys for the ReLU image networks but Myrtle (its cost).
# Measured with these sizes and keys (slopes NNGP / NTK; margin: distance to the nearer end of
# [-0.65, -0.35] in standard deviations of the slope over key sets, bootstrap): the activation
# networks -0.47 .. -0.55, margins 3.6 .. 10; MLP, residual, branches, LayerNorm, Dropout
# -0.45 .. -0.56, margins 3.5 .. 9; image and sequence networks -0.47 .. -0.54, margins 3.1 ..
# 7, except three: CNN(avg, flatten)'s NNGP -0.58 (margin 2.0: its error at D = 64 sits above
# the D^-1/2 line, -0.45 over 128 .. 2048), CNN(sum, gap) -0.54 (2.5) and Myrtle -0.53 (1.8,
# 32 keys; 0.7 of log-error scatter per key).
FEATURE_CELLS: dict[str, tuple[tuple[int, int], int]] = {
    "act_hermite": ((64, 4096), 96),
    "act_exp": ((64, 4096), 64),
    "models.MLP": ((64, 2048), 48),
    "residual": ((64, 2048), 48),
    "models.CNN(flatten)": ((64, 1024), 64),
    "models.CNN(avg,flatten)": ((64, 1024), 64),
    "models.CNN(sum,gap)": ((64, 1024), 64),
    "models.LCN(gap)": ((64, 1024), 64),
    "image LayerNorm": ((64, 1024), 64),
}


def feature_cell(net: Net) -> tuple[tuple[int, int], int]:
    """The two feature counts and the number of keys of ``net``'s random-feature cell."""
    if net.name in FEATURE_CELLS:
        return FEATURE_CELLS[net.name]
    return ((64, 4096) if net.kind == "vector" else (64, 1024)), 32


def by_name(name: str) -> Net:
    return next(n for n in networks() if n.name == name)


def _device_kernels(out: str) -> None:
    """``kernel_matrix(module, x1, x2)`` in blocks of 2 rows over 4 devices for every network;
    a refusal is recorded as its message."""
    import jax

    import ntkjax

    assert jax.config.jax_enable_x64 and len(jax.devices()) == 4, jax.devices()
    arrays: dict[str, np.ndarray] = {}
    for i, net in enumerate(networks()):
        x1, x2 = inputs(net.kind)
        try:
            k = ntkjax.kernel_matrix(net.make(8), x1, x2, block_size=2)
            arrays[f"{i}/nngp"] = np.asarray(k.nngp)
            arrays[f"{i}/ntk"] = np.asarray(k.ntk)
        except Exception as err:  # recorded; the test names it
            arrays[f"{i}/error"] = np.asarray(f"{type(err).__name__}: {err}")
    np.savez(out, **arrays)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] != "devices":
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
    _device_kernels(sys.argv[2])
