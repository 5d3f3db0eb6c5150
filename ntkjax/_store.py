"""Out-of-core, resumable block results: a zarr (v3) store with one chunk per block.

Layout of the store at ``out`` (a directory, a zarr group):

* one array per output leaf of the block function (``nngp`` and ``ntk`` for
  :func:`ntkjax.kernel_matrix`, ``kernel`` for :func:`ntkjax.empirical_ntk_matrix`), shape
  ``(N1, N2, ...)``, chunks ``(block, block, ...)``, no compression, a CRC32C checksum after
  every chunk (zarr's ``crc32c`` codec), fill value NaN (a block not yet computed reads as NaN);
* ``finished_blocks``: a ``(ceil(N1 / block), ceil(N2 / block))`` uint8 array with one chunk per
  entry; entry (I, J) is set to 1 after block (I, J) -- and, for a symmetric kernel, its mirror
  (J, I) -- is written. zarr writes each chunk to a temporary file and renames it, so a chunk
  is either absent or complete, and the record never runs ahead of the data;
* the group attribute ``ntkjax`` with the fingerprints of the inputs (shape, dtype and SHA-256
  of the bytes of x1 and x2), of the computation (SHA-256 of the jaxpr of the block function
  traced on the inputs' shapes and dtypes, with its constants' bytes -- or a key the caller
  supplies -- beside a readable description, e.g. the module's ``repr``), SHA-256 of the
  parameters and other arguments, the block layout and the number of processes that fill it.

Integrity: on resume every recorded block's chunks are checked (present, of the full chunk size,
checksum correct); a missing, truncated or corrupt chunk is reported with its path (a warning)
and its block is computed again. A store is created under a temporary name and renamed into
place, so a store at ``out`` is always complete; of two processes creating the same store at
once, the loser finds the winner's store, checks that it was made for the same call, and joins
it.

Several processes write one store safely: every block (and its mirror) belongs to exactly one
process, so no two processes write the same chunk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

FORMAT = "ntkjax.block_store"
VERSION = 2  # 2: chunk checksums, computation fingerprints
_RECORD = "finished_blocks"


def _zarr():
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "out= needs the zarr package (>= 3.1): pip install 'ntkjax[store]'"
        ) from err
    return zarr


def describe_array(x: Any) -> dict:
    """Shape, dtype and SHA-256 of the bytes of a concrete array (ValueError for an array of
    Python objects, whose bytes are addresses, not values)."""
    arr = np.ascontiguousarray(np.asarray(x))
    if arr.dtype == object:
        raise ValueError(
            "cannot fingerprint a store argument that is not a numeric array (it holds Python "
            f"objects of type {type(x).__name__}): pass arrays, or no out=."
        )
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
    }


def describe_tree(tree: Any) -> str:
    """SHA-256 of a pytree of arrays: its structure, and every leaf's shape, dtype and bytes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        d = describe_array(leaf)
        h.update(f"{d['shape']}{d['dtype']}{d['sha256']}".encode())
    return h.hexdigest()


def describe_object(obj: Any) -> str:
    """A stable description of a module or function: its ``repr`` without memory addresses."""
    if callable(obj) and not hasattr(obj, "__dataclass_fields__"):
        owner = getattr(obj, "__self__", None)
        name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
        if owner is not None:
            return f"{name} of {describe_object(owner)}"
        return name
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


_OPAQUE = re.compile(r"\b(pure_callback|io_callback|callback)\[")


def describe_computation(closed_jaxpr: Any) -> str:
    """SHA-256 of a closed jaxpr: its text (the operations, shapes, dtypes and literals) and the
    bytes of its constants (arrays the function closes over).

    Raises ValueError for a computation that calls back into Python (``pure_callback``,
    ``io_callback``): what such a call computes is not in the jaxpr, so it cannot identify the
    numbers.
    """
    text = str(closed_jaxpr)
    opaque = _OPAQUE.search(text)
    if opaque:
        raise ValueError(
            f"cannot fingerprint the block function for the store: it calls back into Python "
            f"({opaque.group(1)}), whose results its jaxpr does not determine. Pass a key "
            "naming the computation (evaluate_in_blocks(..., store_key='...')), or no out=."
        )
    h = hashlib.sha256(text.encode())
    for const in closed_jaxpr.consts:
        d = describe_array(const)
        h.update(f"{d['shape']}{d['dtype']}{d['sha256']}".encode())
    return h.hexdigest()


