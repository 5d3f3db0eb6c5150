"""Suite-wide fixtures. float64 tests enter ``jax.enable_x64`` through the ``x64`` fixture."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

DATA = Path(__file__).resolve().parent / "data"
REFERENCE_DIR = DATA / "nt_kernels"


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference kernels not found at {REFERENCE_DIR} (the repository's tests/data)")
    return REFERENCE_DIR


# --------------------------------------------------------------------------- test tiers
# The fast tier, `pytest -m "not slow" -n 2`, is what to run while developing (<= 5 min on 2
# cores); CI and the README run everything. A test is slow when it is marked
# `@pytest.mark.slow` in its file, or when it is listed here, by node id (without the
# parameters: every case of a parametrized test), which keeps tier changes out of the test
# files that others edit. tests/test_tiers.py checks that every entry names a test that exists
# and that the fast tier still tests every module.
SLOW_TESTS: frozenset[str] = frozenset({
    # measured with the whole suite on the shared 2-core machine (load ~20, so about 10x the
    # quiet times): every test function that took >= 40 s there, parameters summed
    "tests/test_activations.py::test_activations_on_kernels",
    "tests/test_activations.py::test_angle_zero_and_pi_and_zero_vectors_are_finite_and_exact",
    "tests/test_activations.py::test_approximate_gelu_switches_only_the_finite_network",
    "tests/test_activations.py::test_elementwise_quadrature_accuracy_against_closed_forms",
    "tests/test_activations.py::test_elementwise_quadrature_converges_with_more_nodes",
    "tests/test_activations.py::test_fast_arccos_matches_float64",
    "tests/test_activations.py::test_new_maps_satisfy_price_theorem",
    "tests/test_activations.py::test_parametrized_maps_match_two_dimensional_quadrature",
    "tests/test_activations.py::test_price_theorem_sigma_dot_is_the_derivative_of_sigma",
    "tests/test_activations.py::test_rectified_monomial_maps_match_adaptive_quadrature",
    "tests/test_attention.py::test_finite_layer_is_the_formula",
    "tests/test_attention.py::test_structured_ntk_factors_the_projections",
    "tests/test_attention.py::test_transformer_finite_and_infinite",
    "tests/test_blocking.py::test_blocks_match_direct_evaluation",
    "tests/test_branches.py::test_channel_concatenation_of_inputs_is_the_input_kernel_of_the_concatenation",
    "tests/test_branches.py::test_spatial_concatenation_is_block_diagonal_and_products",
    "tests/test_compile_options.py::test_convolution_under_options_matches_float64",
    "tests/test_compile_options.py::test_jit_with_options_nests_in_jit_grad_vmap_and_scan",
    "tests/test_conv.py::test_conv_ntk_parameterization_formula",
    "tests/test_conv.py::test_conv_transpose_matches_flax_and_its_kernel_the_dilated_patches",
    "tests/test_conv.py::test_diagonal_patch_average_is_the_same_position_kernel_of_explicit_patches",
    "tests/test_conv.py::test_one_by_one_conv_on_a_kernel_is_a_per_position_dense_layer",
    "tests/test_conv.py::test_patch_average_is_the_kernel_of_explicit_patches",
    "tests/test_cookbook.py::test_prior_posterior_and_infinite_time_gradient_descent",
    "tests/test_empirical.py::test_outputs_mean_is_the_brute_force_mean_over_outputs",
    "tests/test_ensemble.py::test_blocks_diagonal_and_one_eigendecomposition",
    "tests/test_ensemble.py::test_nngp_at_infinity_is_the_gp_posterior",
    "tests/test_ensemble.py::test_ntk_ensemble_matches_the_matrix_exponential_formula",
    "tests/test_features.py::test_feature_ridge_is_kernel_ridge_on_the_features",
    "tests/test_features.py::test_hermite_features_of_erf_converge_to_the_kernel",
    "tests/test_features.py::test_hermite_truncation_error_bounds_the_truncated_erf_kernel",
    "tests/test_features.py::test_hermite_degree_is_raised_to_the_truncation_tolerance",
    "tests/test_kernel_pairs.py::test_each_kernel_call_traces_the_module_once",
    "tests/test_features.py::test_networks_without_random_layers_are_exact",
    "tests/test_features.py::test_one_layer_relu_features_converge_to_the_arc_cosine_closed_forms",
    "tests/test_features.py::test_shapes_dtypes_and_float64",
    "tests/test_hyperparameters.py::test_an_overshooting_optimizer_returns_the_best_iterate_never_worse_than_the_start",
    "tests/test_hyperparameters.py::test_evidence_gradient_in_w_std_b_std_and_noise_matches_finite_differences",
    "tests/test_hyperparameters.py::test_kernel_fn_gradients_in_w_std_and_b_std_match_finite_differences",
    "tests/test_hyperparameters.py::test_relu_convolutional_kernel_gradients_match_finite_differences",
    "tests/test_inputs.py::test_huge_and_tiny_inputs_give_finite_kernels_close_to_float64",
    "tests/test_kernels.py::test_float32_diagonal_of_relu_ntk_matches_float64",
    "tests/test_kernels.py::test_jit_and_no_jit_agree_and_keep_dtype",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
