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
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