def leaf_names(tree: Any) -> list[str]:
    """Array names for the leaves of the block function's output (``kernel`` for a bare leaf)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if len(paths) == 1 and not paths[0]:
        return ["kernel"]
    names = []
    for path in paths:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        names.append("_".join(parts) or "kernel")
    return names


class BlockStore:
    """A zarr group holding the block results of one ``evaluate_in_blocks`` call."""

    def __init__(self, path: str, group: Any, meta: dict) -> None:
        self.path = path
        self.group = group
        self.meta = meta
        self.names: list[str] = meta["layout"]["names"]
        self.block: tuple[int, int] = tuple(meta["layout"]["block"])  # type: ignore[assignment]
        self.arrays = [group[name] for name in self.names]
        self.record = group[_RECORD]

    def _chunk_file(self, array: Any, coords: tuple[int, ...]) -> str:
        key = array.metadata.encode_chunk_key(coords)
        return os.path.join(self.path, array.path, *key.split("/"))

    def _chunk_problem(self, array: Any, coords: tuple[int, ...]) -> str | None:
        """None when the chunk file at ``coords`` is whole (present, full size, checksum
        right), else what is wrong with it, naming its path."""
        file = self._chunk_file(array, coords)
        expected = int(np.prod(array.chunks)) * array.dtype.itemsize + 4
        try:
            with open(file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return f"{file} is missing"
        except OSError as err:
            return f"{file} cannot be read ({err})"
        if len(data) != expected:
            return f"{file} holds {len(data)} bytes, not {expected} (truncated or overwritten)"
        import google_crc32c  # zarr's crc32c codec uses it

        stored = np.frombuffer(data[-4:], np.uint32)[0]
        if int(stored) != int(google_crc32c.value(data[:-4])):
            return f"{file} fails its CRC32C checksum (corrupt)"
        return None

    def finished(self) -> np.ndarray:
        """The record: a boolean (blocks of x1, blocks of x2) array. A record chunk that is
        missing or damaged counts as not finished."""
        shape = self.record.shape
        done = np.zeros(shape, bool)
        for i in range(shape[0]):
            for j in range(shape[1]):
                if self._chunk_problem(self.record, (i, j)) is None:
                    with open(self._chunk_file(self.record, (i, j)), "rb") as f:
                        done[i, j] = f.read(1) != b"\0"
        return done

    def damaged(self, finished: np.ndarray) -> list[tuple[int, int, str]]:
        """``(I, J, problem)`` for every recorded block with a chunk (or, for a symmetric
        store, a mirrored chunk) that is missing, truncated or corrupt."""
        symmetric = self.meta["layout"]["symmetric"]
        bad = []
        for bi, bj in zip(*np.nonzero(finished), strict=True):
            coords = [(int(bi), int(bj))]
            if symmetric and bj > bi:
                coords.append((int(bj), int(bi)))
            for array in self.arrays:
                trailing = (0,) * (array.ndim - 2)
                problems = [self._chunk_problem(array, (*c, *trailing)) for c in coords]
                problem = next((p for p in problems if p is not None), None)
                if problem is not None:
                    bad.append((int(bi), int(bj), problem))
                    break
        return bad

    def complete(self) -> bool:
        """Whether every block is recorded (for a symmetric kernel, those on and above the
        diagonal)."""
        done = self.finished()
        if self.meta["layout"]["symmetric"]:
            return bool(done[np.triu_indices(done.shape[0], m=done.shape[1])].all())
        return bool(done.all())

    def write(self, i: int, j: int, tiles: Sequence[np.ndarray], mirrors: Sequence | None):
        """Writes block rows i.., columns j.. (and the mirrored tile), then records it."""
        for arr, tile in zip(self.arrays, tiles, strict=True):
            arr[i : i + tile.shape[0], j : j + tile.shape[1]] = tile
        if mirrors is not None:
            for arr, tile in zip(self.arrays, mirrors, strict=True):
                arr[j : j + tile.shape[0], i : i + tile.shape[1]] = tile
        self.record[i // self.block[0], j // self.block[1]] = 1

    def readers(self) -> list[Any]:
        """Read-only zarr arrays of the results (``a[i:j]`` reads rows as numpy)."""
        zarr = _zarr()
        return [zarr.open_array(self.path, path=name, mode="r") for name in self.names]


def unfinished_damaged(path: str, store: BlockStore) -> np.ndarray:
    """The store's record with every damaged block (:meth:`BlockStore.damaged`) taken out; a
    warning names each damaged chunk's file (its block is computed again)."""
    finished = store.finished()
    for bi, bj, problem in store.damaged(finished):
        warnings.warn(
            f"the store at {path!r}: {problem}; block ({bi}, {bj}) is computed again.",
            RuntimeWarning, stacklevel=3,
        )
        finished[bi, bj] = False
    return finished


def read_meta(path: str) -> dict | None:
    """The ``ntkjax`` record of the store at ``path``, or None when there is no store."""
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return None  # no store yet (an empty directory counts as none)
    zarr = _zarr()
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # not a zarr group
        raise ValueError(
            f"out={path!r} exists but is not an ntkjax block store (a zarr group): {err}. "
            "Pass a new path."
        ) from err
    meta = dict(group.attrs).get("ntkjax")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"out={path!r} is a zarr group but not an ntkjax block store (no 'ntkjax' record); "
            "pass a new path."
        )
    if meta.get("version") != VERSION:
        raise ValueError(
            f"out={path!r} is an ntkjax block store of format version {meta.get('version')} "
            f"(this ntkjax writes version {VERSION}: chunk checksums, computation "
            "fingerprints); pass a new path to compute it again."
        )
    return meta


