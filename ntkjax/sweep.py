"""Width sweeps of kernel-tracked training, streamed to a resumable JSON-lines file.

:func:`sweep` trains an MLP (:class:`ntkjax.models.MLP`) for every width x learning rate, with
all seeds of one (width, learning rate) vmapped inside one compiled program
(:func:`ntkjax.training.make_train_fn`), and appends one JSON row per (width, seed, learning
rate) as soon as that program finishes. Each row is written with a single ``write`` of a whole
line followed by ``flush`` and ``fsync``, so an interruption loses no finished row; a re-run
with the same configuration reads the file and skips the rows it holds (rows of other
configurations in the same file are kept and ignored: every row carries a ``config_id``).

File format: the first line of every sweep file is the header :data:`SWEEP_HEADER`
(``{"format": "ntkjax.sweep", "version": 1}``), every further line one row (a header line
further down, left by concatenating shard files, is skipped). An existing file that does not
start with the header is refused, never appended to or cut. Only an unparsable last line
without a newline (a row torn by a kill) is cut before appending; a complete last row without
a newline (a file rewritten with ``"\n".join(rows)``) is kept and gets its newline.

The rows hold the loss, relative NTK change (probe set), relative parameter change and test loss
at every record, the per-step loss, divergence (``diverged``, ``diverged_at``, ``valid``), and the
stability check of :func:`ntkjax.training.learning_rate_check` (``max_learning_rate =
2n/lambda_max``, ``stable``), and ``seconds``: the wall time of the seeds program (compilation
included) divided by its number of seeds. Non-finite numbers are written as ``null``.

Across devices and machines. The seeds of one (width, learning rate) run as one program whose
seed axis is split across the local devices (:func:`shard_seeds`: a ``jax.sharding.Mesh`` over
``jax.local_devices()`` and ``jax.shard_map``; seeds are padded to a multiple of the device
count with copies of the last seed, whose rows are dropped). Each seed's computation is the one
it would have on one device, so the rows equal the one-device rows up to float rounding. With
``shard=(K, N)`` (``ntkjax sweep --shard K/N``), N independent processes split the (width,
learning rate) groups: group i of the request, in (learning rate, width) order, belongs to
shard ``i mod N``, whatever is already done. Under ``jax.distributed`` (``jax.process_count() >
1``) the default shard is ``(jax.process_index(), jax.process_count())``. Shard K of N appends
to its own file, ``<stem>.shard-K-of-N<suffix>`` beside ``out_path`` (:func:`shard_path`), and
records ``shard: [K, N]`` in every row; :func:`load_rows` and the resume merge the unsharded
file and every shard file of ``out_path``, keeping the first row of each (configuration, width,
seed, learning rate) in a fixed file order (unsharded file, then shard files by N and K).

``ntkjax sweep`` (:mod:`ntkjax.study.sweep_command`) is its command line, with named presets.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntkjax._checks import check_choice
from ntkjax._progress import progress
from ntkjax.empirical import NTKMethod
from ntkjax.losses import mse_loss
from ntkjax.models import MLP
from ntkjax.nn.dense import PARAMETERIZATIONS, Parameterization
from ntkjax.scaling import fit_power_law
from ntkjax.tasks import gaussian_regression, sin_regression
from ntkjax.training import (
    StabilityReport,
    TrainingHistory,
    learning_rate_check,
    make_train_fn,
)

if TYPE_CHECKING:  # jax.Device is an alias that type checkers cannot use in annotations
    from jaxlib._jax import Device
else:
    from jax import Device

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "SWEEP_HEADER",
    "Dataset",
    "Optimizer",
    "SweepConfig",
    "check_sweep_file",
    "drift_fit",
    "load_rows",
    "make_data",
    "make_model",
    "make_optimizer",
    "parse_shard",
    "seeds_program",
    "shard_files",
    "shard_path",
    "shard_seeds",
    "summarize",
    "sweep",
    "write_plots",
]

Dataset = Literal["sin", "gaussian"]
Optimizer = Literal["sgd", "momentum", "adam"]
DATASETS: tuple[Dataset, ...] = ("sin", "gaussian")
OPTIMIZERS: tuple[Optimizer, ...] = ("sgd", "momentum", "adam")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything but widths, seeds and learning rates; its hash is a row's ``config_id``.

    Attributes:
      dataset: ``"sin"`` (:func:`ntkjax.tasks.sin_regression`, 1-D inputs, 100-point test
        grid) or ``"gaussian"`` (inputs N(0, I_d), targets ``sin(x . u)`` with a unit vector u).
      num_train, input_dim, num_test: data sizes (``input_dim`` is 1 for ``"sin"``).
      num_probe: probe inputs of the tracked NTK, drawn N(0, I_d).
      depth: hidden layers; the MLP is ``features=(width,) * depth + (1,)``.
      activation, w_std, b_std, parameterization: passed to :class:`ntkjax.models.MLP`.
      num_steps, record_every, batch_size: as in :func:`ntkjax.training.make_train_fn`.
      optimizer: ``"sgd"``, ``"momentum"`` (0.9) or ``"adam"``, at each learning rate.
      track_kernel: compute the probe NTK change (False: plain training, for benchmarks).
      ntk_method: :func:`ntkjax.empirical_ntk_fn` method.
      data_seed: PRNG seed of the data and probe set (seeds vary the initialization and the
        minibatch order only).
      dtype: ``"float32"`` or ``"float64"`` (the latter needs ``jax.enable_x64``).
    """

    dataset: Dataset = "sin"
    num_train: int = 50
    input_dim: int = 1
    num_test: int = 100
    num_probe: int = 20
    depth: int = 1
    activation: str = "relu"
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.0
    parameterization: Parameterization = "ntk"
    num_steps: int = 500
    record_every: int = 100
    batch_size: int | None = None
    optimizer: Optimizer = "sgd"
    track_kernel: bool = True
    ntk_method: NTKMethod = "auto"
    data_seed: int = 0
    dtype: str = "float32"

    def validate(self) -> None:
        check_choice(self.dataset, DATASETS, "dataset")
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_choice(self.parameterization, PARAMETERIZATIONS, "parameterization")
        check_choice(self.dtype, ("float32", "float64"), "dtype")
        if self.dataset == "sin" and self.input_dim != 1:
            raise ValueError(f"the sin dataset has input_dim 1; got input_dim={self.input_dim}.")
        for name in ("num_train", "input_dim", "num_test", "num_probe", "depth", "num_steps",
                     "record_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.num_steps % self.record_every:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be a multiple of record_every "
                f"({self.record_every})."
            )
        if self.dtype == "float64" and not jax.config.read("jax_enable_x64"):
            raise ValueError("dtype float64 needs 64-bit JAX: wrap the call in jax.enable_x64().")

    def config_id(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- data and model


def make_data(config: SweepConfig) -> dict[str, jax.Array]:
    """Training, test and probe arrays of ``config`` (deterministic in ``data_seed``)."""
    dtype = jnp.dtype(config.dtype)
    key_data, key_probe = jax.random.split(jax.random.PRNGKey(config.data_seed))
    if config.dataset == "sin":
        data = sin_regression(key_data, num_train=config.num_train, num_test=config.num_test,
                              dtype=dtype)
    else:
        data = gaussian_regression(key_data, num_train=config.num_train, num_test=config.num_test,
                                   input_dim=config.input_dim, dtype=dtype)
    x_train, y_train, x_test, y_test = data
    probe_x = jax.random.normal(key_probe, (config.num_probe, config.input_dim), dtype)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "probe_x": probe_x}


