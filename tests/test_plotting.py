"""Figure functions: each writes a non-empty PNG and draws the axes, scales and labels it promises.

The figures are checked through the returned ``Figure`` (its axes, scales, lines and legend), and
the fitted slopes shown in legends against power laws built with a known exponent.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from ntkjax import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # a real figure, not an empty canvas


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, "the axes have no legend"
    return [t.get_text() for t in legend.get_texts()]


def test_kernel_heatmaps_have_colorbars_titles_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 3))
    k = a @ a.T
    path = tmp_path / "sub" / "heat.png"
    fig = plotting.plot_kernel_heatmaps(
        {"theory": k, "empirical": k + 0.1, "|difference|": np.full_like(k, 0.1)},
        title="kernels", path=path, cmaps={"|difference|": "magma"},
    )
    assert_png(path)
    images = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in images] == ["theory", "empirical", "|difference|"]
    # one colorbar axes per heatmap
    assert len(fig.axes) == 2 * len(images)
    for ax in images:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.images[0].get_array().shape == (6, 6)
    assert images[2].images[0].get_cmap().name == "magma"
    assert fig._suptitle.get_text() == "kernels"


def test_kernel_heatmaps_reject_non_matrices():
    with pytest.raises(ValueError, match="matrix"):
        plotting.plot_kernel_heatmaps({"bad": np.zeros(3)})
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_kernel_heatmaps({})


def fitted_slopes(ax) -> dict[str, float]:
    slopes = {}
    for text in legend_texts(ax):
        match = re.match(r"(.*): fitted slope ([+-]\d+\.\d+)", text)
        if match:
            slopes[match.group(1)] = float(match.group(2))
    return slopes


def test_power_laws_are_log_log_and_show_the_fitted_slope(tmp_path):
    x = np.array([64, 256, 1024, 4096])
    rng = np.random.default_rng(1)
    seeds = 3.0 * x[:, None] ** -0.5 * np.exp(0.05 * rng.normal(size=(4, 5)))
    path = tmp_path / "scaling.png"
    fig = plotting.plot_power_laws(
        x, {"exact": 2.0 * x**-0.5, "growing": 0.1 * x**1.0, "seeds": seeds},
        xlabel="width", ylabel="relative error", title="scaling", path=path,
        reference_slope=-0.5,
    )
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "width" and ax.get_ylabel() == "relative error"
    assert ax.get_title() == "scaling"
    slopes = fitted_slopes(ax)
    assert slopes["exact"] == pytest.approx(-0.5, abs=0.005)
    assert slopes["growing"] == pytest.approx(1.0, abs=0.005)
    assert slopes["seeds"] == pytest.approx(-0.5, abs=0.05)
    assert any("theory" in t for t in legend_texts(ax))


def test_power_laws_reject_mismatched_series():
    with pytest.raises(ValueError, match="points"):
        plotting.plot_power_laws([1, 2, 3], {"a": [1.0, 2.0]}, xlabel="x", ylabel="y", title="t")


def test_function_fits_draw_data_curves_and_snapshots(tmp_path):
    x_train = np.linspace(-3, 3, 20)
    x_test = np.linspace(-4, 4, 50)
    snapshots = np.stack([s * np.sin(x_test) for s in (0.2, 0.5, 0.9)])
    path = tmp_path / "fits.png"
    fig = plotting.plot_function_fits(
        x_train, np.sin(x_train), x_test,
        {"sin(x)": np.sin(x_test), "kernel": 0.95 * np.sin(x_test)},
        snapshots=snapshots, title="sin task", path=path,
    )
    assert_png(path)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 + 2
    texts = legend_texts(ax)
    for label in ("training data", "network during training", "sin(x)", "kernel"):
        assert label in texts
    assert ax.get_xlabel() == "x" and ax.get_ylabel()
    with pytest.raises(ValueError, match="snapshots"):
        plotting.plot_function_fits(x_train, np.sin(x_train), x_test, {},
                                    snapshots=np.zeros((2, 3)), title="bad")


def test_convergence_is_semilog_with_bound(tmp_path):
    steps = np.arange(0, 101, 10)
    path = tmp_path / "conv.png"
    fig = plotting.plot_convergence(
        steps, {"network": np.exp(-0.05 * steps), "kernel": np.exp(-0.05 * steps)},
        bound=np.exp(-0.01 * steps), title="convergence", path=path,
    )
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
    assert len(ax.lines) == 3
    assert any(t.startswith("bound") for t in legend_texts(ax))
    assert ax.get_xlabel() and ax.get_ylabel()


def test_stability_marks_diverged_runs(tmp_path):
    widths = np.array([50, 200, 1000, 5000])
    path = tmp_path / "stab.png"
    fig = plotting.plot_stability(
        widths,
        {"standard": 3.0 / widths, "NTK": np.full(4, 0.8)},
        {"standard": np.array([False, True, True, True]), "NTK": np.zeros(4, bool)},
        learning_rate=0.02, title="edge", path=path,
    )
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    crosses = [line for line in ax.lines if line.get_marker() == "X"]
    assert len(crosses) == 1 and len(crosses[0].get_xdata()) == 3
    assert "run diverged" in legend_texts(ax)
    assert any("0.02" in t for t in legend_texts(ax))


def test_trajectories_one_panel_per_width_shared_limits(tmp_path):
    t = np.arange(11)
    full = np.outer(1 - np.exp(-0.2 * t), [1.0, -0.5])
    path = tmp_path / "traj.png"
    fig = plotting.plot_trajectories(
        t, {"width 64": (full, full + 0.1), "width 4096": (full, full + 0.01)},
        title="lazy", path=path,
    )
    assert_png(path)
    assert [ax.get_title() for ax in fig.axes] == ["width 64", "width 4096"]
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    assert len(fig.axes[0].lines) == 4
    with pytest.raises(ValueError, match="panel"):
        plotting.plot_trajectories(t, {"bad": (full, full[:3])}, title="bad")


def test_accuracies_bars_labelled_in_percent(tmp_path):
    path = tmp_path / "acc.png"
    fig = plotting.plot_accuracies({"NTK": 0.99, "NNGP": 0.985, "network": 0.97},
                                   title="digits", path=path)
    assert_png(path)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    top_to_bottom = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_to_bottom] == ["NTK", "NNGP", "network"]
    assert {t.get_text().strip() for t in ax.texts} == {"99.00%", "98.50%", "97.00%"}
    assert "accuracy" in ax.get_xlabel()


def test_accuracy_vs_features_draws_means_bands_and_exact_lines(tmp_path):
    path = tmp_path / "features.png"
    counts = [256, 1024, 4096]
    draws = {"MLP": [[0.90, 0.92], [0.95, 0.97], [0.98, 0.98]], "CNN": [[0.8], [0.9], [0.95]]}
    fig = plotting.plot_accuracy_vs_features(counts, draws, exact={"MLP": 0.985},
                                             title="features", path=path)
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    means = {line.get_label(): line.get_ydata() for line in ax.lines}
    np.testing.assert_allclose(means["MLP features: mean of 2 draws"], [91.0, 96.0, 98.0])
    np.testing.assert_allclose(means["MLP exact kernel: 98.50 %"], [98.5, 98.5])
    assert not any(k.startswith("CNN exact") for k in means)  # no exact value: no line
    assert "CNN features: mean of 1 draw" in means  # one draw: no band
    assert len(ax.collections) == 1
    with pytest.raises(ValueError, match="2 accuracy lists for 3"):
        plotting.plot_accuracy_vs_features(counts, {"a": [[0.9], [0.9]]}, exact={}, title="t")
    with pytest.raises(ValueError, match="positive"):
        plotting.plot_accuracy_vs_features([0, 4], {"a": [[0.9], [0.9]]}, exact={}, title="t")


# --- every figure of the demo, on small data: limits and legends against the data -------------


def assert_data_within_limits(ax) -> None:
    """Every finite point of every line lies inside the axes' limits."""
    x_low, x_high = sorted(ax.get_xlim())
    y_low, y_high = sorted(ax.get_ylim())
    for line in ax.lines:
        if line.get_transform() != ax.transData:  # axhline/axvline: blended coordinates
            continue
        x = np.asarray(line.get_xdata(), float)
        y = np.asarray(line.get_ydata(), float)
        keep = np.isfinite(x) & np.isfinite(y)
        assert np.all((x[keep] >= x_low) & (x[keep] <= x_high)), line.get_label()
        assert np.all((y[keep] >= y_low) & (y[keep] <= y_high)), line.get_label()