def _mismatch(path: str, what: str, recorded: Any, now: Any) -> ValueError:
    return ValueError(
        f"the store at {path!r} was written for other {what}: it records {recorded}, this call "
        f"has {now}. Pass another out= path, or delete the old store to start over."
    )


def check_meta(path: str, meta: dict, fingerprint: dict) -> None:
    """Raises ValueError naming the first difference between a store's record and this call."""
    rec = meta["fingerprint"]
    for key, label in (("x1", "inputs x1"), ("x2", "inputs x2")):
        a, b = rec[key], fingerprint[key]
        if a != b:
            if a is None or b is None:
                raise _mismatch(
                    path, label, "x2 = None (x1 with itself)" if a is None else "a given x2",
                    "x2 = None (x1 with itself)" if b is None else "a given x2",
                )
            if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
                raise _mismatch(path, label, f"shape {tuple(a['shape'])} {a['dtype']}",
                                f"shape {tuple(b['shape'])} {b['dtype']}")
            raise _mismatch(path, label + " (same shape, other values)",
                            f"sha256 {a['sha256'][:12]}", f"sha256 {b['sha256'][:12]}")
    a, b = rec["model"], fingerprint["model"]
    if a["computation"] != b["computation"]:
        raise _mismatch(
            path, "model (block function: another computation)",
            f"{a['description']} (computation {a['computation'][:16]})",
            f"{b['description']} (computation {b['computation'][:16]})",
        )
    if rec["arguments"] != fingerprint["arguments"]:
        raise _mismatch(
            path, "model parameters / arguments (fn_args; for images, the images)",
            f"sha256 {rec['arguments'][:12]}", f"sha256 {fingerprint['arguments'][:12]}",
        )


def check_layout(path: str, meta: dict, layout: dict) -> None:
    rec = meta["layout"]
    for key, label in (("block", "block size (rows, columns)"),
                       ("shapes", "output shapes"), ("dtypes", "output dtypes"),
                       ("names", "output names"), ("symmetric", "symmetry")):
        if rec[key] != layout[key]:
            hint = " (pass block_size=None to reuse the store's)" if key == "block" else ""
            raise ValueError(
                f"the store at {path!r} has another block layout: {label} {rec[key]} recorded, "
                f"{layout[key]} in this call{hint}."
            )


def check_processes(path: str, meta: dict, store: BlockStore) -> None:
    """Refuses to resume an unfinished store with another number of processes (shards)."""
    recorded = meta["num_processes"]
    now = jax.process_count()
    if recorded != now and not store.complete():
        raise ValueError(
            f"the store at {path!r} is being filled by {recorded} process(es) (shards) and is "
            f"unfinished; this run has {now}. Resume it with {recorded} process(es), so that "
            "every block keeps its writer, or start a new store."
        )


def create(path: str, fingerprint: dict, layout: dict, shapes, dtypes) -> bool:
    """Creates the group, its arrays, an empty record and the ``ntkjax`` attribute: under a
    temporary name beside ``path``, then renamed into place, so that a store at ``path`` is
    always whole. Returns False when another process created ``path`` first (the caller checks
    that store against its call and joins it); True when this call created it."""
    zarr = _zarr()
    from zarr.codecs import Crc32cCodec

    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.creating-{uuid.uuid4().hex}")
    try:
        group = zarr.open_group(tmp, mode="w-", zarr_format=3)
        b1, b2 = layout["block"]
        for array, shape, dtype in zip(layout["names"], shapes, dtypes, strict=True):
            chunks = (b1, b2, *shape[2:])
            group.create_array(array, shape=tuple(shape), chunks=chunks, dtype=dtype,
                               fill_value=np.nan if np.issubdtype(dtype, np.floating) else 0,
                               compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
        n1, n2 = shapes[0][:2]
        grid = (-(-n1 // b1), -(-n2 // b2))
        group.create_array(_RECORD, shape=grid, chunks=(1, 1), dtype="uint8", fill_value=0,
                           compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
        group.attrs["ntkjax"] = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "layout": layout,
            "num_processes": jax.process_count(),
        }
        try:
            os.rename(tmp, path)  # atomic; replaces an empty folder, fails on a full one
        except OSError:
            if os.path.isdir(path) and os.listdir(path):
                return False  # another process was first
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str) -> BlockStore:
    """The store at ``path``, opened for writing (ValueError when it is not one of ours)."""
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"out={path!r}: the store was not created (an empty folder remains).")
    group = _zarr().open_group(path, mode="r+")
    return BlockStore(path, group, meta)