def make_model(config: SweepConfig, width: int) -> MLP:
    """The MLP of ``config`` with ``depth`` hidden layers of ``width`` units and one output."""
    return MLP(
        features=(int(width),) * config.depth + (1,),
        activation=config.activation,
        w_std=config.w_std,
        b_std=config.b_std,
        parameterization=config.parameterization,
    )


def make_optimizer(name: Optimizer, learning_rate: float) -> optax.GradientTransformation:
    """``optax.sgd``, ``optax.sgd`` with momentum 0.9, or ``optax.adam`` at ``learning_rate``."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    return optax.adam(learning_rate)


_SEED_AXIS = "seeds"


def _local_devices(devices: Sequence[Device] | None) -> list[Device]:
    """``devices`` (default: ``jax.local_devices()``) as a list, checked to be non-empty and this
    process's own."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("the seeds need at least one device; got an empty list of devices.")
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"seeds are split over this process's devices only; {foreign} belong to other "
            f"processes (use shard=(K, N) to split work between processes)."
        )
    return devices


def shard_seeds(
    fn: Callable[[Any, Any], Any],
    *,
    devices: Sequence[Device] | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[Any, Any], Any]:
    """``run(batched, shared)``: ``fn`` compiled with the leading (seed) axis split over devices.

    ``fn(batched, shared)`` must treat the entries along the leading axis of every leaf of
    ``batched`` independently (a ``jax.vmap`` over it, for instance) and return a pytree whose
    leaves all carry that axis; ``shared`` (data) is replicated on every device. The devices form
    a one-axis ``jax.sharding.Mesh``; ``jax.shard_map`` runs ``fn`` on each device's slice of the
    seeds, with no communication between devices, so each entry is computed as on one device
    (equal up to float rounding, as XLA may fuse a batch of another size differently). A
    leading size that is not a multiple of the device count is padded with copies of the last
    entry, and the padding is cut from the outputs. Under ``jax.distributed`` the mesh holds
    only this process's devices, so processes run independent programs.

    Args:
      fn: the per-shard function (traced once per shape; its Python structure is static).
      devices: the devices to split over; default ``jax.local_devices()``.
      compiler_options: XLA options of the ``jax.jit`` compilation.

    Returns:
      ``run(batched, shared)``, returning ``fn``'s outputs for the unpadded entries, as arrays
      sharded over the devices.

    Raises:
      ValueError: ``devices`` is empty or holds another process's device; at call time,
        ``batched`` has no leaves, leaves of different leading sizes, or a leading size of 0.

    >>> import jax, jax.numpy as jnp
    >>> run = shard_seeds(jax.vmap(lambda k, x: jax.random.normal(k) * x, in_axes=(0, None)))
    >>> keys = jnp.stack([jax.random.PRNGKey(s) for s in range(3)])
    >>> run(keys, jnp.float32(2.0)).shape
    (3,)
    """
    devices = _local_devices(devices)
    mesh = Mesh(np.array(devices), (_SEED_AXIS,))
    split = NamedSharding(mesh, PartitionSpec(_SEED_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    program = jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(_SEED_AXIS), PartitionSpec()),
                      out_specs=PartitionSpec(_SEED_AXIS), check_vma=False),
        compiler_options=compiler_options,
    )
    count = len(devices)

    def run(batched: Any, shared: Any) -> Any:
        sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1
                 for leaf in jax.tree.leaves(batched)}
        if len(sizes) != 1 or min(sizes) < 1:
            raise ValueError(
                "shard_seeds: every leaf of the batched argument needs the same leading (seed) "
                f"axis of size >= 1; got leading sizes {sorted(sizes)} (-1: a scalar)."
            )
        size = sizes.pop()
        pad = -size % count
        if pad:
            batched = jax.tree.map(
                lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), batched)
        out = program(jax.device_put(batched, split), jax.device_put(shared, replicated))
        return jax.tree.map(lambda a: a[:size], out) if pad else out

    return run


