"""The package's layout: no import cycles, the library never imports the application, ``__all__``
lists exactly what is exported, and a fresh clone with nothing beside it passes its reference
tests."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as flax_nn
import pytest

import ntkjax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ntkjax"
APPLICATION = "ntkjax.study"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported_modules(name: str, path: Path) -> set[str]:
    """ntkjax modules that ``name`` imports anywhere in its source (lazy imports inside
    functions included): ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` when
    that is a module, else ``a``; relative imports are resolved against ``name``'s package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imported_modules(name, path) for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first = last), or None; iterative depth-first search."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = _find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ntkjax import sweep\n    from . import tasks\n")
    assert _imported_modules("ntkjax.mod", source) == {"ntkjax.sweep", "ntkjax.tasks"}


def test_no_import_cycles_among_ntkjax_modules():
    assert len(MODULES) > 20
    assert _find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(_find_cycle(GRAPH) or [])}"


def test_the_library_never_imports_the_application():
    offenders = {
        name: sorted(m for m in imported if m == APPLICATION or m.startswith(APPLICATION + "."))
        for name, imported in GRAPH.items()
        if not (name == APPLICATION or name.startswith(APPLICATION + "."))
    }
    assert not {k: v for k, v in offenders.items() if v}


def _exported_names(init: Path) -> set[str]:
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["ntkjax", "ntkjax.nn"])
def test_all_lists_exactly_the_exports(package):
    module = importlib.import_module(package)
    init = Path(module.__file__)
    assert sorted(module.__all__) == sorted(_exported_names(init))
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name).__doc__, f"{package}.{name} has no docstring"


PUBLIC_PACKAGES = ["ntkjax", "ntkjax.nn", "ntkjax.models"]


def _public_callables() -> list[tuple[str, str, object]]:
    found = []
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found.append((package, name, obj))
    return found


def _parameters(obj) -> list[str]:
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


@pytest.mark.parametrize("package,name,obj", _public_callables(),
                         ids=[f"{p}.{n}" for p, n, _ in _public_callables()])
def test_public_docstrings_have_sections_and_an_example(package, name, obj):
    """The API reference is generated from these docstrings, and their examples are doctests:
    every public function documents its arguments (when it has any) and what it returns, and
    every public function and class shows a ``>>>`` example."""
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{package}.{name}: no >>> example in its docstring"
    if inspect.isfunction(obj):
        if _parameters(obj):
            assert "\nArgs:\n" in doc, f"{package}.{name}: no Args: section"
        assert "\nReturns:\n" in doc, f"{package}.{name}: no Returns: section"


def test_the_docstring_check_sees_what_is_missing():
    def documented(x: int) -> int:
        """Doubles.

        Args:
          x: a number.

        Returns:
          2 x.

        >>> documented(1)
        2
        """
        return 2 * x

    def bare(x: int) -> int:
        """Doubles."""
        return 2 * x

    test_public_docstrings_have_sections_and_an_example("t", "documented", documented)
    with pytest.raises(AssertionError, match="no >>> example"):
        test_public_docstrings_have_sections_and_an_example("t", "bare", bare)
    assert len(_public_callables()) > 60


ENTRY_SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Attributes):\s*$")
ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?:(?:\s|$)")


def documented_entries(doc: str) -> set[str]:
    """The names of the entries of a docstring's ``Args:`` / ``Attributes:`` sections, as the
    API tables show them: one per line at the section's item indentation, ``x1, x2: ...``
    naming both (continuation lines, indented deeper, name nothing)."""
    names: set[str] = set()
    lines = doc.split("\n")
    for i, line in enumerate(lines):
        if not ENTRY_SECTION.match(line):
            continue
        item_indent = None
        for item in lines[i + 1:]:
            indent = len(item) - len(item.lstrip())
            if not item.strip() or indent <= len(line) - len(line.lstrip()):
                break
            item_indent = indent if item_indent is None else item_indent
            if indent == item_indent and (entry := ENTRY.match(item.strip())):
                names |= {n.strip().lstrip("*") for n in entry.group(1).split(",")}
    return names


def _undocumented_parameters(obj) -> list[str]:
    if inspect.isclass(obj) and issubclass(obj, flax_nn.Module):
        wanted = [f.name for f in dataclasses.fields(obj) if f.init and f.name not in
                  ("parent", "name")]
    elif inspect.isfunction(obj):
        wanted = _parameters(obj)
    else:
        return []
    entries = documented_entries(inspect.getdoc(obj) or "")
    return [p for p in wanted if p not in entries]


@pytest.mark.parametrize("package,name,obj", _public_callables(),
                         ids=[f"{p}.{n}" for p, n, _ in _public_callables()])
def test_every_parameter_has_an_entry(package, name, obj):
    """Every parameter of a public function (every field of a public flax module) has its own
    ``Args:`` (``Attributes:``) entry, so that it appears in the API reference's tables."""
    assert _undocumented_parameters(obj) == [], f"{package}.{name}: parameters without an entry"


def test_the_parameter_check_sees_what_is_missing():
    def f(x1, x2, devices=None, *, out=None, **options):
        """Sums.

        Args:
          x1, x2: inputs
            of one shape; devices: not an entry, a continuation line.
          **options: passed on.
        """

    assert documented_entries(inspect.getdoc(f) or "") == {"x1", "x2", "options"}
    assert _undocumented_parameters(f) == ["devices", "out"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "ntkjax"))
def test_every_module_all_names_are_documented(name):
    if name.rpartition(".")[2].startswith("_"):
        pytest.skip("private module")
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    for export in getattr(module, "__all__", ()):
        obj = getattr(module, export)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{name}.{export} has no docstring"


def test_py_typed_marker_ships():
    assert (PACKAGE / "py.typed").is_file()
    assert ntkjax.__version__


@pytest.mark.slow
def test_a_fresh_clone_passes_the_reference_tests(tmp_path):
    """``git clone`` of the committed repository into an empty folder, nothing beside it, then
    reference-kernel tests from inside the clone (they read only tests/data): the completeness
    check of the reference set, one fully-connected entry and the convolutional ones (the whole
    file runs in the suite itself)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "alone" / "ntkjax"
    subprocess.run([git, "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)],
                   check=True, capture_output=True, timeout=120)
    assert [p.name for p in clone.parent.iterdir()] == ["ntkjax"]  # nothing beside it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c", "import ntkjax; print(ntkjax.__file__)"], cwd=clone, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(clone.resolve())
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_reference_kernels.py", "-k", "complete or fc0 or convolutional_float64"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def _top_level(path: Path) -> tuple[set[str] | None, dict[str, ast.AST]]:
    """(``__all__`` or None, every top-level name the module defines -> its node)."""
    exported, defined = None, {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = set(ast.literal_eval(node.value))
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "__all__":
            exported = set(ast.literal_eval(node.value)) if node.value else set()
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update({t.id: node for t in targets if isinstance(t, ast.Name)})
    return exported, defined


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items()
                                        if not p.name.startswith("_") or p.name == "__init__.py"))
def test_public_names_are_exported_and_public_functions_typed(name):
    """Every public-looking top-level name is in ``__all__`` (else it is private), and every
    exported function annotates its parameters and return type."""
    exported, defined = _top_level(MODULES[name])
    public = {n for n in defined if not n.startswith("_")}
    if name == "ntkjax" or name == "ntkjax.nn":
        return  # their exports are imports, checked above
    assert exported is not None, f"{name} has no __all__"
    assert public <= exported, f"{name}: public but not in __all__: {sorted(public - exported)}"
    for export in sorted(exported & public):
        node = defined[export]
        if isinstance(node, ast.FunctionDef):
            args = [a for a in [*node.args.args, *node.args.kwonlyargs] if a.arg != "self"]
            untyped = [a.arg for a in args if a.annotation is None]
            assert node.returns is not None and not untyped, f"{name}.{export}: {untyped}"
