"""ntkjax: neural tangent kernels in JAX.

Exact infinite-width NNGP/NTK kernels of Flax models, fast empirical NTKs of any Flax model,
closed-form training dynamics and GP inference, and optax training loops that track the kernel.

The library, one module per capability: layers and activations with their infinite-width rules
(:mod:`ntkjax.nn`), ready-made networks (:mod:`ntkjax.models`), the infinite-width kernels of a
module (:mod:`ntkjax.kernels`) and closed forms (:mod:`ntkjax.analytic`), empirical kernels
(:mod:`ntkjax.empirical`, :mod:`ntkjax.structured`, :mod:`ntkjax.jacobians`,
:mod:`ntkjax.linearize` with Taylor expansions, Monte Carlo averages :mod:`ntkjax.monte_carlo`),
prediction (:mod:`ntkjax.predict`, :mod:`ntkjax.losses`; any loss and momentum:
:mod:`ntkjax.dynamics`; infinite ensembles from a module: :mod:`ntkjax.ensemble`), kernel
hyperparameters by marginal likelihood (:mod:`ntkjax.hyperparameters`), training
(:mod:`ntkjax.training`), width sweeps (:mod:`ntkjax.sweep`, :mod:`ntkjax.tasks`), scaling
fits (:mod:`ntkjax.scaling`), kernel regression beyond memory by preconditioned conjugate
gradients (:mod:`ntkjax.solvers`), blocked evaluation on many devices and processes
(:mod:`ntkjax.blocking`, :mod:`ntkjax.distributed`, :mod:`ntkjax.compile_options`) and
figures (:mod:`ntkjax.plotting`, imported on use). The application built on it -- the
``ntkjax`` command line and the NTK study -- is :mod:`ntkjax.study`, which the library never
imports.
"""

from ntkjax import analytic, models, nn, predict
from ntkjax._meanings import UnsupportedMeaning
from ntkjax.analytic import two_layer_relu_nngp, two_layer_relu_ntk
from ntkjax.blocking import available_memory_bytes, evaluate_in_blocks
from ntkjax.distributed import initialize_distributed
from ntkjax.dynamics import ODEState, SolverStats, gradient_flow
from ntkjax.empirical import (
    empirical_nngp_fn,
    empirical_ntk_fn,
    empirical_ntk_matrix,
    is_batch_coupled,
    nnx_apply_fn,
    ntk_operator,
    projected_ntk_feature_fn,
    projected_ntk_features,
)
from ntkjax.ensemble import ensemble_predictor
from ntkjax.features import (
    FeatureMap,
    FeatureRidge,
    Features,
    feature_map,
    feature_ridge,
    hermite_truncation_error,
)
from ntkjax.hyperparameters import (
    MarginalLikelihoodFit,
    fit_marginal_likelihood,
    gp_log_marginal_likelihood,
)
from ntkjax.kernels import Kernel, kernel_fn, kernel_matrix, mask_from_constant
from ntkjax.linearize import linearize, taylor_expand
from ntkjax.monte_carlo import MonteCarloKernel, monte_carlo_kernel_fn
from ntkjax.predict import (
    convergence_bound,
    gp_inference,
    gradient_descent_mse,
    gradient_flow_ensemble,
    gradient_flow_mse,
    max_learning_rate,
)
from ntkjax.scaling import PowerLawFit, fit_power_law
from ntkjax.solvers import (
    CGResult,
    NystromEigensystem,
    gradient_flow_lowrank,
    kernel_regression_cg,
    kernel_ridge_predict,
)
from ntkjax.training import (
    KernelRegimeReport,
    StabilityReport,
    TrainingHistory,
    kernel_regime_check,
    learning_rate_check,
    make_train_fn,
    train_with_kernel_tracking,
)

__version__ = "0.1.0"

__all__ = [
    "CGResult",
    "FeatureMap",
    "FeatureRidge",
    "Features",
    "Kernel",
    "KernelRegimeReport",
    "MarginalLikelihoodFit",
    "MonteCarloKernel",
    "NystromEigensystem",
    "ODEState",
    "PowerLawFit",
    "SolverStats",
    "StabilityReport",
    "TrainingHistory",
    "UnsupportedMeaning",
    "analytic",
    "available_memory_bytes",
    "convergence_bound",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_matrix",
    "ensemble_predictor",
    "evaluate_in_blocks",
    "feature_map",
    "feature_ridge",
    "fit_marginal_likelihood",
    "fit_power_law",
    "gp_inference",
    "gp_log_marginal_likelihood",
    "gradient_descent_mse",
    "gradient_flow",
    "gradient_flow_ensemble",
    "gradient_flow_lowrank",
    "gradient_flow_mse",
    "hermite_truncation_error",
    "initialize_distributed",
    "is_batch_coupled",
    "kernel_fn",
    "kernel_matrix",
    "kernel_regime_check",
    "kernel_regression_cg",
    "kernel_ridge_predict",
    "learning_rate_check",
    "linearize",
    "make_train_fn",
    "mask_from_constant",
    "max_learning_rate",
    "models",
    "monte_carlo_kernel_fn",
    "nn",
    "nnx_apply_fn",
    "ntk_operator",
    "predict",
    "projected_ntk_feature_fn",
    "projected_ntk_features",
    "taylor_expand",
    "train_with_kernel_tracking",
    "two_layer_relu_nngp",
    "two_layer_relu_ntk",
]
