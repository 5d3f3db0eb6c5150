"""Kernel regression beyond memory: preconditioned conjugate gradients on blocked kernels.

Kernel ridge regression ``(K + mu I) alpha = y`` and its predictions ``f(x) = K(x, X) alpha``
(the ``t -> inf`` limit of gradient-flow training, :mod:`ntkjax.predict`) for ``n`` too large
to hold the ``n x n`` kernel in memory: the kernel is touched only through products ``K V``,

* recomputed block by block at every product from an analytic kernel (a module or kernel
  function and the inputs ``x``): ``(K V)_I = sum_J K(x_I, x_J) V_J`` over row blocks ``I``
  (a Python loop of ONE compiled call) and column tiles ``J`` (a ``lax.scan`` inside it), so
  memory is ``O(block^2 + n C)``, never ``n^2``;
* read by row slices from a stored ``(n, n)`` array (``np.ndarray``, ``np.memmap``, a zarr
  array: anything with ``.shape`` and ``a[i:j]``);
* or applied matrix-free by a callable ``v -> K v`` (e.g. :func:`ntkjax.ntk_operator`).

Conjugate gradients (Hestenes & Stiefel 1952) run on all ``C`` right-hand sides in lockstep:
every column has its own step sizes and stops at its own relative residual
``||y - (K + mu I) alpha|| / ||y|| <= tol``, while one product ``K V`` serves all columns (the
expensive kernel evaluation is shared). Block CG (O'Leary 1980) was not chosen: its
``C x C`` recurrences break down when residual columns become dependent, and per-column
stopping is not natural there.

Preconditioner: a rank-``r`` Nyström approximation ``K ~ U diag(lam) U^T`` with the
randomized-Nyström preconditioner of Frangella, Tropp & Udell (2023, "Randomized Nyström
preconditioning", SIAM J. Matrix Anal. Appl. 44(2), eq. (5.3))::

    P^{-1} = (lam_r + mu) U (diag(lam) + mu I)^{-1} U^T + (I - U U^T),

whose preconditioned system has condition number about ``(lam_{r+1} + mu) / mu`` instead of
``(lam_1 + mu) / mu``. The sketch ``Y = K Omega`` uses ``Omega`` = ``r`` columns of the
identity at uniformly random indices (the Nyström method of Williams & Seeger 2001, the
preconditioner of FALKON, Rudi, Carratino & Rosasco 2017) whenever kernel rows are cheap --
analytic kernels (``r`` rows ``K(x_S, X)``) and stored arrays (the row blocks that hold ``S``)
-- and an orthonormalized Gaussian ``Omega`` (Frangella et al., Algorithm 2.1) for matrix-free
callables, which costs ``r`` products. Both are stabilized by the shift ``nu`` of their
Algorithm 2.1.

The host drives the iteration (a Python loop: operators may read files or loop over blocks),
so :func:`kernel_regression_cg` is not itself ``jit``-able; each block product is one compiled
call, and the work items (chunks of tile pairs, row blocks) are dealt round-robin over
``devices`` (JAX dispatches them asynchronously, so several devices work at once). Under
``jax.distributed`` (:func:`ntkjax.initialize_distributed`) the default ``devices`` are those of
every process: each process computes the items of its own devices and the partial products are
summed across processes (an all-gather per product of ``n x C`` numbers), so every process runs
the same, cheap ``O(n C)`` CG recurrences on the same product and ends with the same ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from jax.typing import ArrayLike

from ntkjax._checks import check_choice, check_finite, float_dtype
from ntkjax._placement import Placement, check_same_devices, resolve_devices
from ntkjax._progress import progress as _progress
from ntkjax._tiling import pad_rows, tile_rows
from ntkjax.predict import Predictions

__all__ = [
    "CGResult",
    "NystromEigensystem",
    "gradient_flow_lowrank",
    "kernel_regression_cg",
    "kernel_ridge_predict",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class NystromEigensystem(NamedTuple):
    """Rank-``r`` Nyström approximation ``K ~ vectors diag(values) vectors^T``.

    Attributes:
      vectors: ``(n, r)`` orthonormal columns ``U``.
      values: ``(r,)`` eigenvalues ``lam``, descending, ``>= 0``; they under-estimate the
        kernel's top eigenvalues (``K - U diag(lam) U^T`` is positive semi-definite).
      indices: ``(r,)`` the sampled training indices (column Nyström), or None for a Gaussian
        sketch.

    >>> import jax, numpy as np, ntkjax
    >>> k = np.diag([4.0, 3.0, 2.0, 1.0])  # a stored kernel (any row-sliceable array)
    >>> eig = ntkjax.kernel_regression_cg(k, np.ones(4), rank=4, ridge=0.1,
    ...                                   key=jax.random.key(0)).eigensystem
    >>> np.round(np.asarray(eig.values, np.float64), 5).tolist()  # rank n: the exact spectrum
    [4.0, 3.0, 2.0, 1.0]
    """

    vectors: jax.Array
    values: jax.Array
    indices: np.ndarray | None


class CGResult(NamedTuple):
    """The outcome of :func:`kernel_regression_cg`.

    Attributes:
      alpha: weights solving ``(K + ridge I) alpha = y``, shaped like ``y``.
      iterations: number of operator products in the CG loop (the same for all columns).
      residual_history: ``(iterations + 1, C)`` relative residuals ``||r_k|| / ||y||`` per
        column (the recursively updated residuals of CG).
      converged: ``(C,)`` whether each column reached ``tol``.
      eigensystem: the preconditioner's Nyström eigensystem, or None with ``rank=0``.
      ridge: the ridge ``mu`` that was added to the kernel's diagonal.

    >>> import jax, numpy as np, ntkjax
    >>> k = np.array([[2.0, 1.0], [1.0, 2.0]])
    >>> res = ntkjax.kernel_regression_cg(k, np.array([3.0, 3.0]), rank=0, ridge=1.0)
    >>> np.asarray(res.alpha), bool(res.converged.all())  # (K + I) alpha = y: alpha = (0.75, 0.75)
    (array([0.75, 0.75]...), True)
    """

    alpha: jax.Array
    iterations: int
    residual_history: np.ndarray
    converged: np.ndarray
    eigensystem: NystromEigensystem | None
    ridge: float


# --------------------------------------------------------------------------- operators


def _block_kernel(kernel: Any, get: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(x1, x2) -> (n1, n2)`` array from a module or a kernel function."""
    fn = _module_kernel_fn(kernel) if isinstance(kernel, linen.Module) else kernel

    def block(a: jax.Array, b: jax.Array) -> jax.Array:
        out = fn(a, b)
        if isinstance(out, (jax.Array, np.ndarray)):
            return jnp.asarray(out)
        return getattr(out, get)

    return block