def seeds_program(
    config: SweepConfig,
    width: int,
    learning_rate: float,
    *,
    compiler_options: dict[str, Any] | None = None,
    devices: Sequence[Device] | None = None,
) -> Callable[[jax.Array, dict[str, jax.Array]], tuple[TrainingHistory, StabilityReport]]:
    """``run(seed_keys, data) -> (history without final params, stability)``, all seeds vmapped.

    ``seed_keys`` is an (S, 2) array of PRNG keys; seed s initializes from its key and draws
    minibatches from ``fold_in(key, 1)``. The seeds are split over ``devices`` (default: all
    local devices) by :func:`shard_seeds`, which jits the program with ``compiler_options``
    (e.g. :data:`ntkjax.compile_options.FAST_COMPILE` for short runs).
    """
    model = make_model(config, width)
    train = make_train_fn(
        model.apply,
        optimizer=make_optimizer(config.optimizer, learning_rate),
        num_steps=config.num_steps,
        record_every=config.record_every,
        batch_size=config.batch_size,
        track_kernel=config.track_kernel,
        ntk_method=config.ntk_method,
    )

    def one_seed(key, data):
        params0 = model.init(key, data["x_train"][:1])
        history = train(
            params0, data["x_train"], data["y_train"], probe_x=data["probe_x"],
            x_test=data["x_test"], key=jax.random.fold_in(key, 1),
        )
        stability = learning_rate_check(
            model.apply, params0, data["x_train"], learning_rate=learning_rate,
            ntk_method=config.ntk_method,
        )
        return history._replace(final_params=None), stability

    return shard_seeds(jax.vmap(one_seed, in_axes=(0, None)), devices=devices,
                       compiler_options=compiler_options)


# --------------------------------------------------------------------------- JSON lines


def _finite_or_none(values) -> Any:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr) if np.isfinite(arr) else None
    return [float(v) if np.isfinite(v) else None for v in arr]


SWEEP_HEADER = {"format": "ntkjax.sweep", "version": 1}
_HEADER_LINE = json.dumps(SWEEP_HEADER) + "\n"


