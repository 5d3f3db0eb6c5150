"""Griffe extension: ntkjax's docstrings are written for ``help()`` and for this site alike.

Three rewrites, made on the loaded docstrings (the sources are untouched):

* Sphinx roles (``:func:`kernel_fn```) become cross-references;
* doctest examples (``>>>`` lines and their expected output) become ``pycon`` code blocks;
* an ``Args:`` entry naming several parameters (``x1, x2: ...``) becomes one entry each;
* a reStructuredText simple table (rows between ``====  ====`` borders) becomes a text block;
* a module attribute without a docstring of its own whose object carries one (an activation
  built with ``Activation(..., doc=...)``) gets that docstring.

A role naming an ntkjax object becomes an autorefs link, resolved like Sphinx does (the current
class, the current module, its package, then ``ntkjax`` and ``ntkjax.nn``); a target that names
no ntkjax object but starts with ``ntkjax`` stays a link, so that ``mkdocs build --strict`` fails
on it (a broken cross-reference). Roles naming other libraries (``:func:`jax.jit```) become inline
code. A reStructuredText ``::`` that opens a literal block becomes ``:``.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|mod|data|meth|attr|obj|exc|const):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::\n")
SHARED_ENTRY = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):(\s.*)?$")
TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Parameters):\s*$")


def _candidates(obj: griffe.Object, target: str) -> list[str]:
    if target.startswith("ntkjax"):
        return [target]
    scopes = []
    node: Any = obj
    while node is not None:
        if node.kind in (griffe.Kind.CLASS, griffe.Kind.MODULE):
            scopes.append(node.path)
        node = node.parent
    scopes += ["ntkjax", "ntkjax.nn"]
    return [f"{scope}.{target}" for scope in scopes]


def _resolve(loader: griffe.GriffeLoader, obj: griffe.Object, target: str) -> str | None:
    for path in _candidates(obj, target):
        try:
            found = loader.modules_collection.get_member(path)
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        try:
            return found.canonical_path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path
    return None


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        self._walk(pkg, loader, set())

    def _walk(self, obj: Any, loader: griffe.GriffeLoader, seen: set[str]) -> None:
        if obj.is_alias or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.is_attribute and obj.docstring is None and obj.parent.is_module:
            doc = _runtime_docstring(obj.parent.path, obj.name)
            if doc:
                obj.docstring = griffe.Docstring(doc, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj, loader, obj.docstring.value)
        for member in obj.members.values():
            self._walk(member, loader, seen)

    def _rewrite(self, obj: griffe.Object, loader: griffe.GriffeLoader, text: str) -> str:
        def link(match: re.Match[str]) -> str:
            short, target = match.group(1), match.group(2).strip()
            target = target.removesuffix("()").lstrip(".")
            shown = target.rsplit(".", 1)[-1] if short else target
            resolved = _resolve(loader, obj, target)
            if resolved is None and not target.startswith("ntkjax"):
                return f"`{shown}`"
            return f"[`{shown}`][{resolved or target}]"

        text = LITERAL_BLOCK.sub(":\n", ROLE.sub(link, text))
        return _split_shared_entries(_fence_tables(_fence_examples(text)))


def _runtime_docstring(module: str, name: str) -> str | None:
    """The docstring an object carries at run time when it is its own (not its type's)."""
    try:
        value = getattr(importlib.import_module(module), name)
    except Exception:  # a module that cannot be imported here: no docstring to add
        return None
    doc = getattr(value, "__doc__", None)
    return doc if isinstance(doc, str) and doc != type(value).__doc__ else None


def _fence_tables(text: str) -> str:
    """Puts each reStructuredText simple table, first border to last, in a ``text`` fence."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        end = i + 1
        last_border = i
        while end < len(lines) and lines[end].strip():
            if TABLE_BORDER.match(lines[end]):
                last_border = end
            end += 1
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        out += [f"{indent}```text", *lines[i:last_border + 1], f"{indent}```"]
        i = last_border + 1
    return "\n".join(out)


def _fence_examples(text: str) -> str:
    """Wraps each run of doctest lines (``>>>``/``...`` and the output up to a blank line) in a
    ``pycon`` fence at the run's indentation."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
    return "\n".join(out)


def _split_shared_entries(text: str) -> str:
    """``x1, x2: desc`` inside an Args/Attributes section -> ``x1: desc`` and ``x2: desc``."""
    out: list[str] = []
    lines = text.split("\n")
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = SECTION.match(line)
        indent = len(line) - len(line.lstrip())
        if header:
            section_indent = len(header.group(1))
        elif line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        entry = SHARED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        body = [entry.group(3) or ""]
        i += 1
        while i < len(lines) and lines[i].strip() and (
            len(lines[i]) - len(lines[i].lstrip()) > len(entry.group(1))
        ):
            body.append("\n" + lines[i])
            i += 1
        for name in re.split(r",\s*", entry.group(2)):
            out.append(f"{entry.group(1)}{name}:{''.join(body)}")
    return "\n".join(out)
