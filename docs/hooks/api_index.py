"""mkdocs hook: the table of every name ``ntkjax`` exports, on ``api/index.md``, generated at
build time from ``ntkjax.__all__`` so that it never goes stale.

Each name links to its entry on the API page that renders its module (the page holding the
``::: module`` line); a name whose module no page renders is linked all the same, and the strict
build then fails on the broken cross-reference -- add ``::: ntkjax.<module>`` to a page of
``docs/api/`` and that page to the nav of ``mkdocs.yml``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

PLACEHOLDER = "<!-- ntkjax-exports -->"
API_DIR = Path(__file__).resolve().parents[1] / "api"
ROLE = re.compile(r":(?:class|func|mod|data|meth|attr):`~?([^`]+)`")


def _summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring, on one line, roles as inline code."""
    doc = inspect.getdoc(obj) or ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", paragraph, maxsplit=1)[0]
    sentence = ROLE.sub(r"`\1`", sentence).replace("``", "`").replace("|", "\\|")
    return sentence.rstrip(".:") + "."


def _module_pages() -> dict[str, str]:
    pages = {}
    for page in sorted(API_DIR.glob("*.md")):
        for module in re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), flags=re.M):
            pages.setdefault(module, page.name)
    return pages


def exports_table() -> str:
    ntkjax = importlib.import_module("ntkjax")
    pages = _module_pages()
    rows = ["| name | what it is |", "|---|---|"]
    for name in ntkjax.__all__:
        obj = getattr(ntkjax, name)
        if inspect.ismodule(obj):
            page = pages.get(obj.__name__, "index.md")
            rows.append(f"| [`ntkjax.{name}`]({page}) | module: {_summary(obj)} |")
        else:
            rows.append(f"| [`{name}`][{obj.__module__}.{name}] | {_summary(obj)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == "api/index.md" and PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, exports_table())
    return markdown