def _is_header(value: Any) -> bool:
    return isinstance(value, dict) and value.get("format") == SWEEP_HEADER["format"]


def _split_sweep_file(path: Path) -> tuple[list[str], str]:
    """``(lines, tail)`` of an existing sweep file: its whole lines after the header, and the
    text after its last newline (``""``, a row without a newline, or a torn row).

    Raises ValueError, naming the file, unless it is empty or starts with the header line
    (a file holding only the start of the header, from a kill while it was written, counts as
    empty)."""
    data = path.read_bytes()
    if not data or _HEADER_LINE.encode().startswith(data):
        return [], ""
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a sweep file (not text): refusing to append.") from err
    first, newline, rest = text.partition("\n")
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not newline or not isinstance(header, dict) or not _is_header(header):
        raise ValueError(
            f"{path} is not a sweep file: it does not start with the sweep header line "
            f"{_HEADER_LINE.strip()}; refusing to append to it or cut it. Pass another --out "
            "(a sweep file written by an older ntkjax needs this line prepended)."
        )
    if header.get("version") != SWEEP_HEADER["version"]:
        raise ValueError(f"{path} is a sweep file of version {header.get('version')}; this "
                         f"ntkjax reads version {SWEEP_HEADER['version']}.")
    lines = rest.split("\n")
    return lines[:-1], lines[-1]


def _parse_tail(tail: str) -> Any:
    """The row in the text after the last newline, or None when it is empty or torn."""
    try:
        return json.loads(tail) if tail.strip() else None
    except json.JSONDecodeError:
        return None


