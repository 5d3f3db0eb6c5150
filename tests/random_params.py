"""Random inputs and NTK-parameterization parameters from numpy's generator: tests that need a
few random arrays avoid compiling JAX's PRNG (about a second per new shape on the CPU)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def normal(shape: tuple[int, ...], seed: int = 0, dtype: Any = jnp.float64) -> jax.Array:
    """Standard normal array of ``shape`` (float64 needs the x64 fixture)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def ntk_params(module: Any, x: Any, seed: int = 0) -> Any:
    """Variables of ``module`` with every parameter N(0, 1) -- the NTK parameterization's
    initialization of ntkjax.nn layers -- in the dtype ``module.init`` would use."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes
    )


def ntk_param_sampler(module: Any, x: Any):
    """``key -> variables`` with every parameter N(0, 1), for use inside ``jit`` / ``vmap``."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)

    def sample(key: jax.Array) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(shapes)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            tree, [jax.random.normal(k, s.shape, s.dtype)
                   for k, s in zip(keys, leaves, strict=True)]
        )

    return sample
