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
