"""Every notebook in notebooks/ executes top to bottom (quick settings), so none can rot.

The notebooks read ``NTKJAX_QUICK=1`` from the environment and shrink their widths, seeds and
step counts. The kernel is the interpreter running this test: a kernelspec pointing at
``sys.executable`` is written to a temporary folder that ``JUPYTER_PATH`` puts first, so no
manual ``ipykernel install`` is needed and no other registered ``python3`` kernel can be picked
up. Executed notebooks are never written back; the stored ones must carry no outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "ntkjax-test-python"

# Notebooks whose time is running programs, not compiling them: their kernels compile with XLA's
# full optimization pipeline, as users' do (the suite otherwise turns most optimizations off,
# tests/conftest.py). Notebook 06's all-pairs CNN and LCN kernels of 200 digits: 36 CPU-s
# optimized against 56 with most optimizations off; the other notebooks compile more than they
# run (01: 14 CPU-s optimized against 10; 05: 31 against 13). (Its quick run now takes 130
# digits: 25.6 against 37.3 CPU-s for 200, back to back, load ~2.5.)
RUN_OPTIMIZED = frozenset({"06_locally_connected_vs_convolutional"})


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ntkjax tests",
        "language": "python",
        "env": {"NTKJAX_QUICK": "1", "MPLBACKEND": "Agg"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, f"expected the study notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: a code cell has stored outputs"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_env))
    monkeypatch.setenv("NTKJAX_QUICK", "1")
    monkeypatch.setenv("NTKJAX_NOTEBOOK_OUT", str(tmp_path))
    if path.stem in RUN_OPTIMIZED:  # the kernel inherits this process's environment
        monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=180,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
    # every notebook shows at least one figure
    assert any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ), f"{path.name} displayed no figure"
