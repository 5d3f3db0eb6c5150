"""Suite-wide fixtures. float64 tests enter ``jax.enable_x64`` through the ``x64`` fixture.

XLA compiles the suite's programs with most optimizations off (``jax_disable_most_optimizations``,
as JAX's own test suite does): almost every test program is small, so compiling costs more than
running, and this takes about 40 % of the suite's CPU time. The setting reaches the suite's
subprocesses through the environment. Tests that check float32 numerics of the programs users
run carry ``@pytest.mark.xla_optimized`` and compile with XLA's full optimization pipeline.

Compiled programs are shared through JAX's persistent compilation cache, in a directory of the
system's temporary folder that belongs to this run alone (the pytest-xdist workers and every
subprocess of the run share it; directories of runs older than a day are removed): tests build
their kernel functions afresh, so the same program is otherwise compiled again and again. This
takes about a third off the CPU time of the empirical-NTK tests, for example.

With most optimizations off, the suite's programs also compile with XLA's older CPU emitters
(``xla_cpu_use_fusion_emitters=False``): the newer fusion emitters build a fresh MLIR context
with every dialect for each program, which doubles the cost of compiling a small one (an eager
op: 38 against 21 ms of CPU; test_predict.py: 84.6 against 53.7 CPU-s). ``xla_optimized`` tests
compile with the fusion emitters, as users' programs do. Subprocesses get the option through
``XLA_FLAGS`` (tests that set it for a subprocess add to it: ``tests.helpers.xla_flags``).

In the same mode XLA's CPU backend also generates each program's machine code as one LLVM
module (``xla_cpu_parallel_codegen_split_count=1``) instead of splitting it into parts for a
thread pool: on the suite's two cores, one pytest-xdist worker per core, the split buys no wall
time and its extra modules cost about 30 % of the backend's CPU time (26 kernel-function and
eager-op programs of the conformance networks: 2.2-2.5 against 3.2-3.4 CPU-s, three rounds). The
split only partitions the code generated for the same optimized program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One BLAS thread per process (subprocesses inherit it): the suite runs one pytest-xdist worker
# per core, and OpenBLAS's threads then spin against the other worker's (numpy's eigvalsh in
# hermgauss(128): 0.13 CPU-s with 2 threads against 0.01 with one, and 100x that under load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import jax
import pytest
import threadpoolctl
from jax._src import compiler as _jax_compiler

# The suite's processes keep the memory they free for their next allocations (glibc's malloc
# otherwise hands every block over 32 MB back to the system at once, and the next one is
# faulted in again page by page, which is slow on the virtual machines that run the suite: the
# Myrtle feature-map cell, a 9216 x 1024 random matrix a key, took 40 CPU-s, 16 of them in the
# kernel; 27 CPU-s with this). Subprocesses get the same through the environment.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 1 << 30, "MALLOC_TRIM_THRESHOLD_": 1 << 30,
           "MALLOC_TOP_PAD_": 1 << 28}
for _name, _value in _MALLOC.items():
    os.environ.setdefault(_name, str(_value))


def _keep_freed_memory() -> None:
    """The settings of ``_MALLOC`` for this process, through glibc's ``mallopt`` (the
    environment is read only when a process starts); nothing where the C library is not
    glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for option, name in ((-3, "MALLOC_MMAP_THRESHOLD_"), (-1, "MALLOC_TRIM_THRESHOLD_"),
                         (-2, "MALLOC_TOP_PAD_")):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
        libc.mallopt(option, int(os.environ[name]))


_keep_freed_memory()

# numpy may be loaded (by a plugin) before this file: limit its BLAS at run time too
threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")

_SUITE_DISABLES = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("", "0", "false")
jax.config.update("jax_disable_most_optimizations", _SUITE_DISABLES)

_CACHE_ROOT = Path(tempfile.gettempdir()) / "ntkjax-tests-jax-cache"


