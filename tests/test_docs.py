"""The documentation: the site builds in strict mode (a broken cross-reference, a missing page or
a bad docstring section fails), every internal link and anchor of the built HTML resolves,
every public name has its entry in the API reference, the README's example runs, and the
notebook pages come from runs of the current notebooks.

The site is built into a temporary folder (``mkdocs build --strict``, about 15 s) by one test
that then checks it, so the check depends on no earlier command and, under ``pytest -n``, the
site is built once.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "hooks"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- link check


class _Links(HTMLParser):
    """The ``id``s of a page and the ``href``/``src`` values it points to."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is None:
                continue
            if key in ("id", "name"):
                self.ids.add(value)
            elif key in ("href", "src") and not (tag == "link" and key == "href" and
                                                 value.startswith("http")):
                self.targets.append(value)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_links(site: Path) -> list[str]:
    """Every internal ``href``/``src`` of ``site/**/*.html`` that names no file, or an anchor
    that the target page does not define, as ``page: target`` strings."""
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    broken = []
    for page, links in pages.items():
        for target in links.targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc or target.startswith(("mailto:", "data:")):
                continue  # external: not checked (the build runs offline)
            path = unquote(parts.path)
            if path:
                base = site if path.startswith("/") else page.parent  # 404.html: site-absolute
                resolved = (base / path.lstrip("/")).resolve()
                if resolved.is_dir():
                    resolved = resolved / "index.html"
            else:
                resolved = page.resolve()
            if not resolved.is_file():
                broken.append(f"{page.relative_to(site)}: {target}")
                continue
            if parts.fragment and resolved.suffix == ".html":
                ids = pages[resolved].ids if resolved in pages else _parse(resolved).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {target} (no such anchor)")
    return broken


def test_link_check_finds_planted_breakage(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="a/page.html#here">ok</a> <a href="a/page.html#gone">bad anchor</a>'
        '<img src="missing.png"> <a href="https://example.org/x">external</a>'
        '<a href="#top">self</a><span id="top"></span>'
    )
    (tmp_path / "a" / "page.html").write_text('<h1 id="here">x</h1><a href="../index.html">up</a>')
    assert sorted(broken_links(tmp_path)) == [
        "index.html: a/page.html#gone (no such anchor)",
        "index.html: missing.png",
    ]


WARNING_LINE = re.compile(r"^(?:WARNING|ERROR)\s+-", flags=re.M)


def build_warnings(output: str) -> list[str]:
    """The ``WARNING`` and ``ERROR`` lines of mkdocs' log (its own, mkdocstrings', griffe's,
    autorefs')."""
    return [line for line in output.splitlines() if WARNING_LINE.match(line)]


def test_warning_count_sees_planted_warnings():
    log = (
        "INFO    -  Building documentation to directory: site\n"
        "WARNING -  mkdocs_autorefs: api/blocking.md: Could not find cross-reference target 'x'\n"
        "ERROR   -  Error reading page 'a.md'\n"
        "INFO    -  a line that mentions WARNING - but is not one\n"
    )
    assert len(build_warnings(log)) == 2
    assert build_warnings("INFO    -  Documentation built in 12.0 seconds\n") == []


