"""``ntkjax demo``: the NTK study, reproduced end to end and corrected, with figures and a report.

The original study notebook (``../shared/study/ntk_study_notebook.txt``) has seven sections.
Three of its results are wrong as written, and this demo shows the correct versions:

* its "NTK" formula ``||x|| ||x'|| (sin t + (pi - t) cos t) / (2 pi)`` is only the NNGP part of a
  two-layer ReLU net (the first layer frozen); the NTK adds ``x.x' (pi - t) / (2 pi)`` from
  training the first layer (section 1);
* its empirical NTK uses the standard parameterization, whose NTK grows with the width, so
  "empirical -> theoretical" cannot hold; in the NTK parameterization the empirical NTK converges
  to the analytic one with relative error ~ width^(-1/2) (section 2);
* its training runs at width >= 200 return NaN: at ``lr = 0.01`` on ``mean((f - y)^2)`` they are
  above the gradient-descent stability edge ``2n / lambda_max`` of the standard-parameterization
  NTK; in the NTK parameterization the same runs converge (section 5).

Every number in the report comes from the public API (:func:`ntkjax.kernel_fn`,
:func:`ntkjax.empirical_ntk_fn`, :mod:`ntkjax.predict`, :mod:`ntkjax.training`,
:mod:`ntkjax.sweep`). :func:`run_demo` writes PNG figures, ``report.md`` and ``results.json``
into ``out_dir`` -- both rewritten after every section, so an interrupted run keeps its finished
sections -- and returns the JSON content. Loss convention: ``L = 1/(2n) sum (f - y)^2``
(:mod:`ntkjax.losses`); the study's ``lr = 0.01`` on ``mean((f - y)^2)`` is ``lr = 0.02`` here.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkjax import empirical_ntk_fn, kernel_fn, kernel_matrix, plotting
from ntkjax._progress import progress
from ntkjax.compile_options import FAST_COMPILE
from ntkjax.features import feature_map, feature_ridge
from ntkjax.models import CNN, MLP
from ntkjax.nn.dense import PARAMETERIZATIONS, Parameterization
from ntkjax.predict import (
    gp_inference,
    gradient_descent_mse,
    gradient_flow_mse,
    max_learning_rate,
)
from ntkjax.scaling import fit_power_law
from ntkjax.study.datasets import Digits, load_digits
from ntkjax.study.marginal_likelihood import digits_marginal_likelihood
from ntkjax.study.report import Report
from ntkjax.study.sweep_command import PRESETS
from ntkjax.sweep import sweep
from ntkjax.tasks import sin_regression
from ntkjax.training import kernel_regime_check, make_train_fn

__all__ = ["DESCRIPTION", "EPILOG", "FULL_ONLY_SECTIONS", "NOT_QUICK_SECTIONS", "SECTIONS",
           "DemoSettings",
           "add_arguments", "default_sections", "demo_settings", "run_demo", "run_from_args"]

_RELU_W_STD = math.sqrt(2.0)  # He initialization, as in the study (kaiming_normal)
_SIN_B_STD = 1.0  # bias scale of the sin-task networks (1-D inputs need biases to bend)
_DIGITS_DIAG_REG = 1e-4  # ridge relative to the mean diagonal (kernel regression on digits)
_STUDY_LEARNING_RATE = 0.02  # the study's lr = 0.01 on mean((f - y)^2), in ntkjax's loss
_KERNEL_BLOCK_BYTES = 256 * 2**20  # memory of one kernel_matrix block call (sections 8, 10)


#: Above this many (hidden unit x training point x step x seed) products, a training program
#: compiles with XLA's full optimizations (:data:`_FULL_OPTIMIZATION`): :data:`FAST_COMPILE`
#: saves ~2 CPU-s of compiling but its unvectorized loops run ~3.5x slower (width 4096, 50 points,
#: 200 steps, 4 seeds: 3.3 + 9.8 CPU-s against 5.1 + 2.8 CPU-s to compile + run, measured on
#: the 2-core development machine).
_HEAVY_TRAINING = 40_000_000
#: XLA's default optimization, stated explicitly so that it also holds where
#: ``jax_disable_most_optimizations`` is set (the test suite): the per-program options win.
_FULL_OPTIMIZATION: dict[str, Any] = {
    "xla_backend_optimization_level": 3,
    "xla_llvm_disable_expensive_passes": False,
}


def _train_options(work: int) -> dict[str, Any]:
    """XLA options of a training program of ``work`` unit-steps (see :data:`_HEAVY_TRAINING`)."""
    return _FULL_OPTIMIZATION if work > _HEAVY_TRAINING else FAST_COMPILE


def _jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit`` with :data:`FAST_COMPILE`. Small post-processing goes through one such program
    per section instead of eager ops: each eager op compiles a program of its own."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


class DemoSettings(NamedTuple):
    """Sizes of every section; :func:`demo_settings` gives the ``--quick``, default and
    ``--full`` ones."""

    quick: bool
    n_points: int  # section 1-2 inputs (the study: 10 points in R^3)
    input_dim: int
    empirical_widths: tuple[int, ...]
    empirical_seeds: int
    heatmap_width: int  # the study's width 1000 with 10 initializations
    heatmap_seeds: int
    sin_widths: tuple[int, ...]
    sin_seeds: int
    sin_steps: int
    sin_record_every: int
    sin_lr_fraction: float  # learning rate as a fraction of the stability edge 2n/lambda_max
    study_widths: tuple[int, ...]
    study_seeds: int
    study_steps: int
    convergence_points: int
    convergence_dim: int
    convergence_steps: int
    digits_width: int
    digits_depth: int
    digits_steps: int
    digits_train_subset: int | None  # None: the whole 70 % training split
    # sections 8 and 10: the first images of the training and test split (None: all of it);
    # the all-pairs CNN-GAP kernel costs ~ N_train (N_train + N_test) x 64^2 position pairs
    digits_image_train: int | None
    digits_image_test: int | None
    digits_feature_counts: tuple[int, ...]  # D of the MLP's random-feature curve (section 10)
    digits_cnn_feature_counts: tuple[int, ...]  # D of the CNN-GAP's curve (costlier features)
    digits_feature_keys: int  # independent draws of the features per D
    digits_likelihood_steps: int  # Adam steps of the marginal-likelihood fit (section 9)
    full: bool = False


#: Sections that a run without ``--full`` (or ``--sections``) leaves out: the marginal-likelihood
#: fit of section 9 costs minutes and leaves the test accuracy where it was.
FULL_ONLY_SECTIONS = ("digits_likelihood",)
#: Sections a ``--quick`` run leaves out (unless named with ``--sections``): the study's
#: sections 1-7 only, so that the smoke run takes well under a minute.
NOT_QUICK_SECTIONS = ("digits_images", "digits_likelihood", "digits_features")


def demo_settings(quick: bool = False, full: bool = False) -> DemoSettings:
    """The default run (about 4 CPU-minutes), the ``--quick`` one (under a minute) or the ``--full``
    one (the whole digits split in sections 8-10, more feature counts and draws)."""
    if quick and full:
        raise ValueError("quick and full exclude each other; choose one.")
    if quick:
        return DemoSettings(
            quick=True, n_points=10, input_dim=3,
            empirical_widths=(64, 1024, 16384), empirical_seeds=10,
            heatmap_width=1024, heatmap_seeds=10,
            sin_widths=(64, 4096), sin_seeds=4, sin_steps=200, sin_record_every=10,
            sin_lr_fraction=0.5,
            study_widths=(1000,), study_seeds=2, study_steps=100,
            convergence_points=40, convergence_dim=8, convergence_steps=200,
            digits_width=256, digits_depth=2, digits_steps=300, digits_train_subset=600,
            digits_image_train=120, digits_image_test=120, digits_feature_counts=(256, 1024),
            digits_cnn_feature_counts=(256,), digits_feature_keys=2,
            digits_likelihood_steps=10,
        )
    default = DemoSettings(
        quick=False, n_points=10, input_dim=3,
        empirical_widths=(64, 256, 1024, 4096, 16384), empirical_seeds=32,
        heatmap_width=1024, heatmap_seeds=10,
        sin_widths=(64, 256, 1024, 4096), sin_seeds=8, sin_steps=200, sin_record_every=10,
        sin_lr_fraction=0.5,
        study_widths=(50, 200, 1000, 5000), study_seeds=4, study_steps=500,
        convergence_points=40, convergence_dim=8, convergence_steps=500,
        digits_width=512, digits_depth=2, digits_steps=1000, digits_train_subset=None,
        digits_image_train=500, digits_image_test=400, digits_feature_counts=(256, 1024, 4096),
        digits_cnn_feature_counts=(256, 1024), digits_feature_keys=4,
        digits_likelihood_steps=100,
    )
    if not full:
        return default
    return default._replace(
        full=True, digits_image_train=None, digits_image_test=None,
        digits_feature_counts=(256, 1024, 4096, 8192),
        digits_cnn_feature_counts=(256, 1024, 4096, 8192), digits_feature_keys=3)


class _SectionResult(NamedTuple):
    """What a section hands to the report (see :meth:`ntkjax.study.report.Report.add_section`)."""

    title: str
    text: str
    numbers: dict[str, Any]
    figures: list[Path]
    summary: str  # one line for the terminal
    data: dict[str, Any] | None = None  # long series: JSON only


class _Context:
    """Settings, output folder, PRNG keys per section, and results shared between sections."""

    def __init__(self, out_dir: Path, settings: DemoSettings, key: jax.Array,
                 show_progress: bool, stream: Any = None):
        self.stream = sys.stderr if stream is None else stream
        self.out_dir = out_dir
        self.settings = settings
        self._key = key
        self.show_progress = show_progress
        self.cache: dict[str, Any] = {}

    def key(self, name: str) -> jax.Array:
        """A key for ``name``, independent of which other sections run."""
        digest = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31 - 1)
        return jax.random.fold_in(self._key, digest)

    def figure(self, name: str) -> Path:
        return self.out_dir / name

    def progress(self, items, description: str):
        return progress(items, description=f"  {description}", enabled=self.show_progress,
                        stream=self.stream)

    def note(self, text: str) -> None:
        """A progress line (only when progress is shown)."""
        if self.show_progress:
            print(text, file=self.stream, flush=True)


# --------------------------------------------------------------------------- shared helpers


def _mlp(hidden: tuple[int, ...], outputs: int = 1, *, w_std: float = _RELU_W_STD,
         b_std: float = 0.0, parameterization: Parameterization = "ntk") -> MLP:
    """A ReLU MLP of the study (hidden widths, then ``outputs``)."""
    return MLP(features=(*hidden, outputs), activation="relu", w_std=w_std, b_std=b_std,
               parameterization=parameterization)


def _analytic(module, x1, x2=None):
    """(NNGP, NTK) of ``module``, computed in float64, as numpy arrays."""

    with jax.enable_x64(True):
        as64 = lambda x: None if x is None else jnp.asarray(np.asarray(x), jnp.float64)
        kernel = _jit(kernel_fn(module))(as64(x1), as64(x2))
        return np.asarray(kernel.nngp), np.asarray(kernel.ntk)


def _kernel_checks(kernel: np.ndarray) -> dict[str, Any]:
    """Symmetry error and eigenvalue range of a kernel matrix (float64)."""
    kernel = np.asarray(kernel, np.float64)
    scale = float(np.max(np.abs(kernel)))
    eigenvalues = np.linalg.eigvalsh(0.5 * (kernel + kernel.T))
    return {
        "symmetry_error": float(np.max(np.abs(kernel - kernel.T)) / scale),
        "lambda_min": float(eigenvalues[0]),
        "lambda_max": float(eigenvalues[-1]),
        "positive_definite": bool(eigenvalues[0] > 1e-10 * eigenvalues[-1]),
    }


def _relative_frobenius(a, b) -> np.ndarray:
    """``||a - b||_F / ||b||_F`` over the last two axes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=(-2, -1)) / np.linalg.norm(b)


