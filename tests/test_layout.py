"""The execution layer's internal API: no module of ``ntkjax`` reaches into another module's
private names (``from ntkjax.x import _y``, or ``module._y`` on another ntkjax module).
Shared helpers live under public names in private modules (``ntkjax._tiling.pad_rows``)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ntkjax"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_crossings(root: Path, package: str = "ntkjax") -> list[str]:
    """``path:line: module._name`` for every private name one module of ``package`` (under
    ``root``) takes from another: imported by name, or read as an attribute of another module
    (importing a private *module*, such as ``ntkjax._store``, is allowed)."""
    modules = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    found = []
    for name, path in modules.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> ntkjax module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        local = alias.asname or alias.name.split(".")[0]
                        aliases[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base not in modules:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    elif _private(alias.name) and base != name:
                        found.append(f"{path.relative_to(root)}:{node.lineno}: {full}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if (owner in modules and owner != name
                        and f"{owner}.{node.attr}" not in modules):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {owner}.{node.attr}")
    return sorted(found)


def test_the_check_finds_planted_crossings(tmp_path):
    pkg = tmp_path / "ntkjax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    pass\n\ndef public():\n    pass\n")
    (pkg / "_b.py").write_text("def ok():\n    pass\n")
    (pkg / "sub" / "c.py").write_text(
        "from ntkjax.a import _helper, public\n"      # a private name: found
        "from ntkjax import _b\n"                     # a private module: allowed
        "from .. import a as mod\n"
        "import ntkjax.a\n"
        "def f():\n"
        "    from ..a import _helper as h\n"          # relative, lazy: found
        "    return mod._helper, ntkjax.a._helper, _b.ok, mod.__name__, h\n"
    )
    (pkg / "a2.py").write_text("def _own():\n    pass\n\nx = _own\n")  # its own: allowed
    found = private_crossings(tmp_path)
    assert [f.split(": ")[1] for f in found] == [
        "ntkjax.a._helper", "ntkjax.a._helper", "ntkjax.a._helper", "ntkjax.a._helper"]
    assert {int(f.split(":")[1]) for f in found} == {1, 6, 7}


def test_no_module_imports_another_modules_private_names():
    assert len(list(PACKAGE.rglob("*.py"))) > 20
    assert private_crossings(ROOT) == []


def test_row_padding_keeps_rows_and_repeats_the_last_or_appends_zeros():
    from ntkjax._tiling import pad_rows, padded_row_indices, tile_rows

    x = np.arange(6.0).reshape(3, 2)
    edge = pad_rows(x, 5)
    assert isinstance(edge, np.ndarray)  # host arrays stay on the host
    np.testing.assert_array_equal(edge, x[[0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(edge, x[padded_row_indices(0, 3, 5)])
    np.testing.assert_array_equal(pad_rows(x, 4, mode="zeros")[3], [0.0, 0.0])
    tiles = np.asarray(tile_rows(x, 2, mode="zeros"))
    assert tiles.shape == (2, 2, 2)
    np.testing.assert_array_equal(tiles.reshape(4, 2)[:3], x)
    np.testing.assert_array_equal(tiles[1, 1], [0.0, 0.0])