def _build_site(out: Path) -> None:
    """``mkdocs build --strict``, not ``--quiet`` (which drops the warnings before mkdocs counts
    them, so a strict build with warnings passed): the log must hold no warning at all."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = run.stdout + run.stderr
    warnings = build_warnings(log)
    assert warnings == [] and run.returncode == 0, (
        f"mkdocs build --strict: {len(warnings)} warning(s), exit code {run.returncode}:\n"
        + "\n".join(warnings or log.splitlines()[-30:])
    )


def test_site_builds_strictly_links_resolve_and_the_api_is_complete(tmp_path):
    site = tmp_path / "site"
    _build_site(site)
    assert (site / "index.html").is_file()
    assert len(list(site.rglob("*.html"))) > 20
    assert broken_links(site) == []
    _check_every_public_name_has_an_api_entry(site)
    page = (site / "api" / "predict.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in page and "\\Theta" in page  # math goes to MathJax
    _check_the_site_reads_offline(site)
    _check_api_tables(site)
    index = (site / "index.html").read_text(encoding="utf-8")
    import ntkjax

    assert f"ntkjax {ntkjax.__version__}" in index
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert f'href="{project["urls"]["Repository"]}"' in index


EXTERNAL_SCRIPT = re.compile(
    r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//|<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*"
    r"\brel=[\"']?stylesheet|<link\b[^>]*\brel=[\"']?stylesheet[^>]*\bhref=[\"']?(?:https?:)?//",
    flags=re.I,
)


def external_resources(html: str) -> list[str]:
    """``<script src>`` and stylesheet ``<link href>`` tags of a page that load from another
    host (a CDN): an offline reader would not get them."""
    return [m.group(0) for m in EXTERNAL_SCRIPT.finditer(html)]


def test_external_resource_check_sees_a_cdn():
    assert external_resources(
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
    )
    assert external_resources('<link rel="stylesheet" href="//fonts.example.org/css">')
    assert external_resources('<script src="javascripts/mathjax/tex-mml-chtml.js"></script>'
                              '<a href="https://example.org">a link</a>') == []


def _check_the_site_reads_offline(site: Path) -> None:
    """No page loads a script or stylesheet from another host, and MathJax itself (with its
    fonts) is part of the site (its ``src`` resolving is checked by the link check)."""
    loaded = {str(page.relative_to(site)): found for page in site.rglob("*.html")
              if (found := external_resources(page.read_text(encoding="utf-8")))}
    assert loaded == {}
    mathjax = site / "javascripts" / "mathjax"
    assert (mathjax / "tex-mml-chtml.js").is_file()
    assert list(mathjax.glob("output/chtml/fonts/woff-v2/*.woff"))
    assert 'src="javascripts/mathjax/tex-mml-chtml.js"' in (site / "index.html").read_text(
        encoding="utf-8")


def _object_html(page: str, path: str) -> str:
    """The HTML of one documented object: from its anchor to the next object's."""
    start = page.index(f'id="{path}"')
    end = page.find('<div class="doc doc-object', start)
    return page[start:end if end != -1 else len(page)]


def _check_api_tables(site: Path) -> None:
    """Every Returns table of the API reference has one entry (a multi-line description is one
    entry, not one row per line), and the tables of the blocked kernels list every parameter."""
    rows = re.compile(r'<tr class="doc-section-item">')
    returns = re.compile(r'doc-section-title">Returns:</span>.*?</table>', flags=re.S)
    split = {}
    for page in (site / "api").glob("*.html"):
        for table in returns.findall(page.read_text(encoding="utf-8")):
            if len(rows.findall(table)) != 1:
                split[page.name] = split.get(page.name, 0) + 1
    assert split == {}, f"Returns tables with several rows: {split}"
    kernels = (site / "api" / "kernels.html").read_text(encoding="utf-8")
    empirical = (site / "api" / "empirical.html").read_text(encoding="utf-8")
    import ntkjax

    for page, function in ((kernels, ntkjax.kernel_matrix),
                           (empirical, ntkjax.empirical_ntk_matrix),
                           (empirical, ntkjax.empirical_ntk_fn)):
        html = _object_html(page, f"{function.__module__}.{function.__name__}")
        shown = set(re.findall(r"<td>\s*<code>\**(\w+)</code>\s*</td>", html))  # **kwargs too
        assert set(inspect.signature(function).parameters) <= shown, function.__name__


def _check_every_public_name_has_an_api_entry(site: Path) -> None:
    """Each public name of ``ntkjax``, ``ntkjax.nn`` and ``ntkjax.models`` has an anchor (its
    canonical path) in the API reference."""
    ids: set[str] = set()
    for page in (site / "api").glob("*.html"):
        ids |= _parse(page).ids
    missing = []
    for package in ("ntkjax", "ntkjax.nn", "ntkjax.models"):
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                target = obj.__name__
            elif inspect.isfunction(obj) or inspect.isclass(obj):
                target = f"{obj.__module__}.{obj.__qualname__}"
            else:
                target = f"{package}.{name}"  # an activation: documented where it is defined
                defined = [m for m in ("ntkjax.nn.activations",) if hasattr(
                    importlib.import_module(m), name)]
                target = f"{defined[0]}.{name}" if defined else target
            if target not in ids:
                missing.append(f"{package}.{name} ({target})")
    assert missing == [], (
        "not in the API reference: add `::: <its module>` to a page of docs/api/ (and a new page "
        "to the nav of mkdocs.yml)"
    )


# --------------------------------------------------------------------------- README


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_its_example_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 4096, "the README should stay under 4 KB"
    blocks = _readme_python_blocks()
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    k, ntk = namespace["k"], namespace["ntk"]
    assert k.ntk.shape == (8, 8) and ntk.shape == (8, 8)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert f"\n{command}\n" in readme


