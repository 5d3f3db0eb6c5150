"""Device placement of the execution layer: the list of devices a call uses (checked, and the
same in every process), and which work items this process computes on which of its devices.

Work item ``k`` (a block, a row block, a chunk of tile pairs) belongs to
``devices[k % len(devices)]``; each process computes the items of its own (local) devices.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._collectives import all_gather, sum_over_processes

__all__ = ["Placement", "check_same_devices", "resolve_devices"]


def resolve_devices(devices: Sequence[Any] | None) -> list[Any]:
    """``devices`` as a list, checked: not empty, ``jax.Device`` objects, no repeats; None
    gives ``jax.devices()`` (every device of every process)."""
    if devices is None:
        return list(jax.devices())
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device, or None for all.")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise TypeError(f"devices must hold jax.Device objects, got {type(d).__name__}.")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device more than once: {devices}.")
    return devices


def check_same_devices(devices: Sequence[Any]) -> None:
    """Raises ValueError (in every process alike) unless all processes pass the same devices."""
    if jax.process_count() == 1:
        return
    ids = ",".join(str(d.id) for d in devices)
    code = np.asarray(zlib.crc32(ids.encode()) & 0x7FFFFFFF, np.int32)
    codes = all_gather(code).ravel()
    if len(set(codes.tolist())) > 1:
        raise ValueError(
            "devices must be the same list in every process (e.g. the default jax.devices()); "
            f"process {jax.process_index()} passed device ids [{ids}], and others differ."
        )


class Placement:
    """Which of ``devices`` (the same list in every process) this process drives.

    Work item ``k`` belongs to ``devices[k % len]``; each process computes the items of its own
    devices into a partial result (zeros elsewhere), and :meth:`total` sums the partial results
    over processes (exact for the zeros), so every process ends with the same product. With one
    process this is round-robin over devices.
    """

    def __init__(self, devices: Sequence[Any]):
        self.devices = list(devices)
        me = jax.process_index()
        self.mine = {k: d for k, d in enumerate(self.devices) if d.process_index == me}
        self.home = next(iter(self.mine.values()), jax.local_devices()[0])

    def owner(self, item: int) -> Any | None:
        """The local device that computes work item ``item``, or None (another process)."""
        return self.mine.get(item % len(self.devices))

    def stack(self, count: int, compute: Callable[[int, Any], jax.Array],
              item_shape: tuple, dtype) -> jax.Array:
        """Items ``0..count-1`` (each ``item_shape``) stacked along axis 0: this process
        computes its own (``compute(item, device)``), zeros stand for the others' until
        :meth:`total` sums the processes' stacks."""
        outs = []
        for item in range(count):
            d = self.owner(item)
            if d is None:
                outs.append(jnp.zeros(item_shape, dtype, device=self.home))
            else:
                outs.append(jax.device_put(compute(item, d), self.home))
        out = jnp.concatenate(outs)
        return self.total(out, out.shape, dtype)

    def total(self, partial: jax.Array | None, shape: tuple, dtype) -> jax.Array:
        """The sum over processes of this process's ``partial`` (None: nothing computed here)."""
        if jax.process_count() == 1:
            assert partial is not None
            return partial
        local = np.zeros(shape, dtype) if partial is None else np.array(partial, dtype)
        return jax.device_put(sum_over_processes(local), self.home)