def _fit(x, y) -> float:

    return fit_power_law(x, y).slope


# --------------------------------------------------------------------------- section 1


def _section_analytic(ctx: _Context) -> _SectionResult:
    """The two-layer ReLU NNGP (the study's formula) and NTK, symmetric and positive definite."""
    import ntkjax

    s = ctx.settings
    def kernels(key):
        x = jax.random.normal(key, (s.n_points, s.input_dim), jnp.float64)
        return x, ntkjax.two_layer_relu_nngp(x), ntkjax.two_layer_relu_ntk(x)

    with jax.enable_x64(True):
        x, nngp, ntk = map(np.asarray, _jit(kernels)(ctx.key("analytic")))
        # The study's formula written out, as a check that two_layer_relu_nngp is it.
        norms = np.linalg.norm(x, axis=1)
        cos = np.clip(x @ x.T / np.outer(norms, norms), -1, 1)
        angle = np.arccos(cos)
        study = np.outer(norms, norms) / (2 * np.pi) * (np.sin(angle) + (np.pi - angle) * cos)
    first_layer = ntk - nngp
    figure = ctx.figure("s1_analytic_kernels.png")
    plotting.plot_kernel_heatmaps(
        {"NNGP = the study's formula": nngp, "NTK (both layers trained)": ntk,
         "NTK - NNGP (first-layer term)": first_layer},
        title=f"Two-layer ReLU kernels on {s.n_points} random points in R^{s.input_dim}",
        path=figure, cmaps={"NTK - NNGP (first-layer term)": "magma"},
    )
    numbers = {
        "n_points": s.n_points,
        "input_dim": s.input_dim,
        "nngp": _kernel_checks(nngp),
        "ntk": _kernel_checks(ntk),
        "study_formula_vs_nngp_max_abs_diff": float(np.max(np.abs(study - nngp))),
        "ntk_minus_nngp_relative_frobenius": float(
            np.linalg.norm(first_layer) / np.linalg.norm(ntk)),
    }
    text = (
        "The study's formula `||x|| ||x'|| (sin t + (pi - t) cos t) / (2 pi)` is the NNGP of a "
        "two-layer ReLU network: the kernel of the output layer alone (first layer frozen). "
        "Training both layers adds the first-layer term `x.x' (pi - t) / (2 pi)`, which is "
        f"{100 * numbers['ntk_minus_nngp_relative_frobenius']:.0f} % of the NTK's Frobenius "
        "norm here: the study's formula is not the NTK. Both matrices are symmetric to "
        "rounding and positive definite "
        f"(smallest eigenvalues {numbers['nngp']['lambda_min']:.3g} and "
        f"{numbers['ntk']['lambda_min']:.3g}), computed in float64 by "
        "`ntkjax.two_layer_relu_nngp` / `ntkjax.two_layer_relu_ntk`."
    )
    summary = (
        f"NNGP/NTK symmetric (err {max(numbers['nngp']['symmetry_error'], numbers['ntk']['symmetry_error']):.1e}), "  # noqa: E501
        f"positive definite: {numbers['nngp']['positive_definite'] and numbers['ntk']['positive_definite']}; "  # noqa: E501
        f"NTK - NNGP = {100 * numbers['ntk_minus_nngp_relative_frobenius']:.0f} % of the NTK"
    )
    return _SectionResult("1. Analytic NTK and NNGP of a two-layer ReLU network", text, numbers,
                         [figure], summary)


# --------------------------------------------------------------------------- section 2


def _empirical_ntks(widths, seeds: int, key: jax.Array, x: jax.Array):
    """``{width: {param: (seeds, N, N)}}`` empirical NTKs in both parameterizations.

    One compiled program per width (both parameterizations, every seed vmapped), compiled on a
    thread pool so that the widths compile side by side (XLA compiles without the GIL).
    """
    def kernels(width, key):
        out = {}
        keys = jax.random.split(jax.random.fold_in(key, width), seeds)
        for param in PARAMETERIZATIONS:
            module = _mlp((width,), parameterization=param)
            ntk = empirical_ntk_fn(module.apply, outputs="trace")
            params = jax.vmap(module.init, in_axes=(0, None))(keys, x[:1])
            out[param] = jax.vmap(ntk, in_axes=(0, None))(params, x)
        return out

    lowered = [jax.jit(functools.partial(kernels, w), compiler_options=FAST_COMPILE).lower(key)
               for w in widths]
    with ThreadPoolExecutor(max_workers=2) as pool:
        compiled = list(pool.map(lambda program: program.compile(), lowered))
    flat = [jax.device_get(program(key)) for program in compiled]
    return {w: {p: np.asarray(k[p], np.float64) for p in ("ntk", "standard")}
            for w, k in zip(widths, flat, strict=True)}


def _section_empirical(ctx: _Context) -> _SectionResult:
    """Empirical NTK (NTK and standard parameterization) against the analytic NTK vs width."""
    s = ctx.settings
    x = jax.random.normal(ctx.key("empirical-x"), (s.n_points, s.input_dim))
    _, theory = _analytic(_mlp((1,)), x)
    per_seed = {"ntk": [], "standard": []}
    heatmap = {}
    widths = sorted(set(s.empirical_widths) | {s.heatmap_width})
    all_kernels = _empirical_ntks(widths, max(s.empirical_seeds, s.heatmap_seeds),
                                  ctx.key("empirical"), x)
    for width in widths:
        kernels = all_kernels[width]
        for param in per_seed:
            if width in s.empirical_widths:
                per_seed[param].append(
                    _relative_frobenius(kernels[param][: s.empirical_seeds], theory))
            if width == s.heatmap_width:
                heatmap[param] = kernels[param][: s.heatmap_seeds].mean(0)
    widths_fit = np.asarray(s.empirical_widths, np.float64)
    per_seed = {k: np.stack(v) for k, v in per_seed.items()}  # (widths, seeds)
    slope_ntk = _fit(widths_fit, per_seed["ntk"].mean(1))
    slope_standard = _fit(widths_fit, per_seed["standard"].mean(1))

    fig_heat = ctx.figure("s2_empirical_vs_analytic_heatmaps.png")
    hw = s.heatmap_width
    plotting.plot_kernel_heatmaps(
        {"analytic NTK": theory,
         f"empirical NTK, width {hw}\n(NTK param., mean of {s.heatmap_seeds} inits)":
             heatmap["ntk"],
         "|empirical - analytic|": np.abs(heatmap["ntk"] - theory),
         f"empirical NTK, width {hw}\n(standard param., as in the study)": heatmap["standard"]},
        title="Empirical vs analytic NTK of a two-layer ReLU network (He init, w_std = sqrt 2)",
        path=fig_heat, cmaps={"|empirical - analytic|": "magma"},
    )
    fig_err = ctx.figure("s2_error_vs_width.png")
    plotting.plot_power_laws(
        widths_fit,
        {"NTK parameterization": per_seed["ntk"],
         "standard parameterization (the study)": per_seed["standard"]},
        xlabel="hidden width m",
        ylabel="||Θ_emp - Θ_analytic||_F / ||Θ_analytic||_F",
        title="Empirical NTK vs the analytic NTK (one network per point)",
        path=fig_err, reference_slope=-0.5, reference_label="width^(-1/2) (theory)",
    )
    heat_diff = np.abs(heatmap["ntk"] - theory)
    numbers = {
        "widths": list(s.empirical_widths),
        "seeds": s.empirical_seeds,
        "relative_error_ntk_param_mean_over_seeds": per_seed["ntk"].mean(1),
        "relative_error_standard_param_mean_over_seeds": per_seed["standard"].mean(1),
        "slope_ntk_param": slope_ntk,
        "slope_standard_param": slope_standard,
        "heatmap_width": hw,
        "heatmap_seeds": s.heatmap_seeds,
        "heatmap_mean_abs_difference": float(heat_diff.mean()),
        "heatmap_relative_error_of_seed_mean": float(_relative_frobenius(heatmap["ntk"], theory)),
        "heatmap_standard_over_analytic_scale": float(
            np.linalg.norm(heatmap["standard"]) / np.linalg.norm(theory)),
        "empirical_mean": _kernel_checks(heatmap["ntk"]),
    }
    text = (
        "The empirical NTK `J(x) J(x')^T` of two-layer ReLU networks (He initialization, "
        "`ntkjax.empirical_ntk_fn`) against the analytic NTK of the same architecture "
        "(`ntkjax.kernel_fn`). In the NTK parameterization the relative error of one network "
        f"falls like width^{slope_ntk:.2f} (theory: -1/2). In the standard parameterization "
        "-- the study's -- the "
        "output layer's gradient contributes `m` terms of order one, so the empirical NTK "
        f"grows like the width: its relative error scales like width^{slope_standard:.2f} and "
        f"at width {hw} it is {numbers['heatmap_standard_over_analytic_scale']:.0f} times the "
        "analytic kernel. The study's \"as width -> infinity, empirical -> theoretical\" holds "
        "only in the NTK parameterization."
    )
    summary = (f"empirical -> analytic NTK: slope {slope_ntk:+.2f} (NTK param.), "
               f"{slope_standard:+.2f} (standard param., diverges)")
    return _SectionResult("2. Empirical vs analytic NTK", text, numbers, [fig_heat, fig_err],
                         summary)