def _read_rows(path: Path) -> list[dict]:
    """The rows of one file (a torn last line, from a crash, is skipped; a complete last row
    without a newline is kept); ValueError for a file that is not a sweep file."""
    if not path.exists():
        return []
    lines, tail = _split_sweep_file(path)
    rows = []
    for line in [*lines, tail]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not _is_header(row):
            rows.append(row)
    return rows


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (0-based shard K of N, ``0 <= K < N``) as ``(K, N)``.

    Raises:
      ValueError: ``text`` is not two integers ``K/N`` with ``0 <= K < N``.

    >>> parse_shard("2/4")
    (2, 4)
    """
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
    if match is None:
        raise ValueError(
            f"a shard is K/N, the 0-based shard K of N processes (0 <= K < N), e.g. 0/4; "
            f"got {text!r}."
        )
    return _check_shard((int(match[1]), int(match[2])))


def _check_shard(shard: Any) -> tuple[int, int]:
    """``shard`` as a validated ``(K, N)`` pair of ints with ``0 <= K < N``."""
    if isinstance(shard, str):
        return parse_shard(shard)
    try:
        index, count = shard
    except (TypeError, ValueError) as err:
        raise ValueError(f"shard must be a pair (K, N) or the text 'K/N'; got {shard!r}.") from err
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
               for v in (index, count)):
        raise ValueError(f"shard (K, N) must hold two integers; got {shard!r}.")
    index, count = int(index), int(count)
    if count < 1:
        raise ValueError(f"the number of shards N must be >= 1; got shard {index}/{count}.")
    if not 0 <= index < count:
        raise ValueError(
            f"shard K of N is 0-based: 0 <= K < N = {count}; got shard {index}/{count}."
        )
    return index, count


def shard_path(out_path: str | Path, shard: tuple[int, int]) -> Path:
    """The rows file of shard K of N beside ``out_path``: ``<stem>.shard-K-of-N<suffix>``.

    Shard 0 of 1 is ``out_path`` itself (an unsharded sweep).

    >>> str(shard_path("runs/sweep.jsonl", (1, 4)))
    'runs/sweep.shard-1-of-4.jsonl'
    """
    index, count = _check_shard(shard)
    out_path = Path(out_path)
    if count == 1:
        return out_path
    return out_path.with_name(f"{out_path.stem}.shard-{index}-of-{count}{out_path.suffix}")


def shard_files(out_path: str | Path) -> list[tuple[tuple[int, int], Path]]:
    """The existing shard files of ``out_path`` as ``((K, N), path)``, sorted by N, then K."""
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out_path.stem) + r"\.shard-(\d+)-of-(\d+)"
                         + re.escape(out_path.suffix))
    found = []
    for path in out_path.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found.append(((int(match[1]), int(match[2])), path))
    return sorted(found, key=lambda item: (item[0][1], item[0][0]))


def load_rows(path: str | Path, *, merge_shards: bool = True) -> list[dict]:
    """The complete rows of a sweep: the file ``path`` and, with ``merge_shards``, the files of
    all its shards (:func:`shard_files`), a torn last line (from a crash) skipped in each.

    Rows are read in a fixed order (``path``, then shard files by N and K, each in file order);
    of rows with the same (configuration, width, seed, learning rate), only the first is kept.
    """
    path = Path(path)
    paths = [path] + ([p for _, p in shard_files(path)] if merge_shards else [])
    rows, seen = [], set()
    for file in paths:
        for row in _read_rows(file):
            try:
                key = _row_key(row)
            except (KeyError, TypeError, ValueError):
                rows.append(row)  # not a keyed row: kept as it is
                continue
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def _check_shard_files(out_path: Path, shard: tuple[int, int] | None) -> None:
    """Refuses a sharded run whose output already has shard files of another shard count, and a
    shard file holding rows recorded for another shard."""
    if shard is None:
        return
    index, count = shard
    others = sorted({n for (_, n), _ in shard_files(out_path) if n != count})
    if others:
        names = ", ".join(p.name for (_, n), p in shard_files(out_path) if n != count)
        raise ValueError(
            f"{out_path} already has shard files written with N = "
            f"{' and '.join(map(str, others))} shards ({names}); this run asks for shard "
            f"{index}/{count}, N = {count}. Use the same N as before, or another output."
        )
    own = shard_path(out_path, shard)
    for row in _read_rows(own):
        recorded = row.get("shard") if isinstance(row, dict) else None
        if recorded is not None and list(recorded) != [index, count]:
            raise ValueError(
                f"{own} holds rows of shard {recorded[0]}/{recorded[1]}, not of shard "
                f"{index}/{count}: refusing to append."
            )


def _resolve_shard(shard: Any) -> tuple[int, int] | None:
    """``shard`` validated; ``None``: the process index / count under ``jax.distributed``, else
    unsharded; one shard of one is unsharded."""
    if shard is None:
        if jax.process_count() == 1:
            return None
        shard = (jax.process_index(), jax.process_count())
    index, count = _check_shard(shard)
    return None if count == 1 else (index, count)


_ROW_KEYS = ("config_id", "width", "seed", "learning_rate", "config", "loss", "diverged")


def _refuse_unwritable(path: Path, err: OSError, what: str = "sweep output") -> ValueError:
    return ValueError(f"cannot write the {what} {path}: {err.strerror or err}.")


def _try_new_file_in(path: Path) -> None:
    """Creates ``path``'s folder and tries to write a new file there, without ever creating
    ``path`` itself: the processes of one sweep check the same output at once, and a file that
    one of them made and removed would break another's read (a uniquely named probe file
    instead, and the name's length against the folder's limit). OSError -> ValueError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent, prefix=".ntkjax-probe-"):
            pass
    except OSError as err:
        raise _refuse_unwritable(path, err) from err
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")  # -1: no limit
    except (OSError, ValueError):  # a file system that does not say: left to the first write
        return
    if 0 < name_max < len(os.fsencode(path.name)):
        raise _refuse_unwritable(
            path, OSError(errno.ENAMETOOLONG, f"its name is longer than {name_max} bytes"))


def check_sweep_file(path: str | Path) -> None:
    """Raises ValueError, leaving the file untouched, unless ``path`` can hold sweep rows: a
    file path (not a folder, not below a file) that does not exist yet (its folder is created
    and a uniquely named file is tried there; ``path`` itself is never created by the check,
    so that the processes of one sweep can check it at once) or a writable sweep file -- the
    header line :data:`SWEEP_HEADER`, then every line a JSON object with a row's keys, except a
    torn last line (a run killed while writing; it is skipped on reading). Writability is
    tried, not read off permission bits (root passes ``os.access`` on read-only and virtual
    file systems)."""
    path = Path(path)
    try:
        exists = path.exists()  # stat raises OSError on a name too long for the file system
    except OSError as err:
        raise _refuse_unwritable(path, err) from err
    if path.is_dir():
        raise ValueError(f"the sweep output {path} is a folder; give a file name (*.jsonl).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"the sweep output {path} lies below {parent}, a file.")
            break
    if not exists:
        _try_new_file_in(path)
        return
    try:
        with path.open("ab"):
            pass
    except OSError as err:
        raise _refuse_unwritable(path, err) from err
    lines, tail = _split_sweep_file(path)
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not a sweep file: line {number} is not JSON; refusing to append."
            ) from err
        if _is_header(row):
            continue
        if not isinstance(row, dict) or not all(key in row for key in _ROW_KEYS):
            raise ValueError(
                f"{path} is not a sweep file: line {number} is not a row object with keys "
                f"{', '.join(_ROW_KEYS)}; refusing to append."
            )
    last = _parse_tail(tail)
    if tail.strip() and last is None and not tail.lstrip().startswith("{"):
        raise ValueError(f"{path} is not a sweep file: its last line is not a row.")
    if last is not None and not (_is_header(last) or (
            isinstance(last, dict) and all(key in last for key in _ROW_KEYS))):
        raise ValueError(f"{path} is not a sweep file: its last line is not a row object with "
                         f"keys {', '.join(_ROW_KEYS)}; refusing to append.")


