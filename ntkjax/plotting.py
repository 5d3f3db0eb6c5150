"""matplotlib figures for ntkjax, in one consistent style.

Every function takes data (numpy arrays or dicts of them), draws one figure, saves it as PNG when
``path`` is given, and returns the ``Figure``. Titles, labelled axes, log scales where the
quantity spans decades, and colorbars on heatmaps. Uses the non-interactive Agg backend.

Edit this file only with small inserts/replacements: several sweep/demo figures live here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ntkjax.scaling import fit_power_law

__all__ = [
    "STYLE",
    "Values",
    "new_figure",
    "plot_accuracies",
    "plot_accuracy_vs_features",
    "plot_convergence",
    "plot_drift_vs_width",
    "plot_function_fits",
    "plot_kernel_heatmaps",
    "plot_loss_curves",
    "plot_power_laws",
    "plot_stability",
    "plot_trajectories",
    "save_figure",
]

Values = Any
"""Anything ``np.asarray`` turns into the numbers to plot (numpy or JAX arrays, lists)."""

STYLE: dict[Any, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "figure.autolayout": False,
}


def new_figure(
    ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 4.0
) -> tuple[Figure, np.ndarray]:
    """A figure with ``nrows x ncols`` axes in the ntkjax style."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                                 squeeze=False)
    return fig, axes


def save_figure(fig: Figure, path: str | Path | None, *,
                rect: tuple[float, float, float, float] | None = None) -> Figure:
    """Lays out ``fig`` (its axes within ``rect`` of the figure, in figure coordinates, when
    given: e.g. room for a figure legend), writes it as PNG when ``path`` is given, closes it,
    and returns it."""
    with plt.rc_context(STYLE):
        fig.tight_layout(rect=rect)
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
    plt.close(fig)
    return fig


# --- figures ---------------------------------------------------------------------------------

_PALETTE = [plt.get_cmap("tab10")(i) for i in range(10)]


def _target_axes(ax: Axes | None, *, width: float, height: float) -> tuple[Any, Axes, bool]:
    """``(figure, axes, own_figure)``: ``ax`` and its figure, or a new one-axes figure."""
    if ax is None:
        fig, axes = new_figure(width=width, height=height)
        return fig, axes[0, 0], True
    return ax.figure, ax, False


def _finish(fig, ax, own_figure: bool, path, *, xlabel: str, ylabel: str, title: str):
    """Labels, title and legend; saves (and returns) the figure when this call made it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best")
    return save_figure(fig, path) if own_figure else fig


def _fit_positive(x, y):
    """:func:`ntkjax.scaling.fit_power_law` on the points where x and y are positive/finite."""

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return fit_power_law(x[keep], y[keep])


def _series_mean(values) -> tuple[np.ndarray, np.ndarray | None]:
    """(n,) -> (values, None); (n, seeds) -> (mean over seeds, the seeds)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return values, None
    if values.ndim == 2:
        return np.nanmean(values, axis=1), values
    raise ValueError(f"a series must have shape (n,) or (n, seeds); got {values.shape}.")


def plot_kernel_heatmaps(
    kernels: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
    path: str | Path | None = None,
    cmaps: Mapping[str, str] | None = None,
    panel_size: float = 4.2,
) -> Figure:
    """One heatmap per kernel matrix (panel title = dict key), each with its own colorbar.

    ``cmaps`` maps a panel title to a colormap name (default ``viridis``); use a sequential map
    such as ``magma`` for absolute differences.
    """
    if not kernels:
        raise ValueError("plot_kernel_heatmaps needs at least one kernel.")
    cmaps = dict(cmaps or {})
    fig, axes = new_figure(len(kernels), width=panel_size, height=panel_size * 0.85)
    for ax, (name, matrix) in zip(axes[0], kernels.items(), strict=True):
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError(f"kernel {name!r} must be a matrix; got shape {matrix.shape}.")
        image = ax.imshow(matrix, cmap=cmaps.get(name, "viridis"), interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name)
        ax.set_xlabel("input index j (x')")
        ax.set_ylabel("input index i (x)")
        ax.grid(False)
    if title:
        fig.suptitle(title, fontsize=13)
    return save_figure(fig, path)


