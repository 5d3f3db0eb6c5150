"""A report that is written after every finished section: Markdown for people, JSON for programs.

``report.md`` holds each section's text, its figures and a table of its numbers; ``results.json``
holds the same numbers (every number the Markdown shows) plus any longer series (loss curves,
predictions) a section keeps under ``data``. Both files are rewritten atomically after each
:meth:`Report.add_section`, so a long run that is interrupted keeps every finished section.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Report", "flatten_numbers", "format_number", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """numpy/JAX scalars and arrays -> Python numbers and lists; non-finite floats -> strings.

    JSON has no NaN or Infinity, so they are stored as the strings ``"nan"``, ``"inf"`` and
    ``"-inf"`` (a diverged loss stays visible instead of turning into ``null``).
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy or JAX array
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, Sequence):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in the JSON report: {value!r}")


def format_number(value: Any) -> str:
    """Numbers with four significant digits, but every digit before the decimal point (and one
    after) from 1,000 on, so that 12,950.3 and 12,980.1 never round to the same text; booleans as
    yes/no, lists comma-separated."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        if abs(value) >= 1e9:
            return f"{value:.6e}"
        if abs(value) >= 1e3:
            return f"{value:.1f}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return "[" + ", ".join(format_number(v) for v in np.asarray(value, dtype=object).ravel()) \
            + "]"
    if value is None:
        return "-"
    return str(value)


def flatten_numbers(numbers: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> ``[(dotted.key, value), ...]`` in insertion order."""
    rows: list[tuple[str, Any]] = []
    for key, value in numbers.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten_numbers(value, prefix=name + "."))
        else:
            rows.append((name, value))
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Report:
    """Collects sections and rewrites ``report.md`` and ``results.json`` after each one.

    Args:
      out_dir: folder for the two files (created if missing); figures are referenced relative to
        it.
      title: the report's heading.
      intro: Markdown paragraph(s) under the heading.
      meta: run settings stored under ``"meta"`` in the JSON and listed in the Markdown.
    """

    def __init__(self, out_dir: str | Path, *, title: str, intro: str = "",
                 meta: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.intro = intro
        self.meta = dict(meta or {})
        self.sections: dict[str, dict[str, Any]] = {}
        self._start = time.perf_counter()
        self.markdown_path = self.out_dir / "report.md"
        self.json_path = self.out_dir / "results.json"

    def add_section(
        self,
        key: str,
        *,
        title: str,
        text: str,
        numbers: Mapping[str, Any],
        figures: Sequence[str | Path] = (),
        data: Mapping[str, Any] | None = None,
        seconds: float | None = None,
    ) -> None:
        """Adds (or replaces) one section and rewrites both files.

        ``numbers`` appear in the Markdown table and the JSON; ``data`` (long series) only in the
        JSON. Figure paths are stored relative to ``out_dir``.
        """
        figures = [self._relative(f) for f in figures]
        self.sections[key] = {
            "title": title,
            "text": text,
            "numbers": to_jsonable(numbers),
            "figures": figures,
            "data": to_jsonable(data or {}),
            "seconds": None if seconds is None else round(float(seconds), 3),
        }
        self.write()

    def _relative(self, path: str | Path) -> str:
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.out_dir.resolve()))
        except ValueError:
            return str(path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "meta": to_jsonable(self.meta),
            "total_seconds": round(time.perf_counter() - self._start, 3),
            "sections": self.sections,
        }

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        if self.intro:
            lines += [self.intro.strip(), ""]
        if self.meta:
            lines += ["Run settings: " + ", ".join(
                f"{k} = {format_number(v)}" for k, v in flatten_numbers(self.meta)), ""]
        for section in self.sections.values():
            lines += [f"## {section['title']}", "", section["text"].strip(), ""]
            for figure in section["figures"]:
                lines += [f"![{Path(figure).stem}]({figure})", ""]
            rows = flatten_numbers(section["numbers"])
            if rows:
                lines += ["| quantity | value |", "|---|---|"]
                lines += [f"| `{name}` | {format_number(value)} |" for name, value in rows]
                lines.append("")
            if section["seconds"] is not None:
                lines += [f"*Section time: {section['seconds']:.1f} s.*", ""]
        return "\n".join(lines)

    def write(self) -> None:
        """Rewrites ``report.md`` and ``results.json`` (atomically)."""
        _write_atomic(self.json_path, json.dumps(self.as_dict(), indent=1, allow_nan=False))
        _write_atomic(self.markdown_path, self.markdown())
