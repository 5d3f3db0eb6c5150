"""``ntkjax demo``: the quick run writes every figure and the report, and its numbers satisfy the
truths the demo claims -- symmetric positive-definite kernels, width^(-1/2) scaling laws,
convergence in the NTK parameterization, the standard-parameterization divergence explained by
the stability edge, and a sane digits accuracy.

The quick demo runs once for the module (about 20-30 s): its tests are marked slow.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

from ntkjax.study import cli
from ntkjax.study.demo import SECTIONS, demo_settings, run_demo

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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out_dir=out, quick=True, seed=0, show_progress=False)
    return out, result


def numbers(result, section):
    return result["sections"][section]["numbers"]


pytestmark = pytest.mark.slow


def test_every_section_figure_and_report_is_written(demo):
    out, result = demo
    assert list(result["sections"]) == list(SECTIONS)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sections"].keys() == result["sections"].keys()
    markdown = (out / "report.md").read_text()
    for name, figures in EXPECTED_FIGURES.items():
        section = result["sections"][name]
        assert section["figures"] == figures
        assert section["title"] in markdown
        for figure in figures:
            data = (out / figure).read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000
            assert f"]({figure})" in markdown
        assert section["seconds"] > 0


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


def test_networks_approach_kernel_gradient_descent(demo):
    s3 = numbers(demo[1], "kernel_regression")
    assert s3["learning_rate"] < s3["stability_edge_analytic"]
    gaps = np.asarray(s3["gap_rms_mean_over_seeds"])
    assert gaps[-1] < gaps[0] / 2
    assert -0.9 <= s3["gap_slope"] <= -0.25
    # trained networks fit the task (noise variance 0.01; test grid extends beyond the data)
    assert np.all(np.asarray(s3["test_mse_network"]) < 0.5)


def test_ntk_drift_falls_like_inverse_sqrt_width(demo):
    s4 = numbers(demo[1], "drift")
    assert -0.8 <= s4["slope"] <= -0.3
    drift = np.asarray(s4["final_relative_ntk_change_mean_over_seeds"])
    assert np.all(drift > 0) and np.all(np.diff(drift) < 0)


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


def test_lazy_training_scalings(demo):
    s6 = numbers(demo[1], "lazy")
    assert -0.8 <= s6["slope_parameter_change"] <= -0.3
    assert s6["slope_linearization_gap"] < -0.2


def test_digits_accuracy_table(demo):
    s7 = numbers(demo[1], "digits")
    assert s7["num_test"] == 540  # 30 % of 1,797 (stratified split)
    assert s7["num_train"] <= 1257
    assert s7["accuracy_ntk"] >= 0.97
    assert s7["accuracy_nngp"] >= 0.97
    assert s7["accuracy_svm_rbf"] >= 0.97
    assert s7["accuracy_network"] >= 0.90
    assert not s7["network_diverged"]


def test_digits_as_images_convolutional_kernels(demo):
    s8 = numbers(demo[1], "digits_images")
    assert s8["num_train"] == s8["num_test"] == demo_settings(quick=True).digits_image_subset
    for name in ("accuracy_mlp_ntk", "accuracy_cnn_flatten_ntk", "accuracy_cnn_gap_ntk"):
        assert 0.85 <= s8[name] <= 1.0, (name, s8[name])


def test_marginal_likelihood_fit_raises_the_evidence(demo):
    s9 = numbers(demo[1], "digits_likelihood")
    # Adam on the log-hyperparameters ascends the evidence from the demo's values
    assert s9["log_marginal_likelihood_fitted"] > s9["log_marginal_likelihood_initial"]
    assert all(s9["fitted"][k] > 0 for k in ("w_std", "b_std", "noise"))
    assert s9["test_accuracy_fitted"] >= 0.85 and s9["test_accuracy_initial"] >= 0.85


def test_random_features_approach_the_exact_kernel(demo):
    s10 = numbers(demo[1], "digits_features")
    s8 = numbers(demo[1], "digits_images")
    # the exact accuracies are those of section 8 (same kernels, same split)
    assert s10["accuracy_exact_MLP"] == s8["accuracy_mlp_ntk"]
    assert s10["accuracy_exact_CNN-GAP"] == s8["accuracy_cnn_gap_ntk"]
    largest = s10["feature_counts"][-1]
    for name in ("MLP", "CNN-GAP"):
        assert abs(s10[f"gap_points_at_D{largest}_{name}"]) <= 10.0
        assert min(s10[f"accuracy_features_{name}"]) >= 0.7


def test_cli_runs_one_section_and_prints_a_summary(tmp_path):
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
