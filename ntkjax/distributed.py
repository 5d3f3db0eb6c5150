"""Starting multi-process runs on JAX's distributed runtime (the collectives ntkjax uses are in
``ntkjax._collectives``).

ntkjax has no scheduler of its own: several processes (on one machine or many) form one JAX
runtime through :func:`jax.distributed.initialize`, after which ``jax.devices()`` lists the
devices of every process and ``jax.local_devices()`` those of this one. The block functions of
:mod:`ntkjax.blocking` (and :func:`ntkjax.kernel_matrix`, :func:`ntkjax.empirical_ntk_matrix`)
then spread their blocks over all of them.

:func:`initialize_distributed` wraps :func:`jax.distributed.initialize` so that

* a coordinator that cannot be reached gives a :class:`TimeoutError` naming the address after
  ``timeout_s`` seconds -- ``jax.distributed.initialize`` itself aborts the whole process
  (``SIGABRT`` from its C++ client) when it cannot register in time;
* on the CPU, cross-process collectives use gloo (the CPU backend has none by default);
* an explicit ``coordinator_address`` is also the address the coordinator binds to (not every
  interface, JAX's default).

Under Slurm or Open MPI, call it with no arguments: ``jax.distributed.initialize`` detects the
coordinator, the number of processes and this process's index from the environment.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ntkjax._collectives import all_gather

__all__ = ["initialize_distributed"]


def _split_address(address: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise TypeError(f"coordinator_address must be a 'host:port' string; got "
                        f"{type(address).__name__}.")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(
            f"coordinator_address must be 'host:port', e.g. '127.0.0.1:12345'; got {address!r}."
        )
    if not 1 <= int(port) <= 65535:
        raise ValueError(
            f"coordinator_address {address!r}: the port must be in 1 .. 65535; got {int(port)}."
        )
    return host.strip("[]"), int(port)


def _check_count(value: Any, name: str, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (or None: detected); got "
                         f"{value!r}.")


def _check_timeout(timeout_s: Any) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float | np.number):
        raise TypeError(f"timeout_s must be a number of seconds; got {type(timeout_s).__name__}.")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0; got {timeout_s!r}.")
    return float(timeout_s)


def _agree_on_process_count(requested: int | None) -> None:
    """Every process's ``num_processes`` (as given, or as detected), exchanged at start-up:
    ValueError in every process, naming each one's count, unless they all asked for the
    number of processes that joined. (JAX takes the coordinator's count and ignores the
    others'.)"""
    count = jax.process_count()
    asked = count if requested is None else int(requested)
    counts = all_gather(np.asarray(asked, np.int32)).ravel().tolist()
    if any(c != count for c in counts):
        listing = ", ".join(f"process {i}: {c}" for i, c in enumerate(counts))
        try:
            jax.distributed.shutdown()
        except Exception:  # the refusal below matters, not a clean shutdown
            pass
        raise ValueError(
            f"num_processes differs between the processes ({listing}); {count} joined. "
            "Give every process the same num_processes."
        )


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Connects (and disconnects) to ``host:port`` until it answers; TimeoutError after
    ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return
        except OSError as err:  # refused, unreachable, timed out: retry until the deadline
            last = err
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
    raise TimeoutError(
        f"could not reach the jax.distributed coordinator at {host}:{port} within "
        f"{timeout_s:g} s ({last}). Start the process with process_id=0 (the coordinator) "
        "first, and check the address, the port and any firewall between the hosts."
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    timeout_s: float = 60.0,
    cpu_collectives: str | None = "gloo",
    **kwargs: Any,
) -> None:
    """Joins this process to a multi-process JAX runtime (:func:`jax.distributed.initialize`).

    Call it once, at the start of every process and before any other JAX call. Afterwards
    ``jax.devices()`` spans all processes and ntkjax's block functions use all of them.

    Args:
      coordinator_address: ``"host:port"`` of process 0, which runs the coordination service
        and binds to exactly this address. None: detected by JAX under Slurm / Open MPI.
      num_processes: number of processes (None: detected).
      process_id: index of this process, 0 .. num_processes - 1 (None: detected).
      local_device_ids: restricts this process to these local devices (as in JAX).
      timeout_s: how long a process other than the coordinator waits for the coordinator to
        answer, and how long every process waits for all of them to register: a finite
        number of seconds > 0.
      cpu_collectives: collectives implementation of the CPU backend (``"gloo"`` or ``"mpi"``;
        None leaves JAX's setting alone). Set before the backend starts.
      **kwargs: passed on to :func:`jax.distributed.initialize`.

    Every process's ``num_processes`` is exchanged once all have joined: JAX itself takes the
    coordinator's and ignores the others', so processes given different counts are refused.

    Returns:
      None; afterwards ``jax.process_count()`` is ``num_processes`` and ``jax.devices()`` lists
      the devices of every process.

    Raises:
      ValueError: for an address that is not ``host:port`` or whose port is outside
        1 .. 65535; a ``timeout_s`` that is not finite and > 0 (inf, nan); a
        ``num_processes`` < 1 or a ``process_id`` outside ``0 .. num_processes - 1``; and, in
        every process, when the processes were given different ``num_processes``.
      TypeError: for a ``timeout_s`` that is not a number.
      TimeoutError: when the coordinator cannot be reached within ``timeout_s`` seconds. (If
        it is reached but some process never registers, JAX itself ends the processes after
        ``timeout_s`` seconds.)

    >>> import ntkjax
    >>> address = "127.0.0.1:1"  # nothing listens on port 1
    >>> ntkjax.initialize_distributed(address, 2, 1, timeout_s=0.2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TimeoutError: could not reach the jax.distributed coordinator at 127.0.0.1:1 ...
    """
    timeout_s = _check_timeout(timeout_s)
    _check_count(num_processes, "num_processes", minimum=1)
    _check_count(process_id, "process_id", minimum=0)
    if num_processes is not None and process_id is not None and not (
        0 <= process_id < num_processes
    ):
        raise ValueError(
            f"process_id must be in 0 .. {num_processes - 1} for num_processes={num_processes}; "
            f"got {process_id}."
        )
    if coordinator_address is not None:
        host, port = _split_address(coordinator_address)
        if process_id not in (None, 0):
            _wait_for_coordinator(host, port, timeout_s)
        kwargs.setdefault("coordinator_bind_address", coordinator_address)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=max(1, int(np.ceil(timeout_s))),
        **kwargs,
    )
    _agree_on_process_count(num_processes)