def _module_kernel_fn(module: linen.Module) -> Callable:
    from ntkjax.kernels import kernel_fn  # the kernels module is heavy; import on use

    return kernel_fn(module)


class _KernelFunctionOperator:
    """``V -> K(x_rows, x) V`` recomputed block by block (never storing ``n x n``)."""

    def __init__(self, kernel, x, *, get, block_size, devices, dtype):
        self.block = _block_kernel(kernel, get)
        self.x = jnp.asarray(x, dtype)
        self.n = int(self.x.shape[0])
        self.dtype = dtype
        self.b = min(block_size, self.n)
        self.place = Placement(devices)
        tiled = tile_rows(self.x, self.b)
        self._cols = {d: jax.device_put(tiled, d) for d in self.place.mine.values()}
        block = self.block

        def row_block(row_tiles, i, col_tiles, v_tiles):
            rows = row_tiles[i]

            def step(acc, tile):
                xc, vc = tile
                return acc + jnp.matmul(block(rows, xc), vc, precision=_HIGHEST), None

            acc = jnp.zeros((rows.shape[0], v_tiles.shape[-1]), v_tiles.dtype)
            return jax.lax.scan(step, acc, (col_tiles, v_tiles))[0]

        self._row_block = jax.jit(row_block)

        # Tile pairs (I, J), I <= J, in chunks of `tiles` pairs (the last padded with weight 0):
        # each chunk is one call of one compiled function; chunks go round-robin to devices.
        tiles = tiled.shape[0]
        pairs = [(i, j, 1) for i in range(tiles) for j in range(i, tiles)]
        pairs += [(0, 0, 0)] * (-len(pairs) % tiles)
        self._pairs = np.asarray(pairs, np.int32).reshape(-1, tiles, 3)
        self._pairs_on = {d: jax.device_put(self._pairs, d) for d in self._cols}

        def pair_blocks(col_tiles, v_tiles, pairs):
            def step(acc, pair):
                i, j, w = pair[0], pair[1], pair[2].astype(v_tiles.dtype)
                k = block(col_tiles[i], col_tiles[j])
                acc = acc.at[i].add(w * jnp.matmul(k, v_tiles[j], precision=_HIGHEST))
                off = jnp.where(i == j, 0.0, w).astype(v_tiles.dtype)
                acc = acc.at[j].add(off * jnp.matmul(k.T, v_tiles[i], precision=_HIGHEST))
                return acc, None

            return jax.lax.scan(step, jnp.zeros_like(v_tiles), pairs)[0]

        self._pair_blocks = jax.jit(pair_blocks)

        def kernel_rows(xs, col_tiles):
            out = jax.lax.map(lambda xc: block(xs, xc), col_tiles)  # (tiles, r, b)
            return jnp.moveaxis(out, 0, 1).reshape(xs.shape[0], -1)

        self._kernel_rows = jax.jit(kernel_rows)

    def apply(self, v: jax.Array, row_x: jax.Array) -> jax.Array:
        """``K(row_x, x) v`` for ``v`` of shape ``(n, C)``: row blocks of ``row_x``."""
        v_tiles = tile_rows(v.astype(self.dtype), self.b, mode="zeros")
        row_tiles = tile_rows(jnp.asarray(row_x, self.dtype), self.b)
        rows = {d: jax.device_put(row_tiles, d) for d in self._cols}
        vs = {d: jax.device_put(v_tiles, d) for d in self._cols}
        out = self.place.stack(row_tiles.shape[0],
                               lambda i, d: self._row_block(rows[d], i, self._cols[d], vs[d]),
                               (self.b, v_tiles.shape[-1]), self.dtype)
        return out[: np.shape(row_x)[0]]

    def matmat(self, v: jax.Array) -> jax.Array:
        """``K v``, computing each tile pair ``(I, J)``, ``I <= J``, once (K is symmetric)."""
        v_tiles = tile_rows(v.astype(self.dtype), self.b, mode="zeros")
        vs = {d: jax.device_put(v_tiles, d) for d in self._cols}
        total = None
        for c in range(self._pairs.shape[0]):  # summed as they come: O(n C) memory
            d = self.place.owner(c)
            if d is None:
                continue
            part = jax.device_put(self._pair_blocks(self._cols[d], vs[d], self._pairs_on[d][c]),
                                  self.place.home)
            total = part if total is None else total + part
        total = self.place.total(total, v_tiles.shape, self.dtype)
        return total.reshape(-1, v.shape[1])[: self.n]

    def rows(self, idx: np.ndarray) -> jax.Array:
        """``K(x_idx, x)`` of shape ``(len(idx), n)``."""
        cols = self._cols.get(self.place.home)
        if cols is None:  # this process drives none of the devices: rows on its own device
            cols = jax.device_put(tile_rows(self.x, self.b), self.place.home)
        out = self._kernel_rows(self.x[jnp.asarray(idx)], cols)
        return jax.device_put(out[:, : self.n], self.place.home)


