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
* The result lives in host numpy arrays allocated once, so nothing is ever concatenated --
  or, with ``out=``, in a resumable zarr store on disk with one chunk per block
  (written by the private module ``ntkjax._store``).
* Devices: the blocks are dealt round-robin over ``devices`` (default ``jax.devices()``: all
  devices of all processes under ``jax.distributed``); each process computes the blocks of its
  local devices, one per device per ``shard_map`` call, without cross-process communication;
  the processes meet only to agree on the block size, at the store's creation, at the end, and
  (without ``out``) to gather the result.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from ntkjax import _collectives, _store
from ntkjax._checks import check_pair
from ntkjax._placement import check_same_devices, resolve_devices
from ntkjax._progress import progress as _progress
from ntkjax._tiling import compiled_footprint, pad_rows
from ntkjax.compile_options import cpu_convolution_options, jit_with_options

__all__ = ["available_memory_bytes", "evaluate_in_blocks"]

_MIN_BLOCK = 8


def available_memory_bytes(device: Any = None) -> int:
    """Free memory, in bytes, on ``device`` (default: the first JAX device).

    Accelerators report ``bytes_limit - bytes_in_use`` from ``Device.memory_stats()``; the CPU
    reports ``MemAvailable`` from ``/proc/meminfo`` (or a conservative 4 GiB where that is absent).

    Args:
      device: a JAX device of this process; None for ``jax.local_devices()[0]``.

    Returns:
      The free memory in bytes.

    >>> available_memory_bytes() > 0
    True
    """
    device = jax.local_devices()[0] if device is None else device
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