def pytest_configure(config: pytest.Config) -> None:
    """Points JAX's persistent compilation cache at this run's directory (see the module
    docstring); an outer run's directory, passed down the environment, is kept."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not directory:
        worker = getattr(config, "workerinput", None)
        run = worker["testrunuid"] if worker else uuid.uuid4().hex
        if _CACHE_ROOT.is_dir():
            for old in _CACHE_ROOT.iterdir():
                if time.time() - old.stat().st_mtime > 86_400:
                    shutil.rmtree(old, ignore_errors=True)
        directory = str(_CACHE_ROOT / run)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _use_older_emitters_with_most_optimizations_off()


#: The XLA options of the emitters and of the code generation in one module (see the module
#: docstring), and whether this jaxlib knows them.
_EMITTERS = "xla_cpu_use_fusion_emitters"
_CODEGEN_SPLIT = "xla_cpu_parallel_codegen_split_count"
_EMITTERS_KNOWN = [False]
_get_compile_options = _jax_compiler.get_compile_options


def _get_compile_options_of_the_mode(*args, **kwargs):
    """JAX's compile options, with the fusion emitters off and the code generated in one module
    while most optimizations are off (unless the program names the option itself)."""
    options = _get_compile_options(*args, **kwargs)
    overrides = list(options.env_option_overrides)
    if _EMITTERS_KNOWN[0]:
        named = {name for name, _ in overrides}
        fusion = not jax.config.values["jax_disable_most_optimizations"]
        added = [] if _EMITTERS in named else [(_EMITTERS, fusion)]
        if not fusion and _CODEGEN_SPLIT not in named:
            added.append((_CODEGEN_SPLIT, 1))
        options.env_option_overrides = [*overrides, *added]
    return options


def _use_older_emitters_with_most_optimizations_off() -> None:
    """Installs :func:`_get_compile_options_of_the_mode` where this jaxlib accepts the options,
    and passes them to subprocesses through ``XLA_FLAGS`` (an unknown flag there aborts every
    process, hence the check first)."""
    try:
        jax.jit(lambda v: v + 1, compiler_options={_EMITTERS: False, _CODEGEN_SPLIT: 1}).lower(
            jax.numpy.zeros((), jax.numpy.float32)).compile()
    except Exception:  # an XLA without the options: compile as it does by default
        return
    _EMITTERS_KNOWN[0] = True
    _jax_compiler.get_compile_options = _get_compile_options_of_the_mode
    flags = os.environ.get("XLA_FLAGS", "").split()
    if _SUITE_DISABLES:
        added = [f for f in (f"--{_EMITTERS}=false", f"--{_CODEGEN_SPLIT}=1") if f not in flags]
        os.environ["XLA_FLAGS"] = " ".join([*flags, *added])


DATA = Path(__file__).resolve().parent / "data"
REFERENCE_DIR = DATA / "nt_kernels"


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types enabled."""
    with jax.enable_x64(True):
        yield


#: Whether the programs compiled now are XLA-optimized: the mode the last test left, so that a
#: run of consecutive ``xla_optimized`` tests (the cases of one parametrized test) shares its
#: compiled programs instead of compiling them again for every case.
_OPTIMIZED = [False]


@pytest.fixture(autouse=True)
def _xla_optimization(request):
    """Compiles a ``@pytest.mark.xla_optimized`` test with XLA's full optimization pipeline, and
    every other test with most optimizations off. The flag is not part of JAX's cache keys, so
    the in-memory caches are cleared whenever the mode changes from one test to the next (no
    program compiled the other way is reused); consecutive tests of one mode keep them."""
    optimized = request.node.get_closest_marker("xla_optimized") is not None
    if optimized != _OPTIMIZED[0]:
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", not optimized and _SUITE_DISABLES)
        _OPTIMIZED[0] = optimized
    yield