def _append_row(path: Path, row: dict) -> None:
    """Appends one whole line in one write (after the header, in a new or empty file), then
    flushes it to disk; an OSError becomes a ValueError naming the file."""
    line = json.dumps(row, allow_nan=False) + "\n"
    try:
        with path.open("a") as f:
            if f.tell() == 0:
                line = _HEADER_LINE + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _refuse_unwritable(path, err) from err


def _repair_tail(path: Path) -> None:
    """Before appending: cuts an unparsable last line (a run killed mid-write: an incomplete
    row, never a finished one) and ends a complete last row that lacks its newline, so that the
    next row starts on a line of its own and the file stays all rows. A file holding only the
    start of the header is emptied (the header is written with the first row)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    try:
        with path.open("r+b") as f:
            if _HEADER_LINE.encode().startswith(data):
                f.truncate(0)
            elif _parse_tail(data[data.rfind(b"\n") + 1:].decode()) is not None:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _refuse_unwritable(path, err) from err


def _row_key(row: dict) -> tuple:
    return (row["config_id"], int(row["width"]), int(row["seed"]), float(row["learning_rate"]))


# --------------------------------------------------------------------------- the sweep


def sweep(
    *,
    widths: Sequence[int],
    seeds: int | Sequence[int],
    out_path: str | Path,
    learning_rates: Sequence[float] | None = None,
    config: SweepConfig | None = None,
    show_progress: bool = True,
    compiler_options: dict[str, Any] | None = None,
    shard: tuple[int, int] | str | None = None,
    devices: Sequence[Device] | None = None,
) -> list[dict]:
    """Trains every (width, learning rate) for all seeds (vmapped) and streams rows to a file.

    Args:
      widths: hidden-layer widths.
      seeds: a number k (seeds 0..k-1) or explicit seed integers.
      out_path: the JSON-lines file; appended to, created with its folder if needed.
      learning_rates: defaults to ``(0.02,)``.
      config: a :class:`SweepConfig` (default: ``SweepConfig()``, one hidden ReLU layer in the
        NTK parameterization on 50 sin-regression points).
      show_progress: draw a progress bar over (width, learning rate) programs on stderr.
      compiler_options: XLA options for every (width, learning rate) program, e.g.
        :data:`ntkjax.compile_options.FAST_COMPILE` when runs are short and compiling dominates.
      shard: ``(K, N)`` or ``"K/N"``: run only shard K (0-based) of N of the (width, learning
        rate) groups -- group i, in (learning rate, width) order of the de-duplicated request,
        belongs to shard ``i mod N`` -- appending to :func:`shard_path` ``(out_path, (K, N))``.
        Every shard must be given the same widths and learning rates. Default: ``(process
        index, process count)`` under ``jax.distributed`` with more than one process, else
        unsharded. ``(0, 1)`` is unsharded.
      devices: the local devices the seeds of a group are split over (:func:`shard_seeds`);
        default all of ``jax.local_devices()``.

    Returns:
      The rows of this configuration for the requested seeds of this shard's (width, learning
      rate) groups (all groups when unsharded), in (learning rate, width, seed) order: the ones
      already in the sweep's files (:func:`load_rows`, all shards merged) and the new ones.

    Raises:
      ValueError: bad widths, seeds, learning rates, configuration, shard or devices (empty,
        or another process's); an output that is not a sweep file or not writable; shard files
        of ``out_path`` written for another number of shards N. Nothing is written or trained
        then.
    """
    config = SweepConfig() if config is None else config
    config.validate()
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty list of positive integers; got {widths}.")
    seed_list = list(range(int(seeds))) if isinstance(seeds, int | np.integer) else [
        int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive count or a non-empty list of integers.")
    lrs = [0.02] if learning_rates is None else [float(lr) for lr in learning_rates]
    if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"learning_rates must be finite and positive; got {lrs}.")
    shard_pair = _resolve_shard(shard)
    devices = _local_devices(devices)
    out_path = Path(out_path)
    write_path = out_path if shard_pair is None else shard_path(out_path, shard_pair)
    # every check before anything is written
    check_sweep_file(out_path)
    if write_path != out_path:
        check_sweep_file(write_path)
    _check_shard_files(out_path, shard_pair)
    _repair_tail(write_path)
    config_id = config.config_id()
    done = {_row_key(r): r for r in load_rows(out_path)
            if isinstance(r, dict) and r.get("config_id") == config_id}

    all_groups = [(lr, width) for lr in dict.fromkeys(lrs) for width in dict.fromkeys(widths)]
    mine = [group for i, group in enumerate(all_groups)
            if shard_pair is None or i % shard_pair[1] == shard_pair[0]]
    groups = []
    for lr, width in mine:
        missing = [s for s in dict.fromkeys(seed_list) if (config_id, width, s, lr) not in done]
        if missing:
            groups.append((lr, width, missing))
    data = make_data(config)
    device = str(devices[0]) if devices else ""
    description = "sweep" if shard_pair is None else f"sweep {shard_pair[0]}/{shard_pair[1]}"
    for lr, width, missing in progress(
        groups, total=len(groups), description=description, enabled=show_progress and bool(groups)
    ):
        start = time.perf_counter()
        run = seeds_program(config, width, lr, compiler_options=compiler_options,
                            devices=devices)
        keys = jnp.stack([jax.random.PRNGKey(s) for s in missing])
        history, stability = jax.device_get(run(keys, data))
        seconds = time.perf_counter() - start
        for i, seed in enumerate(missing):
            row = _make_row(config, config_id, width, seed, lr, history, stability, i, data)
            row.update(seconds=seconds / len(missing), backend=jax.default_backend(),
                       device=device, devices=len(devices),
                       shard=None if shard_pair is None else list(shard_pair))
            _append_row(write_path, row)
            done[_row_key(row)] = row
    mine_set = set(mine)
    return [done[(config_id, w, s, lr)] for lr in dict.fromkeys(lrs)
            for w in dict.fromkeys(widths) if (lr, w) in mine_set for s in dict.fromkeys(seed_list)]


def _make_row(config, config_id, width, seed, lr, history, stability, i, data) -> dict:
    def pick(a: Any) -> np.ndarray:
        return np.asarray(a)[i]

    test_loss = jax.vmap(mse_loss, in_axes=(0, None))(
        pick(history.test_predictions), jnp.asarray(data["y_test"])
    )
    diverged = bool(pick(history.diverged))
    loss = pick(history.loss)
    kernel_change = None if history.kernel_change is None else pick(history.kernel_change)
    param_change = pick(history.param_change)
    return {
        "config_id": config_id,
        "width": int(width),
        "seed": int(seed),
        "learning_rate": float(lr),
        "config": dataclasses.asdict(config),
        "steps": [int(s) for s in pick(history.steps)],
        "loss": _finite_or_none(loss),
        "test_loss": _finite_or_none(test_loss),
        "kernel_change": None if kernel_change is None else _finite_or_none(kernel_change),
        "param_change": _finite_or_none(param_change),
        "step_loss": _finite_or_none(pick(history.step_loss)),
        "valid": [bool(v) for v in pick(history.valid)],
        "diverged": diverged,
        "diverged_at": int(pick(history.diverged_at)) if diverged else None,
        "final_loss": _finite_or_none(loss[-1]),
        "final_kernel_change": None if kernel_change is None else _finite_or_none(
            kernel_change[-1]),
        "final_param_change": _finite_or_none(param_change[-1]),
        "max_learning_rate": _finite_or_none(pick(stability.max_learning_rate)),
        "lambda_max": _finite_or_none(pick(stability.lambda_max)),
        "lambda_min": _finite_or_none(pick(stability.lambda_min)),
        "stable": bool(pick(stability.stable)),
    }


# --------------------------------------------------------------------------- summaries


def _series_name(row: dict) -> str:
    """What distinguishes runs of different configurations in one table or figure."""
    config = row["config"]
    return f"{config['parameterization']} lr {row['learning_rate']:g}"


def _group(rows: list[dict]) -> dict[tuple[str, str, int], list[dict]]:
    """Rows grouped by (series name, config_id, width), sorted."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        key = (_series_name(row), row["config_id"], row["width"])
        groups.setdefault(key, []).append(row)
    return dict(sorted(groups.items()))


def drift_fit(rows: list[dict]) -> dict[str, dict]:
    """Per series (``"<parameterization> lr <lr>"``): widths, the mean final kernel change of
    runs that did not diverge, and the fitted power law ``change ~ width^slope`` (None with
    fewer than two widths)."""
    out: dict[str, dict] = {}
    for (name, _, width), group in _group(rows).items():
        values = [r["final_kernel_change"] for r in group
                  if not r["diverged"] and r.get("final_kernel_change") is not None]
        entry = out.setdefault(name, {"widths": [], "mean": [], "per_seed": []})
        if values and np.mean(values) > 0:
            entry["widths"].append(width)
            entry["mean"].append(float(np.mean(values)))
            entry["per_seed"].append(values)
    for entry in out.values():
        entry["fit"] = (fit_power_law(entry["widths"], entry["mean"])
                        if len(entry["widths"]) >= 2 else None)
    return out


def summarize(rows: list[dict]) -> str:
    """A text table: one line per (learning rate, width) over its seeds, plus drift slopes."""
    header = (f"{'series':>16} {'width':>6} {'seeds':>5} {'final loss':>11} {'NTK change':>19} "
              f"{'param change':>12} {'2n/lmax':>9} {'unstable':>8} {'diverged':>8} {'s/seed':>7}")
    lines = [header, "-" * len(header)]
    nan = float("nan")
    for (name, _, width), group in _group(rows).items():
        ok = [r for r in group if not r["diverged"]]
        mean = lambda key, rs=ok: (float(np.mean([r[key] for r in rs if r[key] is not None]))
                                   if any(r[key] is not None for r in rs) else nan)
        kc = [r["final_kernel_change"] for r in ok if r.get("final_kernel_change") is not None]
        kc_text = f"{np.mean(kc):.3e}+-{np.std(kc):.1e}" if kc else "n/a"
        div = [r for r in group if r["diverged"]]
        div_text = f"{len(div)}/{len(group)}"
        if div:
            div_text += f"@{min(r['diverged_at'] for r in div)}"
        lines.append(
            f"{name:>16} {width:>6d} {len(group):>5d} {mean('final_loss'):>11.4e} "
            f"{kc_text:>19} {mean('final_param_change'):>12.3e} "
            f"{mean('max_learning_rate', group):>9.3g} "
            f"{sum(not r['stable'] for r in group):>4d}/{len(group):<3d} {div_text:>8} "
            f"{mean('seconds', group):>7.2f}"
        )
    for name, entry in drift_fit(rows).items():
        if entry["fit"] is not None:
            lines.append(f"{name}: NTK change ~ width^{entry['fit'].slope:.3f} "
                         f"(fit over widths {entry['widths']}; theory -0.5)")
    lines.append("final loss / NTK change / param change: means over seeds that did not "
                 "diverge; unstable: lr above 2n/lambda_max of the initial NTK.")
    return "\n".join(lines)


def write_plots(rows: list[dict], out_dir: str | Path, *, prefix: str = "sweep") -> list[Path]:
    """Drift-vs-width (log-log with fitted slope) and loss-curve PNGs; returns their paths."""
    from ntkjax.plotting import plot_drift_vs_width, plot_loss_curves  # matplotlib on use

    out_dir = Path(out_dir)
    paths = []
    for name, entry in drift_fit(rows).items():
        if not entry["widths"]:
            continue
        path = out_dir / f"{prefix}_drift_vs_width_{_slug(name)}.png"
        plot_drift_vs_width(
            entry["widths"], entry["per_seed"],
            title=f"NTK change after training vs width ({name})", path=path,
        )
        paths.append(path)
    by_series: dict[str, dict] = {}
    for (name, _, width), group in _group(rows).items():
        step_losses = np.array([[np.nan if v is None else v for v in r["step_loss"]]
                                for r in group], dtype=np.float64)
        for j, r in enumerate(group):
            if r["diverged"]:
                step_losses[j, r["diverged_at"]:] = np.nan
        n_div = sum(r["diverged"] for r in group)
        label = f"width {width}" + (f" ({n_div}/{len(group)} diverged)" if n_div else "")
        by_series.setdefault(name, {})[label] = (np.arange(step_losses.shape[1]), step_losses)
    for name, curves in by_series.items():
        path = out_dir / f"{prefix}_loss_curves_{_slug(name)}.png"
        plot_loss_curves(curves, title=f"Training loss ({name})", path=path)
        paths.append(path)
    return paths


def _slug(name: str) -> str:
    return name.replace(" lr ", "_lr").replace(" ", "_")
