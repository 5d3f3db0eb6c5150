"""ntkjax: neural tangent kernels in JAX.

Exact infinite-width NNGP/NTK kernels of Flax models, fast empirical NTKs of any Flax model,
closed-form training dynamics and GP inference, and optax training loops that track the kernel.
"""

from ntkjax.blocking import available_memory_bytes, evaluate_in_blocks

# --- analytic kernels, layers and models (issue: foundation) ---

# --- empirical kernels and linearization ---

# --- prediction ---

# --- training and sweeps ---

__version__ = "0.1.0"

__all__ = [
    "available_memory_bytes",
    "evaluate_in_blocks",
]