# --------------------------------------------------------------------------- sin task runs


def _sin_model(width: int):
    return _mlp((width,), b_std=_SIN_B_STD)


#: Sections that use the sin-task runs (:func:`_sin_runs`).
_SIN_SECTIONS = ("kernel_regression", "drift", "lazy")


def _start_sin_runs(ctx: _Context) -> dict[str, Any]:
    """Starts the sin-task runs of every width: data, analytic kernels and learning rate now,
    and one future per width (compile, then run) on a 2-thread pool, so that the runs go on
    while the caller does other work (XLA compiles and runs without the GIL).

    Seeds of one width are vmapped in one compiled program (:func:`ntkjax.training.
    make_train_fn`): full and linearized networks, the kernel change tracked on the training
    inputs. :func:`run_demo` calls this on a background thread before section 1;
    :func:`_sin_runs` collects the futures.
    """
    s = ctx.settings
    data = _jit(sin_regression)(ctx.key("sin-data"))
    nngp_train, ntk_train = _analytic(_sin_model(1), data.x_train)
    _, ntk_test_train = _analytic(_sin_model(1), data.x_test, data.x_train)
    edge = float(_jit(max_learning_rate)(ntk_train.astype(np.float32)))
    lr = s.sin_lr_fraction * edge
    programs = {}
    for width in s.sin_widths:
        module = _sin_model(width)
        make = functools.partial(make_train_fn, module.apply, optimizer=optax.sgd(lr),
                                 num_steps=s.sin_steps, record_every=s.sin_record_every)
        programs[width] = (module, make(), make(track_kernel=False, linearized=True))

    def train_width(width, keys):
        module, train, train_linear = programs[width]
        params0 = jax.vmap(module.init, in_axes=(0, None))(keys, data.x_train[:1])
        full = jax.vmap(lambda p: train(
            p, data.x_train, data.y_train, probe_x=data.x_train, x_test=data.x_test))(params0)
        linear = jax.vmap(lambda p: train_linear(
            p, data.x_train, data.y_train, x_test=data.x_test))(params0)
        return params0, full._replace(final_params=None), linear._replace(final_params=None)

    keys = {w: jax.random.split(jax.random.fold_in(ctx.key("sin-init"), w), s.sin_seeds)
            for w in s.sin_widths}
    n_train = int(data.x_train.shape[0])

    def run(width):
        program = jax.jit(functools.partial(train_width, width), compiler_options=_train_options(
            width * n_train * s.sin_steps * s.sin_seeds)).lower(keys[width]).compile()
        return jax.device_get(program(keys[width]))

    # One program per width, each compiled and run on the pool: compiling the next width
    # overlaps compiling or running this one.
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {w: pool.submit(run, w) for w in s.sin_widths}
    pool.shutdown(wait=False)
    return {"data": data, "ntk_train": ntk_train, "nngp_train": nngp_train,
            "ntk_test_train": ntk_test_train, "edge": edge, "lr": lr, "programs": programs,
            "futures": futures}


def _sin_runs(ctx: _Context) -> dict[str, Any]:
    """NTK-parameterized networks of every width trained on the study's sin task (cached):
    the runs :func:`_start_sin_runs` started (in the background, by :func:`run_demo`), or
    starts now."""
    if "sin" in ctx.cache:
        return ctx.cache["sin"]
    started = ctx.cache.pop("sin-started", None)
    started = _start_sin_runs(ctx) if started is None else started.result()
    futures = started.pop("futures")
    programs = started.pop("programs")
    runs = {}
    for width in ctx.progress(ctx.settings.sin_widths, "training on the sin task"):
        params0, full, linear = futures[width].result()
        runs[width] = {"module": programs[width][0], "params0": params0, "history": full,
                       "linear": linear}
    ctx.cache["sin"] = {**started, "runs": runs}
    return ctx.cache["sin"]


def _kernel_trajectory(sin: dict[str, Any], f0_train, f0_test, steps, kernel=None, y=None):
    """Gradient descent in function space with a fixed kernel, from the network's own f_0.

    ``y`` (default: the training targets) and ``f0_*`` may carry several output columns."""

    kernel = sin["ntk_train"] if kernel is None else kernel
    def predict(kernel, y, k_test_train, f0_train, f0_test, steps):
        return gradient_descent_mse(kernel, y, learning_rate=sin["lr"], k_test_train=k_test_train,
                                    fx_train_0=f0_train, fx_test_0=f0_test)(steps)

    with jax.enable_x64(True):  # the sin task's NTK is ill-conditioned: solve in float64
        as64 = lambda a: np.asarray(a, np.float64)
        out = _jit(predict)(as64(kernel), as64(sin["data"].y_train if y is None else y),
                            as64(sin["ntk_test_train"]), as64(f0_train), as64(f0_test),
                            np.asarray(steps))
        return np.asarray(out.train), np.asarray(out.test)


def _rms(a, axis=None) -> np.ndarray:
    return np.sqrt(np.mean(np.square(np.asarray(a, np.float64)), axis=axis))


# --------------------------------------------------------------------------- section 3


