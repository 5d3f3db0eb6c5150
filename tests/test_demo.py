"""``ntkjax demo``: the quick run writes every figure and the report, and its numbers satisfy the
truths the demo claims -- symmetric positive-definite kernels, width^(-1/2) scaling laws,
convergence in the NTK parameterization, the standard-parameterization divergence explained by
the stability edge, and a sane digits accuracy.

The quick demo (every section but the marginal-likelihood fit, whose report logic is tested on
given numbers instead) runs once for the module, about 60 CPU-seconds: its tests are marked
slow.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

from ntkjax.study import cli
from ntkjax.study import demo as demo_module
from ntkjax.study.demo import (
    FULL_ONLY_SECTIONS,
    SECTIONS,
    default_sections,
    demo_settings,
    run_demo,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGURES = {
    "analytic": ["s1_analytic_kernels.png"],
    "empirical": ["s2_empirical_vs_analytic_heatmaps.png", "s2_error_vs_width.png"],
    "kernel_regression": ["s3_kernel_regression_vs_networks.png"],
    "drift": ["s4_ntk_drift_vs_width.png"],
    "convergence": ["s5_convergence_and_stability.png"],
    "lazy": ["s6_linearized_trajectories.png", "s6_lazy_training_vs_width.png"],
    "digits": ["s7_digits_accuracy.png"],
    "digits_images": ["s8_digits_cnn_accuracy.png"],
    "digits_likelihood": [],
    "digits_features": ["s10_digits_features_accuracy.png"],
}


RUN = tuple(n for n in SECTIONS if n not in FULL_ONLY_SECTIONS)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out_dir=out, quick=True, seed=0, show_progress=False, sections=RUN)
    return out, result


def numbers(result, section):
    return result["sections"][section]["numbers"]


slow = pytest.mark.slow


@slow
def test_every_section_figure_and_report_is_written(demo):
    out, result = demo
    assert list(result["sections"]) == list(RUN)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sections"].keys() == result["sections"].keys()
    markdown = (out / "report.md").read_text()
    for name in RUN:
        figures = EXPECTED_FIGURES[name]
        section = result["sections"][name]
        assert section["figures"] == figures
        assert section["title"] in markdown
        for figure in figures:
            data = (out / figure).read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000
            assert f"]({figure})" in markdown
        assert section["seconds"] > 0


@slow
def test_analytic_kernels_symmetric_positive_definite_and_study_formula_is_nngp(demo):
    s1 = numbers(demo[1], "analytic")
    for kernel in ("nngp", "ntk"):
        assert s1[kernel]["symmetry_error"] < 1e-12
        assert s1[kernel]["positive_definite"]
        assert 0 < s1[kernel]["lambda_min"] <= s1[kernel]["lambda_max"]
    assert s1["study_formula_vs_nngp_max_abs_diff"] < 1e-12
    # the first-layer term is a large part of the NTK: the study's formula is not the NTK
    assert s1["ntk_minus_nngp_relative_frobenius"] > 0.2
    assert s1["ntk"]["lambda_max"] > s1["nngp"]["lambda_max"]


@slow
def test_empirical_ntk_converges_like_inverse_sqrt_width_only_in_ntk_param(demo):
    s2 = numbers(demo[1], "empirical")
    assert -0.7 <= s2["slope_ntk_param"] <= -0.3
    assert s2["slope_standard_param"] > 0.5  # the study's parameterization diverges
    errors = np.asarray(s2["relative_error_ntk_param_mean_over_seeds"])
    assert errors[-1] < errors[0] / 3
    assert s2["heatmap_standard_over_analytic_scale"] > 10
    assert s2["empirical_mean"]["symmetry_error"] < 1e-6
    assert s2["empirical_mean"]["lambda_min"] > -1e-6 * s2["empirical_mean"]["lambda_max"]
    widths = np.asarray(s2["widths"], float)
    # the per-network error at width m is O(m^-1/2) with an O(1) constant
    assert np.all(errors * np.sqrt(widths) < 5.0)


@slow
def test_networks_approach_kernel_gradient_descent(demo):
    s3 = numbers(demo[1], "kernel_regression")
    assert s3["learning_rate"] < s3["stability_edge_analytic"]
    gaps = np.asarray(s3["gap_rms_mean_over_seeds"])
    assert gaps[-1] < gaps[0] / 2
    assert -0.9 <= s3["gap_slope"] <= -0.25
    # trained networks fit the task (noise variance 0.01; test grid extends beyond the data)
    assert np.all(np.asarray(s3["test_mse_network"]) < 0.5)


@slow
def test_ntk_drift_falls_like_inverse_sqrt_width(demo):
    s4 = numbers(demo[1], "drift")
    assert -0.8 <= s4["slope"] <= -0.3
    drift = np.asarray(s4["final_relative_ntk_change_mean_over_seeds"])
    assert np.all(drift > 0) and np.all(np.diff(drift) < 0)


@slow
def test_convergence_bound_and_stability_edge(demo):
    s5 = numbers(demo[1], "convergence")
    conv = s5["convergence"]
    assert 0 < conv["lambda_min_empirical"] < conv["lambda_max_empirical"]
    assert conv["learning_rate"] < conv["stability_edge_empirical"]
    assert conv["final_loss"] < 0.2 * conv["initial_loss"]
    assert conv["bound_violation_max"] < 0.05  # ||f_t - y|| <= exp(-lr lmin t / n) ||f_0 - y||
    study = s5["study_setup"]
    standard, ntk = study["standard_param"], study["ntk_param"]
    lr_over_edge = np.asarray(standard["lr_over_edge"])
    diverged = np.asarray(standard["diverged"])
    # every diverged run was above the stability edge, and the study's widths >= 200 diverge
    assert np.all(lr_over_edge[diverged] > 1)
    assert all(d for w, d in zip(study["widths"], diverged, strict=True) if w >= 200)
    # the edge of the standard parameterization falls with width; NTK parameterization: flat
    assert np.all(np.diff(standard["stability_edge"]) < 0)
    ntk_edges = np.asarray(ntk["stability_edge"])
    assert ntk_edges.max() / ntk_edges.min() < 2
    assert not any(ntk["diverged"])
    assert np.all(np.asarray(ntk["final_loss"]) < np.asarray(ntk["initial_loss"]))


@slow
def test_lazy_training_scalings(demo):
    s6 = numbers(demo[1], "lazy")
    assert -0.8 <= s6["slope_parameter_change"] <= -0.3
    assert s6["slope_linearization_gap"] < -0.2


@slow
def test_digits_accuracy_table(demo):
    s7 = numbers(demo[1], "digits")
    assert s7["num_test"] == 540  # 30 % of 1,797 (stratified split)
    assert s7["num_train"] <= 1257
    assert s7["accuracy_ntk"] >= 0.97
    assert s7["accuracy_nngp"] >= 0.97
    assert s7["accuracy_svm_rbf"] >= 0.97
    assert s7["accuracy_network"] >= 0.90
    assert not s7["network_diverged"]


@slow
def test_digits_as_images_convolutional_kernels(demo):
    s8 = numbers(demo[1], "digits_images")
    quick = demo_settings(quick=True)
    assert (s8["num_train"], s8["num_test"]) == (quick.digits_image_train,
                                                 quick.digits_image_test)
    for name in ("accuracy_mlp_ntk", "accuracy_cnn_flatten_ntk", "accuracy_cnn_gap_ntk"):
        assert 0.85 <= s8[name] <= 1.0, (name, s8[name])
    # the binomial standard error sqrt(p (1 - p) / n), in points
    p = s8["accuracy_mlp_ntk"]
    assert s8["standard_error_points"]["MLP"] == pytest.approx(
        100 * max(np.sqrt(p * (1 - p) / s8["num_test"]), 1 / s8["num_test"]), abs=0.006)
    # the summary names each kernel once, unbroken (it read "MLP (512 99.3 %" once)
    summary = demo[1]["sections"]["digits_images"]["data"]["summary"]
    assert [part.rsplit(" ", 2)[0] for part in summary.split(", ")] == [
        "MLP", "CNN-flatten", "CNN-GAP"]


@slow
def test_random_features_approach_the_exact_kernel(demo):
    section = demo[1]["sections"]["digits_features"]
    s10, s8 = section["numbers"], numbers(demo[1], "digits_images")
    # the exact accuracies are those of section 8 (same kernels, same split)
    assert s10["MLP"]["accuracy_exact"] == s8["accuracy_mlp_ntk"]
    assert s10["CNN-GAP"]["accuracy_exact"] == s8["accuracy_cnn_gap_ntk"]
    draws = section["data"]["accuracy_per_draw"]
    for name in ("MLP", "CNN-GAP"):
        counts = s10[name]["feature_counts"]
        per_draw = np.asarray(draws[name], float)  # (counts, draws)
        assert per_draw.shape == (len(counts), s10["draws_per_count"])
        np.testing.assert_allclose(s10[name]["accuracy_features_mean"], per_draw.mean(1))
        assert abs(s10[name][f"gap_points_at_D{counts[-1]}"]) <= 15.0
        assert per_draw.min() >= 0.6
        # each change between feature counts is called noise exactly when it is within two
        # standard errors of the mean over draws (recomputed here from the draws)
        mean, se = 100 * per_draw.mean(1), 100 * per_draw.std(1, ddof=1) / np.sqrt(
            per_draw.shape[1])
        for k in range(1, len(counts)):
            change = mean[k] - mean[k - 1]
            claim = f"D = {counts[k - 1]} -> {counts[k]}: {change:+.2f} points"
            margin = abs(change) - 2 * np.hypot(se[k], se[k - 1])
            assert claim in section["text"]
            if abs(margin) > 1e-6:  # not on the boundary, where rounding may decide
                verdict = " (within noise)" if margin < 0 else " (> 2 s.e."
                assert claim + verdict in section["text"]


@slow
def test_lazy_training_text_says_what_the_panel_shows(demo):
    section = demo[1]["sections"]["lazy"]
    ratio = section["numbers"]["shown_narrowest_max_gap_over_range"]
    assert 0 <= ratio < 1
    if ratio > 0.05:
        assert "visibly part" in section["text"]
    else:
        assert "lie on top of each other" in section["text"]
        assert "visibly part" not in section["text"]


def fake_fit(accuracy_initial, accuracy_fitted, evidence_initial, evidence_fitted, num_test):
    return {"depth": 3, "num_train": 100, "num_test": num_test, "num_steps": 5,
            "initial": {"w_std": 1.414, "b_std": 0.1, "noise": 1e-3},
            "fitted": {"w_std": 1.6, "b_std": 0.2, "noise": 2e-3},
            "log_marginal_likelihood_initial": evidence_initial,
            "log_marginal_likelihood_fitted": evidence_fitted,
            "test_accuracy_initial": accuracy_initial, "test_accuracy_fitted": accuracy_fitted,
            "fit_seconds": 1.0}


@pytest.mark.parametrize("before, after, verdict", [
    (0.9907, 0.9907, "unchanged"),  # the default run's outcome: the same accuracy
    (0.9800, 0.9815, "the same within noise"),  # 1 image in 540: within 2 s.e.
    (0.90, 0.97, "higher"),
])
def test_marginal_likelihood_section_states_the_change_it_measured(monkeypatch, tmp_path,
                                                                    before, after, verdict):
    monkeypatch.setattr(demo_module, "digits_marginal_likelihood", lambda **kwargs: fake_fit(
        before, after, 12950.3, 12980.1, 540))
    ctx = demo_module._Context(tmp_path, demo_settings(quick=True), None, False)
    result = demo_module._section_digits_likelihood(ctx)
    assert verdict in result.text
    # the evidence table shows the digits that change (12950.3 -> 12980.1, +29.8)
    assert "| log marginal likelihood | 12950.3 | 12980.1 | +29.8 |" in result.text
    assert result.numbers["log_marginal_likelihood_change"] == pytest.approx(29.8)
    assert result.numbers["accuracy_change_significant"] == (verdict == "higher")
    if verdict != "higher":
        assert "does not buy a better classifier" in result.text


def test_default_run_leaves_out_the_heavy_studies():
    assert "digits_likelihood" not in default_sections()
    assert default_sections(full=True) == tuple(SECTIONS)
    assert default_sections(quick=True) == tuple(SECTIONS)[:7]
    default, full = demo_settings(), demo_settings(full=True)
    # sections 8 and 10 on a subset by default, the whole split with --full
    assert default.digits_image_train and default.digits_image_test
    assert full.digits_image_train is None and full.digits_image_test is None
    assert set(default.digits_feature_counts) <= set(full.digits_feature_counts)
    assert default.digits_feature_keys >= 3  # a standard error needs several draws
    with pytest.raises(ValueError, match="exclude"):
        demo_settings(quick=True, full=True)


@slow
def test_cli_runs_one_section_and_prints_a_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    out = tmp_path / "cli"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = cli.main(["demo", "--quick", "--out", str(out), "--sections", "analytic",
                         "--no-progress"])
    assert code == 0
    text = buffer.getvalue()
    assert "analytic" in text and "results.json" in text
    result = json.loads((out / "results.json").read_text())
    assert list(result["sections"]) == ["analytic"]
    assert (out / "s1_analytic_kernels.png").exists()
    # a quick run compiles with XLA's older CPU emitters (read when a fresh process starts JAX)
    assert "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"].split()


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown section"):
        run_demo(out_dir=tmp_path, sections=("nope",))


def test_quick_settings_are_smaller():
    quick, full = demo_settings(True), demo_settings(False)
    assert quick.quick and not full.quick
    assert max(quick.empirical_widths) <= max(full.empirical_widths)
    assert quick.sin_steps <= full.sin_steps and quick.sin_seeds <= full.sin_seeds


def test_bad_output_folders_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [(a_file, "is a file"), (a_file / "below", "a file")]
    if not os.access(read_only, os.W_OK):  # root may write anywhere
        cases.append((read_only / "out", "not writable"))
    for out, message in cases:
        assert cli.main(["demo", "--quick", "--out", str(out), "--sections", "analytic"]) == 2
        assert message in capsys.readouterr().err
        with pytest.raises(ValueError, match=message):
            run_demo(out_dir=out, quick=True, sections=("analytic",))
    assert a_file.read_text() == "keep me"
