"""Small flax linen models shared by the empirical-NTK tests (MLP, CNN, ResNet, LayerNorm,
Embed), and a brute-force float64 NTK: the explicit full Jacobian, flattened with ravel_pytree."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

CASES = ("mlp", "cnn", "resnet", "layernorm", "embed")


class MLP(nn.Module):
    widths: tuple = (16, 16)
    out: int = 3

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.out)(x)


class CNN(nn.Module):
    out: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        x = nn.tanh(nn.Conv(3, (2, 2), strides=(2, 2), padding="VALID")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.out)(x)


class ResNet(nn.Module):
    width: int = 8
    out: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width)(x)
        for _ in range(2):
            h = nn.Dense(self.width)(nn.gelu(x))
            x = x + nn.Dense(self.width, use_bias=False)(nn.tanh(h))
        return nn.DenseGeneral(self.out)(x)


class LayerNormNet(nn.Module):
    out: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(12)(x)
        x = nn.LayerNorm()(x)
        x = nn.relu(x)
        return nn.Dense(self.out)(x)


class EmbedNet(nn.Module):
    vocab: int = 7
    out: int = 2

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, 5)(tokens)  # (N, T, 5)
        h = nn.tanh(nn.Dense(6)(h))
        h = h.mean(axis=1)
        return nn.Dense(self.out)(h)


def make_case(name: str, dtype=jnp.float32, n1: int = 5, n2: int = 4):
    """(apply_fn, variables, x1, x2) for a named model, in ``dtype``."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(CASES.index(name)), 3)
    if name == "mlp":
        model, shape = MLP(), (6,)
    elif name == "cnn":
        model, shape = CNN(), (6, 6, 2)
    elif name == "resnet":
        model, shape = ResNet(), (5,)
    elif name == "layernorm":
        model, shape = LayerNormNet(), (4,)
    elif name == "embed":
        model = EmbedNet()
        x1 = jax.random.randint(k1, (n1, 3), 0, model.vocab, jnp.int32)
        x2 = jax.random.randint(k2, (n2, 3), 0, model.vocab, jnp.int32)
        x2 = x2.at[0].set(x1[0])  # shared tokens exercise the embedding term
        params = model.init(k3, x1)
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        return model.apply, params, x1, x2
    else:
        raise KeyError(name)
    # drawn in float32 and cast, so the float32 and float64 cases are the same numbers
    x1 = jax.random.normal(k1, (n1, *shape), jnp.float32).astype(dtype)
    x2 = jax.random.normal(k2, (n2, *shape), jnp.float32).astype(dtype)
    params = model.init(k3, x1.astype(jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return model.apply, params, x1, x2




def brute_force_ntk(apply_fn, variables, x1, x2):
    """(N1, N2, O, O) NTK in float64 from the explicit Jacobian of the flattened params (of
    each batch as a whole: right for batch-coupled functions too). The Jacobian is one jitted
    program per input shape: evaluated op by op, each of its many operations would be compiled
    apart (about 2.5x the CPU time)."""
    same = x2 is x1
    with jax.enable_x64(True):
        to64 = lambda a: (
            np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
            else np.asarray(a)
        )
        variables = jax.tree_util.tree_map(to64, variables)
        x1, x2 = to64(x1), to64(x2)
        flat, unravel = ravel_pytree(variables["params"])
        rest = {k: v for k, v in variables.items() if k != "params"}

        def f(theta, rest, x):
            out = apply_fn({**rest, "params": unravel(theta)}, x)
            return out.reshape(out.shape[0], -1)

        jacobian = jax.jit(jax.jacfwd(f))
        j1 = np.asarray(jacobian(flat, rest, x1))  # (N1, O, P)
        j2 = j1 if same else np.asarray(jacobian(flat, rest, x2))
        return np.einsum("aip,bjp->abij", j1, j2)


@functools.cache
def case_truth(name: str) -> np.ndarray:
    """Brute-force float64 (N1, N2, O, O) NTK of ``make_case(name)`` (same for both dtypes)."""
    apply_fn, params, x1, x2 = make_case(name)
    return brute_force_ntk(apply_fn, params, x1, x2)


def reduce_full(full: np.ndarray, outputs: str) -> np.ndarray:
    if outputs == "full":
        return full
    diag = np.diagonal(full, axis1=2, axis2=3)
    return diag if outputs == "diagonal" else diag.sum(-1)