class _StoredOperator:
    """``V -> A V`` for an array-like ``A`` read by row slices ``A[i:j]``."""

    def __init__(self, a, *, block_size, devices, dtype):
        self.a = a
        self.n = int(a.shape[0])
        self.dtype = dtype
        self.b = min(block_size, self.n)
        self.place = Placement(devices)
        self._product = jax.jit(lambda blk, v: jnp.matmul(blk, v, precision=_HIGHEST))

    def _read(self, i: int) -> np.ndarray:
        return pad_rows(np.asarray(self.a[i : i + self.b], dtype=self.dtype), self.b,
                        mode="zeros")

    def matmat(self, v: jax.Array) -> jax.Array:
        v = v.astype(self.dtype)
        vs = {d: jax.device_put(v, d) for d in self.place.mine.values()}
        out = self.place.stack(
            -(-self.n // self.b),
            lambda k, d: self._product(jax.device_put(self._read(k * self.b), d), vs[d]),
            (self.b, v.shape[1]), self.dtype)
        return out[: self.n]

    def rows(self, idx: np.ndarray) -> jax.Array:
        """Rows ``A[idx]``, reading each row block that holds one of them once."""
        order = np.argsort(idx)
        sorted_idx = np.asarray(idx)[order]
        picked = np.empty((len(idx), self.n), self.dtype)
        for start in np.unique(sorted_idx // self.b) * self.b:
            sel = (sorted_idx >= start) & (sorted_idx < start + self.b)
            blk = np.asarray(self.a[int(start) : int(start) + self.b], dtype=self.dtype)
            picked[order[sel]] = blk[sorted_idx[sel] - start]
        return jnp.asarray(picked)


class _CallableOperator:
    """``V -> [op(V[:, c])]_c``: a matrix-free ``(n,) -> (n,)`` map, vmapped over columns."""

    def __init__(self, op, n, dtype):
        self.op = op
        self.n = n
        self.dtype = dtype
        self._batched = jax.vmap(op, in_axes=1, out_axes=1)

    def matmat(self, v: jax.Array) -> jax.Array:
        out = self._batched(v.astype(self.dtype))
        if tuple(np.shape(out)) != tuple(v.shape):
            raise ValueError(
                f"the operator must map vectors of shape ({self.n},) to the same shape; applied "
                f"to {v.shape[1]} columns it returned shape {tuple(np.shape(out))}."
            )
        return jnp.asarray(out, self.dtype)

    rows = None


def _is_stored(obj: Any) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "__getitem__") and not callable(obj)


def _devices(devices: Sequence[Any] | None) -> list[Any]:
    """``devices`` checked (default: every device of every process), the same in all processes."""
    devices = resolve_devices(devices)
    check_same_devices(devices)
    return devices


def _operator(kernel, n, *, x, get, block_size, devices, dtype):
    devices = _devices(devices)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    if x is not None:
        if not (isinstance(kernel, linen.Module) or callable(kernel)):
            raise TypeError(
                "with x given, kernel must be a flax module or a kernel function "
                f"(x1, x2) -> kernel; got {type(kernel).__name__}."
            )
        check_finite(x, "x")
        if np.ndim(x) < 2 or np.shape(x)[0] != n:
            raise ValueError(
                f"x must have shape ({n}, features...) to match y's {n} rows; got shape "
                f"{tuple(np.shape(x))}."
            )
        return _KernelFunctionOperator(kernel, x, get=get, block_size=block_size,
                                       devices=devices, dtype=dtype)
    if isinstance(kernel, linen.Module):
        raise ValueError("a module needs the training inputs: pass x=...")
    if _is_stored(kernel):
        shape = tuple(kernel.shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] != n:
            raise ValueError(
                f"the stored kernel must have shape ({n}, {n}) to match y's {n} rows; got "
                f"shape {shape}."
            )
        return _StoredOperator(kernel, block_size=block_size, devices=devices, dtype=dtype)
    if callable(kernel):
        return _CallableOperator(kernel, n, dtype)
    raise TypeError(
        "kernel must be a flax module or kernel function (with x), an (n, n) array-like read by "
        f"row slices, or a callable v -> K v; got {type(kernel).__name__}."
    )


# --------------------------------------------------------------------------- preconditioner


def _nystrom(op, rank: int, key: jax.Array, sketch: str) -> NystromEigensystem:
    """Frangella, Tropp & Udell (2023), Algorithm 2.1, with ``Omega`` = sampled identity
    columns (``sketch="columns"``) or an orthonormalized Gaussian matrix (``"gaussian"``).

    The host samples and checks; the arithmetic after the sketch is two compiled programs
    (:func:`_sketch_checks`, :func:`_nystrom_factors`), shared by every call of those shapes,
    instead of a dozen single eager operations."""
    n, dtype = op.n, op.dtype
    omega = None
    if sketch == "auto":
        sketch = "columns" if op.rows is not None else "gaussian"
    if sketch == "columns":
        if op.rows is None:
            raise ValueError("sketch='columns' needs kernel rows: a matrix-free callable only "
                             "supports sketch='gaussian'.")
        idx = np.sort(np.asarray(_choice(key, n, (rank,), False)))
        y = op.rows(idx).T.astype(dtype)  # K[:, S] (K symmetric)
    else:
        idx = None
        omega = jnp.linalg.qr(jax.random.normal(key, (n, rank), dtype))[0]
        y = op.matmat(omega)
    finite, top = _sketch_checks(y)
    if not bool(finite):
        raise ValueError("the kernel holds non-finite values (NaN or Inf) in its sampled columns.")
    eps = float(jnp.finfo(dtype).eps)
    nu = math.sqrt(n) * eps * float(top)
    factored, u, values = _nystrom_factors(y, nu, omega, None if idx is None else jnp.asarray(idx))
    if not bool(factored):
        raise ValueError(
            "the kernel is not positive semi-definite: the Cholesky factorization of its "
            f"sampled {rank} x {rank} core failed. Pass a kernel (PSD) matrix or operator."
        )
    return NystromEigensystem(u, values, idx)


#: ``jax.random.choice`` compiled once per ``(n, shape, replace)`` (its eager form is several
#: single-operation programs): the same draws.
_choice = jax.jit(jax.random.choice, static_argnums=(1, 2, 3))


@jax.jit
def _sketch_checks(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whether the sketch ``y`` is finite, and its Frobenius norm (:func:`_norms`, scaled)."""
    return jnp.all(jnp.isfinite(y)), jnp.max(_norms(y.reshape(-1, 1)))


@jax.jit
def _nystrom_factors(y, nu, omega, idx) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Algorithm 2.1's factors from the sketch ``y = K Omega`` and the shift ``nu``: whether
    the Cholesky factor of the shifted core is finite, ``U`` and ``lam``. ``Omega`` is
    ``omega``, or the identity's columns ``idx`` (``omega`` None)."""
    rank = y.shape[1]
    core = y[idx] if omega is None else omega.T @ y
    core = 0.5 * (core + core.T) + nu * jnp.eye(rank, dtype=y.dtype)
    if omega is not None:
        y_nu = y + nu * omega
    else:
        y_nu = y.at[idx, jnp.arange(rank)].add(nu)
    chol = jnp.linalg.cholesky(core)
    b = jax.scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T  # Y_nu C^{-T}
    u, s, _ = jnp.linalg.svd(b, full_matrices=False)
    return jnp.all(jnp.isfinite(chol)), u, jnp.maximum(s**2 - nu, 0.0)


def _preconditioner(eig: NystromEigensystem | None, mu: float) -> Callable:
    """``r -> P^{-1} r`` of Frangella et al. (2023), eq. (5.3); identity without ``eig``.
    A :class:`jax.tree_util.Partial`, so that the compiled CG steps take it as an argument."""
    if eig is None:
        return jax.tree_util.Partial(_unpreconditioned)
    u, lam = eig.vectors, eig.values
    # mu = 0: the smallest positive value keeps P SPD (the preconditioner need not be exact).
    top = float(np.asarray(lam)[0]) if lam.size else 0.0
    mu = max(mu, float(jnp.finfo(lam.dtype).eps) * top if lam.size else 0.0)
    if mu <= 0:
        return jax.tree_util.Partial(_unpreconditioned)
    return jax.tree_util.Partial(_nystrom_preconditioned, u, lam, mu)


def _unpreconditioned(r: jax.Array) -> jax.Array:
    return r


def _nystrom_preconditioned(u: jax.Array, lam: jax.Array, mu, r: jax.Array) -> jax.Array:
    """``P^{-1} r`` for the eigensystem ``(u, lam)`` and shift ``mu``."""
    scale = (lam[-1] + mu) / (lam + mu) - 1.0
    return r + u @ (scale[:, None] * (u.T @ r))


# --------------------------------------------------------------------------- solver


def _check_scalar(value, name: str, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {value!r}.") from None
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}; got {value!r}.")
    return v


def kernel_regression_cg(
    kernel: Any,
    y: ArrayLike,
    *,
    x: ArrayLike | None = None,
    ridge: float = 0.0,
    rank: int = 100,
    key: jax.Array | None = None,
    tol: float = 1e-6,
    max_iterations: int = 1000,
    get: str = "ntk",
    sketch: str = "auto",
    block_size: int = 512,
    devices: Sequence[Any] | None = None,
    show_progress: bool = False,
) -> CGResult:
    """Solves ``(K + ridge I) alpha = y`` by Nyström-preconditioned conjugate gradients.

    ``K`` is never formed. Preconditioned CG (Hestenes & Stiefel 1952) on each column of
    ``y``, in lockstep (one product ``K V`` per iteration serves every column); each column
    stops updating when its relative residual ``||y - (K + ridge I) alpha|| / ||y||`` falls to
    ``tol``. The preconditioner is the randomized Nyström one of Frangella, Tropp & Udell
    (2023, eq. 5.3) built from ``rank`` sampled kernel columns (module docstring). With ridge
    ``mu > 0`` the preconditioned condition number is about ``(lam_{rank+1} + mu) / mu``.

    Args:
      kernel: one of
        * a ``flax.linen`` module of :mod:`ntkjax.nn` layers, or a kernel function
          ``(x1, x2) -> (n1, n2)`` array or :class:`ntkjax.Kernel` (``get`` picks the field),
          with ``x`` given: recomputed block by block at each product;
        * an ``(n, n)`` symmetric array-like read by row slices ``kernel[i:j]``
          (``np.ndarray``, ``np.memmap``, zarr): out of core;
        * a callable ``v -> K v`` on vectors of shape ``(n,)`` (vmapped over the columns of
          ``y``), e.g. ``lambda v: ntk_operator(apply_fn, params, x)(v[:, None])[:, 0]``.
      y: ``(n,)`` or ``(n, C)`` targets (e.g. one-hot classes).
      x: ``(n, ...)`` training inputs, for a module or kernel function.
      ridge: ``mu >= 0`` added to the diagonal (absolute, like ``ntk_operator``'s ``ridge``).
      rank: Nyström rank ``r`` (``0 <= r <= n``); 0 runs plain CG.
      key: PRNG key for the Nyström sample; required when ``rank > 0``.
      tol: relative residual at which a column stops, ``> 0``.
      max_iterations: bound on the number of CG iterations (products), ``>= 1``.
      get: ``"ntk"`` or ``"nngp"``, the field of a :class:`ntkjax.Kernel`.
      sketch: ``"columns"`` -- ``rank`` kernel columns at uniformly random indices (cheap:
        ``n * rank`` kernel entries); ``"gaussian"`` -- ``K Omega`` for an orthonormalized
        Gaussian ``Omega`` (one blocked product with ``rank`` columns; better eigenpairs, which
        :func:`gradient_flow_lowrank` uses); ``"auto"`` -- columns when the kernel has rows
        (module, kernel function, stored array), else Gaussian (callables).
      block_size: rows per block (and columns per tile) of blocked operators.
      devices: devices to deal work items to round-robin (default: ``jax.devices()``, every
        device of every process under ``jax.distributed``; must be the same list in every
        process).
      show_progress: draw a progress bar on stderr (one step per iteration).

    Returns:
      A :class:`CGResult`; ``alpha`` is shaped like ``y``. Check ``converged``: after
      ``max_iterations`` the last iterate is returned with ``converged`` False.

    Raises:
      ValueError: for shapes that do not match, ``ridge < 0``, ``tol <= 0``, a bad ``rank``,
        non-finite ``y`` or ``x``, a missing key, an operator that returns non-finite values,
        or one that is not positive definite (``p^T (K + ridge I) p <= 0``, or a failed
        Cholesky of the Nyström core) -- never a NaN result.
      TypeError: for a ``kernel`` of an unsupported type.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> x = jax.random.normal(jax.random.key(0), (50, 3))
    >>> mlp = ntkjax.models.MLP((64, 64, 1), "relu", w_std=2**0.5, b_std=0.1)
    >>> res = ntkjax.kernel_regression_cg(mlp, x[:, 0], x=x, ridge=1e-2, rank=20,
    ...                                   key=jax.random.key(1), tol=1e-4, block_size=16)
    >>> bool(res.converged.all()), res.alpha.shape
    (True, (50,))
    """
    check_choice(get, ("ntk", "nngp"), "get")
    check_choice(sketch, ("auto", "columns", "gaussian"), "sketch")
    ridge = _check_scalar(ridge, "ridge", positive=False)
    tol = _check_scalar(tol, "tol", positive=True)
    if not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an integer >= 1; got {max_iterations!r}.")
    shape = tuple(np.shape(y))
    if len(shape) not in (1, 2) or shape[0] == 0:
        raise ValueError(f"y must have shape (n,) or (n, C) with n >= 1; got shape {shape}.")
    check_finite(y, "y")
    n = shape[0]
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank <= n:
        raise ValueError(f"rank must be an integer in [0, n={n}]; got {rank!r}.")
    if rank > 0 and key is None:
        raise ValueError("the Nyström preconditioner needs a PRNG key: pass key=jax.random.key(0)"
                         " (or rank=0 for plain CG).")
    stored_dtype = getattr(kernel, "dtype", None) if x is None and _is_stored(kernel) else None
    dtype = float_dtype(y, x, None if stored_dtype is None else np.empty(0, stored_dtype))
    op = _operator(kernel, n, x=x, get=get, block_size=block_size, devices=devices,
                   dtype=dtype)
    rhs = jnp.asarray(y, dtype)
    rhs = rhs[:, None] if rhs.ndim == 1 else rhs
    eig = _nystrom(op, int(rank), key, sketch) if key is not None and rank > 0 else None
    precondition = _preconditioner(eig, ridge)
    alpha, iterations, history, converged = _cg(op, rhs, ridge, precondition, tol,
                                                int(max_iterations), show_progress)
    if len(shape) == 1:
        alpha = alpha[:, 0]
    return CGResult(alpha, iterations, history, converged, eig, ridge)


def _column_scales(a: jax.Array) -> jax.Array:
    """Per column of ``a``, the power of two ``2^e`` with ``max_i |a_ic| / 2^e`` in [0.5, 1)
    (1 for a zero column): dividing by it is exact and brings the column to unit size."""
    _, exponent = jnp.frexp(jnp.max(jnp.abs(a), axis=0))
    return jnp.ldexp(jnp.ones(exponent.shape, a.dtype), exponent)


def _norms(a: jax.Array) -> jax.Array:
    """Column 2-norms, scaled before squaring: ``s ||a / s||`` with ``s`` the column's
    :func:`_column_scales`, so that no square underflows (entries ~1e-20 in float32, whose
    squares are below the smallest normal number) or overflows (~1e20)."""
    scale = _column_scales(a)
    return scale * jnp.linalg.norm(a / scale, axis=0)


def _cg(op, rhs, ridge, precondition, tol, max_iterations, show_progress):
    """Preconditioned CG on the columns of ``rhs`` in lockstep; frozen once converged.

    Each column is divided by a power of two that brings it to unit size (exact), solved, and
    ``alpha`` multiplied back: the iterates are those of the unscaled system wherever those are
    representable, and no residual norm or inner product under- or overflows for targets of
    any representable size (float32 targets of 1e-20 or 1e20 included).

    The host drives the loop and its checks; the recurrences are compiled programs
    (:func:`_cg_start`, :func:`_cg_products`, :func:`_cg_step`), one each per shape and dtype,
    shared by every call."""
    scale, alpha, r, z, rz, safe, relative = _cg_start(rhs, precondition)
    p = z
    history = [np.asarray(relative)]
    iterations = 0

    def pending():
        """Iteration numbers while a column is above tol (so the progress bar ends cleanly)."""
        for k in range(max_iterations):
            if not (history[-1] > tol).any():
                return
            yield k

    steps = _progress(pending(), total=max_iterations, description="kernel CG",
                      enabled=show_progress)
    for _ in steps:
        active = history[-1] > tol
        finite, q, pq_device = _cg_products(op.matmat(p), p, ridge)
        if not bool(finite):
            raise ValueError("the kernel operator returned non-finite values (NaN or Inf).")
        pq = np.asarray(pq_device)
        bad = active & ~(pq > 0)
        if bad.any():
            raise ValueError(
                "conjugate gradients broke down: p^T (K + ridge I) p = "
                f"{pq[bad][0]:.3e} <= 0, so the operator is not positive definite. Use a PSD "
                "kernel and a ridge > 0."
            )
        alpha, r, p, rz, relative = _cg_step(alpha, r, p, rz, q, pq_device, jnp.asarray(active),
                                             safe, precondition)
        iterations += 1
        history.append(np.asarray(relative))
    hist = np.stack(history)
    return alpha * scale, iterations, hist, hist[-1] <= tol


@jax.jit
def _cg_start(rhs, precondition):
    """CG's start from ``alpha = 0``: the columns' scales (:func:`_column_scales`), ``alpha``,
    the scaled residual ``r``, ``z = P^{-1} r``, ``r.z``, the safe norms of ``r`` (1 for a zero
    column) and the relative residuals."""
    scale = _column_scales(rhs)
    r = rhs / scale
    norms = _norms(r)
    safe = jnp.where(norms > 0, norms, 1.0)
    z = precondition(r)
    return scale, jnp.zeros_like(r), r, z, jnp.sum(r * z, axis=0), safe, _norms(r) / safe


@jax.jit
def _cg_products(q, p, ridge):
    """Whether the operator's product ``q = K p`` is finite, ``(K + ridge I) p`` and the
    columns' ``p^T (K + ridge I) p``."""
    finite = jnp.all(jnp.isfinite(q))
    q = q + ridge * p
    return finite, q, jnp.sum(p * q, axis=0)


@jax.jit
def _cg_step(alpha, r, p, rz, q, pq, act, safe, precondition):
    """One CG update of the ``act``ive columns (the others keep their values): ``alpha``,
    ``r``, ``p``, ``r.z`` and the relative residuals."""
    step = jnp.where(act, rz / jnp.where(act, pq.astype(rz.dtype), 1.0), 0.0)
    alpha = alpha + step * p
    r = r - step * q
    z = precondition(r)
    rz_new = jnp.sum(r * z, axis=0)
    beta = jnp.where(act, rz_new / jnp.where(rz == 0, 1.0, rz), 0.0)
    p = jnp.where(act, z + beta * p, p)
    rz = jnp.where(act, rz_new, rz)
    return alpha, r, p, rz, _norms(r) / safe


# --------------------------------------------------------------------------- predictions


def kernel_ridge_predict(
    kernel: Any,
    alpha: ArrayLike,
    *,
    x_train: ArrayLike | None = None,
    x_test: ArrayLike | None = None,
    get: str = "ntk",
    block_size: int = 512,
    devices: Sequence[Any] | None = None,
) -> jax.Array:
    """Kernel-ridge predictions ``f(x*) = K(x*, X) alpha`` at many test points, in blocks.

    This is the ``t -> inf`` limit of gradient-flow training (:func:`ntkjax.gradient_flow_mse`
    with ``diag_reg = ridge / mean(diag K)``) once ``alpha`` solves ``(K + ridge I) alpha = y``
    (:func:`kernel_regression_cg`).

    Args:
      kernel: a module or kernel function (with ``x_train`` and ``x_test``), recomputed block
        by block (memory ``O(block^2)``); or an ``(m, n)`` test-train kernel array-like read by
        row slices.
      alpha: ``(n,)`` or ``(n, C)`` weights.
      x_train, x_test: ``(n, ...)`` and ``(m, ...)`` inputs for a module or kernel function.
      get, block_size, devices: as in :func:`kernel_regression_cg`.

    Returns:
      ``(m,)`` or ``(m, C)`` predictions.

    Raises:
      ValueError: when shapes disagree or inputs are not finite; TypeError for a callable
        operator (which has no test rows).

    >>> import jax, ntkjax
    >>> x = jax.random.normal(jax.random.key(0), (20, 3))
    >>> mlp = ntkjax.models.MLP((64, 1), "relu")
    >>> ntkjax.kernel_ridge_predict(mlp, x[:, 0], x_train=x, x_test=x[:5], block_size=8).shape
    (5,)
    """
    check_choice(get, ("ntk", "nngp"), "get")
    a = jnp.asarray(alpha)
    if a.ndim not in (1, 2):
        raise ValueError(f"alpha must have shape (n,) or (n, C); got {a.shape}.")
    check_finite(alpha, "alpha")
    n = a.shape[0]
    w = a[:, None] if a.ndim == 1 else a
    if x_train is not None or x_test is not None:
        if x_train is None or x_test is None:
            raise ValueError("pass both x_train and x_test with a module or kernel function.")
        check_finite(x_test, "x_test")
        dtype = float_dtype(alpha, x_train, x_test)
        op = _operator(kernel, n, x=x_train, get=get, block_size=block_size, devices=devices,
                       dtype=dtype)
        assert isinstance(op, _KernelFunctionOperator)
        if np.ndim(x_test) != np.ndim(x_train) or np.shape(x_test)[1:] != np.shape(x_train)[1:]:
            raise ValueError(
                f"x_test {tuple(np.shape(x_test))} and x_train {tuple(np.shape(x_train))} must "
                "have the same per-example shape."
            )
        out = op.apply(w.astype(dtype), jnp.asarray(x_test, dtype))
    elif _is_stored(kernel):
        shape = tuple(kernel.shape)
        if len(shape) != 2 or shape[1] != n:
            raise ValueError(f"the test-train kernel must have shape (m, {n}); got {shape}.")
        stored_dtype = getattr(kernel, "dtype", None)
        dtype = float_dtype(alpha, None if stored_dtype is None else np.empty(0, stored_dtype))
        stored = _StoredOperator(kernel, block_size=block_size, devices=_devices(devices),
                                 dtype=dtype)
        stored.n = shape[0]
        out = stored.matmat(w.astype(dtype))
    else:
        raise TypeError(
            "kernel_ridge_predict needs a module or kernel function with x_train and x_test, "
            f"or an (m, n) test-train kernel array; got {type(kernel).__name__}."
        )
    return out[:, 0] if a.ndim == 1 else out


def gradient_flow_lowrank(
    result: CGResult,
    y: ArrayLike,
    t: ArrayLike,
    *,
    learning_rate: float,
    kernel: Any,
    x_train: ArrayLike | None = None,
    x_test: ArrayLike | None = None,
    get: str = "ntk",
    block_size: int = 512,
    devices: Sequence[Any] | None = None,
) -> Predictions:
    """Gradient-flow predictions at finite time ``t``, approximated on the Nyström eigenspace.

    Exact (Lee et al. 2019, eqs. 10-11; :func:`ntkjax.gradient_flow_mse`, zero initial
    outputs, ``K_mu = K + mu I``, ``tau = learning_rate * t / n``)::

        f_t(x) = K(x, X) w_t,   w_t = g_t(K_mu) y,   g_t(s) = (1 - exp(-tau s)) / s.

    Approximation: ``g_t`` is applied exactly on the top-``r`` Nyström eigenspace ``U`` of
    ``result.eigensystem`` and with the eigenvalue taken as 0 on its complement::

        w_t ~ U g_t(diag(lam) + mu) U^T y + g_t(mu) (I - U U^T) y,

    and ``w_inf = alpha`` exactly (``t = inf``). On the complement the true eigenvalues lie in
    ``[0, lam_{r+1}]`` and ``0 <= g_t(mu) - g_t(s + mu) <= tau^2 s / 2``, a relative error of
    at most ``tau * lam_{r+1} / 2``: the approximation is good while the tail of the spectrum
    has not yet been learnt, ``tau * lam_r << 1``, i.e. ``t << n / (learning_rate * lam_r)``,
    and degrades after (it over-weights the tail), where ``t = inf`` (exact) takes over. The
    Nyström error of the top eigenpairs adds to this (it shrinks as ``rank`` grows).

    Args:
      result: a :class:`CGResult` with an eigensystem (``rank > 0``).
      y: the targets that ``result`` was solved for.
      t: a scalar or 1-D array of times ``>= 0`` (``jnp.inf`` allowed).
      learning_rate: the flow's learning rate (as in :func:`ntkjax.gradient_flow_mse`).
      kernel: as in :func:`kernel_regression_cg`; train predictions use its product, test
        predictions need a module or kernel function with ``x_test``.
      x_train, x_test, get, block_size, devices: as in :func:`kernel_ridge_predict`.

    Returns:
      :class:`ntkjax.predict.Predictions` ``(train, test)`` (``test`` None without
      ``x_test``), with a leading time axis for 1-D ``t``.

    Raises:
      ValueError: without an eigensystem, for negative or NaN times, a non-positive
        learning rate, or mismatched shapes.

    >>> import jax, ntkjax
    >>> x = jax.random.normal(jax.random.key(0), (30, 3))
    >>> mlp = ntkjax.models.MLP((64, 1), "relu")
    >>> res = ntkjax.kernel_regression_cg(mlp, x[:, 0], x=x, ridge=1e-2, rank=10,
    ...                                   key=jax.random.key(1), block_size=16)
    >>> out = ntkjax.gradient_flow_lowrank(res, x[:, 0], [0.0, 1.0], learning_rate=1.0,
    ...                                    kernel=mlp, x_train=x, block_size=16)
    >>> out.train.shape
    (2, 30)
    """
    if result.eigensystem is None:
        raise ValueError("result has no Nyström eigensystem: solve with rank > 0.")
    lr = _check_scalar(learning_rate, "learning_rate", positive=True)
    times = np.asarray(t, dtype=np.float64)
    if times.ndim > 1 or np.any(np.isnan(times)) or np.any(times < 0):
        raise ValueError(f"t must be a scalar or 1-D array of times >= 0; got {t!r}.")
    check_finite(y, "y")
    u, lam = result.eigensystem.vectors, result.eigensystem.values
    n = u.shape[0]
    rhs = jnp.asarray(y, u.dtype)
    if rhs.shape != tuple(np.shape(result.alpha)):
        raise ValueError(f"y must have the shape {tuple(np.shape(result.alpha))} of result.alpha;"
                         f" got {rhs.shape}.")
    rhs = rhs[:, None] if rhs.ndim == 1 else rhs
    alpha = jnp.asarray(result.alpha, u.dtype).reshape(rhs.shape)
    mu = result.ridge
    if mu <= 0:  # u1 = 1 / mu below; a tiny mu gives the mu -> 0 limit of the chord
        mu = float(jnp.finfo(u.dtype).eps) * max(float(lam[0]), 1.0)
    proj = u.T @ rhs  # (r, C)
    rest_y = rhs - u @ proj
    rest_alpha = alpha - u @ (u.T @ alpha)
    u0, u1 = 1.0 / (float(lam[-1]) + mu), 1.0 / mu

    def h(v: float, tau: float) -> float:  # g_t(1 / v) = v (1 - exp(-tau / v))
        return -v * math.expm1(-tau / v)

    def g(s, tau):
        return -jnp.expm1(-tau * s) / s

    weights = []
    for time in np.atleast_1d(times):
        if np.isinf(time):
            weights.append(alpha)
            continue
        tau = lr * float(time) / n
        slope = (h(u1, tau) - h(u0, tau)) / (u1 - u0)
        offset = h(u0, tau) - slope * u0
        top = u @ (g(lam + mu, tau)[:, None] * proj)
        weights.append(top + offset * rest_y + slope * rest_alpha)
    c = rhs.shape[1]
    w_all = jnp.concatenate(weights, axis=1)  # (n, T*C)
    op = _operator(kernel, n, x=x_train, get=get, block_size=block_size, devices=devices,
                   dtype=u.dtype)
    train = op.matmat(w_all)
    test = None
    if x_test is not None:
        test = kernel_ridge_predict(kernel, w_all, x_train=x_train, x_test=x_test, get=get,
                                    block_size=block_size, devices=devices)

    def shape_out(out):
        out = out.reshape(out.shape[0], len(weights), c).transpose(1, 0, 2)
        if np.ndim(y) == 1:
            out = out[..., 0]
        return out if times.ndim == 1 else out[0]

    return Predictions(shape_out(train), None if test is None else shape_out(test))
