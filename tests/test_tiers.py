"""The two test tiers: ``pytest -m "not slow"`` (fast, while developing) and the whole suite
(CI). Slow tests are marked in their files or listed in ``tests/conftest.py``'s ``SLOW_TESTS``;
every listed test exists, and the fast tier keeps at least one test of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import SLOW_TESTS

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(
    _module_name(p) for p in (ROOT / "ntkjax").rglob("*.py")
    if p.name != "__init__.py" and not p.name.startswith("_")
)


def _is_slow_decorator(node: ast.expr) -> bool:
    """``@pytest.mark.slow`` (or ``@mark.slow``)."""
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def test_functions(path: Path) -> dict[str, bool]:
    """Each top-level ``test_*`` function of a test file -> whether it is slow (marked in the
    file, by a module-level ``pytestmark``, or listed in ``SLOW_TESTS``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_slow = any(
        isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                             for t in node.targets)
        and any(_is_slow_decorator(n) for n in ast.walk(node.value))
        for node in tree.body
    )
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return {
        node.name: module_slow or f"{rel}::{node.name}" in SLOW_TESTS
        or any(_is_slow_decorator(d) for d in node.decorator_list)
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


test_functions.__test__ = False  # a helper, not a test


def imported_modules(path: Path) -> set[str]:
    """The ntkjax modules a test file imports (``import a.b``, ``from a import b``, ``from a.b
    import c``), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("ntkjax")}


# A module without tests of its own, tested through the one module that uses it (checked: that
# module imports it and is itself in the fast tier).
TESTED_THROUGH = {"ntkjax.jacobians": "ntkjax.empirical"}
# Modules whose only tests are slow today; the check fails when this changes either way.
KNOWN_GAPS = {
    # declarations of flax's own layers only; read through the registry by tests/test_meanings.py
    "ntkjax.nn.flax_layers",
    "ntkjax.study.marginal_likelihood",  # run only by the demo's section tests
}


def fast_tier_gaps() -> list[str]:
    """The modules no fast test file tests: a module is tested by ``tests/test_<name>.py`` and by
    every test file that imports it; it needs one such file with a test that is not slow."""
    files = {p: test_functions(p) for p in sorted(TESTS.glob("test_*.py"))}
    fast_files = {p: imported_modules(p) for p, tests in files.items()
                  if not all(tests.values())}

    def covered(module: str) -> bool:
        short = module.rsplit(".", 1)[1]
        return any(p.stem == f"test_{short}" or module in imports
                   for p, imports in fast_files.items())

    gaps = []
    for module in MODULES:
        user = TESTED_THROUGH.get(module)
        if user is not None:
            source = ROOT / (user.replace(".", "/") + ".py")
            if module in imported_modules(source) and covered(user):
                continue
        if not covered(module):
            gaps.append(module)
    return gaps


def test_every_listed_slow_test_exists():
    stale = [entry for entry in SLOW_TESTS
             if not entry.startswith("tests/test_") or "::" not in entry or "[" in entry]
    for entry in sorted(SLOW_TESTS):
        file, _, name = entry.partition("::")
        path = ROOT / file
        if not path.is_file() or name not in test_functions(path):
            stale.append(entry)
    assert stale == [], (
        "SLOW_TESTS: each entry is tests/test_<file>.py::<test function> (no parameters) of a "
        "test that exists (renamed or removed?)"
    )


def test_the_fast_tier_tests_every_module():
    assert len(MODULES) > 30
    assert set(fast_tier_gaps()) == KNOWN_GAPS


def test_the_tier_helpers_see_markers_and_imports(tmp_path):
    path = tmp_path / "test_example.py"
    path.write_text(
        "import pytest\nfrom ntkjax import kernels\nfrom ntkjax.nn.dense import Dense\n\n"
        "@pytest.mark.slow\ndef test_big():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [1])\ndef test_small(x):\n    pass\n\n"
        "def helper():\n    pass\n"
    )
    assert test_functions(path) == {"test_big": True, "test_small": False}
    assert {"ntkjax.kernels", "ntkjax.nn.dense"} <= imported_modules(path)
    path.write_text("import pytest\npytestmark = pytest.mark.slow\n\ndef test_a():\n    pass\n")
    assert test_functions(path) == {"test_a": True}




def test_the_suite_compiles_with_most_xla_optimizations_off():
    """tests/conftest.py turns most XLA optimizations off for the suite (and its subprocesses)."""
    import os

    import jax

    assert jax.config.values["jax_disable_most_optimizations"]
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"


@pytest.mark.xla_optimized
def test_xla_optimized_tests_compile_with_the_full_pipeline():
    import jax

    assert not jax.config.values["jax_disable_most_optimizations"]
    from jax._src import compiler

    overrides = dict(compiler.get_compile_options(1, 1).env_option_overrides)
    assert overrides.get("xla_cpu_use_fusion_emitters", True) is True
    assert "xla_cpu_parallel_codegen_split_count" not in overrides


def test_the_suite_compiles_with_the_older_emitters_in_process_and_in_subprocesses():
    """tests/conftest.py compiles the suite's programs with XLA's older CPU emitters, and their
    code in one module, while most optimizations are off, and passes that to subprocesses (and
    those that force a device count keep it)."""
    import os

    from jax._src import compiler

    from tests.helpers import xla_flags

    overrides = dict(compiler.get_compile_options(1, 1).env_option_overrides)
    assert overrides["xla_cpu_use_fusion_emitters"] is False
    assert overrides["xla_cpu_parallel_codegen_split_count"] == 1
    flags = ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]
    assert set(flags) <= set(os.environ["XLA_FLAGS"].split())
    assert xla_flags(4).split()[-3:] == [*flags, "--xla_force_host_platform_device_count=4"]


def test_the_suite_shares_compiled_programs_through_this_runs_cache():
    """tests/conftest.py points JAX's persistent compilation cache at a directory of this run;
    compiling a program then stores it there."""
    import os

    import jax
    import jax.numpy as jnp

    directory = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    assert jax.config.values["jax_compilation_cache_dir"] == str(directory)
    before = set(directory.rglob("*")) if directory.exists() else set()
    jax.jit(lambda a: jnp.sin(a) * 3.25 + 0.125)(jnp.arange(7.0))
    assert set(directory.rglob("*")) - before


def test_numpy_runs_one_blas_thread_here_and_in_subprocesses():
    """tests/conftest.py limits BLAS to one thread (one pytest-xdist worker per core): numpy's
    BLAS in this process, and the environment subprocesses inherit."""
    import os
    import subprocess
    import sys

    import threadpoolctl

    blas = threadpoolctl.threadpool_info()
    assert blas and all(pool["num_threads"] == 1 for pool in blas
                        if pool["user_api"] == "blas"), blas
    child = subprocess.run(
        [sys.executable, "-c", "import numpy, threadpoolctl; print(max(p['num_threads'] for p "
         "in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'))"],
        env=dict(os.environ), capture_output=True, text=True, check=True, timeout=120)
    assert child.stdout.strip() == "1", child
