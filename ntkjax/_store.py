"""Out-of-core, resumable block results: a zarr (v3) store with one chunk per block.

Layout of the store at ``out`` (a directory, a zarr group):

* one array per output leaf of the block function (``nngp`` and ``ntk`` for
  :func:`ntkjax.kernel_matrix`, ``kernel`` for :func:`ntkjax.empirical_ntk_matrix`), shape
  ``(N1, N2, ...)``, chunks ``(block, block, ...)``, no compression, fill value NaN (a block not
  yet computed reads as NaN);
* ``finished_blocks``: a ``(ceil(N1 / block), ceil(N2 / block))`` uint8 array with one chunk per
  entry; entry (I, J) is set to 1 after block (I, J) -- and, for a symmetric kernel, its mirror
  (J, I) -- is written. zarr writes each chunk to a temporary file and renames it, so a chunk
  is either absent or complete, and the record never runs ahead of the data;
* the group attribute ``ntkjax`` with the fingerprints of the inputs (shape, dtype and SHA-256
  of the bytes of x1 and x2), of the model (a description of the block function -- the module's
  ``repr``, or ``apply_fn`` with ``ntk_method`` and ``outputs`` -- and SHA-256 of the parameters
  and other arguments), the block layout and the number of processes that fill it.

Several processes write one store safely: every block (and its mirror) belongs to exactly one
process, so no two processes write the same chunk.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

FORMAT = "ntkjax.block_store"
VERSION = 1
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
    """Shape, dtype and SHA-256 of the bytes of a concrete array."""
    arr = np.ascontiguousarray(np.asarray(x))
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

    def finished(self) -> np.ndarray:
        """The record: a boolean (blocks of x1, blocks of x2) array."""
        return np.asarray(self.record[...]).astype(bool)

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
    if rec["model"] != fingerprint["model"]:
        raise _mismatch(path, "model (block function)", rec["model"], fingerprint["model"])
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


def create(path: str, fingerprint: dict, layout: dict, shapes, dtypes) -> None:
    """Creates the group, its arrays, an empty record and the ``ntkjax`` attribute."""
    zarr = _zarr()
    empty_dir = os.path.isdir(path) and not os.listdir(path)
    group = zarr.open_group(path, mode="w" if empty_dir else "w-", zarr_format=3)
    b1, b2 = layout["block"]
    for name, shape, dtype in zip(layout["names"], shapes, dtypes, strict=True):
        chunks = (b1, b2, *shape[2:])
        group.create_array(name, shape=tuple(shape), chunks=chunks, dtype=dtype,
                           fill_value=np.nan if np.issubdtype(dtype, np.floating) else 0,
                           compressors=None)
    n1, n2 = shapes[0][:2]
    grid = (-(-n1 // b1), -(-n2 // b2))
    group.create_array(_RECORD, shape=grid, chunks=(1, 1), dtype="uint8", fill_value=0,
                       compressors=None)
    group.attrs["ntkjax"] = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "layout": layout,
        "num_processes": jax.process_count(),
    }


def open_store(path: str) -> BlockStore:
    zarr = _zarr()
    group = zarr.open_group(path, mode="r+")
    meta = dict(group.attrs)["ntkjax"]
    assert isinstance(meta, dict)
    return BlockStore(path, group, meta)