@pytest.fixture(autouse=True, scope="module")
def _fresh_caches_per_module():
    """Clears JAX's in-memory caches (traces, lowerings, compiled programs) and collects garbage
    after each test module. A long-lived process slows down as they accumulate: test_kernels,
    test_kernel_pairs and test_empirical run one after the other in one process took 287.6
    CPU-s and 3.6 GB with them kept, 243.6 CPU-s and 2.2 GB cleared after each module (quiet
    machine, back to back); the whole suite took 15 min 33 s and 1,805 CPU-s against 20 min
    31 s and 2,397 CPU-s (one float64 Jacobian test: 10 against 50 CPU-s, as when run alone). A
    module's programs that a later module needs again come from the persistent compilation
    cache (module docstring)."""
    yield
    jax.clear_caches()
    gc.collect()


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
    "tests/test_attention_positions.py::test_identity_attention_kernel_is_the_monte_carlo_mean",
    "tests/test_attention_positions.py::test_wide_causal_softmax_with_positions_converges_to_the_kernel",
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
    "tests/test_graph_local_features.py::test_feature_error_falls_like_inverse_sqrt_of_the_features",
    "tests/test_structural.py::test_linear_upsampling_by_explicit_matrices_sides_with_the_rule_not_nt",
    "tests/test_masks.py::test_structured_empirical_ntk_of_masked_networks_is_the_jacobian_one",
    "tests/test_hyperparameters.py::test_an_overshooting_optimizer_returns_the_best_iterate_never_worse_than_the_start",
    "tests/test_hyperparameters.py::test_evidence_gradient_in_w_std_b_std_and_noise_matches_finite_differences",
    "tests/test_hyperparameters.py::test_kernel_fn_gradients_in_w_std_and_b_std_match_finite_differences",
    "tests/test_hyperparameters.py::test_relu_convolutional_kernel_gradients_match_finite_differences",
    "tests/test_inputs.py::test_huge_and_tiny_inputs_give_finite_kernels_close_to_float64",
    "tests/test_kernels.py::test_float32_diagonal_of_relu_ntk_matches_float64",
    "tests/test_kernels.py::test_jit_and_no_jit_agree_and_keep_dtype",
    # graphs (issue 24): Monte Carlo and blocked evaluations
    "tests/test_graphs.py::test_blocked_evaluation_slices_the_patterns_with_the_inputs",
    "tests/test_graphs.py::test_empirical_ntk_of_wide_gnn_approaches_the_gntk",
    "tests/test_structural.py::test_nearest_resize_monte_carlo_sides_with_the_rule_not_nt",
    # masks: two kernel compilations per nt entry (conv entries ~4 s of CPU each); eight
    # initializations with Jacobians; five evaluations in blocks
    "tests/test_masks.py::test_masking_entries_match_neural_tangents",
    "tests/test_masks.py::test_empirical_ntk_of_the_masked_network_converges_to_the_masked_kernel",
    "tests/test_masks.py::test_blocks_equal_the_whole",
    # issue 25 (entk): the projected eNTK over many keys, and through the store
    "tests/test_entk_real.py::test_projected_features_are_unbiased_with_error_falling_like_dim_to_minus_half",
    "tests/test_entk_real.py::test_projected_features_in_blocks_streamed_and_for_feature_ridge",
    "tests/test_entk_real.py::test_factored_projections_of_embeddings_and_convolutions_are_unbiased",
    # issue 25 (entkrules): structured rules against per-sample Jacobians, mostly compile time
    "tests/test_structured_rules.py::test_gpt_block_is_structured_with_positions_and_tied_head",
    "tests/test_structured_rules.py::test_norm_scales_and_biases",
    "tests/test_structured_rules.py::test_norm_leaves_projected_features",
    # issue 25 (entkrules2): tables and tied heads, scan/remat fallbacks, float64 compile time
    "tests/test_structured_rules.py::test_additive_tables_and_tied_head",
    "tests/test_structured_rules.py::test_tied_embedding_projected_features",
    "tests/test_structured_rules.py::test_scanned_and_rematted_blocks_fall_back_exactly",
    # issue 25 (twopass26): a subprocess with four forced host devices (its JAX start-up)
    "tests/test_two_pass.py::test_pass_one_blocks_on_four_devices",
    # session 8: the costliest fast functions of the whole-suite run (29 min 43 s) until the
    # fast tier's per-test times summed to about 480 worker-seconds
    "tests/test_activations.py::test_mlp_kernels_at_huge_float32_inputs_match_float64",
    # issue 22 (scale22): float32 kernels at |x| ~ 1e20, whole networks against float64
    "tests/test_numerics_scale.py::test_mlp_kernels_at_the_top_of_float32_match_float64",
    "tests/test_numerics_scale.py::test_mixed_magnitudes_with_and_without_x2_eager_and_jitted",
    "tests/test_numerics_scale.py::test_kernel_matrix_in_blocks_equals_kernel_fn_at_1e20",
    "tests/test_attention_positions.py::test_transformer_passes_causal_and_positional_options_to_every_block",
    "tests/test_blocking.py::test_two_elementwise_activations_never_share_a_store",
    "tests/test_structured_rules.py::test_modules_called_several_times",
    "tests/test_activations.py::test_kernel_maps_over_the_whole_range_match_long_double_closed_forms",
    "tests/test_empirical.py::test_x2_none_is_symmetric_psd_and_equals_x1_x1",
    "tests/test_models.py::test_cnn_init_apply_shapes_and_layers",
    "tests/test_structured.py::test_ntkjax_dense_scales",
    # session 7: measured in the whole suite on 2 cores (26 min 27 s, load 3-6 for the first
    # half), the costliest fast functions (parameters summed) until the fast tier summed
    # under 500 worker-seconds (about 4.5 min on 2 workers)
    "tests/test_conformance.py::test_conformance",
    "tests/test_reference_layers.py::test_matches_neural_tangents_float64",
    "tests/test_empirical.py::test_methods_match_brute_force_float32",
    "tests/test_reference_kernels.py::test_fully_connected_float32",
    "tests/test_graphs.py::test_matches_the_nt_reference",
    "tests/test_properties.py::test_every_empirical_method_agrees_and_blocked_equals_unblocked",
    "tests/test_structured.py::test_layer_forms_match_brute_force",
    "tests/test_attention_positions.py::test_matches_neural_tangents_float64",
    "tests/test_kernel_pairs.py::test_two_batches_are_the_off_diagonal_block_of_the_joint_kernel",
    "tests/test_activations.py::test_float32_kernel_maps_over_the_whole_range_match_float64",
    "tests/test_conv.py::test_circular_conv_transpose_is_the_adjoint_of_a_circular_conv_and_its_kernel_exact",
    "tests/test_kernels.py::test_cnn_jit_and_no_jit_agree_and_keep_dtype",
    "tests/test_solvers.py::test_float32_targets_at_extreme_scales_match_a_float64_solve",
    "tests/test_empirical.py::test_diagonal_batch_is_the_diagonal_of_the_float64_kernel",
    "tests/test_predict.py::test_float32_keeps_small_but_real_eigenvalues",
    "tests/test_properties.py::test_analytic_kernels_are_finite_symmetric_psd_and_consistent",
    "tests/test_kernel_pairs.py::test_static_facts_name_the_layers_that_need_them",
    "tests/test_structured.py::test_conv_transpose_networks_all_methods_agree_with_brute_force",
    "tests/test_kernels.py::test_cnn_kernel_matrix_matches_kernel_fn_in_blocks",
    "tests/test_empirical.py::test_methods_match_brute_force_float64",
    "tests/test_graphs.py::test_dot_general_kernel_is_the_kernel_of_the_mapped_inputs",
    "tests/test_masks.py::test_padding_to_two_lengths_gives_the_same_kernel_and_outputs",
    "tests/test_kernels.py::test_blocks_of_rows_match_one_block",
    "tests/test_models.py::test_activation_names_and_errors",
    "tests/test_structural.py::test_index_and_scale_match_the_nt_reference",
    "tests/test_graphs.py::test_aggregate_kernel_is_the_kernel_of_aggregated_inputs",
    "tests/test_entk_real.py::test_nnx_module_passed_directly",
    "tests/test_kernels.py::test_kernel_matrix_matches_kernel_fn_in_blocks",
    "tests/test_solvers.py::test_float32_default_and_devices_argument",
    "tests/test_kernels.py::test_cnn_kernels_are_symmetric_psd_with_consistent_variances",
    "tests/test_entk_real.py::test_params_filter_differentiates_only_the_subset",
    "tests/test_solvers.py::test_ntk_operator_callable_equals_dense_empirical_solve",
    "tests/test_activations.py::test_huge_and_tiny_scales_float32",
    "tests/test_sweep.py::test_study_preset_standard_divergence_is_caught",
    "tests/test_kernels.py::test_same_position_kernels_are_the_diagonal_of_all_pairs",
    "tests/test_models.py::test_myrtle5_kernel_matches_neural_tangents_myrtle_notebook_network",
    "tests/test_dynamics.py::test_kernel_times_identity_over_outputs_is_the_per_output_dynamics",
    "tests/test_docs.py::test_site_builds_strictly_links_resolve_and_the_api_is_complete",
    "tests/test_structured.py::test_unsupported_uses_fall_back_to_jacobian_contraction",
    "tests/test_solvers.py::test_predictions_at_infinite_time_equal_gradient_flow",
    "tests/test_graphs.py::test_lcn_and_cnn_kernels_agree_with_flatten_and_differ_with_pooling",
    "tests/test_attention_positions.py::test_position_i_does_not_see_later_positions",
    "tests/test_solvers.py::test_any_row_sliceable_store_equals_direct_solve",
    "tests/test_graphs.py::test_elementwise_quadrature_is_closer_to_the_integral_than_nt",
    "tests/test_distributed.py::test_store_for_other_inputs_or_model_is_refused",
    "tests/test_pooling.py::test_pooling_of_the_input_kernel_is_the_kernel_of_the_pooled_inputs",
    "tests/test_training.py::test_linearized_model_is_kernel_gradient_descent",
    "tests/test_structural.py::test_image_resize_rule_is_the_kernel_of_resized_inputs",
    "tests/test_kernels.py::test_dense_layers_on_images_act_per_position",
    "tests/test_dynamics.py::test_mse_equals_closed_form_gradient_flow",
    "tests/test_monte_carlo.py::test_several_sample_counts_in_one_pass_with_output_axes",
    "tests/test_predict.py::test_duplicated_training_points_give_finite_outputs",
    "tests/test_monte_carlo.py::test_batch_size_does_not_change_the_estimate",
    "tests/test_solvers.py::test_memmap_kernel_equals_direct_solve",
    "tests/test_dynamics.py::test_full_output_kernels_match_a_matrix_exponential",
    # the two-pass schedule against float64 per-sample Jacobians: a 2-block GPT, pass 2 in
    # many blocks and chunks (issue 25)
    "tests/test_two_pass.py::test_gpt_two_pass_equals_the_jacobian_kernel_and_spilling_changes_no_bit",
    "tests/test_two_pass.py::test_norms_and_fallback_parameters_in_example_and_column_blocks",
    "tests/test_two_pass.py::test_convolution_patch_columns_in_chunks_the_last_zero_padded",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the tests of :data:`SLOW_TESTS` slow, and runs the ``xla_optimized`` tests first
    (see :func:`_xla_optimization`)."""
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    # Each change of mode clears every compiled program of the process, and clearing costs
    # about 2 % of the CPU spent compiling them (1.2 CPU-s after test_kernel_pairs.py's 60;
    # 18 CPU-s for test_tiers' mode-change test late in a pytest-xdist worker of the whole
    # suite), and the programs that tests share are compiled again after it. In collection order
    # the suite changes mode about thirty times; with the xla_optimized tests first, at most
    # twice per worker, with little compiled yet. (A stable sort: the same order on every
    # worker, the rest in collection order.)
    items.sort(key=lambda item: item.get_closest_marker("xla_optimized") is None)
