"""Collectives over the processes of a ``jax.distributed`` runtime: the few that ntkjax's
execution layer uses (a barrier, a minimum, an all-gather and a sum of partial results).

Every function here is a no-op (or the identity) with one process, so callers need no
``jax.process_count()`` test of their own. All of them must be called by every process, in the
same order: they are collective.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["all_gather", "barrier", "minimum_over_processes", "sum_over_processes"]


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_gather(value: np.ndarray) -> np.ndarray:
    """Every process's ``value`` (same shape and dtype everywhere), stacked along a new axis 0
    in process order; ``value[None]`` with one process."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.ascontiguousarray(value)))


def minimum_over_processes(value: int) -> int:
    """The smallest of every process's ``value`` (``value`` itself with one process)."""
    return int(np.min(all_gather(np.asarray(value, np.int32))))


def sum_over_processes(local: np.ndarray, max_bytes: int = 2**26) -> np.ndarray:
    """The sum over processes of each process's ``local`` array, in place, in row strips.

    Used to assemble a result that every process filled in part (zeros elsewhere): adding
    zeros is exact, so the result equals the parts. Strips hold at most ``max_bytes`` per
    process, so the gather needs ``num_processes * max_bytes`` of extra memory.
    """
    if jax.process_count() == 1:
        return local
    row_bytes = max(1, local[:1].nbytes)
    rows = max(1, min(local.shape[0], max_bytes // row_bytes))
    for start in range(0, local.shape[0], rows):
        parts = all_gather(local[start:start + rows])
        local[start:start + rows] = np.sum(parts, axis=0, dtype=local.dtype)
    return local
