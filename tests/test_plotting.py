"""Figure functions: each writes a non-empty PNG and draws the axes, scales and labels it promises.

The figures are checked through the returned ``Figure`` (its axes, scales, lines and legend), and
the fitted slopes shown in legends against power laws built with a known exponent.
"""

from __future__ import annotations

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
    np.testing.assert_allclose(means["MLP features"], [91.0, 96.0, 98.0])
    np.testing.assert_allclose(means["MLP exact kernel"], [98.5, 98.5])
    assert "CNN exact kernel" not in means  # no exact value given: no line
    with pytest.raises(ValueError, match="2 accuracy lists for 3"):
        plotting.plot_accuracy_vs_features(counts, {"a": [[0.9], [0.9]]}, exact={}, title="t")
    with pytest.raises(ValueError, match="positive"):
        plotting.plot_accuracy_vs_features([0, 4], {"a": [[0.9], [0.9]]}, exact={}, title="t")
