"""Row tiling for block evaluation: padding a batch to a whole number of equal blocks, so that
every block has one shape and one compilation, and the padding is cut off afterwards.

Padding repeats the last row (``mode="edge"``: the padded rows are valid inputs, so a kernel
evaluated on them stays finite) or appends zeros (``mode="zeros"``: for coefficient vectors,
whose padded rows must contribute nothing to a product).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pad_axis", "pad_rows", "padded_row_indices", "tile_rows"]

PadMode = Literal["edge", "zeros"]


def pad_rows(x: Any, size: int, *, mode: PadMode = "edge") -> Any:
    """``x`` padded along axis 0 to ``size`` rows (``x`` itself when it has ``size`` rows).

    A numpy array stays a numpy array (padded on the host); anything else is padded with
    ``jnp.pad`` (on its device, traceable).
    """
    return pad_axis(x, size, axis=0, mode=mode)


def pad_axis(x: Any, size: int, *, axis: int, mode: PadMode = "edge") -> Any:
    """``x`` padded along ``axis`` to ``size`` entries (``x`` itself when it has ``size``), as
    :func:`pad_rows` pads rows (e.g. a chunk of columns zero-padded to the chunk width)."""
    axis = axis % x.ndim
    n = x.shape[axis]
    if n == size:
        return x
    if n > size:
        raise ValueError(f"cannot pad {n} entries of axis {axis} to {size}: more than the "
                         "block holds.")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    how = "edge" if mode == "edge" else "constant"
    if isinstance(x, np.ndarray):
        return np.pad(x, widths, mode=how)
    return jnp.pad(x, widths, mode=how)


def tile_rows(x: Any, block: int, *, mode: PadMode = "edge") -> jax.Array:
    """``x`` padded along axis 0 to a multiple of ``block`` and reshaped to
    ``(tiles, block, ...)``."""
    tiles = -(-x.shape[0] // block)
    return jnp.asarray(pad_rows(x, tiles * block, mode=mode)).reshape(
        tiles, block, *x.shape[1:])


def padded_row_indices(start: int, count: int, block: int) -> np.ndarray:
    """Row indices ``start .. start + count - 1`` padded to ``block`` entries by repeating the
    last one (the index form of ``pad_rows(x[start:start + count], block)``)."""
    rows = np.arange(start, start + count)
    if count < block:
        rows = np.concatenate([rows, np.full(block - count, start + count - 1)])
    return rows


def compiled_footprint(compiled: Any) -> int | None:
    """Bytes a compiled program holds while it runs: its arguments, outputs and temporaries
    (XLA's memory analysis); None where the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    )