def _section_kernel_regression(ctx: _Context) -> _SectionResult:
    """Kernel gradient descent (analytic NTK) vs trained networks of growing width."""

    s = ctx.settings
    sin = _sin_runs(ctx)
    data = sin["data"]
    # Every (width, seed) run is one output column of a single kernel gradient descent: the
    # kernel is shared, so one float64 eigendecomposition serves all of them.
    hist = [run["history"] for run in sin["runs"].values()]
    n_runs = len(hist) * s.sin_seeds
    columns = lambda a: np.concatenate([np.asarray(x)[:, 0, :, 0].T for x in a], axis=1)
    f0_train = columns([h.train_predictions for h in hist])  # (n, widths * seeds)
    f0_test = columns([h.test_predictions for h in hist])
    _, k_test = _kernel_trajectory(sin, f0_train, f0_test, hist[0].steps[0],
                                   y=np.repeat(np.asarray(data.y_train), n_runs, axis=1))
    k_last = k_test[-1].T.reshape(len(hist), s.sin_seeds, -1)  # (widths, seeds, num_test)
    net_last = np.stack([h.test_predictions[:, -1, :, 0] for h in hist])
    y_test = np.asarray(data.y_test)[:, 0]
    gaps = _rms(net_last - k_last, axis=-1)
    test_mse_net = np.mean(np.square(net_last - y_test), axis=-1)
    test_mse_kernel = np.mean(np.square(k_last - y_test), axis=-1)
    kernel_curves = {w: k_test[:, :, i * s.sin_seeds][..., None]
                     for i, w in enumerate(sin["runs"])}
    gaps = np.asarray(gaps)
    widths = np.asarray(s.sin_widths, np.float64)
    slope_gap = _fit(widths, gaps.mean(1))
    # The study's predictor: kernel ridge regression from f_0 = 0 (t = infinity).
    ridge = _jit(lambda k, y, k_test: gradient_flow_mse(k, y, learning_rate=1.0,
                                                        k_test_train=k_test)(jnp.inf))
    ridge_test = np.asarray(ridge(sin["ntk_train"].astype(np.float32), data.y_train,
                                  sin["ntk_test_train"].astype(np.float32)).test)

    widest = max(sin["runs"])
    h = sin["runs"][widest]["history"]
    stride = max(1, (len(h.steps[0]) - 1) // 8)
    snapshots = h.test_predictions[0, ::stride, :, 0]
    fig, axes = plotting.new_figure(2, width=6.2, height=4.6)
    plotting.plot_function_fits(
        data.x_train, data.y_train, data.x_test,
        {"sin(x) (noise-free target)": data.y_test,
         f"NTK gradient descent, same f_0, step {int(h.steps[0, -1])}":
             kernel_curves[widest][-1],
         f"network, width {widest}, step {int(h.steps[0, -1])}": h.test_predictions[0, -1],
         "NTK kernel regression, f_0 = 0, t = inf (the study's)": ridge_test},
        snapshots=snapshots, snapshot_label=f"network during training (every {stride * s.sin_record_every} steps)",  # noqa: E501
        title=f"Sin task: width-{widest} network vs NTK dynamics", ax=axes[0, 0],
    )
    plotting.plot_power_laws(
        widths, {"RMS gap on the test grid": gaps},
        xlabel="hidden width m", ylabel="RMS |f_network - f_NTK| at the last step",
        title="Network vs kernel prediction", ax=axes[0, 1], reference_slope=-0.5,
        reference_label="width^(-1/2) (theory)",
    )
    figure = ctx.figure("s3_kernel_regression_vs_networks.png")
    plotting.save_figure(fig, figure)
    numbers = {
        "num_train": int(data.x_train.shape[0]),
        "learning_rate": sin["lr"],
        "stability_edge_analytic": sin["edge"],
        "steps": s.sin_steps,
        "widths": list(s.sin_widths),
        "seeds": s.sin_seeds,
        "gap_rms_mean_over_seeds": gaps.mean(1),
        "gap_slope": slope_gap,
        "test_mse_network": np.mean(test_mse_net, axis=1),
        "test_mse_kernel_same_time": np.mean(test_mse_kernel, axis=1),
        "test_mse_kernel_ridge_f0_zero": float(_rms(ridge_test - data.y_test) ** 2),
    }
    text = (
        "The study's sin task (50 noisy points on [-3, 3], test grid on [-4, 4]) with two-layer "
        f"ReLU networks in the NTK parameterization (w_std = sqrt 2, b_std = {_SIN_B_STD}), "
        f"trained by full-batch gradient descent at lr = {sin['lr']:.3g} "
        f"({s.sin_lr_fraction:g} x the stability edge 2n/lambda_max = {sin['edge']:.3g} of the "
        "analytic NTK) for "
        f"{s.sin_steps} steps, {s.sin_seeds} seeds per width. The kernel prediction is gradient "
        "descent in function space with "
        "the analytic NTK started from the network's own initial outputs "
        "(`ntkjax.predict.gradient_descent_mse`, in float64); the gap between the two at the "
        f"last step shrinks like width^{slope_gap:.2f} (theory: -1/2, Lee et al. 2019). The "
        "comparison is at a fixed, moderate training time: over long runs the slow modes of "
        "this badly conditioned 1-D kernel keep moving, and the gap there is dominated by how "
        "a finite network's kernel differs on them, which decays more slowly at these widths. "
        "The study's kernel ridge solution "
        "starts from f_0 = 0 and is the t -> infinity limit, so it is not what a finite "
        "training run of a randomly initialized network is close to."
    )
    summary = (f"network vs NTK gradient descent: gap slope {slope_gap:+.2f}, "
               f"gap at width {widest} = {gaps.mean(1)[-1]:.3g}")
    return _SectionResult("3. Kernel regression vs trained wide networks", text, numbers,
                         [figure], summary)


# --------------------------------------------------------------------------- section 4


def _section_drift(ctx: _Context) -> _SectionResult:
    """Relative change of the empirical NTK during training, vs width."""
    s = ctx.settings
    sin = _sin_runs(ctx)
    widths = np.asarray(s.sin_widths, np.float64)
    final = np.stack([run["history"].kernel_change[:, -1] for run in sin["runs"].values()])
    slope = _fit(widths, final.mean(1))
    steps = sin["runs"][s.sin_widths[0]]["history"].steps[0]
    fig, axes = plotting.new_figure(2, width=6.0, height=4.4)
    plotting.plot_convergence(
        steps[1:],
        {f"width {w}": run["history"].kernel_change[:, 1:].mean(0)
         for w, run in sin["runs"].items()},
        title="NTK change during training (mean over seeds)",
        ylabel="||Θ_t - Θ_0||_F / ||Θ_0||_F", ax=axes[0, 0],
    )
    plotting.plot_power_laws(
        widths, {"NTK change at the last step": final}, xlabel="hidden width m",
        ylabel="||Θ_T - Θ_0||_F / ||Θ_0||_F", title=f"NTK drift after {s.sin_steps} steps",
        ax=axes[0, 1], reference_slope=-0.5, reference_label="width^(-1/2) (theory)",
    )
    figure = ctx.figure("s4_ntk_drift_vs_width.png")
    plotting.save_figure(fig, figure)
    numbers = {
        "widths": list(s.sin_widths),
        "final_relative_ntk_change_mean_over_seeds": final.mean(1),
        "slope": slope,
        "steps": s.sin_steps,
    }
    text = (
        "The relative change `||Θ_t - Θ_0||_F / ||Θ_0||_F` of each network's empirical NTK on "
        "the training inputs, tracked inside the compiled training loop "
        "(`ntkjax.training.make_train_fn`). Unlike the study's figure, every run converges "
        "(NTK parameterization, learning rate below the stability edge), and the kernel's "
        f"movement falls like width^{slope:.2f} (theory: -1/2): wider networks stay closer to "
        "their initial kernel."
    )
    summary = f"NTK drift after training ~ width^{slope:+.2f}"
    return _SectionResult("4. NTK evolution during training", text, numbers, [figure], summary)


# --------------------------------------------------------------------------- section 5


def _study_runs(ctx: _Context, show_progress: bool | None = None
                ) -> dict[str, list[dict[str, Any]]]:
    """The study's section 6 set-up (:data:`ntkjax.sweep.PRESETS` ``"study"``) in both
    parameterizations, through :func:`ntkjax.sweep.sweep` (rows streamed to
    ``study_sweep.jsonl`` in the output folder; a re-run resumes from it). ``show_progress``
    defaults to the context's."""
    import dataclasses


    s = ctx.settings
    base = PRESETS["study"]["config"]
    rows = {}
    for param in ("standard", "ntk"):
        config = dataclasses.replace(base, parameterization=param, num_steps=s.study_steps,
                                     track_kernel=False)
        rows[param] = [
            {"width": r["width"], "diverged": r["diverged"], "diverged_at": r["diverged_at"],
             "initial_loss": r["loss"][0], "final_loss": r["final_loss"],
             "max_learning_rate": r["max_learning_rate"]}
            for r in sweep(widths=s.study_widths, seeds=s.study_seeds,
                           out_path=ctx.out_dir / "study_sweep.jsonl",
                           learning_rates=(_STUDY_LEARNING_RATE,), config=config,
                           show_progress=ctx.show_progress if show_progress is None
                           else show_progress, compiler_options=FAST_COMPILE)
        ]
    return rows


def _gaussian_task(key: jax.Array, n: int, dim: int):
    """``x ~ N(0, I_dim)``, ``y = sin(x . u)`` for a random unit vector u: well conditioned."""
    k_x, k_u = jax.random.split(key)
    x = jax.random.normal(k_x, (n, dim))
    u = jax.random.normal(k_u, (dim,))
    return x, jnp.sin(x @ (u / jnp.linalg.norm(u)))[:, None]


def _convergence_check(ctx: _Context) -> tuple[Any, float, int, np.ndarray]:
    """Section 5's width-``max(sin_widths)`` network trained against its kernel dynamics and the
    bound (:func:`ntkjax.training.kernel_regime_check`): ``(check, lr, width, analytic NTK)``.
    :func:`run_demo` starts it on a background thread; :func:`_section_convergence` collects."""
    s = ctx.settings
    n, dim = s.convergence_points, s.convergence_dim
    x, y = _jit(_gaussian_task, static_argnums=(1, 2))(ctx.key("convergence-data"), n, dim)
    width = max(s.sin_widths)
    module = _mlp((width,), b_std=0.1)
    _, ntk_inf = _analytic(module, x)
    lr = 0.5 * float(_jit(max_learning_rate)(ntk_inf.astype(np.float32)))
    params0 = _jit(module.init)(ctx.key("convergence-init"), x[:1])
    check = kernel_regime_check(module.apply, params0, x, y, learning_rate=lr,
                                num_steps=s.convergence_steps,
                                record_every=s.convergence_steps // 50)
    return check, lr, width, ntk_inf


def _section_convergence(ctx: _Context) -> _SectionResult:
    """Loss vs the exp(-lr lambda_min t / n) bound; the stability edge in both parameterizations."""

    s = ctx.settings
    n, dim = s.convergence_points, s.convergence_dim
    started = ctx.cache.pop("convergence-started", None)
    check, lr, width, ntk_inf = (_convergence_check(ctx) if started is None
                                 else started.result())
    started = ctx.cache.pop("study-started", None)
    rows = _study_runs(ctx) if started is None else started.result()
    steps = check.steps
    loss_network = np.asarray(check.loss_network, np.float64)
    loss_kernel = np.asarray(check.loss_kernel, np.float64)
    loss_bound = np.asarray(check.residual_bound, np.float64) ** 2 / (2 * n)
    lambda_min = float(check.stability.lambda_min)
    lambda_max = float(check.stability.lambda_max)
    eig_inf = np.linalg.eigvalsh(ntk_inf)

    widths = np.asarray(s.study_widths, np.float64)
    by_width = {p: {w: [r for r in rs if r["width"] == w] for w in s.study_widths}
                for p, rs in rows.items()}
    mean_of = lambda p, key, keep=lambda r: True: [
        float(np.mean([r[key] for r in by_width[p][w] if keep(r)] or [np.nan]))
        for w in s.study_widths]
    edges = {p: np.asarray(mean_of(p, "max_learning_rate")) for p in rows}
    diverged = {p: np.array([any(r["diverged"] for r in by_width[p][w]) for w in s.study_widths])
                for p in rows}
    diverged_at = {p: [min((r["diverged_at"] for r in by_width[p][w] if r["diverged"]),
                           default=None) for w in s.study_widths] for p in rows}
    final_loss = {p: mean_of(p, "final_loss", lambda r: not r["diverged"]) for p in rows}
    initial_loss = {p: mean_of(p, "initial_loss") for p in rows}
    fig, axes = plotting.new_figure(2, width=6.2, height=4.6)
    plotting.plot_convergence(
        steps, {f"network, width {width}": loss_network,
                "kernel gradient descent (Θ_0 of this network)": loss_kernel},
        bound=loss_bound, bound_label="bound: exp(-2 lr λmin t / n) L_0",
        title=f"Training loss vs the convergence bound (lr = {lr:.3g})", ax=axes[0, 0],
    )
    plotting.plot_stability(
        widths, {"standard param. (study)": edges["standard"], "NTK param.": edges["ntk"]},
        {"standard param. (study)": diverged["standard"], "NTK param.": diverged["ntk"]},
        learning_rate=_STUDY_LEARNING_RATE,
        learning_rate_label="study's lr (0.01 on mean loss = 0.02 here)",
        title="Stability edge 2n/λmax of the initial NTK", ax=axes[0, 1],
    )
    figure = ctx.figure("s5_convergence_and_stability.png")
    plotting.save_figure(fig, figure)

    crossing = [w for w, e in zip(s.study_widths, edges["standard"], strict=True)
                if e < _STUDY_LEARNING_RATE]
    numbers = {
        "convergence": {
            "num_train": n,
            "input_dim": dim,
            "width": width,
            "learning_rate": lr,
            "steps": s.convergence_steps,
            "lambda_min_empirical": lambda_min,
            "lambda_max_empirical": lambda_max,
            "lambda_min_analytic": float(eig_inf[0]),
            "lambda_max_analytic": float(eig_inf[-1]),
            "stability_edge_empirical": float(check.stability.max_learning_rate),
            "initial_loss": float(loss_network[0]),
            "final_loss": float(loss_network[-1]),
            "final_loss_kernel": float(loss_kernel[-1]),
            "final_loss_bound": float(loss_bound[-1]),
            "max_loss_deviation_relative": check.loss_deviation,
            "max_prediction_deviation_relative": check.prediction_deviation,
            "bound_violation_max": check.bound_excess,
            "diverged": check.diverged,
        },
        "study_setup": {
            "widths": list(s.study_widths),
            "seeds": s.study_seeds,
            "steps": s.study_steps,
            "learning_rate": _STUDY_LEARNING_RATE,
            **{f"{p}_param": {
                "stability_edge": edges[p],
                "lr_over_edge": _STUDY_LEARNING_RATE / edges[p],
                "diverged": diverged[p],
                "diverged_at_step": diverged_at[p],
                "initial_loss": initial_loss[p],
                "final_loss": final_loss[p],
            } for p in ("standard", "ntk")},
        },
    }
    text = (
        f"Left: a width-{width} ReLU network (NTK parameterization) trained on {n} Gaussian "
        f"inputs in R^{dim} (targets sin(x.u)) at lr = {lr:.3g}, half the stability edge of "
        "the analytic NTK. Its training loss follows gradient descent with its initial "
        "empirical NTK (`ntkjax.training.kernel_regime_check`; largest deviation "
        f"{100 * check.loss_deviation:.2g} % of the initial loss) and decays at least as fast "
        "as the "
        "bound `||f_t - y|| <= exp(-lr λmin t / n) ||f_0 - y||` (the study's section 7, with "
        f"the 1/n of ntkjax's loss): λmin = {lambda_min:.3g}, λmax = {lambda_max:.3g} "
        f"(analytic NTK: {eig_inf[0]:.3g} and {eig_inf[-1]:.3g}). The bound is set by the "
        "slowest mode; on the 1-D sin task λmin is ~1e-5 of λmax and the bound says "
        "almost nothing. Right: the study's section 6 runs (He init, zero biases, 50 sin "
        f"points, lr 0.01 on the mean loss = {_STUDY_LEARNING_RATE} here, {s.study_steps} steps; "
        "`ntkjax.sweep`'s study preset). Gradient descent is stable only below `2n / λmax` of "
        "the initial NTK. In the standard parameterization λmax grows like the width, so the "
        f"edge falls below the study's learning rate (at widths {crossing}) and those runs "
        "diverge -- the NaN of the study, here detected and reported with the step. In the NTK "
        "parameterization the edge does not depend on the width and every run converges (to "
        "the same loss: with 1-D inputs and no bias scale, b_std = 0, the NTK-parameterized "
        "network can only fit functions linear on each side of 0)."
    )
    n_div = int(diverged["standard"].sum())
    summary = (f"loss bound holds (violation {numbers['convergence']['bound_violation_max']:.1e}); "
               f"study set-up: standard param. diverged at {n_div}/{len(widths)} widths "
               f"(edge < lr at {crossing}), NTK param. diverged at "
               f"{int(diverged['ntk'].sum())}/{len(widths)}")
    return _SectionResult("5. Convergence and the stability edge", text, numbers, [figure],
                         summary)


# --------------------------------------------------------------------------- section 6


def _section_lazy(ctx: _Context) -> _SectionResult:
    """Relative parameter movement vs width; the network against its linearization."""
    s = ctx.settings
    sin = _sin_runs(ctx)
    data = sin["data"]
    widths = np.asarray(s.sin_widths, np.float64)
    param_change = np.stack([run["history"].param_change[:, -1] for run in sin["runs"].values()])
    slope_params = _fit(widths, param_change.mean(1))
    differences, linear_tests = [], {}
    for width in s.sin_widths:
        run = sin["runs"][width]
        lin = run["linear"]
        full_test = run["history"].test_predictions
        differences.append(_rms(full_test[:, -1] - lin.test_predictions[:, -1], axis=(1, 2)))
        linear_tests[width] = lin.test_predictions
    differences = np.stack(differences)
    slope_lin = _fit(widths, differences.mean(1))

    points = (-3.0, 0.0, 2.0)
    picks = np.searchsorted(np.asarray(data.x_test)[:, 0], points)
    steps = sin["runs"][s.sin_widths[0]]["history"].steps[0]
    shown = (s.sin_widths[0], s.sin_widths[-1])
    shown_curves = {w: (np.asarray(sin["runs"][w]["history"].test_predictions[0][:, picks, 0]),
                        np.asarray(linear_tests[w][0][:, picks, 0])) for w in shown}
    plotting.plot_trajectories(
        steps, {f"width {w}": curves for w, curves in shown_curves.items()},
        title="Network (solid) vs its linearization (dashed), one seed",
        point_labels=[f"x = {p:g}" for p in points],
        path=ctx.figure("s6_linearized_trajectories.png"),
    )
    # how far apart the curves of the narrowest panel are, relative to the panel's range
    full_narrow, linear_narrow = shown_curves[shown[0]]
    panel_range = max(float(np.ptp(np.concatenate([c.ravel() for pair in shown_curves.values()
                                                   for c in pair]))), 1e-12)
    narrow_gap = float(np.max(np.abs(full_narrow - linear_narrow)))
    fig, axes = plotting.new_figure(1, width=6.2, height=4.6)
    plotting.plot_power_laws(
        widths, {"||θ_T - θ_0|| / ||θ_0||": param_change,
                 "RMS |f_T - f_T^lin| on the test grid": differences},
        xlabel="hidden width m", ylabel="relative change / difference",
        title=f"Lazy training after {s.sin_steps} steps", ax=axes[0, 0], reference_slope=-0.5,
        reference_label="width^(-1/2) (theory)",
    )
    fig_scaling = ctx.figure("s6_lazy_training_vs_width.png")
    plotting.save_figure(fig, fig_scaling)
    numbers = {
        "widths": list(s.sin_widths),
        "relative_parameter_change_mean_over_seeds": param_change.mean(1),
        "slope_parameter_change": slope_params,
        "linearization_gap_rms_mean_over_seeds": differences.mean(1),
        "slope_linearization_gap": slope_lin,
        "shown_narrowest_max_gap": narrow_gap,
        "shown_narrowest_max_gap_over_range": narrow_gap / panel_range,
    }
    text = (
        "Lazy training: the parameters of wider networks move less, relative to their size "
        f"(`||θ_T - θ_0|| / ||θ_0||` ~ width^{slope_params:.2f}; theory -1/2), and the network "
        "stays close to its first-order Taylor expansion around the initialization "
        "(`ntkjax.linearize`, trained by the same compiled loop): the RMS difference of their "
        f"test predictions falls like width^{slope_lin:.2f}. "
        + (f"In the left panel (width {shown[0]}) the two visibly part: they differ by up to "
           f"{narrow_gap:.3g}, {100 * narrow_gap / panel_range:.0f} % of the panel's range -- "
           "the network learns features the fixed kernel does not have."
           if narrow_gap > 0.05 * panel_range else
           f"Even at width {shown[0]} (left panel) the two curves lie on top of each other: "
           f"they differ by at most {narrow_gap:.2g}, {100 * narrow_gap / panel_range:.1f} % of "
           "the panel's range; the difference shows only in the numbers (second figure).")
    )
    summary = (f"parameter change ~ width^{slope_params:+.2f}, "
               f"network - linearization ~ width^{slope_lin:+.2f}")
    return _SectionResult("6. Lazy training", text, numbers,
                         [ctx.figure("s6_linearized_trajectories.png"), fig_scaling], summary)


# --------------------------------------------------------------------------- section 7


def _digits_baselines(ctx: _Context) -> tuple[tuple[Any, Any, Any], float]:
    """Section 7's infinite-width NTK and NNGP regression on digits, with the NTK's stability
    edge, and the RBF SVM's accuracy: ``((ntk_pred, nngp_pred, edge), svm_accuracy)``. Raises
    ImportError without scikit-learn. :func:`run_demo` starts it on a background thread in a
    quick run; :func:`_section_digits` collects."""
    digits = _digits_split(ctx)
    from sklearn.svm import SVC

    module = _digits_mlp(ctx.settings)

    def kernel_predictions(ntk_tt, ntk_xt, nngp_tt, nngp_xt, y):
        ntk_pred = gradient_flow_mse(ntk_tt, y, learning_rate=1.0, k_test_train=ntk_xt,
                                     diag_reg=_DIGITS_DIAG_REG)(jnp.inf).test
        nngp_pred = gp_inference(nngp_tt, nngp_xt, None, y, diag_reg=_DIGITS_DIAG_REG).mean
        return ntk_pred, nngp_pred, max_learning_rate(ntk_tt)

    (nngp_tt, ntk_tt), (nngp_xt, ntk_xt) = (
        _analytic(module, digits.x_train), _analytic(module, digits.x_test, digits.x_train))
    as32 = lambda a: a.astype(np.float32)
    kernels = _jit(kernel_predictions)(as32(ntk_tt), as32(ntk_xt), as32(nngp_tt), as32(nngp_xt),
                                       digits.y_train)
    model = SVC(kernel="rbf", gamma="scale").fit(np.asarray(digits.x_train),
                                                 np.asarray(digits.labels_train))
    svm_acc = float(np.mean(model.predict(np.asarray(digits.x_test))
                            == np.asarray(digits.labels_test)))
    return kernels, svm_acc


def _digits_network(ctx: _Context, lr: float, show_progress: bool) -> Any:
    """Section 7's network: full-batch SGD at ``lr`` (no optimizer state) in 10 equal chunks of
    one compiled program, each from the last one's parameters -- the same run as one loop --
    under a progress bar (``show_progress``). Returns the training history."""
    s = ctx.settings
    digits = _digits_split(ctx)
    module = _digits_mlp(s)
    chunk = s.digits_steps // 10
    train = jax.jit(lambda p, x, y, x_test: make_train_fn(
        module.apply, optimizer=optax.sgd(lr), num_steps=chunk, record_every=chunk,
        track_kernel=False)(p, x, y, x_test=x_test)._replace(train_predictions=None),
        compiler_options=_train_options(
            s.digits_width * int(digits.x_train.shape[0]) * s.digits_steps))
    params = _jit(module.init)(ctx.key("digits-init"), digits.x_train[:1])
    records = []
    steps = range(10)
    if show_progress:
        steps = ctx.progress(steps, f"training the width-{s.digits_width} network "
                                    f"({s.digits_steps} steps)")
    for _ in steps:
        part = jax.device_get(train(params, digits.x_train, digits.y_train, digits.x_test))
        records.append(part)
        params = part.final_params
    first = records[0]
    return first._replace(
        steps=np.arange(11) * chunk,
        loss=np.array([first.loss[0], *(r.loss[-1] for r in records)]),
        test_predictions=np.stack([first.test_predictions[0],
                                   *(r.test_predictions[-1] for r in records)]),
        diverged=any(bool(r.diverged) for r in records), final_params=params)


def _digits_started(ctx: _Context) -> tuple[Any, float, Any]:
    """Section 7's baselines and trained network (:func:`_digits_baselines`,
    :func:`_digits_network`, the latter without a progress bar): what :func:`run_demo`
    computes on its background thread in a quick run."""
    kernels, svm_acc = _digits_baselines(ctx)
    lr = 0.5 * float(kernels[2])  # half the stability edge of the analytic NTK (section 7)
    return kernels, svm_acc, _digits_network(ctx, lr, show_progress=False)


def _section_digits(ctx: _Context) -> _SectionResult:
    """NTK and NNGP regression vs a trained network (and an RBF SVM) on scikit-learn's digits."""

    s = ctx.settings
    started = ctx.cache.pop("digits-started", None)
    if started is None:
        ctx.note("  infinite-width kernels and an RBF SVM (a few seconds each)")
    try:
        (ntk_pred, nngp_pred, edge), svm_acc, history = (
            (*_digits_baselines(ctx), None) if started is None else started.result())
        digits = _digits_split(ctx)
    except ImportError as err:
        return _skipped_digits("7. Beyond the study: digits", err)
    hidden = (s.digits_width,) * s.digits_depth
    accuracy = functools.partial(_digits_accuracy, digits)
    lr = 0.5 * float(edge)  # half the stability edge of the analytic NTK
    if history is None:
        history = _digits_network(ctx, lr, show_progress=True)
    net_acc_curve = [accuracy(p) for p in history.test_predictions]
    accuracies = {
        "NTK regression (infinite width)": accuracy(ntk_pred),
        "NNGP regression (infinite width)": accuracy(nngp_pred),
        f"trained network (width {s.digits_width})": net_acc_curve[-1],
        "RBF-kernel SVM (scikit-learn)": svm_acc,
    }
    figure = ctx.figure("s7_digits_accuracy.png")
    plotting.plot_accuracies(accuracies, title="scikit-learn digits: test accuracy (30 % split)",
                             path=figure)
    numbers = {
        "num_train": int(digits.x_train.shape[0]),
        "num_test": int(digits.x_test.shape[0]),
        "train_subset": s.digits_train_subset is not None,
        "architecture": f"ReLU MLP {hidden} -> 10, NTK param., w_std = sqrt 2, b_std = 0.1",
        "accuracy_ntk": accuracies["NTK regression (infinite width)"],
        "accuracy_nngp": accuracies["NNGP regression (infinite width)"],
        "accuracy_network": net_acc_curve[-1],
        "accuracy_svm_rbf": svm_acc,
        "network_learning_rate": lr,
        "network_steps": s.digits_steps,
        "network_final_train_loss": float(history.loss[-1]),
        "network_diverged": bool(history.diverged),
    }
    table = "\n".join(["| method | test accuracy |", "|---|---|"] + [
        f"| {name} | {100 * acc:.2f} % |" for name, acc in accuracies.items()])
    text = (
        "Classification as one-hot regression on scikit-learn's 8x8 digits (1,797 images, "
        "stratified 70/30 split, random_state 0; `ntkjax.study.datasets.load_digits`"
        + ("" if s.digits_train_subset is None else
           f"; quick run: the first {s.digits_train_subset} training images only")
        + "). The infinite-"
        f"width kernels are those of the ReLU MLP {hidden} -> 10 (`ntkjax.kernel_fn`); NTK "
        "regression is the t -> infinity limit of gradient flow (`ntkjax.predict."
        "gradient_flow_mse`), NNGP regression the GP posterior mean (`ntkjax.predict."
        f"gp_inference`), both with a ridge of {_DIGITS_DIAG_REG:g} x the mean diagonal. "
        "The finite network of the same architecture is trained with "
        f"`optax.sgd({lr:.3g})` for {s.digits_steps} full-batch steps.\n\n" + table
    )
    summary = ", ".join(f"{k.split(' (')[0]} {100 * v:.1f} %" for k, v in accuracies.items())
    return _SectionResult("7. Beyond the study: NTK regression on real data (digits)", text,
                         numbers, [figure], summary,
                         data={"network_test_accuracy_during_training": net_acc_curve,
                               "network_record_steps": history.steps})


def _digits_split(ctx: _Context) -> Digits:
    """scikit-learn's digits split as host arrays (the first ``digits_train_subset`` training
    images in a quick run; the split is shuffled and stratified already). Raises ImportError
    without scikit-learn."""
    if "digits" not in ctx.cache:
        digits = load_digits()
        digits = type(digits)(*map(np.asarray, digits))  # host arrays: slicing compiles nothing
        subset = ctx.settings.digits_train_subset
        if subset is not None:
            keep = slice(0, subset)
            digits = digits._replace(x_train=digits.x_train[keep], y_train=digits.y_train[keep],
                                     labels_train=digits.labels_train[keep])
        ctx.cache["digits"] = digits
    return ctx.cache["digits"]


def _digits_image_split(ctx: _Context) -> Digits:
    """The split of sections 8 and 10: the first ``digits_image_train`` training and
    ``digits_image_test`` test images of the full split (all-pairs convolutional kernels cost
    ~ N_train (N_train + N_test) x positions^2; the split is shuffled and stratified)."""
    if "digits_images" not in ctx.cache:
        digits = load_digits()  # raises ImportError without scikit-learn
        digits = type(digits)(*map(np.asarray, digits))
        train = slice(0, ctx.settings.digits_image_train)
        test = slice(0, ctx.settings.digits_image_test)
        ctx.cache["digits_images"] = Digits(
            x_train=digits.x_train[train], y_train=digits.y_train[train],
            x_test=digits.x_test[test], y_test=digits.y_test[test],
            labels_train=digits.labels_train[train], labels_test=digits.labels_test[test])
    return ctx.cache["digits_images"]


def _skipped_digits(title: str, err: Exception) -> _SectionResult:
    return _SectionResult(title, f"Skipped: {err}", {"skipped": True}, [],
                          "skipped (scikit-learn missing)")


def _digits_mlp(s: DemoSettings) -> MLP:
    """The ReLU MLP of the digits sections: ``digits_depth`` hidden layers -> 10 outputs."""
    return _mlp((s.digits_width,) * s.digits_depth, outputs=10, b_std=0.1)


def _digits_accuracy(digits: Digits, scores) -> float:
    return float(np.mean(np.argmax(np.asarray(scores), axis=-1) == np.asarray(
        digits.labels_test)))


def _ntk_regression_accuracy(ctx: _Context, name: str, module, digits: Digits, x_train,
                             x_test) -> float:
    """Test accuracy of exact NTK regression (t -> infinity of gradient flow, the digits
    sections' ridge) with the infinite-width NTK of ``module``, in float64 on the host.

    The kernels are computed block by block (:func:`ntkjax.kernel_matrix`) within
    :data:`_KERNEL_BLOCK_BYTES` per block, with a progress bar per matrix."""
    shapes = f"{len(x_train)} x {len(x_train)} and {len(x_test)} x {len(x_train)}"
    ctx.note(f"  exact NTK of {name} ({shapes}):")
    blocks = functools.partial(kernel_matrix, module, memory_bytes=_KERNEL_BLOCK_BYTES,
                               show_progress=ctx.show_progress)
    k_tt = np.asarray(blocks(x_train).ntk, np.float64)
    k_xt = np.asarray(blocks(x_test, x_train).ntk, np.float64)
    ridge = _DIGITS_DIAG_REG * np.trace(k_tt) / k_tt.shape[0]
    weights = np.linalg.solve(k_tt + ridge * np.eye(k_tt.shape[0]),
                              np.asarray(digits.y_train, np.float64))
    return _digits_accuracy(digits, k_xt @ weights)


def _standard_error(accuracy: float, num_test: int) -> float:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` of a test accuracy on n images (at
    least that of one image in n, so that a perfect score is not called exact)."""
    return max(math.sqrt(accuracy * (1.0 - accuracy) / num_test), 1.0 / num_test)


def _compare(a: float, b: float, se: float) -> str:
    """``"higher"``/``"lower"`` when ``a - b`` exceeds two standard errors ``se`` of the
    difference, else ``"the same within noise"``."""
    if abs(a - b) <= 2 * se:
        return "the same within noise"
    return "higher" if a > b else "lower"


def _as_images(x) -> np.ndarray:
    return np.asarray(x).reshape(-1, 8, 8, 1)


def _digits_cnns() -> dict[str, CNN]:
    """The two convolutional networks of sections 8 and 10 (3x3 SAME convolutions, ReLU)."""
    return {
        "CNN, flatten readout": CNN((64, 64, 10), kernel_size=3, activation="relu",
                                    readout="flatten", w_std=_RELU_W_STD, b_std=0.1),
        "CNN, global average pooling": CNN((64, 10), kernel_size=3, activation="relu",
                                           readout="global_average_pool", w_std=_RELU_W_STD,
                                           b_std=0.1),
    }


def _split_text(s: DemoSettings, digits: Digits) -> str:
    """How many images of the split sections 8 and 10 use."""
    n_train, n_test = len(digits.x_train), len(digits.x_test)
    if s.digits_image_train is None and s.digits_image_test is None:
        return f"the whole split ({n_train} training, {n_test} test images)"
    return (f"the first {n_train} training and {n_test} test images of the split (`--full`: "
            "all 1,257 and 540)")


def _section_digits_images(ctx: _Context) -> _SectionResult:
    """Digits as 8x8x1 images: NTK regression with two convolutional kernels beside the MLP's."""
    title = "8. Digits as images: convolutional kernels"
    try:
        digits = _digits_image_split(ctx)
    except ImportError as err:
        return _skipped_digits(title, err)
    s = ctx.settings
    networks = {
        "MLP": (f"MLP {(s.digits_width,) * s.digits_depth} (pixels as vectors)",
                _digits_mlp(s), digits.x_train, digits.x_test),
        **{short: (name, cnn, _as_images(digits.x_train), _as_images(digits.x_test))
           for short, (name, cnn) in zip(("CNN-flatten", "CNN-GAP"), _digits_cnns().items(),
                                         strict=True)},
    }
    accuracies = {short: _ntk_regression_accuracy(ctx, short, module, digits, x_train, x_test)
                  for short, (_, module, x_train, x_test) in networks.items()}
    ctx.cache["digits_exact_accuracy"] = accuracies
    n_test = len(digits.x_test)
    figure = ctx.figure("s8_digits_cnn_accuracy.png")
    plotting.plot_accuracies({networks[k][0]: v for k, v in accuracies.items()},
                             title="digits: infinite-width NTK regression", path=figure)
    mlp, flat, pooled = accuracies.values()
    se = {k: _standard_error(v, n_test) for k, v in accuracies.items()}
    se_diff = math.sqrt(se["CNN-GAP"] ** 2 + se["MLP"] ** 2)
    numbers = {"num_train": len(digits.x_train), "num_test": n_test,
               "accuracy_mlp_ntk": mlp, "accuracy_cnn_flatten_ntk": flat,
               "accuracy_cnn_gap_ntk": pooled,
               "standard_error_points": {k: round(100 * v, 2) for k, v in se.items()},
               "cnn_gap_minus_mlp_points": round(100 * (pooled - mlp), 2)}
    table = "\n".join(["| infinite-width NTK of | test accuracy | ± 1 s.e. |",
                       "|---|---|---|"] + [
        f"| {networks[k][0]} | {100 * acc:.2f} % | {100 * se[k]:.2f} |"
        for k, acc in accuracies.items()])
    text = (
        f"The same ridge as section 7 on {_split_text(s, digits)}, with the digits as 8x8x1 "
        "images: NTK regression (t -> infinity) with the exact infinite-width kernels "
        "(`ntkjax.kernel_matrix`, float64 solve) of a ReLU CNN of two 3x3 SAME convolutions and "
        "a flatten readout (only same-position pairs are needed: Novak et al. 2019), and of one "
        "3x3 convolution followed by global average pooling (the CNTK-GAP of Arora et al. 2019, "
        "all pairs of positions), beside the MLP kernel of section 7 on the pixels as vectors. "
        f"With {n_test} test images one image is {100 / n_test:.2f} points and the standard "
        "error of an accuracy is about "
        f"{100 * float(np.mean(list(se.values()))):.1f} points: the CNN-GAP kernel is "
        f"{_compare(pooled, mlp, se_diff)} than the MLP's "
        f"({100 * (pooled - mlp):+.2f} points, 2 s.e. of the difference = "
        f"{200 * se_diff:.2f}).\n\n" + table)
    summary = ", ".join(f"{k} {100 * v:.1f} %" for k, v in accuracies.items())
    return _SectionResult(title, text, numbers, [figure], summary)


def _section_digits_likelihood(ctx: _Context) -> _SectionResult:
    """w_std, b_std and the noise of a depth-3 ReLU NNGP fitted by marginal likelihood."""
    title = "9. Digits: hyperparameters fitted by marginal likelihood"
    s = ctx.settings
    ctx.note(f"  Adam on the evidence, {s.digits_likelihood_steps} steps in one compiled loop "
             "(no progress inside it; --full: about 3 CPU-minutes)")
    try:
        fit = digits_marginal_likelihood(
            depth=3, num_steps=s.digits_likelihood_steps,
            train_subset=s.digits_train_subset, test_subset=s.digits_image_test)
    except ImportError as err:
        return _skipped_digits(title, err)
    before, after = fit["initial"], fit["fitted"]
    gain = fit["log_marginal_likelihood_fitted"] - fit["log_marginal_likelihood_initial"]
    acc0, acc1 = fit["test_accuracy_initial"], fit["test_accuracy_fitted"]
    n_test = fit["num_test"]
    se = math.sqrt(_standard_error(acc0, n_test) ** 2 + _standard_error(acc1, n_test) ** 2)
    verdict = _compare(acc1, acc0, se)
    rows = [("w_std", "w_std"), ("b_std", "b_std"), ("noise variance", "noise")]
    table = "\n".join(["| | before | after | change |", "|---|---|---|---|"] + [
        f"| {label} | {before[key]:.5g} | {after[key]:.5g} | "
        f"{after[key] / before[key]:.3g} x |" for label, key in rows] + [
        f"| log marginal likelihood | {fit['log_marginal_likelihood_initial']:.1f} | "
        f"{fit['log_marginal_likelihood_fitted']:.1f} | {gain:+.1f} |",
        f"| test accuracy (GP posterior mean) | {100 * acc0:.2f} % | {100 * acc1:.2f} % | "
        f"{100 * (acc1 - acc0):+.2f} points |"])
    outcome = (
        f"The fit raises the log evidence by {gain:.1f} nats, but the test accuracy is "
        + ("unchanged" if acc0 == acc1 else f"{verdict} ({100 * (acc1 - acc0):+.2f} points)")
        + f" (2 standard errors of the difference: {200 * se:.2f} points): on these digits a "
        "higher evidence does not buy a better classifier."
        if verdict == "the same within noise" else
        f"The fit raises the log evidence by {gain:.1f} nats and the test accuracy is "
        f"{verdict} by {100 * abs(acc1 - acc0):.2f} points (more than 2 standard errors, "
        f"{200 * se:.2f} points).")
    text = (
        "The NNGP of a depth-3 ReLU MLP (NTK parameterization) is the GP prior of each one-hot "
        "output (centred by 0.1). Its `w_std`, `b_std` and the observation noise are fitted by "
        "maximizing the GP evidence of the training targets with Adam on their logarithms "
        f"({fit['num_steps']} steps, gradients through the kernel recursion: "
        "`ntkjax.fit_marginal_likelihood`, float64); test accuracy is the argmax of the GP "
        f"posterior mean ({fit['num_train']} training, {n_test} test images; "
        f"{fit['fit_seconds']:.1f} s). " + outcome + " This section runs with `--full` (or "
        "`--sections digits_likelihood`).\n\n" + table)
    numbers = {**fit, "log_marginal_likelihood_change": gain,
               "test_accuracy_change_points": round(100 * (acc1 - acc0), 2),
               "accuracy_change_significant": verdict != "the same within noise"}
    summary = (f"log evidence {fit['log_marginal_likelihood_initial']:.1f} -> "
               f"{fit['log_marginal_likelihood_fitted']:.1f} ({gain:+.1f}); accuracy "
               f"{100 * acc0:.2f} % -> {100 * acc1:.2f} % ({verdict})")
    return _SectionResult(title, text, numbers, [], summary)


def _section_digits_features(ctx: _Context) -> _SectionResult:
    """Test accuracy of NTK random-feature regression against the number of features D."""
    title = "10. Digits: NTK random features against the exact kernel"
    try:
        digits = _digits_image_split(ctx)
    except ImportError as err:
        return _skipped_digits(title, err)
    s = ctx.settings
    cnn = _digits_cnns()["CNN, global average pooling"]
    networks = {"MLP": (_digits_mlp(s), np.asarray(digits.x_train), np.asarray(digits.x_test),
                        s.digits_feature_counts),
                "CNN-GAP": (cnn, _as_images(digits.x_train), _as_images(digits.x_test),
                            s.digits_cnn_feature_counts)}
    exact_cached = ctx.cache.get("digits_exact_accuracy", {})
    n_test, draws = len(digits.x_test), s.digits_feature_keys
    curves, exact = {}, {}
    for name, (module, x_train, x_test, counts) in networks.items():
        exact[name] = exact_cached[name] if name in exact_cached else _ntk_regression_accuracy(
            ctx, name, module, digits, x_train, x_test)
        fits = [(count, draw) for count in counts for draw in range(draws)]
        accuracy = {count: [] for count in counts}
        for count, draw in ctx.progress(
                fits, f"{name} random features, D = {', '.join(map(str, counts))} x {draws} "
                      "draws"):
            fmap = feature_map(module, key=jax.random.fold_in(ctx.key(f"features-{name}"),
                                                               draw), num_features=count)
            fit = feature_ridge(fmap, x_train, digits.y_train, diag_reg=_DIGITS_DIAG_REG,
                                batch_size=256)
            accuracy[count].append(_digits_accuracy(digits, fit.predict(x_test)))
        curves[name] = [accuracy[count] for count in counts]
    figure = ctx.figure("s10_digits_features_accuracy.png")
    plotting.plot_accuracy_vs_features(
        {name: list(networks[name][3]) for name in networks}, curves, exact=exact,
        title=f"digits: NTK random-feature regression ({draws} draws per D)", path=figure)

    def stats(runs):  # mean and standard error over the draws, in points
        runs = 100 * np.asarray(runs, np.float64)
        return float(runs.mean()), float(runs.std(ddof=1) / math.sqrt(len(runs))) \
            if len(runs) > 1 else float("nan")

    numbers: dict[str, Any] = {"num_train": len(digits.x_train), "num_test": n_test,
                               "draws_per_count": draws}
    findings = []
    for name, (_, _, _, counts) in networks.items():
        means, errors = zip(*(stats(r) for r in curves[name]), strict=True)
        numbers[name] = {
            "feature_counts": list(counts),
            "accuracy_exact": exact[name],
            "accuracy_features_mean": [m / 100 for m in means],
            "standard_error_over_draws_points": [round(e, 2) for e in errors],
            f"gap_points_at_D{counts[-1]}": round(means[-1] - 100 * exact[name], 2),
        }
        steps = []
        for k in range(1, len(counts)):
            change = means[k] - means[k - 1]
            se = math.hypot(errors[k], errors[k - 1])
            noisy = not math.isfinite(se) or abs(change) <= 2 * se
            steps.append(f"D = {counts[k - 1]} -> {counts[k]}: {change:+.2f} points"
                         + (" (within noise)" if noisy else f" (> 2 s.e. = {2 * se:.2f})"))
        gap = means[-1] - 100 * exact[name]
        gap_se = math.hypot(errors[-1], 100 * _standard_error(exact[name], n_test))
        steps.append(
            f"at D = {counts[-1]} the features are {abs(gap):.2f} points "
            f"{'below' if gap < 0 else 'above'} the exact kernel"
            + (" (within noise)" if abs(gap) <= 2 * gap_se else ""))
        findings.append(f"{name}: " + "; ".join(steps) + ".")
    header_counts = sorted({d for _, _, _, counts in networks.values() for d in counts})
    rows = []
    for name, (_, _, _, counts) in networks.items():
        cells = {d: "{:.2f} ± {:.2f} %".format(*stats(r))
                 for d, r in zip(counts, curves[name], strict=True)}
        rows.append(f"| {name} | " + " | ".join(cells.get(d, "-") for d in header_counts)
                    + f" | {100 * exact[name]:.2f} % |")
    table = "\n".join(["| NTK of | " + " | ".join(f"D = {d}" for d in header_counts)
                       + " | exact |", "|---" * (len(header_counts) + 2) + "|", *rows])
    text = (
        "Kernel ridge regression on D random features of the NTK (`ntkjax.feature_map`: "
        "arc-cosine features and TensorSRHT sketches, Zandieh et al. 2021; `ntkjax."
        "feature_ridge`, streamed, the same ridge) against exact NTK regression with the same "
        f"kernel (section 8) on {_split_text(s, digits)}: the MLP of section 7 and the CNN-GAP "
        f"of section 8. Each entry is the mean ± standard error over {draws} independent draws "
        "of the features; a change is called within noise when it is smaller than two "
        "standard errors (of the draws; the test set adds "
        f"{100 * _standard_error(exact['MLP'], n_test):.1f} points of its own to a comparison "
        "with another test set). " + " ".join(findings) + "\n\n" + table)
    summary = ", ".join(
        f"{name} D={networks[name][3][-1]} {100 * np.mean(curves[name][-1]):.1f} % vs exact "
        f"{100 * exact[name]:.1f} %" for name in networks)
    return _SectionResult(title, text, numbers, [figure], summary,
                          data={"accuracy_per_draw": curves})


# --------------------------------------------------------------------------- driver

SECTIONS: dict[str, Callable[[_Context], _SectionResult]] = {
    "analytic": _section_analytic,
    "empirical": _section_empirical,
    "kernel_regression": _section_kernel_regression,
    "drift": _section_drift,
    "convergence": _section_convergence,
    "lazy": _section_lazy,
    "digits": _section_digits,
    "digits_images": _section_digits_images,
    "digits_likelihood": _section_digits_likelihood,
    "digits_features": _section_digits_features,
}

_INTRO = (
    "This report reproduces the NTK study notebook with ntkjax and corrects it where it is "
    "wrong: the study's kernel formula is the NNGP, not the NTK (section 1); its empirical NTK "
    "is computed in the standard parameterization, where it diverges with width (section 2); "
    "and its training runs at width >= 200 diverge because their learning rate is above the "
    "stability edge 2n/λmax (section 5). All numbers are in `results.json`."
)


def _check_output_folder(out_dir: Path) -> None:
    """Raises ValueError, before any work, unless ``out_dir`` is (or can be made) a writable
    folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder.")
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out_dir} lies below {folder}, a file.")
            if not os.access(folder, os.W_OK):
                raise ValueError(f"--out {out_dir}: {folder} is not writable.")
            return


def default_sections(quick: bool = False, full: bool = False) -> tuple[str, ...]:
    """The sections a run without ``--sections`` runs: all of :data:`SECTIONS` with ``full``;
    all but :data:`NOT_QUICK_SECTIONS` with ``quick``; else all but :data:`FULL_ONLY_SECTIONS`.

    >>> default_sections(quick=True)[-1], len(default_sections()), len(default_sections(full=True))
    ('digits', 9, 10)
    """
    left_out = () if full else (NOT_QUICK_SECTIONS if quick else FULL_ONLY_SECTIONS)
    return tuple(n for n in SECTIONS if n not in left_out)


def run_demo(
    *,
    out_dir: str | Path,
    quick: bool = False,
    full: bool = False,
    seed: int = 0,
    show_progress: bool = True,
    sections: tuple[str, ...] | None = None,
    stream: Any = None,
) -> dict[str, Any]:
    """Runs the study's sections, writing figures, ``report.md`` and ``results.json``.

    Args:
      out_dir: output folder (created if needed).
      quick: small widths, seeds, step counts and digit subsets, and by default only the
        study's sections 1-7 (under a minute instead of minutes).
      full: the whole digits split in sections 8 and 10, more random-feature counts, and
        section 9 (the marginal-likelihood fit) among the default sections.
      seed: seed of the PRNG key from which every section derives its own key.
      show_progress: print each section's start and time, and progress bars for long loops.
      sections: names from :data:`SECTIONS` to run, in this order (default:
        ``default_sections``).
      stream: where progress lines go (default ``sys.stderr``).

    Returns:
      The report as a dict (the content of ``results.json``).

    Raises:
      ValueError: for unknown section names, ``quick`` together with ``full``, or an output
        folder that cannot be written.
    """
    names = default_sections(quick, full) if sections is None else tuple(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}.")
    settings = demo_settings(quick, full)
    stream = sys.stderr if stream is None else stream
    out_dir = Path(out_dir)
    _check_output_folder(out_dir)
    mode = "quick" if quick else ("full" if full else "default")
    report = Report(out_dir, title="ntkjax demo: the NTK study, reproduced and corrected",
                    intro=_INTRO, meta={"mode": mode, "quick": quick, "seed": seed,
                                       "backend": jax.default_backend(),
                                       "jax_version": jax.__version__})
    ctx = _Context(out_dir, settings, jax.random.PRNGKey(seed), show_progress, stream)
    # A quick run starts the sin-task runs (sections 3, 4 and 6), section 5's training against
    # its kernel dynamics and its study runs, and section 7's kernel and SVM baselines and its
    # network (without progress bars: seconds each) at once, on a background thread: they
    # compile and run while the sections before them run (XLA compiles and runs without the
    # GIL), so that both cores stay busy; the numbers are the same. (The default run keeps
    # its sections one after the other, within its memory budget.)
    background = ThreadPoolExecutor(max_workers=1)
    if settings.quick:
        if any(name in _SIN_SECTIONS for name in names):
            ctx.cache["sin-started"] = background.submit(_start_sin_runs, ctx)
        if "convergence" in names:
            ctx.cache["convergence-started"] = background.submit(_convergence_check, ctx)
            ctx.cache["study-started"] = background.submit(_study_runs, ctx, False)
        if "digits" in names:
            ctx.cache["digits-started"] = background.submit(_digits_started, ctx)
    try:
        _run_sections(ctx, names, report, stream)
    finally:
        background.shutdown(wait=True, cancel_futures=True)
    report.write()
    return report.as_dict()


def _run_sections(ctx: _Context, names: tuple[str, ...], report: Report, stream: Any) -> None:
    show_progress = ctx.show_progress
    for index, name in enumerate(names, start=1):
        if show_progress:
            print(f"[{index}/{len(names)}] {name} ...", file=stream, flush=True)
        start = time.perf_counter()
        result = SECTIONS[name](ctx)
        seconds = time.perf_counter() - start
        report.add_section(name, title=result.title, text=result.text, numbers=result.numbers,
                           figures=result.figures, data={**(result.data or {}),
                                                         "summary": result.summary},
                           seconds=seconds)
        if show_progress:
            print(f"[{index}/{len(names)}] {name}: {result.summary} ({seconds:.1f} s)",
                  file=stream, flush=True)


DESCRIPTION = """\
Reproduce the NTK study notebook end to end, and correct it where it is wrong: its kernel
formula is the NNGP, not the NTK (section 1); its empirical NTK uses the standard
parameterization, which grows with width (section 2); its training runs at width >= 200 diverge
because the learning rate is above the stability edge 2n/lambda_max (section 5). Sections 7-10
go beyond the study: digits with MLP and convolutional kernels, a marginal-likelihood fit, and
random features. Writes PNG figures, report.md and results.json into --out, rewritten after
every section."""

EPILOG = """\
sections (in order):
  analytic           1. analytic NNGP and NTK of a two-layer ReLU network
  empirical          2. empirical vs analytic NTK against width
  kernel_regression  3. trained networks vs NTK gradient descent (sin task)
  drift              4. NTK change during training against width
  convergence        5. loss bound and the stability edge (the study's divergence)
  lazy               6. parameter movement; the network vs its linearization
  digits             7. NTK/NNGP regression, a trained network and an SVM on digits
  digits_images      8. convolutional NTKs on digits as images (not in --quick)
  digits_likelihood  9. hyperparameters fitted by marginal likelihood (--full only)
  digits_features    10. NTK random features against the exact kernel (not in --quick)

cost on a 2-core CPU (user+sys CPU time, peak memory), measured:
  --quick   26 s wall, 38 CPU-s, 0.7 GB (sections 1-7)
  default   2 min 23 s wall, 222 CPU-s, 2.5 GB (sections 1-8 and 10; 8 and 10 on 500
            training and 400 test images, 4 draws of the random features)
  --full    about 16 CPU-min, 3 GB, estimated from its parts (all 10 sections; 8 and 10
            on the whole digits split, D up to 8192)
  (quick and default measured on an idle machine, 2026-12-07).

example:
  ntkjax demo --out demo_out"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ntkjax demo``."""
    parser.add_argument("--out", default="ntkjax-demo", type=Path, metavar="DIR",
                        help="output folder for the figures, report.md and results.json")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="sections 1-7 at small widths, seeds and steps: a smoke run")
    size.add_argument("--full", action="store_true",
                      help="the heavy studies too: section 9 and the whole digits split in "
                           "sections 8 and 10 (see the costs below)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the PRNG key every section derives its key from")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                        metavar="NAME",
                        help="run only these sections, in this order (names below; default: "
                             "all but digits_likelihood; --quick: 1-7; --full: all)")
    parser.add_argument("--no-progress", action="store_true",
                        help="print no progress lines or bars")


