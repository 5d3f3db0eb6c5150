"""XLA compiler options that ntkjax passes to single programs.

Every option here is given per program, through ``jax.jit(fn, compiler_options=...)``: nothing
global (``XLA_FLAGS``, ``jax.config``) is changed, and a program that is inlined into a caller's
``jit`` is compiled with the caller's options instead.

* :data:`FAST_COMPILE` -- for small programs that run once (the demo): XLA's backend
  optimisations cost more compile time than they save.
* :func:`cpu_convolution_options` -- for kernels of convolutional networks on a multi-core CPU:
  convolutions on XLA's multi-threaded Eigen kernels instead of single-threaded YNNPACK ones.
* :func:`jit_with_options` -- ``jax.jit`` with options that also works inside another ``jit``,
  ``grad`` or ``vmap`` (where JAX refuses options on the nested call).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntkjax._checks import is_concrete

__all__ = ["FAST_COMPILE", "cpu_convolution_options", "jit_with_options"]

FAST_COMPILE: dict[str, Any] = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}

# XLA's CPU backend hands matmuls and convolutions to YNNPACK ("ynn fusions" of the types
# INDIVIDUAL_DOT and INDIVIDUAL_CONVOLUTION). Listing only INDIVIDUAL_DOT leaves matmuls there and
# sends convolutions back to XLA's own Eigen kernels.
_YNN_MATMULS_ONLY: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _accepted(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib compiles a program with these options (experimental options come
    and go between XLA versions)."""
    try:
        jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(
            jnp.zeros((), jnp.float32)
        ).compile()
    except Exception:  # any rejection means: do not use the options
        return False
    return True


def cpu_convolution_options() -> dict[str, Any] | None:
    """Compiler options for programs with convolutions, or None where they do not help.

    With JAX 0.10 on the CPU, YNNPACK runs a convolution on one thread while XLA's Eigen kernels
    use every core. Measured on the 2-core development machine (float32, 3x3 SAME, 64 -> 64
    channels, 320 images of 16 x 16): 0.060 s on YNNPACK, 0.036 s on Eigen; on one core Eigen is
    slower (0.081 s). Matmuls stay on YNNPACK, so programs without convolutions are unchanged.

    Returns:
      The options when the default backend is the CPU, the process may use at least two cores
      and this jaxlib accepts the option; None (plain compilation) otherwise.
    """
    if jax.default_backend() != "cpu" or _usable_cores() < 2:
        return None
    if not _accepted(tuple(_YNN_MATMULS_ONLY.items())):
        return None
    return dict(_YNN_MATMULS_ONLY)


def jit_with_options(fn: Callable, compiler_options: dict[str, Any] | None) -> Any:
    """``jax.jit(fn, compiler_options=compiler_options)`` for top-level calls, and plain
    ``jax.jit(fn)`` when any argument is a tracer (a call inside another ``jit``, ``grad``,
    ``vmap`` or ``scan``: the caller's program is compiled with the caller's options, and JAX
    rejects options on a nested ``jit``). With ``compiler_options=None`` this is ``jax.jit(fn)``.

    The result keeps ``__wrapped__`` (the pure ``fn``), ``trace`` and ``lower`` (of the
    top-level program).
    """
    plain = jax.jit(fn)
    if not compiler_options:
        return plain
    tuned = jax.jit(fn, compiler_options=compiler_options)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        if not all(is_concrete(leaf) for leaf in leaves):
            return plain(*args, **kwargs)
        return tuned(*args, **kwargs)

    call.lower = tuned.lower  # type: ignore[attr-defined]
    call.trace = tuned.trace  # type: ignore[attr-defined]
    return call