def evaluate_in_blocks(
    block_fn: Callable[..., Any],
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    fn_args: tuple = (),
    block_size: int | None = None,
    memory_bytes: int | None = None,
    max_block_size: int = 4096,
    devices: Sequence[Any] | None = None,
    out: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    store_key: str | None = None,
    show_progress: bool = False,
    description: str = "kernel blocks",
    diagonal_fn: Callable[..., Any] | None = None,
) -> Any:
    """Evaluates ``block_fn`` over all pairs of ``x1`` and ``x2`` rows, block by block.

    Devices: block k of the list of blocks (row-major, upper triangle only when symmetric) goes
    to ``devices[k % len(devices)]``; each process computes the blocks of its own (local)
    devices, several at a time -- one per local device -- in one ``shard_map`` call, so every
    device holds one block call at a time and the memory budget is per device. Under
    ``jax.distributed`` (see :func:`ntkjax.initialize_distributed`) every process must make the
    same call; without ``out`` each process then receives the full result, assembled with an
    all-gather over processes in row strips (exact: every entry comes from one process).

    Out of core: with ``out`` (a directory path) the result goes to a zarr (v3) store with one
    chunk per block, and a record of finished blocks, instead of host RAM; a store that exists
    is resumed -- only blocks not yet recorded are computed -- after checking that it was made
    for the same inputs, computation, ``fn_args``, block layout and number of processes. The
    computation is identified by the SHA-256 of the jaxpr of ``block_fn`` on the inputs'
    shapes and dtypes (with the bytes of the arrays it closes over), or by ``store_key``; a
    ``block_fn`` that calls back into Python (``jax.pure_callback``) cannot be fingerprinted
    and needs a ``store_key``. Every chunk carries a CRC32C checksum: on resume a recorded
    block whose chunk is missing, truncated or corrupt is computed again (a RuntimeWarning
    names the chunk's file). Several processes write one store, each its own blocks; two
    independent calls creating the same store at once share it. Format and guarantees:
    ``docs/guides/scaling_out.md``.

    Args:
      block_fn: ``(x1_block, x2_block, *fn_args) -> pytree`` of arrays with leading shape
        ``(n1, n2)``. It is jitted here; pass parameters through ``fn_args`` (traced
        arguments) rather than closing over them, which would bake them in as constants.
      x1: array of shape ``(N1, ...)``.
      x2: array of shape ``(N2, ...)`` with the same per-example shape, or None for x2 = x1, in
        which case the result is assumed symmetric and only one triangle of blocks is computed.
      fn_args: extra arguments (pytrees of arrays, e.g. network parameters) passed to every call.
      block_size: rows of x1 (and x2) per block; chosen from ``memory_bytes`` when None (or
        taken from the store being resumed).
      memory_bytes: budget for one compiled block call on one device (arguments, outputs and
        temporaries); when None, half of the free device memory -- on the CPU, half of the
        free RAM after the in-memory result, shared by the local CPU devices.
      max_block_size: the largest tile tried when choosing the block size.
      devices: the devices to use, the same list in every process; default ``jax.devices()``
        (all devices of all processes).
      out: path of a zarr store to write the result to (and resume from) instead of RAM.
      fingerprint: a readable description of ``block_fn`` recorded in the store and shown when
        a resume is refused (default: its module and qualified name); callers pass e.g. the
        module's ``repr``. It does not identify the computation: the jaxpr does.
      store_key: a key naming the computation, recorded and compared on resume instead of the
        jaxpr's hash (for a ``block_fn`` that cannot be fingerprinted; you vouch that equal
        keys mean equal numbers).
      show_progress: draw a progress bar on stderr.
      description: label of the progress bar.
      diagonal_fn: ``(x_block, *fn_args) -> pytree``, the value of ``block_fn(x_block,
        x_block, *fn_args)`` computed once per row (e.g. a kernel's ``x2=None`` path, which
        does the per-example work once, not twice). When given, the diagonal blocks of a
        symmetric evaluation (``x2=None``) on one device use it instead of ``block_fn``; a
        symmetric evaluation that fits one block compiles only it.

    Returns:
      The pytree ``block_fn`` returns, with numpy leaves of leading shape ``(N1, N2)``; with
      ``out``, read-only ``zarr.Array`` leaves of that shape (``a[i:j]`` reads rows as numpy).

    Raises:
      ValueError: when inputs lack a batch axis or disagree in per-example shape, when even
        the smallest block does not fit ``memory_bytes``, for an empty or repeated device list
        (or, under ``jax.distributed``, one that differs between processes), or when ``out``
        holds a store made for other inputs, another computation or arguments, another
        block layout, or (unfinished) another number of processes; when ``block_fn`` cannot
        be fingerprinted (it calls back into Python) and no ``store_key`` is given.
      TypeError: when ``devices`` holds something other than ``jax.Device`` objects.

    >>> import jax.numpy as jnp
    >>> from ntkjax.blocking import evaluate_in_blocks
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> evaluate_in_blocks(lambda a, b: a @ b.T, x, block_size=2)
    array([[ 1.,  3.,  5.],
           [ 3., 13., 23.],
           [ 5., 23., 41.]], dtype=float32)
    """
    check_pair(x1, x2, min_ndim=1)
    symmetric = x2 is None
    x1 = jnp.asarray(x1)
    x2 = x1 if symmetric else jnp.asarray(x2)
    n1, n2 = x1.shape[0], x2.shape[0]
    devices = resolve_devices(devices)
    check_same_devices(devices)
    local = [d for d in devices if d.process_index == jax.process_index()]
    options = cpu_convolution_options()
    jitted = jit_with_options(block_fn, options)
    diagonal = None if diagonal_fn is None or not symmetric else jit_with_options(
        diagonal_fn, options)

    def spec(x, b):
        return jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype)

    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    path = None if out is None else os.fspath(out)
    closed = traced = None
    traced_diagonal = False  # whether `traced` is diagonal_fn's
    if path is not None and store_key is None:
        closed, full_shapes = jax.make_jaxpr(block_fn, return_shape=True)(
            spec(x1, n1), spec(x2, n2), *fn_args)
    elif path is None:
        # One trace of the first block (whose lowering is compiled below) gives the result's
        # shapes too: block_fn's outputs lead with the block's (rows of x1, rows of x2).
        first = min(block_size or max_block_size, max(n1, n2))
        traced_diagonal = diagonal is not None and first >= n1  # one block, on the diagonal
        if traced_diagonal:
            assert diagonal is not None
            traced = diagonal.trace(spec(x1, n1), *fn_args)
        else:
            traced = jitted.trace(spec(x1, min(first, n1)), spec(x2, min(first, n2)), *fn_args)
        full_shapes = _full_shapes(traced.out_info, min(first, n1), min(first, n2), n1, n2)
    else:
        full_shapes = jax.eval_shape(block_fn, spec(x1, n1), spec(x2, n2), *fn_args)
    out_leaves, treedef = jax.tree_util.tree_flatten(full_shapes)
    result_bytes = sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in out_leaves
    )

    meta = prints = None
    if path is not None:
        if store_key is not None and not (isinstance(store_key, str) and store_key):
            raise ValueError(f"store_key must be a non-empty string; got {store_key!r}.")
        prints = {
            "x1": _store.describe_array(x1),
            "x2": None if symmetric else _store.describe_array(x2),
            "model": {
                "computation": (f"key {store_key}" if closed is None
                                else _store.describe_computation(closed)),
                "description": (fingerprint if fingerprint is not None
                                else _store.describe_object(block_fn)),
            },
            "arguments": _store.describe_tree(fn_args),
        }
        meta = _store.read_meta(path)
        if meta is not None:
            _store.check_meta(path, meta, prints)
            if block_size is None:
                block_size = max(meta["layout"]["block"])

    if block_size is None:
        if memory_bytes is None:
            device = local[0] if local else devices[0]
            free = available_memory_bytes(device)
            if device.platform == "cpu":
                # On the CPU the result shares RAM with the blocks, and forced host devices
                # share the RAM; on a device the result lives on the host.
                free = (free - (0 if path else result_bytes)) // max(len(local), 1)
            memory_bytes = max(free // 2, 0)
        block_size, compiled = _choose_block(
            jitted, x1, x2, fn_args, memory_bytes, max_block_size, spec, traced
        )
        agreed = _collectives.minimum_over_processes(block_size)
        if agreed != block_size:  # every process must use the same blocks
            block_size, compiled = agreed, None
    else:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}.")
        compiled = None  # compiled below, only for the one-device path
    b1, b2 = min(block_size, n1), min(block_size, n2)
    first_block = (None if traced is None
                   else tuple(s.shape[:2] for s in jax.tree_util.tree_leaves(traced.out_info)))
    # _choose_block compiled `traced` first: the diagonal program when it fit at that size
    compiled_is_diagonal = traced_diagonal and compiled is not None and b1 >= n1
    diagonal_compiled, compiled = (compiled, None) if compiled_is_diagonal else (None, compiled)

    def compile_block():
        if (traced is not None and not traced_diagonal
                and all(shape == (b1, b2) for shape in first_block or ())):
            return traced.lower().compile()
        return jitted.lower(spec(x1, b1), spec(x2, b2), *fn_args).compile()

    def compile_diagonal():
        if traced is not None and traced_diagonal and all(
                shape == (b1, b1) for shape in first_block or ()):
            return traced.lower().compile()
        assert diagonal is not None
        return diagonal.lower(spec(x1, b1), *fn_args).compile()

    programs = {False: compiled, True: diagonal_compiled}

    def program(i: int, j: int) -> tuple[Any, bool]:
        """The compiled program of block (i, j), compiled on first use, and whether it is
        the diagonal one (which takes the rows once)."""
        on_diagonal = diagonal is not None and i == j
        if programs[on_diagonal] is None:
            programs[on_diagonal] = compile_diagonal() if on_diagonal else compile_block()
        return programs[on_diagonal], on_diagonal

    store = None
    if path is not None:
        assert prints is not None
        layout = {
            "block": [b1, b2],
            "shapes": [list(leaf.shape) for leaf in out_leaves],
            "dtypes": [str(np.dtype(leaf.dtype)) for leaf in out_leaves],
            "names": _store.leaf_names(full_shapes),
            "symmetric": symmetric,
        }
        if meta is not None:
            _store.check_layout(path, meta, layout)
        _collectives.barrier("ntkjax-store-checked")
        if meta is None and jax.process_index() == 0:
            _store.create(path, prints, layout, layout["shapes"], layout["dtypes"])
        _collectives.barrier("ntkjax-store-created")
        store = _store.open_store(path)  # ours, or one another call created meanwhile
        _store.check_meta(path, store.meta, prints)
        _store.check_layout(path, store.meta, layout)
        _store.check_processes(path, store.meta, store)
        finished = _store.unfinished_damaged(path, store)
        results = []

        def write(i, j, tiles):
            mirrors = [_mirror(t) for t in tiles] if symmetric and j > i else None
            store.write(i, j, tiles, mirrors)
    else:
        finished = None
        # Under jax.distributed every process fills its own blocks and the others are summed
        # in, so the rest must be zeros.
        alloc = np.zeros if jax.process_count() > 1 else np.empty
        results = [alloc(leaf.shape, dtype=leaf.dtype) for leaf in out_leaves]

        def write(i, j, tiles):
            for res, tile in zip(results, tiles, strict=True):
                res[i : i + tile.shape[0], j : j + tile.shape[1]] = tile
                if symmetric and j > i:
                    res[j : j + tile.shape[1], i : i + tile.shape[0]] = _mirror(tile)

    pairs = [(i, j) for i in range(0, n1, b1) for j in range(0, n2, b2)
             if not symmetric or j >= i]
    todo: dict[Any, list[tuple[int, int]]] = {d: [] for d in local}
    for k, (i, j) in enumerate(pairs):
        device = devices[k % len(devices)]
        if device in todo and (finished is None or not finished[i // b1, j // b2]):
            todo[device].append((i, j))
    total = sum(len(v) for v in todo.values())

    if not total:
        blocks = iter(())
    elif local == [jax.local_devices()[0]]:
        blocks = _one_device(program, x1, x2, fn_args, todo[local[0]], b1, b2, n1, n2)
    else:
        rest: list[tuple[int, int]] = []
        if local[0].platform == "cpu":
            # Forced host devices share the cores: a last, partial round is computed on one
            # device instead of padding it with filler blocks on the others.
            full = min(len(v) for v in todo.values())
            rest = [p for v in todo.values() for p in v[full:]]
            todo = {d: v[:full] for d, v in todo.items()}
        blocks = _many_devices(block_fn, options, local, x1, x2, fn_args, todo, b1, b2, n1, n2)
        if rest:
            blocks = itertools.chain(
                blocks, _one_device(program, x1, x2, fn_args, rest, b1, b2, n1, n2)
            )
    for i, j, tiles in _progress(blocks, total=total, description=description,
                                 enabled=show_progress):
        write(i, j, tiles)

    _collectives.barrier("ntkjax-blocks-done")
    if store is not None:
        return jax.tree_util.tree_unflatten(treedef, store.readers())
    for res in results:
        _collectives.sum_over_processes(res)
    return jax.tree_util.tree_unflatten(treedef, results)


def _pipelined(calls):
    """Runs the ``(dispatch, collect)`` pairs of ``calls`` keeping one call in flight: JAX
    dispatches asynchronously, so the next blocks compute while the last ones are copied to
    the host and written."""
    pending = None
    for dispatch, collect in calls:
        current = (dispatch(), collect)
        if pending is not None:
            yield from pending[1](pending[0])
        pending = current
    if pending is not None:
        yield from pending[1](pending[0])


def _one_device(program, x1, x2, fn_args, todo, b1, b2, n1, n2):
    """Blocks on the default device, one compiled call each (``program(i, j)``: the compiled
    program of block (i, j) and whether it takes the rows once -- a diagonal block)."""

    def call(i, j):
        m1, m2 = min(b1, n1 - i), min(b2, n2 - j)

        def dispatch():
            compiled, on_diagonal = program(i, j)
            if on_diagonal:
                return compiled(pad_rows(x1[i : i + m1], b1), *fn_args)
            return compiled(
                pad_rows(x1[i : i + m1], b1), pad_rows(x2[j : j + m2], b2), *fn_args
            )

        def collect(out):
            leaves = jax.device_get(jax.tree_util.tree_leaves(out))
            yield i, j, [np.asarray(leaf)[:m1, :m2] for leaf in leaves]

        return dispatch, collect

    return _pipelined(call(i, j) for i, j in todo)


def _many_devices(block_fn, options, local, x1, x2, fn_args, todo, b1, b2, n1, n2):
    """Blocks on several local devices: one ``shard_map`` call computes one block on each."""
    mesh = Mesh(np.array(local), ("blocks",))

    def body(a, b, *args):
        out = block_fn(a[0], b[0], *args)
        return jax.tree_util.tree_map(lambda leaf: leaf[None], out)

    sharded = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(P("blocks"), P("blocks"), *([P()] * len(fn_args))),
            out_specs=P("blocks"), check_vma=False,
        ),
        **({"compiler_options": options} if options else {}),
    )
    stacked = NamedSharding(mesh, P("blocks"))
    args = jax.device_put(fn_args, NamedSharding(mesh, P()))
    h1 = np.asarray(jax.device_get(x1))
    h2 = h1 if x2 is x1 else np.asarray(jax.device_get(x2))
    rounds = max((len(v) for v in todo.values()), default=0)

    def call(r):
        slots = [todo[d][r] if r < len(todo[d]) else None for d in local]
        filler = next(p for p in slots if p is not None)
        work = [p or filler for p in slots]

        def dispatch():
            a = np.stack([pad_rows(h1[i : i + b1], b1) for i, _ in work])
            b = np.stack([pad_rows(h2[j : j + b2], b2) for _, j in work])
            return sharded(jax.device_put(a, stacked), jax.device_put(b, stacked), *args)

        def collect(out):
            leaves = [np.asarray(leaf) for leaf in jax.device_get(jax.tree_util.tree_leaves(out))]
            for k, p in enumerate(slots):
                if p is not None:
                    i, j = p
                    m1, m2 = min(b1, n1 - i), min(b2, n2 - j)
                    yield i, j, [leaf[k, :m1, :m2] for leaf in leaves]

        return dispatch, collect

    return _pipelined(call(r) for r in range(rounds))


