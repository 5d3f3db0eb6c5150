"""mkdocs hook: the site reads offline and says which ntkjax it documents.

* **MathJax from a package, not a CDN.** MathJax 3 (``tex-mml-chtml.js``, with the fonts and the
  extensions it loads on demand) is copied from the installed ``sphinx-mathjax-offline`` package
  (a ``docs`` extra) into the site under ``javascripts/mathjax/``; ``mkdocs.yml``'s
  ``extra_javascript`` points there, so formulas render without a network connection.
* **Version and repository.** The site name carries ``ntkjax.__version__`` (shown in the header
  of every page) and ``repo_url`` is the ``Repository`` URL of ``pyproject.toml``'s
  ``[project.urls]``, so neither is written twice.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
MATHJAX_DIST = "sphinx-mathjax-offline"
MATHJAX_DEST = "javascripts/mathjax"
MATHJAX_ENTRY = "tex-mml-chtml.js"


def mathjax_dir() -> Path:
    """The folder of the installed MathJax 3 distribution (``tex-mml-chtml.js`` and friends)."""
    try:
        dist = importlib.metadata.distribution(MATHJAX_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the site serves MathJax from the {MATHJAX_DIST!r} package: "
            "pip install -e '.[docs]'"
        ) from None
    folder = Path(str(dist.locate_file(f"{MATHJAX_DIST}/static/mathjax")))
    if not (folder / MATHJAX_ENTRY).is_file():
        raise RuntimeError(f"{MATHJAX_DIST} has no {MATHJAX_ENTRY} under {folder}")
    return folder


def mathjax_files(folder: Path) -> list[Path]:
    """What the site needs of the distribution: the one combined component it loads, and
    every sub-folder (fonts, and the extensions, menu and accessibility code loaded on demand);
    the other combined components are left out."""
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.parent != folder or p.name == MATHJAX_ENTRY)]


def on_config(config: Any) -> Any:
    import ntkjax

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    config["site_name"] = f"ntkjax {ntkjax.__version__}"
    config["repo_url"] = project["urls"]["Repository"]
    return config


def on_files(files: Files, config: Any) -> Files:
    folder = mathjax_dir()
    for path in mathjax_files(folder):
        uri = f"{MATHJAX_DEST}/{path.relative_to(folder).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