def test_readme_links_to_docs_pages_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links, "the README should link to the documentation pages"
    assert [link for link in links if not (ROOT / link).is_file()] == []


# --------------------------------------------------------------------------- guides

# Every ``python`` block of these pages runs, as written: the blocks of one page run top to
# bottom in one namespace, in a fresh temporary working directory. A block that is not meant to
# run (code of another library, one that needs several processes) says so on the line before
# its fence: ``<!-- not run: <why> -->``; keep these rare (the count is bounded below).
EXAMPLE_PAGES = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
              *(ROOT / "docs").glob("guides/**/*.md")]
    if "```python" in p.read_text(encoding="utf-8")
)
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")
MAX_NOT_RUN = 4
BLOCK = re.compile(r"^(?:(<!--.*?-->)\n)?```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """``(code, reason)`` for every ```` ```python ```` block of a page; ``reason`` is the text of
    a ``<!-- not run: reason -->`` line just before the fence, else None."""
    blocks = []
    for match in BLOCK.finditer(text):
        marker = NOT_RUN.fullmatch(match.group(1) or "")
        blocks.append((match.group(2), marker.group(1) if marker else None))
    return blocks


def test_python_blocks_are_found_with_their_opt_outs():
    page = (
        "text\n```python\nx = 1\n```\n\n<!-- not run: needs two processes -->\n"
        "```python\nimport sys\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    )
    assert python_blocks(page) == [
        ("x = 1\n", None), ("import sys\n", "needs two processes"), ("y = x + 1\n", None)
    ]
    assert len(EXAMPLE_PAGES) >= 8 and "README.md" in EXAMPLE_PAGES


def test_opt_outs_are_rare():
    reasons = [
        (page, reason) for page in EXAMPLE_PAGES
        for _, reason in python_blocks((ROOT / page).read_text(encoding="utf-8")) if reason
    ]
    assert len(reasons) <= MAX_NOT_RUN, reasons


@pytest.mark.slow  # a few seconds per page, about a minute in all
@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_page_examples_run_as_written(page, tmp_path, monkeypatch):
    """The page's ``python`` blocks run top to bottom in one namespace, each exactly as shown."""
    blocks = python_blocks((ROOT / page).read_text(encoding="utf-8"))
    assert blocks
    monkeypatch.chdir(tmp_path)  # a block may write files (a store, a figure)
    namespace: dict = {}
    for i, (code, reason) in enumerate(blocks):
        if reason is None:
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)


# --------------------------------------------------------------------------- neural-tangents guide

NT_GUIDE = ROOT / "docs" / "guides" / "coming_from_neural_tangents.md"
NAME = re.compile(r"\bntkjax(?:\.\w+)+")