def _format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _full_shapes(block_shapes: Any, b1: int, b2: int, n1: int, n2: int) -> Any:
    """The result's shapes from one block's: leading (b1, b2) becomes (n1, n2)."""

    def full(leaf):
        if tuple(leaf.shape[:2]) != (b1, b2):
            raise ValueError(
                f"block_fn must return arrays with leading shape (rows of x1, rows of x2) = "
                f"({b1}, {b2}) for a {b1} x {b2} block; one output has shape {leaf.shape}.")
        return jax.ShapeDtypeStruct((n1, n2, *leaf.shape[2:]), leaf.dtype)

    return jax.tree_util.tree_map(full, block_shapes)


def _choose_block(jitted, x1, x2, fn_args, memory_bytes, max_block_size, spec,
                  traced: Any = None) -> tuple[int, Any]:
    """Largest power-of-two block whose compiled footprint fits ``memory_bytes`` (``traced``:
    the first, largest block's trace, when already made)."""
    n_max = max(x1.shape[0], x2.shape[0])
    size = min(max_block_size, n_max)
    while True:
        b1, b2 = min(size, x1.shape[0]), min(size, x2.shape[0])
        if traced is not None:
            compiled = traced.lower().compile()
            traced = None
        else:
            compiled = jitted.lower(spec(x1, b1), spec(x2, b2), *fn_args).compile()
        footprint = compiled_footprint(compiled)
        if footprint is None or footprint <= memory_bytes:
            return size, compiled
        if size <= _MIN_BLOCK:
            raise ValueError(
                f"even a {b1} x {b2} block needs {_format_bytes(footprint)}, more than the "
                f"memory budget of {_format_bytes(memory_bytes)}; raise memory_bytes or free "
                "memory."
            )
        size = max(_MIN_BLOCK, size // 2)