def drawn(fig):
    """An Agg canvas of ``fig``, drawn (a saved figure is closed: pyplot's canvas is gone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


def legend_box(fig, legend):
    return legend.get_window_extent(drawn(fig).get_renderer())


def line_points(line) -> np.ndarray:
    """A line's points in display coordinates, densely along each segment."""
    xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    dense = [a + t * (b - a) for a, b in itertools.pairwise(xy)
             for t in np.linspace(0, 1, 50)] if len(xy) > 1 else list(xy)
    return line.get_transform().transform(np.asarray(dense))


def test_stability_legend_covers_no_line(tmp_path):
    # the demo's set-up: the standard edge falls through the learning rate, NTK edge flat
    widths = np.array([50, 200, 1000, 5000])
    fig = plotting.plot_stability(
        widths, {"standard param. (study)": 0.9 * 50 / widths, "NTK param.": np.full(4, 0.9)},
        {"standard param. (study)": np.array([False, True, True, True]),
         "NTK param.": np.zeros(4, bool)},
        learning_rate=0.02, learning_rate_label="study's lr", title="edge",
        path=tmp_path / "s5.png")
    ax = fig.axes[0]
    box = legend_box(fig, ax.get_legend())
    for line in ax.lines:
        points = line_points(line)
        inside = ((points[:, 0] >= box.x0) & (points[:, 0] <= box.x1)
                  & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1))
        assert not inside.any(), f"the legend covers {line.get_label()!r}"
    assert set(legend_texts(ax)) == {"standard param. (study): edge 2n/λmax",
                                     "NTK param.: edge 2n/λmax", "run diverged", "study's lr"}
    assert_data_within_limits(ax)


