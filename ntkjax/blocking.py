"""Memory-bounded evaluation of pairwise kernels in blocks.

Any function ``block_fn(x1_block, x2_block)`` that returns a pytree of arrays whose two leading
axes are ``(len(x1_block), len(x2_block))`` -- an analytic ``kernel_fn``, an empirical NTK with
its parameters bound -- is evaluated here over the full ``(N1, N2)`` grid in blocks, so that the
result can be far larger than what one compiled call may hold.

* Block size: given, or the largest power-of-two tile (at most ``max_block_size``) whose compiled
  footprint -- arguments + outputs + XLA temporaries, read from
  ``jax.jit(block_fn).lower(...).compile().memory_analysis()`` -- fits the memory budget.
* Budget: given in bytes, or half of what is free (device memory on an accelerator, available RAM
  on the CPU) after the result itself is allocated.
* One compilation: edge blocks are padded to the full tile and the padding is cut off.
* Symmetry: with ``x2=None`` the kernel is taken as symmetric, K(x, x')_{ab} = K(x', x)_{ba};
  only blocks (i, j) with i <= j are computed and the others are filled by transposing axes 0 and
  1 and reversing the trailing (output) axes, which swaps (O, O) output blocks.
* The result lives in host numpy arrays allocated once, so nothing is ever concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ntkjax._checks import check_pair
from ntkjax._progress import progress as _progress
from ntkjax.compile_options import cpu_convolution_options, jit_with_options

__all__ = ["available_memory_bytes", "evaluate_in_blocks"]

_MIN_BLOCK = 8


def available_memory_bytes(device: Any = None) -> int:
    """Free memory, in bytes, on ``device`` (default: the first JAX device).

    Accelerators report ``bytes_limit - bytes_in_use`` from ``Device.memory_stats()``; the CPU
    reports ``MemAvailable`` from ``/proc/meminfo`` (or a conservative 4 GiB where that is absent).

    Args:
      device: a JAX device; None for ``jax.devices()[0]``.

    Returns:
      The free memory in bytes.

    >>> available_memory_bytes() > 0
    True
    """
    device = jax.devices()[0] if device is None else device
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30 if os.name != "nt" else 2 * 2**30


def _mirror(block: np.ndarray) -> np.ndarray:
    """K(x', x) from K(x, x'): swap the two batch axes and reverse the trailing output axes."""
    trailing = tuple(range(block.ndim - 1, 1, -1))
    return np.transpose(block, (1, 0, *trailing))


def _pad_rows(x: np.ndarray | jax.Array, size: int):
    n = x.shape[0]
    if n == size:
        return x
    pad = [(0, size - n)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, mode="edge")


def _footprint(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    )


def evaluate_in_blocks(
    block_fn: Callable[..., Any],
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    fn_args: tuple = (),
    block_size: int | None = None,
    memory_bytes: int | None = None,
    max_block_size: int = 4096,
    show_progress: bool = False,
    description: str = "kernel blocks",
) -> Any:
    """Evaluates ``block_fn`` over all pairs of ``x1`` and ``x2`` rows, block by block.

    Args:
      block_fn: ``(x1_block, x2_block, *fn_args) -> pytree`` of arrays with leading shape
        ``(n1, n2)``. It is jitted here; pass parameters through ``fn_args`` (traced
        arguments) rather than closing over them, which would bake them in as constants.
      x1: array of shape ``(N1, ...)``.
      x2: array of shape ``(N2, ...)`` with the same per-example shape, or None for x2 = x1, in
        which case the result is assumed symmetric and only one triangle of blocks is computed.
      fn_args: extra arguments (pytrees of arrays, e.g. network parameters) passed to every call.
      block_size: rows of x1 (and x2) per block; chosen from ``memory_bytes`` when None.
      memory_bytes: budget for one compiled block call (arguments, outputs and temporaries);
        half of the free device memory, after the result is allocated, when None.
      max_block_size: the largest tile tried when choosing the block size.
      show_progress: draw a progress bar on stderr.
      description: label of the progress bar.

    Returns:
      The pytree ``block_fn`` returns, with numpy leaves of leading shape ``(N1, N2)``.

    Raises:
      ValueError: when inputs lack a batch axis or disagree in per-example shape, or when even
        the smallest block does not fit ``memory_bytes``.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(5.0)[:, None]
    >>> gram = evaluate_in_blocks(lambda a, b: a @ b.T, x, block_size=2)  # 3 x 3 blocks
    >>> gram.shape, float(gram[4, 3])
    ((5, 5), 12.0)
    """
    check_pair(x1, x2, min_ndim=1)
    symmetric = x2 is None
    x1 = jnp.asarray(x1)
    x2 = x1 if symmetric else jnp.asarray(x2)
    n1, n2 = x1.shape[0], x2.shape[0]
    jitted = jit_with_options(block_fn, cpu_convolution_options())

    def spec(x, b):
        return jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype)

    full_shapes = jax.eval_shape(block_fn, spec(x1, n1), spec(x2, n2), *fn_args)
    result_bytes = sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(full_shapes)
    )

    if block_size is None:
        if memory_bytes is None:
            # On the CPU the result shares RAM with the blocks; on a device it lives on the host.
            free = available_memory_bytes()
            if jax.devices()[0].platform == "cpu":
                free -= result_bytes
            memory_bytes = max(free // 2, 0)
        block_size, compiled = _choose_block(
            jitted, x1, x2, fn_args, memory_bytes, max_block_size, spec
        )
    else:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}.")
        b1, b2 = min(block_size, n1), min(block_size, n2)
        compiled = jitted.lower(spec(x1, b1), spec(x2, b2), *fn_args).compile()
    b1, b2 = min(block_size, n1), min(block_size, n2)

    out_leaves, treedef = jax.tree_util.tree_flatten(full_shapes)
    results = [np.empty(leaf.shape, dtype=leaf.dtype) for leaf in out_leaves]

    starts1 = range(0, n1, b1)
    starts2 = range(0, n2, b2)
    pairs = [(i, j) for i in starts1 for j in starts2 if not symmetric or j >= i]
    for i, j in _progress(pairs, description=description, enabled=show_progress):
        m1, m2 = min(b1, n1 - i), min(b2, n2 - j)
        block = compiled(
            _pad_rows(x1[i : i + m1], b1), _pad_rows(x2[j : j + m2], b2), *fn_args
        )
        for res, leaf in zip(results, jax.tree_util.tree_leaves(block), strict=True):
            tile = np.asarray(leaf)[:m1, :m2]
            res[i : i + m1, j : j + m2] = tile
            if symmetric and j > i:
                res[j : j + m2, i : i + m1] = _mirror(tile)
    return jax.tree_util.tree_unflatten(treedef, results)


def _format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _choose_block(jitted, x1, x2, fn_args, memory_bytes, max_block_size, spec):
    """Largest power-of-two block whose compiled footprint fits ``memory_bytes``."""
    n_max = max(x1.shape[0], x2.shape[0])
    size = min(max_block_size, n_max)
    while True:
        b1, b2 = min(size, x1.shape[0]), min(size, x2.shape[0])
        compiled = jitted.lower(spec(x1, b1), spec(x2, b2), *fn_args).compile()
        footprint = _footprint(compiled)
        if footprint is None or footprint <= memory_bytes:
            return size, compiled
        if size <= _MIN_BLOCK:
            raise ValueError(
                f"even a {b1} x {b2} block needs {_format_bytes(footprint)}, more than the "
                f"memory budget of {_format_bytes(memory_bytes)}; raise memory_bytes or free "
                "memory."
            )
        size = max(_MIN_BLOCK, size // 2)