def _resolves(dotted: str) -> bool:
    """Whether ``ntkjax.a.b.c`` names a module or an attribute that exists."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def nt_guide_problems(text: str) -> list[str]:
    """What makes the neural-tangents guide disagree with the library's public names: a name it
    cites that does not exist; a public function of ``ntkjax``, a name of ``ntkjax.nn`` or a
    model of ``ntkjax.models`` that it never cites (so a new layer cannot be left out, or left
    as "not yet"); an nt name in a "not yet" row whose namesake ``ntkjax.nn`` exports."""
    import flax.linen as flax_nn

    import ntkjax.models
    import ntkjax.nn

    cited = set(NAME.findall(text))
    problems = [f"cites {name}, which does not exist" for name in sorted(cited)
                if not _resolves(name)]
    wanted = [f"ntkjax.{n}" for n in ntkjax.__all__ if inspect.isfunction(getattr(ntkjax, n))]
    wanted += [f"ntkjax.nn.{n}" for n in ntkjax.nn.__all__]
    wanted += [f"ntkjax.models.{n}" for n in ntkjax.models.__all__
               if inspect.isclass(obj := getattr(ntkjax.models, n))
               and issubclass(obj, flax_nn.Module)]
    problems += [f"never cites {name}" for name in wanted if name not in cited]
    ours = {_squash(n): n for n in [*ntkjax.nn.__all__, *ntkjax.models.__all__]}
    for row in text.splitlines():
        cells = row.split("|")
        if row.startswith("|") and len(cells) > 2 and "not yet" in cells[2]:
            for nt_name in re.findall(r"\b([A-Z]\w*)", cells[1]):
                if _squash(nt_name) in ours:
                    problems.append(f"{nt_name} is marked 'not yet' but ntkjax.nn has "
                                    f"{ours[_squash(nt_name)]}")
    return problems


def test_nt_guide_check_sees_stale_rows():
    stale = (
        "| `LayerNorm`, `Dropout` | not yet |\n"
        "| `Relu()` | `ntkjax.nn.relu` and `ntkjax.nn.no_such_layer` |\n"
    )
    problems = nt_guide_problems(stale)
    assert "cites ntkjax.nn.no_such_layer, which does not exist" in problems
    assert "LayerNorm is marked 'not yet' but ntkjax.nn has LayerNorm" in problems
    assert "never cites ntkjax.nn.avg_pool" in problems
    assert "never cites ntkjax.kernel_fn" in problems
    assert "never cites ntkjax.nn.relu" not in problems


def test_nt_guide_matches_the_public_names():
    assert nt_guide_problems(NT_GUIDE.read_text(encoding="utf-8")) == []


# --------------------------------------------------------------------------- notebooks


def _code_cells(path: Path) -> list[str]:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_stored_notebook_runs_hold_the_current_notebooks():
    """docs/notebooks/ holds one quick-mode run of each notebook of notebooks/ (regenerate with
    ``.venv/bin/python docs/hooks/notebooks.py``), with exactly its code and some output."""
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    stored = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))
    assert [p.name for p in stored] == [p.name for p in sources]
    for source, run in zip(sources, stored, strict=True):
        assert _code_cells(run) == _code_cells(source), (
            f"{run} is a run of an older {source.name}: run docs/hooks/notebooks.py"
        )
    total = sum(p.stat().st_size for p in stored)
    assert total < 400_000, f"the stored runs take {total} bytes"


def test_stored_demo_run_is_small_and_complete():
    """The NTK-study guide includes a committed quick run of ``ntkjax demo``: its report and
    every figure the report shows, together under 200 KB."""
    folder = ROOT / "docs" / "guides" / "ntk_study"
    report = (folder / "report.md").read_text(encoding="utf-8")
    shown = re.findall(r"\]\(ntk_study/([^)]+\.png)\)", report)
    assert len(shown) >= 7
    assert all((folder / name).is_file() for name in shown)
    assert sum(p.stat().st_size for p in folder.glob("*.png")) < 200_000
    guide = (ROOT / "docs" / "guides" / "ntk_study.md").read_text(encoding="utf-8")
    assert '--8<-- "docs/guides/ntk_study/report.md"' in guide


def test_notebook_page_has_code_text_and_figures():
    nbformat = pytest.importorskip("nbformat")
    hook = _load(HOOKS / "notebooks.py")
    notebook = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print('hi')")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="hi\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}),
    ]
    notebook.cells = [nbformat.v4.new_markdown_cell("# Title\n$x^2$"), code]
    page = hook.notebook_markdown(notebook, "demo.ipynb")
    assert "# Title\n$x^2$" in page
    assert "```python\nprint('hi')\n```" in page
    assert "```text\nhi\n```" in page
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in page


# --------------------------------------------------------------------------- docstring rewrites


def test_docstring_rewrites_for_the_site():
    griffe = pytest.importorskip("griffe")
    roles = _load(HOOKS / "griffe_roles.py")
    text = (
        "Uses :func:`kernel_fn` and :class:`~ntkjax.Kernel`, not :func:`jax.jit`.\n\n"
        "Args:\n  x1, x2: inputs\n    of one shape.\n  y: targets.\n\n"
        ">>> 1 + 1\n2\n\n"
        "===  ===\nact  q\n===  ===\nerf  1\n===  ===\n"
    )
    loader = griffe.GriffeLoader()
    package = loader.load("ntkjax")
    function = package["kernels"]["kernel_matrix"]
    out = roles.SphinxRoles()._rewrite(function, loader, text)
    assert "[`kernel_fn`][ntkjax.kernels.kernel_fn]" in out
    assert ("[`Kernel`][ntkjax.kernels.Kernel]" in out
            or "[`Kernel`][ntkjax._kernel.Kernel]" in out)  # Kernel lives in ntkjax._kernel
    assert "`jax.jit`" in out and "[`jax.jit`]" not in out
    assert "  x1: inputs\n    of one shape.\n  x2: inputs\n    of one shape.\n  y: targets." in out
    assert "```pycon\n>>> 1 + 1\n2\n```" in out
    assert "```text\n===  ===\nact  q\n===  ===\nerf  1\n===  ===\n```" in out