def test_trajectories_legend_names_every_colour_and_both_styles(tmp_path):
    t = np.arange(11)
    full = np.outer(1 - np.exp(-0.2 * t), [1.0, -0.5, 0.3])
    fig = plotting.plot_trajectories(
        t, {"width 64": (full, full + 0.05), "width 4096": (full, full + 0.001)},
        title="lazy", point_labels=["x = -3", "x = 0", "x = 2"], path=tmp_path / "s6.png")
    (legend,) = fig.legends
    handles = legend.legend_handles
    texts = [text.get_text() for text in legend.get_texts()]
    assert texts == ["x = -3", "x = 0", "x = 2", "network", "linearized network"]
    colours = {matplotlib_colour(h.get_color()) for h in handles[:3]}
    for ax in fig.axes:
        # every drawn colour is named in the legend; solid = network, dashed = linearization
        assert {matplotlib_colour(line.get_color()) for line in ax.lines} == colours
        assert sorted(line.get_linestyle() for line in ax.lines) == ["-"] * 3 + ["--"] * 3
        assert_data_within_limits(ax)
    assert [h.get_linestyle() for h in handles[3:]] == ["-", "--"]
    with pytest.raises(ValueError, match="point_labels"):
        plotting.plot_trajectories(t, {"w": (full, full)}, title="t", point_labels=["a"])


def matplotlib_colour(colour) -> tuple:
    from matplotlib.colors import to_rgb

    return tuple(np.round(to_rgb(colour), 3))


@pytest.mark.parametrize("accuracies", [
    {"NTK": 0.993, "NNGP": 0.991, "network": 0.97, "SVM": 0.987},  # the demo's s7
    {"MLP": 1.0, "CNN": 0.95},  # a perfect score still ends the axis at 100 %
])
def test_accuracy_axis_ends_at_100_percent(tmp_path, accuracies):
    fig = plotting.plot_accuracies(accuracies, title="digits", path=tmp_path / "acc.png")
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert high == 100.0
    widths = [bar.get_width() for bar in ax.patches]
    np.testing.assert_allclose(sorted(widths), sorted(100 * np.asarray(list(
        accuracies.values()))))
    assert low <= min(widths) - 5
    # every percentage label sits inside the axes
    renderer = drawn(fig).get_renderer()
    box = ax.get_window_extent()
    for text in ax.texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
    with pytest.raises(ValueError, match="fractions"):
        plotting.plot_accuracies({"a": 99.0}, title="percent by mistake")


def test_features_exact_lines_stay_visible_when_equal_and_band_is_labelled(tmp_path):
    counts = {"MLP": [256, 1024, 4096], "CNN-GAP": [256, 1024]}
    draws = {"MLP": [[0.90, 0.93, 0.91], [0.95, 0.96, 0.955], [0.97, 0.975, 0.98]],
             "CNN-GAP": [[0.85, 0.88, 0.86], [0.93, 0.95, 0.94]]}
    exact = {"MLP": 0.985, "CNN-GAP": 0.985}  # equal: one line would hide the other
    fig = plotting.plot_accuracy_vs_features(counts, draws, exact=exact, title="features",
                                             path=tmp_path / "s10.png")
    ax = fig.axes[0]
    texts = legend_texts(ax)
    for name in counts:
        assert f"{name} features: mean of 3 draws" in texts
        assert f"{name}: range over the draws" in texts
        assert f"{name} exact kernel: 98.50 %" in texts
    assert len(ax.collections) == 2  # one band per curve
    low, high = ax.get_ylim()
    assert high <= 100.0 and low <= 85.0
    assert_data_within_limits(ax)
    # both colours show along the shared exact line in the rendered image
    image = np.asarray(drawn(fig).buffer_rgba())[..., :3].astype(float) / 255
    row = image.shape[0] - round(float(ax.transData.transform((300, 98.5))[1]))
    x0, x1 = (int(v) for v in ax.transData.transform([(300, 0), (3000, 0)])[:, 0])
    strip = image[row - 1:row + 2, x0:x1].reshape(-1, 3)
    for k in range(2):
        colour = np.asarray(plotting._PALETTE[k][:3])
        assert np.sum(np.all(np.abs(strip - colour) < 0.08, axis=1)) > 20, f"colour {k} hidden"