def plot_power_laws(
    x: Values,
    series: Mapping[str, np.ndarray],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path | None = None,
    fit: bool = True,
    reference_slope: float | None = None,
    reference_label: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Log-log plot of quantities against ``x`` with fitted power laws (slope in the legend).

    Each series has shape ``(len(x),)`` or ``(len(x), seeds)``; with seeds, the individual values
    are drawn faintly and the mean over seeds is drawn and fitted. ``reference_slope`` adds a
    dashed guide line of that slope through the first series' geometric centre.
    Draws into ``ax`` when given (and then neither lays out nor saves the figure).
    """
    x = np.asarray(x, dtype=np.float64)
    fig, ax, own_figure = _target_axes(ax, width=6.0, height=4.4)
    first_mean = None
    for k, (name, values) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        mean, seeds = _series_mean(values)
        if mean.shape != x.shape:
            raise ValueError(f"series {name!r} has {mean.shape[0]} points but x has {x.size}.")
        if seeds is not None:
            for s in range(seeds.shape[1]):
                ax.scatter(x, seeds[:, s], s=9, color=color, alpha=0.3, linewidths=0)
        label = name
        if fit:
            slope, prefactor = _fit_positive(x, mean)
            label = f"{name}: fitted slope {slope:+.2f}"
            ax.plot(x, prefactor * x**slope, color=color, lw=1, alpha=0.7)
        ax.plot(x, mean, "o", color=color, ms=6, label=label)
        if first_mean is None:
            first_mean = mean
    if reference_slope is not None and first_mean is not None:
        ok = np.isfinite(first_mean) & (first_mean > 0)
        x0 = np.exp(np.mean(np.log(x[ok])))
        y0 = np.exp(np.mean(np.log(first_mean[ok])))
        guide = reference_label or f"slope {reference_slope:+.2f} (theory)"
        ax.plot(x, y0 * (x / x0) ** reference_slope, "k--", lw=1, alpha=0.6, label=guide)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, own_figure, path, xlabel=xlabel, ylabel=ylabel,
                   title=title)


def plot_function_fits(
    x_train: Values,
    y_train: Values,
    x_test: Values,
    curves: Mapping[str, np.ndarray],
    *,
    title: str,
    path: str | Path | None = None,
    snapshots: Values | None = None,
    snapshot_label: str = "network during training",
    xlabel: str = "x",
    ylabel: str = "f(x)",
    ax: Axes | None = None,
) -> Figure:
    """1-D regression: training points, labelled curves on ``x_test``, and optional snapshots.

    ``snapshots`` has shape ``(T, len(x_test))`` (e.g. a network's predictions during training),
    drawn from faint (early) to solid (late) in one colour.
    """
    x_train = np.asarray(x_train).ravel()
    x_test = np.asarray(x_test).ravel()
    fig, ax, own_figure = _target_axes(ax, width=6.4, height=4.4)
    ax.scatter(x_train, np.asarray(y_train).ravel(), s=18, color="0.3", zorder=3,
               label="training data")
    if snapshots is not None:
        snapshots = np.asarray(snapshots)
        if snapshots.ndim != 2 or snapshots.shape[1] != x_test.size:
            raise ValueError(
                f"snapshots must have shape (T, {x_test.size}); got {snapshots.shape}."
            )
        count = snapshots.shape[0]
        for t, row in enumerate(snapshots):
            ax.plot(x_test, row, color="tab:blue", lw=1.0, alpha=0.15 + 0.6 * (t + 1) / count,
                    label=snapshot_label if t == count - 1 else None)
    styles = ["-", "--", "-.", ":"]
    for k, (name, values) in enumerate(curves.items()):
        ax.plot(x_test, np.asarray(values).ravel(), styles[k % len(styles)],
                color=_PALETTE[(k + 1) % len(_PALETTE)], lw=2, label=name)
    return _finish(fig, ax, own_figure, path, xlabel=xlabel, ylabel=ylabel,
                   title=title)


def plot_convergence(
    steps: Values,
    curves: Mapping[str, np.ndarray],
    *,
    title: str,
    path: str | Path | None = None,
    bound: Values | None = None,
    bound_label: str = "bound exp(-2 lr λmin t / n) L0",
    xlabel: str = "gradient-descent step t",
    ylabel: str = "training loss",
    ax: Axes | None = None,
) -> Figure:
    """Training losses against steps on a log y axis, with an optional upper bound (dashed)."""
    steps = np.asarray(steps)
    fig, ax, own_figure = _target_axes(ax, width=6.0, height=4.4)
    for k, (name, values) in enumerate(curves.items()):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != steps.shape:
            raise ValueError(f"curve {name!r} has shape {values.shape}; steps {steps.shape}.")
        ax.plot(steps, values, "-" if k == 0 else "--", color=_PALETTE[k % len(_PALETTE)],
                lw=2 if k == 0 else 1.5, label=name)
    if bound is not None:
        ax.plot(steps, np.asarray(bound), "k:", lw=1.5, label=bound_label)
    ax.set_yscale("log")
    return _finish(fig, ax, own_figure, path, xlabel=xlabel, ylabel=ylabel,
                   title=title)


def plot_stability(
    widths: Values,
    edges: Mapping[str, np.ndarray],
    diverged: Mapping[str, np.ndarray],
    *,
    learning_rate: float,
    title: str,
    path: str | Path | None = None,
    learning_rate_label: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The stability edge ``2n / λmax`` against width, per parameterization, and the outcomes.

    ``edges[name]`` is the edge at each width, ``diverged[name]`` a boolean per width (the run at
    ``learning_rate`` diverged). Converged runs are drawn as circles, diverged ones as red
    crosses; the learning rate used is a horizontal line. Log-log axes.
    """
    widths = np.asarray(widths, dtype=np.float64)
    fig, ax, own_figure = _target_axes(ax, width=6.2, height=4.4)
    crossed = False
    for k, (name, edge) in enumerate(edges.items()):
        edge = np.asarray(edge, dtype=np.float64)
        bad = np.asarray(diverged[name], dtype=bool)
        if edge.shape != widths.shape or bad.shape != widths.shape:
            raise ValueError(f"edges/diverged for {name!r} must have one value per width.")
        color = _PALETTE[k % len(_PALETTE)]
        ax.plot(widths, edge, "-", color=color, lw=1.5, label=f"{name}: edge 2n/λmax")
        ax.plot(widths[~bad], edge[~bad], "o", color=color, ms=7)
        if bad.any():
            ax.plot(widths[bad], edge[bad], "X", color="tab:red", ms=10,
                    label=None if crossed else "run diverged")
            crossed = True
    ax.axhline(learning_rate, color="k", ls="--", lw=1,
               label=learning_rate_label or f"learning rate {learning_rate:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden width m")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    _legend_below(ax)
    return save_figure(fig, path) if own_figure else fig


def _legend_below(ax: Axes, ncols: int = 2, **kwargs: Any) -> None:
    """The legend under the axes (below the x label), where it cannot hide a line; laid out
    by :func:`save_figure`'s ``tight_layout``."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=ncols, fontsize=8,
              frameon=False, **kwargs)


def plot_trajectories(
    times: Values,
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str,
    path: str | Path | None = None,
    labels: tuple[str, str] = ("network", "linearized network"),
    point_labels: Sequence[str] | None = None,
    xlabel: str = "gradient-descent step t",
    ylabel: str = "output f_t(x) at test points",
    panel_width: float = 4.6,
) -> Figure:
    """Full vs linearized outputs over training: one panel per entry, shared y axis.

    ``panels[name] = (full, linear)``, each of shape ``(len(times), k)`` for k tracked test
    points. One colour per point (named by ``point_labels``, default ``point 1..k``) for both
    curves; solid lines are the full network, dashed its linearization. The legend (under the
    panels) names every colour and both line styles.
    """
    from matplotlib.lines import Line2D

    times = np.asarray(times)
    fig, axes = new_figure(len(panels), width=panel_width, height=4.3)
    axes = axes[0]
    count = None
    for ax, (name, (full, linear)) in zip(axes, panels.items(), strict=True):
        full, linear = np.asarray(full), np.asarray(linear)
        if full.shape != linear.shape or full.shape[0] != times.size:
            raise ValueError(
                f"panel {name!r}: full {full.shape} and linear {linear.shape} must both be "
                f"({times.size}, k)."
            )
        full = full.reshape(times.size, -1)
        linear = linear.reshape(times.size, -1)
        count = full.shape[1]
        for j in range(count):
            color = _PALETTE[j % len(_PALETTE)]
            ax.plot(times, full[:, j], "-", color=color, lw=2.2, alpha=0.6)
            ax.plot(times, linear[:, j], "--", color=color, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
    count = count or 0
    names = list(point_labels) if point_labels is not None else [
        f"point {j + 1}" for j in range(count)]
    if len(names) != count:
        raise ValueError(f"point_labels has {len(names)} names for {count} points.")
    handles = [Line2D([], [], color=_PALETTE[j % len(_PALETTE)], lw=2, label=names[j])
               for j in range(count)]
    handles += [Line2D([], [], color="0.3", ls="-", lw=2.2, alpha=0.6, label=labels[0]),
                Line2D([], [], color="0.3", ls="--", lw=1.2, label=labels[1])]
    axes[0].set_ylabel(ylabel)
    lows = [ax.get_ylim()[0] for ax in axes]
    highs = [ax.get_ylim()[1] for ax in axes]
    for ax in axes:
        ax.set_ylim(min(lows), max(highs))
    fig.suptitle(title, fontsize=13)
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 5), fontsize=9,
               frameon=False)
    return save_figure(fig, path, rect=(0, 0.1, 1, 1))


def plot_accuracies(
    accuracies: Mapping[str, float],
    *,
    title: str,
    path: str | Path | None = None,
    xlabel: str = "test accuracy (%)",
) -> Figure:
    """Horizontal bars of accuracies (fractions in [0, 1]), each labelled with its percentage;
    the axis ends at 100 %."""
    if not accuracies:
        raise ValueError("plot_accuracies needs at least one accuracy.")
    names = list(accuracies)
    percent = np.array([100.0 * float(accuracies[n]) for n in names])
    if not np.all((percent >= 0) & (percent <= 100)):
        raise ValueError(f"accuracies must be fractions in [0, 1]; got {dict(accuracies)}.")
    fig, axes = new_figure(width=6.4, height=0.55 * len(names) + 1.6)
    ax = axes[0, 0]
    y = np.arange(len(names))[::-1]
    ax.barh(y, percent, color=[_PALETTE[k % len(_PALETTE)] for k in range(len(names))])
    for yi, value in zip(y, percent, strict=True):  # inside the bar's end: the axis stops at 100
        ax.text(value, yi, f"{value:.2f}% ", va="center", ha="right", fontsize=9,
                color="white", fontweight="bold")
    ax.set_yticks(y, names)
    low = max(0.0, float(np.floor(percent.min() / 5.0) * 5.0 - 5.0))
    ax.set_xlim(low, 100.0)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", visible=False)
    return save_figure(fig, path)


def plot_accuracy_vs_features(
    feature_counts: Sequence[int] | Mapping[str, Sequence[int]],
    accuracies: Mapping[str, Sequence[Sequence[float]]],
    *,
    exact: Mapping[str, float],
    title: str,
    path: str | Path | None = None,
) -> Figure:
    """Test accuracy of random-feature regression against the number of features D (log axis).

    Each curve is the mean over draws of the features, its shaded band the range (lowest to
    highest) over the draws; the exact kernel's accuracy is a horizontal line in the curve's
    colour, its value in the legend. Exact lines of different curves have dash patterns that
    interleave, so two equal accuracies stay visible as one two-coloured line. The accuracy
    axis ends at 100 %.

    Args:
      feature_counts: the D values, increasing: one sequence for every curve, or a mapping
        from curve name to its own D values.
      accuracies: per curve, one list of accuracies (fractions, one per draw of the features)
        for each of its D.
      exact: per curve, the accuracy of the exact kernel (curves without one get no line).
      title: the axes' title.
      path: where to save the PNG (None: not saved).

    Returns:
      The figure.

    >>> fig = plot_accuracy_vs_features([64, 256], {"MLP": [[0.9, 0.92], [0.95, 0.96]]},
    ...                                 exact={"MLP": 0.97}, title="digits")
    >>> bool(fig.axes[0].get_ylim()[1] <= 100.0)
    True
    """
    fig, axes = new_figure(width=6.4, height=4.6)
    ax = axes[0, 0]
    highest = 0.0
    for k, (name, per_count) in enumerate(accuracies.items()):
        own = feature_counts[name] if isinstance(feature_counts, Mapping) else feature_counts
        counts = np.asarray(own, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or np.any(counts <= 0):
            raise ValueError(f"feature_counts must be positive numbers; got {own}.")
        if len(per_count) != counts.size:
            raise ValueError(f"{name}: {len(per_count)} accuracy lists for {counts.size} D's.")
        color = _PALETTE[k % len(_PALETTE)]
        values = [100.0 * np.asarray(v, dtype=np.float64) for v in per_count]
        draws = min(v.size for v in values)
        ax.plot(counts, [v.mean() for v in values], "o-", color=color,
                label=f"{name} features: mean of {draws} draw{'s' * (draws != 1)}")
        if draws > 1:
            ax.fill_between(counts, [v.min() for v in values], [v.max() for v in values],
                            color=color, alpha=0.2, label=f"{name}: range over the draws")
        highest = max(highest, *(v.max() for v in values))
        if name in exact:
            value = 100.0 * float(exact[name])
            highest = max(highest, value)
            dashes = "--" if len(exact) == 1 else (6 * k, (6, 6 * len(exact) - 6))
            ax.axhline(value, color=color, lw=1.8, ls=dashes,
                       label=f"{name} exact kernel: {value:.2f} %")
    ax.set_xscale("log", base=2)
    low, high = ax.get_ylim()
    ax.set_ylim(low, min(high, 100.0) if highest <= 100.0 else high)
    _legend_below(ax, ncols=2)
    ax.set_xlabel("number of random features D")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    return save_figure(fig, path)


# --- width sweeps (ntkjax.sweep) ----------------------------------------------------------------


def _ragged_to_padded(values) -> np.ndarray:
    """A list of per-width value lists (possibly of different lengths) -> (n, max_len), NaN-padded;
    a flat list/array -> (n,)."""
    if len(values) and np.ndim(values[0]) == 1:
        longest = max(len(v) for v in values)
        out = np.full((len(values), longest), np.nan)
        for i, v in enumerate(values):
            out[i, : len(v)] = np.asarray(v, dtype=np.float64)
        return out
    return np.asarray(values, dtype=np.float64)


def plot_drift_vs_width(
    widths: Values,
    drift: Values,
    *,
    title: str = "Relative NTK change after training vs width",
    ylabel: str = "||Θ_t - Θ_0||_F / ||Θ_0||_F",
    label: str = "NTK change",
    reference_slope: float | None = -0.5,
    path: str | Path | None = None,
) -> Figure:
    """Log-log drift against width with its fitted power law (slope in the legend).

    ``drift`` is ``(len(widths),)``, ``(len(widths), seeds)``, or a list of per-width lists of
    seed values (ragged: seeds that diverged left out). The mean over seeds is fitted; the
    dashed guide has the lazy-training slope ``-1/2`` (Lee et al. 2019).
    """
    return plot_power_laws(
        widths,
        {label: _ragged_to_padded(list(drift))},
        xlabel="hidden width m",
        ylabel=ylabel,
        title=title,
        path=path,
        fit=len(widths) >= 2,
        reference_slope=reference_slope,
        reference_label=None if reference_slope is None else f"slope {reference_slope:+.2f} "
        "(lazy training)",
    )


def plot_loss_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "Training loss",
    xlabel: str = "optimizer step",
    ylabel: str = "training loss 1/(2n) Σ (f - y)²",
    path: str | Path | None = None,
) -> Figure:
    """Loss against step on a log y axis, one colour per curve (e.g. per width).

    ``curves[label] = (steps, losses)`` with losses ``(len(steps),)`` or ``(seeds, len(steps))``;
    with seeds each is drawn faintly and their geometric mean boldly. NaN entries (e.g. steps
    after a run diverged) are left out.
    """
    if not curves:
        raise ValueError("plot_loss_curves needs at least one curve.")
    fig, axes = new_figure(width=6.4, height=4.4)
    ax = axes[0, 0]
    for k, (name, (steps, losses)) in enumerate(curves.items()):
        steps = np.asarray(steps)
        losses = np.atleast_2d(np.asarray(losses, dtype=np.float64))
        if losses.shape[1] != steps.size:
            raise ValueError(f"curve {name!r}: losses {losses.shape} do not match "
                             f"{steps.size} steps.")
        color = _PALETTE[k % len(_PALETTE)]
        positive = np.where(losses > 0, losses, np.nan)
        if losses.shape[0] > 1:
            for row in positive:
                ax.plot(steps, row, "-", color=color, lw=0.7, alpha=0.25)
        logs = np.log(positive)
        count = np.sum(np.isfinite(logs), axis=0)
        mean = np.full(steps.size, np.nan)
        seen = count > 0
        mean[seen] = np.exp(np.nansum(logs, axis=0)[seen] / count[seen])
        ax.plot(steps, mean, "-", color=color, lw=2, label=name)
    ax.set_yscale("log")
    return _finish(fig, ax, True, path, xlabel=xlabel, ylabel=ylabel, title=title)