#: The ``XLA_FLAGS`` entry of a ``--quick`` command-line run: XLA's older CPU emitters. The
#: fusion emitters build a fresh MLIR context with every dialect for each program, which doubles
#: the cost of compiling a small one (an eager op: 38 against 21 ms of CPU), and a quick run is
#: mostly compiling: 46.5 against 63.3 CPU-s and 1.4 against 2.3 GB (both runs side by side,
#: load ~17 on the 2-core development machine, 2026-12-06), with the same report. jaxlib 0.10
#: has the flag (an unknown flag aborts the process, hence the version check); the default and
#: full runs keep XLA's default emitters.
_QUICK_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _use_older_emitters() -> None:
    """Adds :data:`_QUICK_XLA_FLAG` to ``XLA_FLAGS`` on jaxlib 0.10 (read when JAX starts its
    backend: the command line calls this before any computation)."""
    from importlib.metadata import version

    flags = os.environ.get("XLA_FLAGS", "").split()
    if version("jaxlib").startswith("0.10.") and _QUICK_XLA_FLAG not in flags:
        os.environ["XLA_FLAGS"] = " ".join([*flags, _QUICK_XLA_FLAG])


def run_from_args(args: argparse.Namespace) -> int:
    """Runs ``ntkjax demo`` with parsed ``args``; returns the exit code."""
    start = time.perf_counter()
    if args.quick:
        _use_older_emitters()
    try:
        _check_output_folder(Path(args.out))
    except ValueError as err:
        print(f"ntkjax demo: error: {err}", file=sys.stderr)
        return 2
    result = run_demo(out_dir=args.out, quick=args.quick, full=args.full, seed=args.seed,
                      show_progress=not args.no_progress,
                      sections=None if args.sections is None else tuple(args.sections))
    out = Path(args.out)
    figures = [f for section in result["sections"].values() for f in section["figures"]]
    print(f"ntkjax demo ({result['meta']['mode']}): "
          f"{time.perf_counter() - start:.0f} s")
    for index, (name, section) in enumerate(result["sections"].items(), start=1):
        print(f"  {index}. {name}: {section['data']['summary']}")
    print(f"wrote {len(figures)} figures, {out / 'report.md'} and {out / 'results.json'}")
    return 0
