"""The notebooks of ``notebooks/`` as pages of the site, with their outputs.

The notebooks are stored without outputs (``tests/test_notebooks.py`` checks it, and executes
them). Their outputs for the site come from a small committed run: ``docs/notebooks/<name>.ipynb``
is the notebook executed once in quick mode (``NTKJAX_QUICK=1``, figures at a low resolution),
made by running this file::

    .venv/bin/python docs/hooks/notebooks.py

At build time (an mkdocs hook) each stored run becomes the page ``notebooks/<name>.md``:
markdown cells as they are, code cells as Python blocks, text outputs as text blocks, figures as
inline PNG images. ``tests/test_docs.py`` checks that the stored runs hold exactly the code of
the notebooks, so a changed notebook without a fresh run fails the tests.
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "notebooks"
STORED_DIR = ROOT / "docs" / "notebooks"
MAX_WIDTH = 720  # pixels of a stored figure


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _fence(body: str, language: str = "text") -> str:
    body = body.rstrip("\n")
    fence = "```"
    while fence in body:
        fence += "`"
    return f"{fence}{language}\n{body}\n{fence}\n"


def notebook_markdown(notebook: Any, source_name: str) -> str:
    """The markdown page of an executed notebook (an ``nbformat`` node)."""
    parts = [
        f"<!-- generated from notebooks/{source_name} by docs/hooks/notebooks.py -->\n",
        f"*Source: `notebooks/{source_name}`, executed in quick mode (`NTKJAX_QUICK=1`).*\n",
    ]
    for cell in notebook.cells:
        source = _text(cell.source)
        if cell.cell_type == "markdown":
            parts.append(source + "\n")
        elif cell.cell_type == "code":
            parts.append(_fence(source, "python"))
            for output in cell.get("outputs", []):
                parts.append(_output_markdown(output))
    return "\n".join(p for p in parts if p)


def _output_markdown(output: Any) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return _fence(_text(output.get("text", "")))
    if kind == "error":
        return _fence(f"{output.get('ename')}: {output.get('evalue')}")
    data = output.get("data", {})
    if "image/png" in data:
        png = _text(data["image/png"]).replace("\n", "")
        return f'<img alt="figure" src="data:image/png;base64,{png}">\n'
    if "text/plain" in data:
        return _fence(html.unescape(_text(data["text/plain"])))
    return ""


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: adds ``notebooks/<name>.md`` for each stored run."""
    import nbformat
    from mkdocs.structure.files import File

    for stored in sorted(STORED_DIR.glob("*.ipynb")):
        notebook = nbformat.read(stored, as_version=4)
        page = notebook_markdown(notebook, stored.name)
        files.append(File.generated(config, f"notebooks/{stored.stem}.md", content=page))
    return files


def shrink_figures(notebook: Any) -> None:
    """Stores each figure at most ``MAX_WIDTH`` pixels wide, as a 64-colour PNG (a few tens of
    kilobytes each), so the committed runs stay small."""
    import base64
    import io

    from PIL import Image

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(_text(data["image/png"]))))
            image = image.convert("RGB")
            if image.width > MAX_WIDTH:
                height = round(image.height * MAX_WIDTH / image.width)
                image = image.resize((MAX_WIDTH, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.quantize(colors=64).save(buffer, format="PNG", optimize=True)
            data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def execute_all() -> None:
    """Runs every notebook in quick mode and stores it, outputs included, in docs/notebooks/."""
    import nbclient
    import nbformat

    os.environ["NTKJAX_QUICK"] = "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    STORED_DIR.mkdir(parents=True, exist_ok=True)
    for source in sorted(SOURCE_DIR.glob("*.ipynb")):
        notebook = nbformat.read(source, as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(SOURCE_DIR)}}).execute()
        shrink_figures(notebook)
        for cell in notebook.cells:
            cell.metadata = {}
        notebook.metadata = {"kernelspec": notebook.metadata.get("kernelspec", {})}
        nbformat.write(notebook, STORED_DIR / source.name)
        print(f"{source.name}: {(STORED_DIR / source.name).stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    execute_all()
